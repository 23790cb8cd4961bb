"""Migrations: `alembic upgrade head` builds exactly the schema the models describe, on SQLite and PostgreSQL."""

from __future__ import annotations

import subprocess
import sys

from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect

from api.db.models import Base
from tests.services import REPO_ROOT


def test_one_head() -> None:
    script = ScriptDirectory.from_config(Config(str(REPO_ROOT / "alembic.ini")))
    assert len(script.get_heads()) == 1


def test_upgrade_head_builds_the_model_schema(database_url: str) -> None:
    # database_url was migrated by the fixture with the real `alembic upgrade head` subprocess.
    engine = create_engine(database_url)
    try:
        inspector = inspect(engine)
        tables = set(inspector.get_table_names())
        assert set(Base.metadata.tables) <= tables
        assert "alembic_version" in tables
        checks = {c["name"] for c in inspector.get_check_constraints("jobs")}
        assert {"ck_jobs_job_kind", "ck_jobs_job_status"} <= checks
        foreign = {fk["name"] for fk in inspector.get_foreign_keys("jobs")}
        assert "fk_jobs_dataset_id_datasets" in foreign
    finally:
        engine.dispose()


def test_models_and_migrations_agree(database_url: str) -> None:
    # `alembic check` autogenerates against the migrated database and fails on any difference.
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(REPO_ROOT / "alembic.ini"), "check"],
        cwd=REPO_ROOT,
        env={"PELTUNE_DATABASE_URL": database_url, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No new upgrade operations detected" in result.stdout + result.stderr
