"""Deployment tests: the entry-point script the images run, and a database it migrated."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.services import DUMMY_AWS, moto_s3_server

ENTRYPOINT = REPO_ROOT / "deploy" / "entrypoint.sh"


def entrypoint_env(home: Path, **overrides: str) -> dict[str, str]:
    """The environment a container gets: PELTUNE_* settings, and this venv's python first on PATH (the image's
    python is the one on its PATH too)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PELTUNE_", "UVICORN_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PELTUNE_HOME"] = str(home)
    env.update(overrides)
    return env


def run_entrypoint(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ENTRYPOINT), *args], cwd="/", env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def migrated_sqlite(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A SQLite database migrated by `deploy/entrypoint.sh migrate`, as the compose/k8s migration step does."""
    home = tmp_path_factory.mktemp("migrated")
    url = f"sqlite:///{home}/peltune.db"
    result = run_entrypoint("migrate", env=entrypoint_env(home, PELTUNE_DATABASE_URL=url))
    assert result.returncode == 0, f"entrypoint.sh migrate failed:\n{result.stdout}\n{result.stderr}"
    return url


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server (the test bucket created); dummy AWS credentials in the environment while it runs."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in DUMMY_AWS.items():
            patch.setenv(key, value)
        with moto_s3_server(tmp_path_factory.mktemp("moto") / "moto.log") as endpoint:
            yield endpoint
