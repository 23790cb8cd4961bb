"""Security: hashed API keys made with the admin key, tenant isolation (404), s3:// prefixes and file:// roots, the
per-tenant submission limit, secrets (placeholders refused in production, *_FILE mounts), CORS closed by default."""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import select, text, update
from sqlalchemy.engine import make_url

from api.db import crud
from api.db.models import DEFAULT_TENANT_ID, ApiKey, JobKind, Tenant
from api.db.session import session_scope
from api.main import create_app
from api.settings import Settings
from tests.factories import make_archive, make_checkpoint, make_dataset
from tests.services import REPO_ROOT, S3_BUCKET, alembic_upgrade_head, free_port, local_api_key, s3_client

JOB = {"kind": "baseline", "config": {"patch_size": 32, "steps": 2}}


def admin(client: TestClient) -> dict[str, str]:
    return {"Authorization": f"Bearer {client.app.state.admin_key}"}  # type: ignore[attr-defined]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def new_tenant(client: TestClient, **fields: object) -> tuple[dict, str]:
    """A tenant made through the admin API, and a fresh key of it."""
    created = client.post("/v1/tenants", json={"name": f"t-{uuid.uuid4().hex[:8]}", **fields}, headers=admin(client))
    assert created.status_code == 201, created.text
    key = client.post(f"/v1/tenants/{created.json()['id']}/keys", json={"name": "ci"}, headers=admin(client))
    assert key.status_code == 201, key.text
    return created.json(), key.json()["key"]


