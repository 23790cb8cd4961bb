"""Programmatic ``alembic upgrade head`` (the API's auto-migration; the CLI runs the alembic command itself)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["database_url"] = database_url  # not via set_main_option: '%' in passwords breaks it
    config.attributes["configure_logging"] = False  # keep the host application's logging as it is
    return config


def upgrade_head(database_url: str) -> None:
    command.upgrade(alembic_config(database_url), "head")
