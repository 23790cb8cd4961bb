"""Settings: embedded defaults derive from PELTUNE_HOME; every part can be overridden from the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.settings import Settings, get_settings


def test_embedded_defaults_derive_from_home(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "h")
    home = (tmp_path / "h").resolve()
    assert settings.home == home
    assert settings.database_url == f"sqlite:///{home}/peltune.db"
    assert settings.broker_url == "filesystem://"
    assert settings.storage_url == (home / "objects").as_uri()
    assert settings.work_dir == home / "work"
    assert settings.task_queue == "peltune"


def test_filesystem_broker_folders_are_shared_and_created_on_demand(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    options = settings.broker_transport_options()
    assert options["data_folder_in"] == options["data_folder_out"]  # the API writes where the worker reads
    assert options["data_folder_in"].startswith(str(tmp_path.resolve() / "broker"))
    assert not Path(options["data_folder_in"]).exists()  # reading settings has no side effects
    settings.ensure_broker_folders()
    for key in ("data_folder_in", "control_folder", "processed_folder"):
        assert Path(options[key]).is_dir()
    assert options["visibility_timeout"] > Settings(home=tmp_path).job_timeout_s


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PELTUNE_HOME", str(tmp_path))
    monkeypatch.setenv("PELTUNE_DATABASE_URL", "postgresql+psycopg://u@db/peltune")
    monkeypatch.setenv("PELTUNE_BROKER_URL", "redis://redis:6379/0")
    monkeypatch.setenv("PELTUNE_STORAGE_URL", "s3://bucket/prefix")
    monkeypatch.setenv("PELTUNE_S3_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("PELTUNE_MAX_UPLOAD_BYTES", "1234")
    monkeypatch.setenv("PELTUNE_TASK_QUEUE", "gpu-jobs")
    get_settings.cache_clear()
    try:
        settings = get_settings()
        assert get_settings() is settings  # one cached instance per process
    finally:
        get_settings.cache_clear()
    assert settings.database_url == "postgresql+psycopg://u@db/peltune"
    assert settings.broker_url == "redis://redis:6379/0"
    assert settings.storage_url == "s3://bucket/prefix"
    assert settings.s3_endpoint_url == "http://minio:9000"
    assert settings.max_upload_bytes == 1234
    assert settings.task_queue == "gpu-jobs"
    assert settings.work_dir == tmp_path.resolve() / "work"
    # Redis needs no folders; only the visibility timeout travels.
    assert set(settings.broker_transport_options()) == {"visibility_timeout"}


@pytest.mark.parametrize("bad", [{"max_upload_bytes": 0}, {"task_queue": "a/b"}, {"job_timeout_s": -1}])
def test_invalid_values_fail_loudly(bad: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Settings(home=tmp_path, **bad)