def upload_dataset(client: TestClient, folder: Path, headers: dict[str, str] | None = None) -> str:
    archive = make_archive(make_dataset(folder, n=3), folder.with_suffix(".zip"))
    with open(archive, "rb") as stream:
        response = client.post("/v1/datasets", files={"file": ("cells.zip", stream)}, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()["id"]


@pytest.fixture
def anonymous(settings: Settings) -> Iterator[TestClient]:
    """A client of the same app configuration that sends no key."""
    with TestClient(create_app(settings)) as test_client:
        del test_client.headers["authorization"]
        yield test_client


def production_settings(base: Settings, **overrides: object) -> Settings:
    return Settings(
        env="production",
        admin_key=secrets.token_urlsafe(32),
        home=base.home,
        database_url=base.database_url,
        task_queue=base.task_queue,
        auto_migrate=False,
        **overrides,
    )


# -- keys -----------------------------------------------------------------------------------------------------------


def test_keys_are_stored_only_as_hashes(client: TestClient, settings: Settings) -> None:
    tenant, key = new_tenant(client)
    assert client.get("/v1/jobs", headers=bearer(key)).status_code == 200
    key_id, secret = key.split("_", 2)[1:]
    with session_scope(settings.database_url) as session:
        row = session.get(ApiKey, key_id)
        assert row is not None and row.tenant_id == tenant["id"]
        assert row.secret_sha256 == hashlib.sha256(secret.encode()).hexdigest()
        dumped = [str(value) for r in session.execute(text("SELECT * FROM api_keys")).all() for value in r]
    assert not any(secret in value or key in value for value in dumped)


def test_missing_or_wrong_keys_are_401_and_the_admin_key_is_only_for_admin(
    anonymous: TestClient, client: TestClient, settings: Settings
) -> None:
    missing = anonymous.get("/v1/jobs")
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert "missing API key" in missing.json()["detail"]
    # Development: a hint at where the embedded key is, but not the server's own path.
    assert "local-keys.json under PELTUNE_HOME" in missing.json()["detail"]
    assert str(settings.home) not in missing.text and str(settings.local_keys_file) not in missing.text
    # Refused before the upload is read: nothing of it reaches the server's scratch space.
    assert anonymous.post("/v1/datasets", files={"file": ("x.zip", b"PK" * 1000)}).status_code == 401

    _, key = new_tenant(client)
    key_id = key.split("_")[1]
    for wrong in ("nonsense", f"pt_{key_id}_not-the-secret", f"pt_{uuid.uuid4().hex}_x", key[:-1]):
        response = anonymous.get("/v1/jobs", headers=bearer(wrong))
        assert response.status_code == 401, wrong
        assert response.json()["detail"] == "invalid or revoked API key"
    assert anonymous.get("/v1/jobs", headers={"X-API-Key": key}).status_code == 200

    assert anonymous.get("/v1/jobs", headers=admin(anonymous)).status_code == 403
    assert anonymous.get("/v1/tenants").status_code == 401
    assert anonymous.get("/v1/tenants", headers=bearer(key)).status_code == 403
    assert anonymous.post("/v1/tenants", json={"name": "sneaky"}, headers=bearer(key)).status_code == 403
    assert anonymous.get("/v1/tenants", headers=admin(anonymous)).status_code == 200


def test_a_revoked_key_is_401(client: TestClient) -> None:
    _, key = new_tenant(client)
    assert client.get("/v1/datasets", headers=bearer(key)).status_code == 200
    key_id = key.split("_")[1]
    assert client.delete(f"/v1/keys/{key_id}", headers=bearer(key)).status_code == 403
    assert client.delete(f"/v1/keys/{key_id}", headers=admin(client)).status_code == 204
    response = client.get("/v1/datasets", headers=bearer(key))
    assert response.status_code == 401
    assert response.json()["detail"] == "invalid or revoked API key"
    assert client.delete(f"/v1/keys/{key_id}", headers=admin(client)).status_code == 404


def test_tenant_names_are_unique_and_prefixes_checked(client: TestClient) -> None:
    tenant, _ = new_tenant(client)
    again = client.post("/v1/tenants", json={"name": tenant["name"]}, headers=admin(client))
    assert again.status_code == 409
    for bad in ("http://bucket/x", "s3://", "s3://bucket/a/../b"):
        response = client.post("/v1/tenants", json={"name": "p" + uuid.uuid4().hex[:6], "s3_prefix": bad},
                               headers=admin(client))  # fmt: skip
        assert response.status_code == 422, bad
        assert "s3_prefix" in response.text
    made, _ = new_tenant(client, s3_prefix="s3://bucket/team")
    assert made["s3_prefix"] == "s3://bucket/team/"  # "team" must not admit "team-b/"


# -- tenant isolation -----------------------------------------------------------------------------------------------


def test_another_tenant_gets_404_for_everything(client: TestClient, settings: Settings, tmp_path: Path) -> None:
    # Tenant A is the embedded default tenant (the client's key); B is made by the admin.
    dataset_a = upload_dataset(client, tmp_path / "a")
    with open(make_checkpoint(tmp_path / "init.pt"), "rb") as stream:
        checkpoint_a = client.post("/v1/checkpoints", files={"file": ("init.pt", stream)}).json()["id"]
    job_a = client.post("/v1/jobs", json={**JOB, "dataset_id": dataset_a}, headers={"Idempotency-Key": "k1"})
    assert job_a.status_code == 201, job_a.text
    job_a = job_a.json()["id"]

    _, key_b = new_tenant(client)
    b = bearer(key_b)
    missing = uuid.uuid4().hex
    for resource, owned in (("jobs", job_a), ("datasets", dataset_a), ("checkpoints", checkpoint_a)):
        singular = resource[:-1]
        for suffix in ("", "/download", "/link", "/events", "/metrics", "/checkpoint"):
            path = f"/v1/{resource}/{owned}{suffix}"
            if client.get(path).status_code == 405 or (suffix and client.get(path).status_code == 404):
                continue  # a route this resource does not have
            theirs, nothing = client.get(path, headers=b), client.get(f"/v1/{resource}/{missing}{suffix}", headers=b)
            assert theirs.status_code == nothing.status_code == 404, path
            # Word for word like a missing id: the response does not tell that the id exists.
            assert theirs.json()["detail"] == f"{singular} {owned!r} not found"
            assert nothing.json()["detail"] == f"{singular} {missing!r} not found"
        assert client.get(f"/v1/{resource}").json() != []
        assert owned not in [row["id"] for row in client.get(f"/v1/{resource}", headers=b).json()]
    assert client.post(f"/v1/jobs/{job_a}/cancel", headers=b).status_code == 404
    assert client.get(f"/v1/jobs/{job_a}").json()["status"] == "queued"  # untouched by B's attempt

    # B may not train on A's dataset or fine-tune A's checkpoint: refused like ids that do not exist.
    refused = client.post("/v1/jobs", json={**JOB, "dataset_id": dataset_a}, headers=b)
    assert refused.status_code == 422
    assert refused.json()["detail"][0]["msg"] == f"dataset {dataset_a!r} not found"
    dataset_b = upload_dataset(client, tmp_path / "b", headers=b)
    finetune = {"kind": "finetune", "dataset_id": dataset_b, "checkpoint_id": checkpoint_a, "config": JOB["config"]}
    refused = client.post("/v1/jobs", json=finetune, headers=b)
    assert refused.status_code == 422
    assert refused.json()["detail"][0]["msg"] == f"checkpoint {checkpoint_a!r} not found"

    # Idempotency keys are per tenant: B's "k1" makes B's own job, not a replay (or a 409) of A's.
    job_b = client.post("/v1/jobs", json={**JOB, "dataset_id": dataset_b}, headers={**b, "Idempotency-Key": "k1"})
    assert job_b.status_code == 201, job_b.text
    assert job_b.json()["id"] != job_a
    assert client.post(f"/v1/jobs/{job_a}/cancel").json()["status"] == "cancelled"  # A still owns its job


def test_rows_made_outside_the_api_follow_their_owner(settings: Settings, client: TestClient) -> None:
    tenant, _ = new_tenant(client)
    with session_scope(settings.database_url) as session:
        dataset = crud.create_dataset(
            session, name="d", uri="file:///data", num_images=3, splits={}, tenant_id=tenant["id"]
        )
        job = crud.create_job(
            session, kind=JobKind.baseline, dataset_id=dataset.id, checkpoint_id=None, nprocs=1, config={}
        )
        # The worker registers a job's output like this: it belongs to the job's tenant.
        output = crud.create_checkpoint(session, name="out", uri="file:///o.pt", size_bytes=1, sha256="0" * 64,
                                        source_job_id=job.id)  # fmt: skip
        assert (job.tenant_id, output.tenant_id) == (tenant["id"], tenant["id"])
        unowned = crud.create_dataset(session, name="d", uri="file:///data", num_images=3, splits={})
        assert unowned.tenant_id == DEFAULT_TENANT_ID


# -- what a tenant may register -------------------------------------------------------------------------------------


def test_s3_uris_only_inside_the_tenants_prefix(settings: Settings, s3_endpoint: str, tmp_path: Path) -> None:
    archive = make_archive(make_dataset(tmp_path / "cells", n=3), tmp_path / "cells.zip")
    team = f"team-{uuid.uuid4().hex[:6]}"
    s3_client(s3_endpoint).upload_file(str(archive), S3_BUCKET, f"{team}/cells.zip")
    s3_client(s3_endpoint).upload_file(str(archive), S3_BUCKET, f"{team}-b/cells.zip")
    with TestClient(create_app(settings.model_copy(update={"s3_endpoint_url": s3_endpoint}))) as client:
        _, key = new_tenant(client, s3_prefix=f"s3://{S3_BUCKET}/{team}/")
        inside = client.post("/v1/datasets", data={"uri": f"s3://{S3_BUCKET}/{team}/cells.zip"}, headers=bearer(key))
        assert inside.status_code == 201, inside.text
        for outside in (
            f"s3://{S3_BUCKET}/{team}-b/cells.zip",  # a sibling sharing the prefix's first characters
            f"s3://{S3_BUCKET}/{team}/../{team}-b/cells.zip",
            f"s3://other-bucket/{team}/cells.zip",
        ):
            for resource in ("datasets", "checkpoints"):
                response = client.post(f"/v1/{resource}", data={"uri": outside}, headers=bearer(key))
                assert response.status_code == 403, (resource, outside, response.text)
                assert response.json()["detail"].startswith("uri: ")
        response = client.post("/v1/datasets", data={"uri": f"s3://{S3_BUCKET}/{team}-b/cells.zip"},
                               headers=bearer(key))  # fmt: skip
        assert f"s3://{S3_BUCKET}/{team}/" in response.json()["detail"]  # names the allowed prefix
        # The default tenant has no prefix: any bucket in development (the embedded mode is one trusted user).
        assert client.post("/v1/datasets", data={"uri": f"s3://{S3_BUCKET}/{team}-b/cells.zip"}).status_code == 201


def test_a_tenant_prefix_may_not_cover_the_services_own_store(s3_client_app: TestClient, s3_settings: Settings) -> None:
    store = s3_settings.storage_url  # s3://peltune-test/run-xxxx
    for prefix in (f"s3://{S3_BUCKET}/", f"{store}/", f"{store}/checkpoints/"):
        body = {"name": f"t-{uuid.uuid4().hex[:6]}", "s3_prefix": prefix}
        response = s3_client_app.post("/v1/tenants", json=body, headers=admin(s3_client_app))
        assert response.status_code == 422, prefix
        assert "own object store" in response.text


def test_production_allows_file_uris_only_under_the_roots_and_s3_only_with_a_prefix(
    settings: Settings, tmp_path: Path
) -> None:
    allowed = make_dataset(tmp_path / "shared" / "cells", n=3)
    elsewhere = make_dataset(tmp_path / "private" / "cells", n=3)
    (tmp_path / "shared" / "link").symlink_to(elsewhere)  # a link inside the root that leads out of it
    closed = production_settings(settings)
    with TestClient(create_app(closed)) as client:
        assert not closed.local_keys_file.exists()  # production generates no keys
        assert "authorization" not in client.headers
        _, key = new_tenant(client)
        response = client.post("/v1/datasets", data={"uri": allowed.as_uri()}, headers=bearer(key))
        assert response.status_code == 403
        assert "PELTUNE_FILE_URI_ROOTS" in response.json()["detail"]
        response = client.post("/v1/datasets", data={"uri": f"s3://{S3_BUCKET}/x.zip"}, headers=bearer(key))
        assert response.status_code == 403
        assert "has no s3_prefix configured" in response.json()["detail"]
    rooted = production_settings(settings, file_uri_roots=str(tmp_path / "shared"))
    with TestClient(create_app(rooted)) as client:
        _, key = new_tenant(client)
        assert client.post("/v1/datasets", data={"uri": allowed.as_uri()}, headers=bearer(key)).status_code == 201
        for outside in (elsewhere.as_uri(), (tmp_path / "shared" / "link").as_uri(),
                        f"{(tmp_path / 'shared').as_uri()}/../private/cells"):  # fmt: skip
            response = client.post("/v1/datasets", data={"uri": outside}, headers=bearer(key))
            assert response.status_code == 403, outside
            assert str(tmp_path / "shared") in response.json()["detail"]


def configured(base: Settings, env: str, **overrides: object) -> Settings:
    """The test's settings in ``env``, with overrides (production: a real admin key, no generated local keys)."""
    if env == "production":
        return production_settings(base, **overrides)
    return base.model_copy(update=overrides)


def spelled(uri: str, scheme: str) -> str:
    """``uri`` with its scheme written as ``scheme`` (``FILE``, ``File``, ``S3``)."""
    return scheme + uri[uri.index(":") :]


@pytest.mark.parametrize("env", ["development", "production"])
def test_mixed_case_schemes_are_checked_and_stored_normalised(
    env: str, settings: Settings, s3_endpoint: str, tmp_path: Path
) -> None:
    """``S3://`` and ``FILE:``/``File:`` reach the same objects as ``s3://`` and ``file:``: the checks read the
    normalised URI, and the row stores it (a file:// checkpoint is copied into the store, as always)."""
    shared, private = tmp_path / "shared", tmp_path / "private"
    local = {"datasets": make_dataset(shared / "cells", n=3), "checkpoints": make_checkpoint(shared / "init.pt")}
    elsewhere = {"datasets": make_dataset(private / "cells", n=3), "checkpoints": make_checkpoint(private / "i.pt")}
    archive = make_archive(local["datasets"], tmp_path / "cells.zip")
    team = f"team-{uuid.uuid4().hex[:6]}"
    objects = {"datasets": "cells.zip", "checkpoints": "init.pt"}
    for folder in (team, f"{team}-b"):
        s3_client(s3_endpoint).upload_file(str(archive), S3_BUCKET, f"{folder}/cells.zip")
        s3_client(s3_endpoint).upload_file(str(local["checkpoints"]), S3_BUCKET, f"{folder}/init.pt")
    app_settings = configured(settings, env, s3_endpoint_url=s3_endpoint, file_uri_roots=str(shared))
    with TestClient(create_app(app_settings)) as client:
        _, key = new_tenant(client, s3_prefix=f"s3://{S3_BUCKET}/{team}/")
        for resource, name in objects.items():
            for outside in (
                f"S3://{S3_BUCKET}/{team}-b/{name}",
                f"S3://{S3_BUCKET}/{team}/../{team}-b/{name}",
                spelled(elsewhere[resource].as_uri(), "FILE"),
                spelled(elsewhere[resource].as_uri(), "File"),
                spelled(elsewhere[resource].as_uri(), "fIlE"),
            ):
                response = client.post(f"/v1/{resource}", data={"uri": outside}, headers=bearer(key))
                assert response.status_code == 403, (resource, outside, response.text)
                assert response.json()["detail"].startswith("uri: ")

            mixed = f" S3://{S3_BUCKET}/{team}/{name}"
            in_s3 = client.post(f"/v1/{resource}", data={"uri": mixed}, headers=bearer(key))
            assert in_s3.status_code == 201, in_s3.text
            assert in_s3.json()["uri"] == f"s3://{S3_BUCKET}/{team}/{name}"
            on_disk = client.post(
                f"/v1/{resource}", data={"uri": spelled(local[resource].as_uri(), "FILE")}, headers=bearer(key)
            )
            assert on_disk.status_code == 201, on_disk.text
            stored = on_disk.json()["uri"]
            if resource == "datasets":  # a folder is read in place: its normalised URI is the row's
                assert stored == local[resource].as_uri()
            else:  # a file:// checkpoint is copied into the store, whatever the spelling of its scheme
                assert stored.startswith((app_settings.home / "objects").as_uri()), stored
        listed = {row["uri"] for row in client.get("/v1/datasets", headers=bearer(key)).json()}
        assert all(uri.startswith(("s3://", "file:///")) for uri in listed)


@pytest.mark.parametrize("env", ["development", "production"])
def test_the_services_own_files_cannot_be_registered(
    env: str, settings: Settings, database_url: str, tmp_path: Path
) -> None:
    """Not the SQLite database (opening and closing it drops SQLite's POSIX locks), not another tenant's stored
    upload, nothing in the home, the work folder or the object store, whichever path leads there; in every
    environment, even inside a file:// root."""
    work = tmp_path / "work"
    database = Path(make_url(database_url).database) if database_url.startswith("sqlite") else None
    roots = ",".join(str(root) for root in (tmp_path, database.parent if database else tmp_path))
    app_settings = configured(settings, env, work_dir=work, file_uri_roots=roots)
    (tmp_path / "into-home").symlink_to(app_settings.home)
    with TestClient(create_app(app_settings)) as client:
        _, key_a = new_tenant(client)
        _, key_b = new_tenant(client)
        theirs = upload_dataset(client, tmp_path / "a", headers=bearer(key_a))
        stored = client.get(f"/v1/datasets/{theirs}", headers=bearer(key_a)).json()["uri"]
        stored_path = stored.removeprefix("file://")
        home = app_settings.home
        refused = {
            stored: "inside the service's object store",
            spelled(stored, "FILE"): "inside the service's object store",
            f"file:///{stored_path}": "inside the service's object store",  # "//x" is not another path
            f"{(tmp_path / 'a').as_uri()}/../home/objects": "inside the service's object store",
            f"{(tmp_path / 'into-home').as_uri()}/objects": "inside the service's object store",  # a symlink
            home.as_uri(): "inside the service's home (PELTUNE_HOME)",
            (home / "local-keys.json").as_uri(): "inside the service's home (PELTUNE_HOME)",
            (home / "tmp" / "uploads").as_uri(): "inside the service's home (PELTUNE_HOME)",
            (work / "job" / "model.pt").as_uri(): "inside the service's work folder",
        }
        if database is not None:
            refused[database.as_uri()] = "the service's database"
            refused[f"{database.as_uri()}-wal"] = "the service's database"
        for uri, reason in refused.items():
            for resource in ("datasets", "checkpoints"):
                response = client.post(f"/v1/{resource}", data={"uri": uri}, headers=bearer(key_b))
                assert response.status_code == 403, (resource, uri, response.text)
                assert reason in response.json()["detail"], (uri, response.text)
                assert "the service's own files cannot be registered" in response.json()["detail"]
        # Nothing was registered, and the database is untouched.
        assert client.get("/v1/datasets", headers=bearer(key_b)).json() == []
        assert client.get("/v1/checkpoints", headers=bearer(key_b)).json() == []
        assert client.get(f"/v1/datasets/{theirs}", headers=bearer(key_a)).status_code == 200


# -- request bodies -------------------------------------------------------------------------------------------------


def test_oversized_bodies_are_413_and_keyless_bodies_are_not_read(
    anonymous: TestClient, client: TestClient, settings: Settings, tmp_path: Path
) -> None:
    limit = settings.max_json_bytes
    assert limit == 1024**2  # the default
    big = b'{"kind": "baseline", "config": {}, "pad": "' + b"a" * limit + b'"}'
    json_type = {"Content-Type": "application/json"}
    for app_client, path in ((anonymous, "/v1/jobs"), (client, "/v1/jobs"), (anonymous, "/v1/tenants")):
        response = app_client.post(path, content=big, headers=json_type)
        assert response.status_code == 413, (path, response.text)
        assert "PELTUNE_MAX_JSON_BYTES" in response.json()["detail"]

    def streamed() -> Iterator[bytes]:  # no Content-Length: the bytes are counted as they arrive
        yield b'{"kind": "baseline", "config": {}, "pad": "'
        for _ in range(3):
            yield b"a" * (limit // 2)
        yield b'"}'

    response = client.post("/v1/jobs", content=streamed(), headers=json_type)
    assert response.status_code == 413, response.text
    # Without a key, a body is refused before any of it is read.
    keyless = anonymous.post("/v1/jobs", content=streamed(), headers=json_type)
    assert keyless.status_code == 401 and "missing API key" in keyless.json()["detail"]
    # A url-encoded form on an upload route is not an upload: the same cap.
    form = client.post("/v1/datasets", data={"uri": "file:///x", "pad": "a" * limit})
    assert form.status_code == 413, form.text

    # Ordinary requests are untouched, and an upload far above the cap still goes in.
    small = settings.model_copy(update={"max_json_bytes": 1024})
    with TestClient(create_app(small)) as capped:
        dataset = upload_dataset(capped, tmp_path / "cells")  # a multipart body of several KiB
        job = capped.post("/v1/jobs", json={**JOB, "dataset_id": dataset})
        assert job.status_code == 201, job.text
        assert capped.post("/v1/jobs", json={**JOB, "dataset_id": dataset, "pad": "a" * 2000}).status_code == 413


# -- tenant prefixes ------------------------------------------------------------------------------------------------


def test_tenant_prefixes_may_not_overlap(client: TestClient) -> None:
    bucket = f"bkt-{uuid.uuid4().hex[:8]}"
    lab_a, _ = new_tenant(client, s3_prefix=f"s3://{bucket}/lab-a")
    lab_ab, _ = new_tenant(client, s3_prefix=f"s3://{bucket}/lab-ab/")  # shares characters, not a folder: allowed
    for prefix, other in (
        (f"s3://{bucket}/", lab_a),  # covers both
        (f"s3://{bucket}/lab-a/", lab_a),  # identical
        (f"S3://{bucket}/lab-a", lab_a),  # identical, spelled differently
        (f"s3://{bucket}/lab-a/sub/", lab_a),  # inside
        (f"s3://{bucket}/lab-ab/x", lab_ab),
    ):
        name = f"t-{uuid.uuid4().hex[:8]}"
        response = client.post("/v1/tenants", json={"name": name, "s3_prefix": prefix}, headers=admin(client))
        assert response.status_code == 409, (prefix, response.text)
        assert repr(other["name"]) in response.json()["detail"] and other["s3_prefix"] in response.json()["detail"]
        assert name not in [t["name"] for t in client.get("/v1/tenants", headers=admin(client)).json()]
    new_tenant(client, s3_prefix=f"s3://{bucket}/lab-b/")
    new_tenant(client, s3_prefix=f"s3://{bucket}-2/lab-a/")  # another bucket


# -- submission rate limit ------------------------------------------------------------------------------------------


def test_submissions_are_limited_per_tenant_and_recover(client: TestClient, settings: Settings, tmp_path: Path) -> None:
    tenant, key = new_tenant(client, submissions_per_minute=2)
    dataset = upload_dataset(client, tmp_path / "cells", headers=bearer(key))
    submit = {**JOB, "dataset_id": dataset}
    first = client.post("/v1/jobs", json=submit, headers={**bearer(key), "Idempotency-Key": "once"})
    assert first.status_code == 201
    # Refused submissions spend nothing (this one is refused after its token was taken: rolled back with it).
    unknown = client.post("/v1/jobs", json={**submit, "dataset_id": uuid.uuid4().hex}, headers=bearer(key))
    assert unknown.status_code == 422
    assert client.post("/v1/jobs", json=submit, headers=bearer(key)).status_code == 201
    limited = client.post("/v1/jobs", json=submit, headers=bearer(key))
    assert limited.status_code == 429
    assert 1 <= int(limited.headers["retry-after"]) <= 30  # 2 per minute: a token every 30 s
    assert "2 jobs per minute" in limited.json()["detail"]
    # A replay of an earlier submission is not a new one; other tenants have their own bucket.
    replay = client.post("/v1/jobs", json=submit, headers={**bearer(key), "Idempotency-Key": "once"})
    assert (replay.status_code, replay.json()["id"]) == (200, first.json()["id"])
    assert client.post("/v1/jobs", json=submit, headers=bearer(key)).status_code == 429
    with session_scope(settings.database_url) as session:
        # Half a minute passes (the bucket's clock is the row's; moving it back is what time does).
        stamp = session.get(Tenant, tenant["id"]).tokens_at
        session.execute(update(Tenant).where(Tenant.id == tenant["id"]).values(tokens_at=stamp - timedelta(seconds=31)))
    assert client.post("/v1/jobs", json=submit, headers=bearer(key)).status_code == 201
    assert client.post("/v1/jobs", json=submit, headers=bearer(key)).status_code == 429


def test_the_bucket_lives_in_sql_shared_by_every_api_process(settings: Settings, client: TestClient) -> None:
    """Separate sessions (as separate API replicas hold) draw from one bucket: never more tokens than it holds."""
    tenant, _ = new_tenant(client, submissions_per_minute=3)
    now = crud.utcnow()
    granted = 0
    for _ in range(5):
        with session_scope(settings.database_url) as one, session_scope(settings.database_url) as other:
            granted += crud.take_submission_token(one, tenant_id=tenant["id"], now=now) == 0.0
            one.commit()
            granted += crud.take_submission_token(other, tenant_id=tenant["id"], now=now) == 0.0
    assert granted == 3
    with session_scope(settings.database_url) as session:
        assert session.scalar(select(Tenant.submission_tokens).where(Tenant.id == tenant["id"])) == 0.0


# -- secrets --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"admin_key": "change-me"}, "PELTUNE_ADMIN_KEY"),
        ({"admin_key": "short-but-random-1f3a"}, "PELTUNE_ADMIN_KEY"),
        ({"database_url": "postgresql+psycopg://peltune:password@db/peltune"}, "PELTUNE_DATABASE_URL"),
        ({"database_url": "postgresql+psycopg://peltune:change_me@db/peltune"}, "PELTUNE_DATABASE_URL"),
        ({"broker_url": "redis://:minioadmin@redis:6379/0"}, "PELTUNE_BROKER_URL"),
    ],
)
def test_placeholder_secrets_are_refused_in_production_only(tmp_path: Path, overrides: dict, named: str) -> None:
    good = {"admin_key": secrets.token_urlsafe(32), "home": tmp_path}
    with pytest.raises(ValidationError) as refused:
        Settings(env="production", **{**good, **overrides})
    assert named in str(refused.value)
    assert "PELTUNE_ENV=production" in str(refused.value)
    Settings(env="development", **{**good, **overrides})  # the embedded mode takes them
    Settings(env="production", **good)


