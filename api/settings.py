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

from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

FILESYSTEM_BROKER = "filesystem://"


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
    # The longest a training subprocess may run before the worker kills it; the broker's visibility timeout is
    # derived from it so Redis never redelivers a job that is still legitimately running.
    job_timeout_s: float = Field(24 * 3600.0, gt=0)
    # How often the worker copies metrics.jsonl into SQL and refreshes the job's heartbeat.
    poll_interval_s: float = Field(1.0, gt=0)
    # A running job whose heartbeat is older than this has lost its worker (killed, host gone): it is failed
    # rather than re-run, because its training processes may still be alive somewhere.
    heartbeat_timeout_s: float = Field(300.0, gt=0)
    # Keep a succeeded job's work folder (staged inputs, outputs, log); failed ones are always kept for debugging.
    keep_work_dirs: bool = False
    # Run `alembic upgrade head` when the API starts (safe with several API processes: migrations take a
    # PostgreSQL advisory lock). Turn off where migrations are a separate release step.
    auto_migrate: bool = True

    @model_validator(mode="after")
    def _derive_defaults(self) -> Settings:
        self.home = self.home.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.home}/peltune.db"
        if not self.broker_url:
            self.broker_url = FILESYSTEM_BROKER
        if not self.storage_url:
            self.storage_url = (self.home / "objects").as_uri()
        self.work_dir = (self.work_dir or self.home / "work").expanduser().resolve()
        return self

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
