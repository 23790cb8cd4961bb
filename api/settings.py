"""Service settings, read once from the environment (prefix ``PELTUNE_``).

Everything has an embedded default derived from ``PELTUNE_HOME`` (default ``./.peltune``, made absolute so the
API and the worker agree even when started from different folders):

=====================  ==========================================  ==============================================
setting                embedded default                            production override (example)
=====================  ==========================================  ==============================================
database_url           ``sqlite:///{home}/peltune.db``              ``postgresql+psycopg://user@db/peltune``
broker_url             ``filesystem://`` (folders {home}/broker)    ``redis://redis:6379/0``
storage_url            ``file://{home}/objects``                    ``s3://bucket/prefix`` (+ PELTUNE_S3_ENDPOINT_URL)
work_dir               ``{home}/work``                              a fast local disk on the worker host
=====================  ==========================================  ==============================================

S3 credentials and region come from the standard ``AWS_*`` environment (boto3's own chain); only the endpoint
(MinIO, moto) is ours to configure.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

FILESYSTEM_BROKER = "filesystem://"
# In development, the generated admin key and default-tenant key (api/auth.py), read by the client and CLI.
LOCAL_KEYS_FILE = "local-keys.json"
SECRET_FILE_SETTINGS = ("admin_key", "database_url", "broker_url")
# Secrets that ship in examples and compose files; refused in production (compared case-insensitively, -/_ ignored).
PLACEHOLDER_SECRETS = frozenset(
    {"", "changeme", "change", "replaceme", "minioadmin", "password", "passw0rd", "secret", "admin", "postgres",
     "root", "test", "example", "default", "peltune"}
)  # fmt: skip
MIN_ADMIN_KEY_CHARS = 32


def is_placeholder(secret: str) -> bool:
    return secret.lower().replace("-", "").replace("_", "") in PLACEHOLDER_SECRETS


FIX_SECRET = "set a random value (python -c 'import secrets; print(secrets.token_urlsafe(32))') or mount it as a file"


def refuse_weak_admin_key(admin_key: str) -> None:
    if is_placeholder(admin_key) or len(admin_key) < MIN_ADMIN_KEY_CHARS:
        raise ValueError(
            f"PELTUNE_ADMIN_KEY (or PELTUNE_ADMIN_KEY_FILE) is missing, a placeholder or shorter than "
            f"{MIN_ADMIN_KEY_CHARS} characters, which PELTUNE_ENV=production refuses: {FIX_SECRET}"
        )


def refuse_placeholder_secrets(settings: Settings) -> None:
    """Production must not start with a secret anyone can guess: name the first offending setting. Every process
    checks these; the admin key, which only the API needs (workers run without it), is required by the API's
    startup (api.auth.admin_key_at_startup) and checked here whenever it is set."""
    if settings.admin_key:
        refuse_weak_admin_key(settings.admin_key)
    for name in ("database_url", "broker_url"):
        password = urlparse(getattr(settings, name)).password
        if password is not None and is_placeholder(password):
            raise ValueError(
                f"PELTUNE_{name.upper()} carries a placeholder password ({password!r}), which PELTUNE_ENV=production "
                f"refuses: {FIX_SECRET} (PELTUNE_{name.upper()}_FILE)"
            )
    aws_secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    if aws_secret is not None and is_placeholder(aws_secret):
        raise ValueError(
            f"AWS_SECRET_ACCESS_KEY is a placeholder ({aws_secret!r}), which PELTUNE_ENV=production refuses: "
            f"{FIX_SECRET} (or AWS_SHARED_CREDENTIALS_FILE)"
        )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PELTUNE_", extra="ignore")

    home: Path = Path(".peltune")
    database_url: str = ""
    broker_url: str = ""
    storage_url: str = ""
    s3_endpoint_url: str | None = None
    work_dir: Path | None = None

    task_queue: str = Field("peltune", min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    max_upload_bytes: int = Field(4 * 1024**3, gt=0)
    # Every other request body (JSON, url-encoded forms): larger is 413 before it is read into memory (api/guard.py).
    max_json_bytes: int = Field(1024**2, gt=0)
    # A dataset archive may expand to at most this many bytes and members (zip/tar bombs are refused before any
    # member is written past the cap; only the images/, masks/ and splits.json the dataset uses are written). The
    # bytes land in the API's scratch space at every registration and in the worker's work folder for every job,
    # so the cap is sized to real use, not to the disk: BBBC039 (200 images) unpacks to ~0.2 GB, and 8 GiB is 40×
    # that while a bomb can no longer fill a typical scratch volume. Raise it for larger datasets.
    max_archive_bytes: int = Field(8 * 1024**3, gt=0)
    max_archive_members: int = Field(200_000, gt=0)
    # Largest image (or mask) in pixels, height × width, read from the file header before any pixel is decoded:
    # a decompression bomb (a 1 MB zip of blank 13000×13000 16-bit PNGs, under Pillow's own 178M-pixel limit) cost
    # the API 2.5 GB of memory to verify. 8000×8000 is far above a microscopy field (BBBC039: 520×696).
    max_image_pixels: int = Field(8000 * 8000, gt=0)
    # PostgreSQL: fail fast when the server is unreachable (the API answers 503 instead of hanging); pre-ping
    # makes a restarted server usable again without restarting the API or the worker.
    db_connect_timeout_s: int = Field(5, ge=1)
    db_pool_timeout_s: float = Field(10.0, gt=0)
    # S3: botocore retries errors, throttling and timeouts with exponential backoff ("standard" or "adaptive"
    # mode); files above the threshold go up and down as multipart transfers of this part size, streamed from disk.
    s3_retry_mode: Literal["standard", "adaptive"] = "standard"
    s3_max_attempts: int = Field(5, ge=1, le=20)
    s3_connect_timeout_s: float = Field(5.0, gt=0)
    s3_read_timeout_s: float = Field(60.0, gt=0)
    s3_multipart_threshold_bytes: int = Field(64 * 1024**2, ge=5 * 1024**2)
    s3_multipart_chunk_bytes: int = Field(64 * 1024**2, ge=5 * 1024**2)
    # The longest a training subprocess may run before the worker kills it; the broker's visibility timeout is
    # derived from it so Redis never redelivers a job that is still legitimately running.
    job_timeout_s: float = Field(24 * 3600.0, gt=0)
    # How often the worker copies metrics.jsonl into SQL and refreshes the job's heartbeat.
    poll_interval_s: float = Field(1.0, gt=0)
    # A running job whose heartbeat is older than this has lost its worker (killed, host gone): it goes back to the
    # queue (attempts permitting) and resumes from its last snapshot. Its ranks died with their worker (the
    # launcher's parent-death signal), so the retry never runs beside a leftover of the lost attempt.
    heartbeat_timeout_s: float = Field(300.0, gt=0)
    # Attempts a job gets in all: a retry follows a lost worker or a rank killed by a signal, never an error the
    # training reported itself (that would only fail again). Counted in SQL (jobs.attempt).
    max_attempts: int = Field(3, ge=1, le=100)
    # A job still queued this long after its message was sent gets the message again (the broker may have lost it:
    # Redis restarted or flushed). A duplicate is harmless: the first delivery claims the row, the others exit.
    requeue_after_s: float = Field(900.0, gt=0)
    # How long a worker keeps retrying (with backoff) the database writes of a job it runs before giving up.
    db_retry_s: float = Field(3600.0, gt=0)
    # Keep a succeeded job's work folder (staged inputs, outputs, log); failed and cancelled ones are kept for
    # debugging this long after they finished, then the worker's periodic reaper removes them (else they pile up).
    keep_work_dirs: bool = False
    keep_failed_work_dirs_s: float = Field(7 * 24 * 3600.0, ge=0)
    # Run `alembic upgrade head` when the API starts (safe with several API processes: migrations take a
    # PostgreSQL advisory lock). Turn off where migrations are a separate release step.
    auto_migrate: bool = True
    # Operations (api/logs.py, api/observability.py): one JSON object per log line for log shippers, or plain
    # text for a terminal; /readyz gives each dependency (database, broker, object store) this long to answer.
    log_format: Literal["json", "text"] = "json"
    log_level: str = Field("INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)$")
    readiness_timeout_s: float = Field(2.0, gt=0)
    # The S3 endpoint as clients outside the service network reach it (docker compose: http://127.0.0.1:9000, not
    # http://minio:9000): presigned download links are signed for this host (api/links.py). Default: s3_endpoint_url.
    s3_public_endpoint_url: str | None = None
    download_link_expiry_s: int = Field(3600, gt=0, le=7 * 24 * 3600)
    # Security (api/auth.py; docs/design.md "Security"). "development" is the embedded mode on one's own machine:
    # the API generates an admin key and a key for the default tenant on first start ({home}/local-keys.json, mode
    # 0600), and file:// registrations may read any path. "production" refuses to start with a missing, short or
    # placeholder secret, and reads file:// URIs only under file_uri_roots.
    env: Literal["development", "production"] = "development"
    # Secrets come from the environment or from mounted files (Docker/Kubernetes secrets): PELTUNE_X or
    # PELTUNE_X_FILE, not both. The database and broker URLs are secrets because they may carry a password.
    admin_key: str = ""
    admin_key_file: Path | None = None
    database_url_file: Path | None = None
    broker_url_file: Path | None = None
    # Comma-separated browser origins allowed to call the API (CORS); empty: no CORS headers at all.
    cors_origins: str = ""
    # Comma-separated folders under which file:// URIs may be registered (a file:// registration makes the server
    # read its own disk). Empty: anywhere in development, nowhere in production.
    file_uri_roots: str = ""
    # Job submissions per minute a new tenant may make (token bucket; the admin sets it per tenant).
    submissions_per_minute: int = Field(60, ge=1, le=100_000)

    @model_validator(mode="after")
    def _derive_defaults(self) -> Settings:
        for name in SECRET_FILE_SETTINGS:
            self._read_secret_file(name)
        self.home = self.home.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.home}/peltune.db"
        if not self.broker_url:
            self.broker_url = FILESYSTEM_BROKER
        if not self.storage_url:
            self.storage_url = (self.home / "objects").as_uri()
        self.work_dir = (self.work_dir or self.home / "work").expanduser().resolve()
        if self.env == "production":
            refuse_placeholder_secrets(self)
        return self

    def _read_secret_file(self, name: str) -> None:
        path: Path | None = getattr(self, f"{name}_file")
        if path is None:
            return
        setting = f"PELTUNE_{name.upper()}"
        if getattr(self, name):
            raise ValueError(f"{setting} and {setting}_FILE are both set: give the secret one way")
        try:
            setattr(self, name, path.read_text().strip())
        except OSError as exc:
            raise ValueError(f"{setting}_FILE: cannot read {path}: {exc.strerror or exc}") from None

    @property
    def cors_origin_list(self) -> list[str]:
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]

    @property
    def file_uri_root_list(self) -> list[Path]:
        return [Path(root.strip()).resolve() for root in self.file_uri_roots.split(",") if root.strip()]

    @property
    def local_keys_file(self) -> Path:
        return self.home / LOCAL_KEYS_FILE

    @property
    def visibility_timeout_s(self) -> int:
        return int(self.job_timeout_s + 3600)

    @property
    def broker_dir(self) -> Path:
        return self.home / "broker"

    def scratch_dir(self, *parts: str) -> Path:
        """A folder under ``home/tmp`` for request-scoped scratch files (uploads, unpacked archives); created here."""
        path = self.home.joinpath("tmp", *parts)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def broker_transport_options(self) -> dict[str, Any]:
        """kombu transport options shared by the producer (API) and the consumer (worker)."""
        options: dict[str, Any] = {"visibility_timeout": self.visibility_timeout_s}
        if self.broker_url.startswith(FILESYSTEM_BROKER):
            # One folder for both directions: the API writes messages where the worker reads them.
            options.update(
                data_folder_in=str(self.broker_dir / "queue"),
                data_folder_out=str(self.broker_dir / "queue"),
                control_folder=str(self.broker_dir / "control"),
                processed_folder=str(self.broker_dir / "processed"),
                store_processed=False,
            )
        return options

    def ensure_broker_folders(self) -> None:
        """Create the filesystem broker's folders (kombu expects them to exist); a no-op for other brokers."""
        options = self.broker_transport_options()
        for key in ("data_folder_in", "data_folder_out", "control_folder", "processed_folder"):
            if key in options:
                Path(options[key]).mkdir(parents=True, exist_ok=True)


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings; tests build their own ``Settings(...)`` or call ``get_settings.cache_clear()``."""
    return Settings()