def test_the_production_api_needs_an_admin_key_and_workers_do_not(settings: Settings) -> None:
    worker = Settings(env="production", home=settings.home, database_url=settings.database_url)
    assert worker.admin_key == ""  # a worker never sees the admin key
    with pytest.raises(ValueError, match="PELTUNE_ADMIN_KEY"), TestClient(create_app(worker)):
        pass


def test_placeholder_aws_secret_is_refused_in_production(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "minioadmin")
    with pytest.raises(ValidationError, match="AWS_SECRET_ACCESS_KEY"):
        Settings(env="production", admin_key=secrets.token_urlsafe(32), home=tmp_path)


def test_secrets_from_mounted_files(tmp_path: Path) -> None:
    key = secrets.token_urlsafe(32)
    (tmp_path / "admin_key").write_text(key + "\n")  # a trailing newline, as `echo` and editors leave it
    (tmp_path / "db").write_text("postgresql+psycopg://peltune:S3cr3t-9f1e@db/peltune")
    settings = Settings(
        env="production", home=tmp_path, admin_key_file=tmp_path / "admin_key", database_url_file=tmp_path / "db"
    )
    assert (settings.admin_key, settings.database_url) == (key, "postgresql+psycopg://peltune:S3cr3t-9f1e@db/peltune")
    with pytest.raises(ValidationError, match="PELTUNE_ADMIN_KEY and PELTUNE_ADMIN_KEY_FILE are both set"):
        Settings(home=tmp_path, admin_key=key, admin_key_file=tmp_path / "admin_key")
    with pytest.raises(ValidationError, match="PELTUNE_ADMIN_KEY_FILE: cannot read"):
        Settings(home=tmp_path, admin_key_file=tmp_path / "missing")


