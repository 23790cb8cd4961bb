"""The app as a whole: OpenAPI docs, health, and auto-migration of a fresh embedded home."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from api.main import create_app
from api.settings import Settings


def test_openapi_documents_every_route_and_the_upload_forms(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    for path in (
        "/v1/checkpoints",
        "/v1/checkpoints/{checkpoint_id}",
        "/v1/checkpoints/{checkpoint_id}/download",
        "/v1/datasets",
        "/v1/datasets/{dataset_id}",
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/metrics",
        "/v1/jobs/{job_id}/checkpoint",
    ):
        assert path in spec["paths"], path
    form = spec["paths"]["/v1/datasets"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(form["properties"]) == {"file", "uri", "name", "num_classes"}
    assert "TrainSettings" in spec["components"]["schemas"]
    assert client.get("/healthz").json() == {"status": "ok"}


def test_a_fresh_home_is_migrated_at_startup(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "fresh")  # embedded SQLite, auto_migrate on by default
    with TestClient(create_app(settings)) as client:
        assert client.get("/v1/jobs").json() == []
        assert client.get("/v1/datasets").json() == []
    assert (tmp_path / "fresh" / "peltune.db").is_file()
