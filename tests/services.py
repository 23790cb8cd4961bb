"""Real backing services for the tests: PostgreSQL databases, a moto S3 server, Redis, and child processes.

Each helper starts or creates what it needs, waits until it answers, and removes it afterwards. A service that
is not reachable makes its tests skip with the reason (set PELTUNE_REQUIRE_SERVICES=1 to make that a failure,
as CI does).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PG_HOST = os.environ.get("PELTUNE_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("PELTUNE_TEST_PG_PORT", "5432"))
PG_MAINTENANCE_DB = os.environ.get("PELTUNE_TEST_PG_DB", "test")
REDIS_URL = os.environ.get("PELTUNE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
S3_BUCKET = "peltune-test"
DUMMY_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def unavailable(what: str) -> None:
    """Skip (or fail, under PELTUNE_REQUIRE_SERVICES=1) a test whose service is missing."""
    if os.environ.get("PELTUNE_REQUIRE_SERVICES") == "1":
        pytest.fail(f"required service unavailable: {what}")
    pytest.skip(f"service unavailable: {what}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(interval)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s")


# -- processes ------------------------------------------------------------------------------------------------------


class Process:
    """A child process in its own process group, output to a log file; stop() kills the whole group."""

    def __init__(self, name: str, argv: list[str], *, env: Mapping[str, str], log_path: Path, cwd: Path = REPO_ROOT):
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            self.popen = subprocess.Popen(
                argv, cwd=cwd, env=dict(env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self, tail: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:] if self.log_path.exists() else ""

    def check(self) -> None:
        if not self.alive():
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.log()}")

    def stop(self, grace: float = 10.0) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=grace)
        # The leader may be gone while members of its group (e.g. a warm-shutdown child) remain.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)


@contextlib.contextmanager
def running(name: str, argv: list[str], *, env: Mapping[str, str], log_path: Path) -> Iterator[Process]:
    process = Process(name, argv, env=env, log_path=log_path)
    try:
        yield process
    finally:
        process.stop()


# -- PostgreSQL -----------------------------------------------------------------------------------------------------


def _pg_connect(user: str, dbname: str):  # noqa: ANN202 - psycopg.Connection
    import psycopg

    return psycopg.connect(host=PG_HOST, port=PG_PORT, user=user, dbname=dbname, autocommit=True, connect_timeout=3)


def postgres_user() -> str | None:
    """The first of postgres/root (or PELTUNE_TEST_PG_USER) that can connect, or None."""
    candidates = [os.environ["PELTUNE_TEST_PG_USER"]] if "PELTUNE_TEST_PG_USER" in os.environ else ["postgres", "root"]
    for user in candidates:
        try:
            with _pg_connect(user, PG_MAINTENANCE_DB):
                return user
        except Exception:
            continue
    return None


@contextlib.contextmanager
def fresh_postgres_database(prefix: str = "peltune_test") -> Iterator[str]:
    """Create a uniquely named database, yield its SQLAlchemy URL, drop it afterwards."""
    user = postgres_user()
    if user is None:
        unavailable(f"PostgreSQL at {PG_HOST}:{PG_PORT} (users postgres/root, database {PG_MAINTENANCE_DB!r})")
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with _pg_connect(user, PG_MAINTENANCE_DB) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://{user}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        from api.db.session import dispose_engines

        dispose_engines()
        with _pg_connect(user, PG_MAINTENANCE_DB) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def alembic_upgrade_head(database_url: str, *, env: Mapping[str, str] | None = None) -> None:
    """The real migration command, as an operator runs it (a subprocess reading PELTUNE_DATABASE_URL)."""
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(REPO_ROOT / "alembic.ini"), "upgrade", "head"],
        cwd=REPO_ROOT,
        env={**(env or os.environ), "PELTUNE_DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"alembic upgrade head failed:\n{result.stdout}\n{result.stderr}"


# -- API keys -------------------------------------------------------------------------------------------------------


def local_api_key(home: Path) -> str | None:
    """The default tenant's key an API in development mode generated under ``home`` (None before it started)."""
    from api.auth import read_local_keys
    from api.settings import LOCAL_KEYS_FILE

    keys = read_local_keys(Path(home) / LOCAL_KEYS_FILE)
    return keys.api_key if keys is not None else None


def auth_headers(home: Path) -> dict[str, str]:
    """Headers for an HTTP client of a real API process started with PELTUNE_HOME=home (the e2e stacks)."""
    key = local_api_key(home)
    if key is None:
        raise RuntimeError(f"no local API key under {home}: has the API started in development mode?")
    return {"Authorization": f"Bearer {key}"}


# -- Redis ----------------------------------------------------------------------------------------------------------


def redis_client():  # noqa: ANN201 - redis.Redis
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except Exception:
        unavailable(f"Redis at {REDIS_URL}")
    return client


def forget_redis_queue(client, queue: str) -> None:  # noqa: ANN001 - redis.Redis
    """Delete a test queue and kombu's exchange bindings for it (kombu keeps them in Redis keys)."""
    client.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")


# -- moto S3 server -------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def moto_s3_server(log_path: Path) -> Iterator[str]:
    """A real moto server over HTTP on a free port; yields its endpoint URL, with the test bucket created."""
    import boto3
    import httpx

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with running("moto", argv, env={**os.environ, **DUMMY_AWS}, log_path=log_path) as process:
        wait_until(lambda: httpx.get(f"{endpoint}/moto-api/", timeout=1).status_code < 500, timeout=30, what="moto")
        process.check()
        s3 = boto3.client("s3", endpoint_url=endpoint, **_boto_credentials())
        s3.create_bucket(Bucket=S3_BUCKET)
        yield endpoint


def _boto_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": DUMMY_AWS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": DUMMY_AWS["AWS_SECRET_ACCESS_KEY"],
        "aws_session_token": DUMMY_AWS["AWS_SESSION_TOKEN"],
        "region_name": DUMMY_AWS["AWS_DEFAULT_REGION"],
    }


def s3_client(endpoint: str):  # noqa: ANN201 - a boto3 S3 client
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, **_boto_credentials())