def test_the_api_refuses_to_start_in_production_with_a_placeholder(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PELTUNE_")}
    env.update(PELTUNE_ENV="production", PELTUNE_ADMIN_KEY="change-me", PELTUNE_HOME=str(tmp_path))
    argv = [sys.executable, "-m", "uvicorn", "api.main:app", "--port", str(free_port())]
    result = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "Application startup failed" in result.stderr
    assert "PELTUNE_ADMIN_KEY" in result.stderr and "PELTUNE_ENV=production" in result.stderr


# -- the embedded mode's local key ----------------------------------------------------------------------------------


def test_the_embedded_api_generates_one_local_key(settings: Settings, client: TestClient) -> None:
    path = settings.local_keys_file
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = local_api_key(settings.home)
    assert key is not None and client.headers["authorization"] == f"Bearer {key}"
    assert client.get("/v1/datasets").status_code == 200
    with TestClient(create_app(settings)) as again:  # a restart (or a second process) keeps the same keys
        assert again.headers["authorization"] == f"Bearer {key}"
        assert again.app.state.admin_key == client.app.state.admin_key  # type: ignore[attr-defined]


def test_the_local_key_comes_back_after_the_database_was_replaced(settings: Settings, tmp_path: Path) -> None:
    with TestClient(create_app(settings)) as first:
        assert first.get("/v1/jobs").status_code == 200
    fresh = f"sqlite:///{tmp_path}/fresh.db"
    alembic_upgrade_head(fresh)
    with TestClient(create_app(settings.model_copy(update={"database_url": fresh}))) as client:
        assert client.get("/v1/jobs").status_code == 200  # the key in the file was registered again


# -- CORS -----------------------------------------------------------------------------------------------------------


def preflight(client: TestClient, origin: str):  # noqa: ANN201 - httpx.Response
    return client.options(
        "/v1/jobs",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization",
        },
    )


def test_cors_is_closed_by_default_and_opens_only_for_listed_origins(client: TestClient, settings: Settings) -> None:
    assert "access-control-allow-origin" not in preflight(client, "https://evil.example").headers
    assert (
        "access-control-allow-origin" not in client.get("/v1/jobs", headers={"Origin": "https://evil.example"}).headers
    )
    opened = settings.model_copy(update={"cors_origins": "https://ui.example, https://lab.example"})
    with TestClient(create_app(opened)) as cors:
        allowed = preflight(cors, "https://ui.example")
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://ui.example"
        got = cors.get("/v1/jobs", headers={"Origin": "https://lab.example"})
        assert got.headers["access-control-allow-origin"] == "https://lab.example"
        assert "access-control-allow-origin" not in preflight(cors, "https://evil.example").headers
        assert "access-control-allow-credentials" not in got.headers
