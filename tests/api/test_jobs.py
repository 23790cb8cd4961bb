"""/v1/jobs: validation against TrainConfig, insert-commit-enqueue (a real broker holds the message), reads."""

from __future__ import annotations

import base64
import dataclasses
import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.db import crud
from api.db.models import JobStatus
from api.db.session import session_scope
from api.main import create_app
from api.schemas import SERVER_FIELDS, TrainSettings
from api.settings import Settings
from api.storage import get_store
from pel.config import TrainConfig
from tests.factories import make_archive, make_checkpoint, make_dataset
from tests.services import REDIS_URL, forget_redis_queue, redis_client


@pytest.fixture
def dataset_id(client: TestClient, tmp_path: Path) -> str:
    folder = make_dataset(tmp_path / "ds", n=4, size=(128, 160))  # room for the default 128-pixel patch
    response = client.post("/v1/datasets", data={"uri": folder.as_uri()})
    assert response.status_code == 201, response.text
    return response.json()["id"]


@pytest.fixture
def checkpoint_id(client: TestClient, tmp_path: Path) -> str:
    path = make_checkpoint(tmp_path / "init.pt")
    with open(path, "rb") as stream:
        response = client.post("/v1/checkpoints", files={"file": ("init.pt", stream)})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def queued_messages(settings: Settings) -> list[dict]:
    """The run_job messages waiting in the filesystem broker's folder for this test's queue."""
    folder = Path(settings.broker_transport_options()["data_folder_in"])
    return [json.loads(p.read_text()) for p in sorted(folder.glob(f"*.{settings.task_queue}.msg"))]


def message_args(message: dict) -> list:
    """The positional args of a Celery (protocol 2) message as kombu stores it."""
    raw = message["body"]
    if message.get("properties", {}).get("body_encoding") == "base64":
        raw = base64.b64decode(raw)
    return json.loads(raw)[0]


def test_the_config_schema_mirrors_train_config() -> None:
    expected = {f.name for f in dataclasses.fields(TrainConfig)} - SERVER_FIELDS
    assert set(TrainSettings.model_fields) == expected
    defaults = TrainConfig().to_dict()
    for name, value in TrainSettings().model_dump().items():
        assert value == defaults[name], name


def test_finetune_is_committed_then_enqueued(
    client: TestClient, settings: Settings, dataset_id: str, checkpoint_id: str
) -> None:
    response = client.post(
        "/v1/jobs",
        json={
            "kind": "finetune",
            "dataset_id": dataset_id,
            "checkpoint_id": checkpoint_id,
            "nprocs": 2,
            "config": {"loss": "pel_ce", "steps": 30, "lr": 1e-4, "patch_size": 64},
        },
    )
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["status"] == "queued" and job["kind"] == "finetune" and job["nprocs"] == 2
    assert job["progress"] == 0.0 and job["step"] == 0 and job["error"] is None
    # The stored config is the full TrainConfig the worker will run (defaults filled in), minus mode.
    expected = TrainConfig(mode="finetune", loss="pel_ce", steps=30, lr=1e-4, patch_size=64).to_dict()
    expected.pop("mode")
    assert job["config"] == expected

    (message,) = queued_messages(settings)
    assert message["headers"]["task"] == "peltune.run_job"
    assert message_args(message) == [job["id"]]

    assert client.get(f"/v1/jobs/{job['id']}").json() == job
    assert job["id"] in {j["id"] for j in client.get("/v1/jobs").json()}
    assert job["id"] in {j["id"] for j in client.get("/v1/jobs", params={"status": "queued"}).json()}
    assert job["id"] not in {j["id"] for j in client.get("/v1/jobs", params={"status": "failed"}).json()}


def test_baseline_needs_no_checkpoint(client: TestClient, settings: Settings, dataset_id: str) -> None:
    response = client.post("/v1/jobs", json={"kind": "baseline", "dataset_id": dataset_id, "config": {}})
    assert response.status_code == 201, response.text
    assert response.json()["checkpoint_id"] is None
    assert len(queued_messages(settings)) == 1


BAD_CONFIGS = [
    ({"bogus": 1}, "bogus", "extra_forbidden"),
    ({"lr": 0}, "lr", "greater_than"),
    ({"lr": "fast"}, "lr", "float_type"),
    # Strict types: no silent coercion of booleans, strings or fractional numbers.
    ({"steps": True}, "steps", "int_type"),
    ({"steps": 5.5}, "steps", "int_type"),
    ({"batch_size": "8"}, "batch_size", "int_type"),
    # Upper bounds: a typo must not allocate terabytes or hold a worker for years.
    ({"patch_size": 10**6}, "patch_size", "less_than_equal"),
    ({"batch_size": 10**7}, "batch_size", "less_than_equal"),
    ({"steps": 10**9}, "steps", "less_than_equal"),
    ({"seed": 2**70}, "seed", "less_than"),
    ({"grad_clip": 0}, "grad_clip", "greater_than"),
    ({"n": -1.0}, "n", "greater_than"),
    ({"steps": 0}, "steps", "greater_than_equal"),
    ({"patch_size": 8}, "patch_size", "greater_than_equal"),
    ({"loss": "focal"}, "loss", "literal_error"),
    ({"fg_fraction": 1.5}, "fg_fraction", "less_than_equal"),
    ({"val_images": 0}, "val_images", "greater_than_equal"),
]


@pytest.mark.parametrize(("config", "field", "kind"), BAD_CONFIGS)
def test_bad_config_values_name_the_field(
    client: TestClient, settings: Settings, dataset_id: str, config: dict, field: str, kind: str
) -> None:
    response = client.post("/v1/jobs", json={"kind": "baseline", "dataset_id": dataset_id, "config": config})
    assert response.status_code == 422
    errors = response.json()["detail"]
    assert any(e["loc"][-1] == field and e["type"] == kind for e in errors), errors
    assert queued_messages(settings) == []


def test_mode_is_not_a_client_field(client: TestClient, dataset_id: str) -> None:
    response = client.post(
        "/v1/jobs", json={"kind": "baseline", "dataset_id": dataset_id, "config": {"mode": "finetune"}}
    )
    assert response.status_code == 422
    assert "kind" in response.json()["detail"][0]["msg"]


def test_invalid_model_architecture_is_422(client: TestClient, dataset_id: str) -> None:
    response = client.post(
        "/v1/jobs", json={"kind": "baseline", "dataset_id": dataset_id, "config": {"model": {"depth": 99}}}
    )
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "config"] and "depth" in error["msg"]


@pytest.mark.parametrize(
    ("body", "loc", "text"),
    [
        ({"kind": "finetune"}, ["body", "checkpoint_id"], "needs an init checkpoint"),
        ({"kind": "finetune", "checkpoint_id": "c0ffee" * 5 + "00"}, ["body", "checkpoint_id"], "not found"),
        ({"kind": "baseline", "checkpoint_id": "c0ffee" * 5 + "00"}, ["body", "checkpoint_id"], "omit checkpoint_id"),
        ({"kind": "baseline", "dataset_id": "d00d" * 8}, ["body", "dataset_id"], f"'{'d00d' * 8}' not found"),
        ({"kind": "baseline", "dataset_id": "d\x00d"}, ["body", "dataset_id"], "should match pattern"),
        ({"kind": "baseline", "nprocs": 0}, ["body", "nprocs"], "greater than or equal to 1"),
        ({"kind": "baseline", "nprocs": "2"}, ["body", "nprocs"], "valid integer"),
        ({"kind": "sideways"}, ["body", "kind"], "baseline"),
        ({"kind": "baseline", "colour": "red"}, ["body", "colour"], "Extra inputs"),
    ],
)
def test_bad_job_requests(client: TestClient, settings: Settings, dataset_id: str, body: dict, loc, text) -> None:
    response = client.post("/v1/jobs", json={"dataset_id": dataset_id, **body})
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert any(e["loc"] == loc and text in e["msg"] for e in errors), errors
    assert queued_messages(settings) == []


def test_nan_in_a_config_is_422_not_500(client: TestClient, settings: Settings, dataset_id: str) -> None:
    # Python's json writes NaN/Infinity literals, as some clients do.
    body = json.dumps(
        {"kind": "baseline", "dataset_id": dataset_id, "config": {"lr": float("nan"), "alpha": float("inf")}}
    )
    response = client.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert {tuple(e["loc"]) for e in response.json()["detail"]} >= {
        ("body", "config", "lr"),
        ("body", "config", "alpha"),
    }
    assert queued_messages(settings) == []


@pytest.mark.parametrize("bad_id", ["a%00b", "abc", "ABCDEF" + "0" * 26])
def test_malformed_ids_are_404_on_every_resource(client: TestClient, bad_id: str) -> None:
    for path in (f"/v1/jobs/{bad_id}", f"/v1/datasets/{bad_id}", f"/v1/checkpoints/{bad_id}/download"):
        assert client.get(path).status_code == 404, path


def test_control_characters_in_names_are_422(client: TestClient, tmp_path: Path) -> None:
    folder = make_dataset(tmp_path / "ds", n=4)
    for name in ("a\x00b", "evil\u202etxt.pt"):
        response = client.post("/v1/datasets", data={"uri": folder.as_uri(), "name": name})
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["msg"] == "must not contain control characters"


def test_unknown_job_is_404(client: TestClient) -> None:
    for path in ("/v1/jobs/abc", "/v1/jobs/abc/metrics", "/v1/jobs/abc/checkpoint"):
        response = client.get(path)
        assert response.status_code == 404
        assert response.json()["detail"] == "job 'abc' not found"


def test_metrics_and_checkpoint_follow_the_job(
    client: TestClient, settings: Settings, dataset_id: str, checkpoint_id: str, tmp_path: Path
) -> None:
    job = client.post("/v1/jobs", json={"kind": "baseline", "dataset_id": dataset_id}).json()
    assert client.get(f"/v1/jobs/{job['id']}/metrics").json() == {"job_id": job["id"], "points": []}
    conflict = client.get(f"/v1/jobs/{job['id']}/checkpoint")
    assert conflict.status_code == 409 and "queued" in conflict.json()["detail"]

    # What the worker does, through the same data functions it uses.
    output = client.get(f"/v1/checkpoints/{checkpoint_id}").json()
    with session_scope(settings.database_url) as session:
        assert crud.claim_job(session, job_id=job["id"])
        assert not crud.claim_job(session, job_id=job["id"])  # a second delivery cannot claim it again
        crud.add_metric_points(
            session,
            job_id=job["id"],
            points=[
                {"step": 1, "total_steps": 4, "loss": 1.0, "pel_norm": 0.5},
                {"step": 4, "total_steps": 4, "loss": 0.5, "pel_norm": 0.25, "val_dice": 0.8},
            ],
        )
        crud.record_progress(session, job_id=job["id"], step=4, total_steps=4)
    running = client.get(f"/v1/jobs/{job['id']}").json()
    assert running["status"] == "running" and running["progress"] == 1.0 and running["total_steps"] == 4
    assert client.get(f"/v1/jobs/{job['id']}/checkpoint").status_code == 409

    with session_scope(settings.database_url) as session:
        assert crud.finish_job(
            session,
            job_id=job["id"],
            status=JobStatus.succeeded,
            summary={"best_step": 4},
            output_checkpoint_id=output["id"],
        )
    points = client.get(f"/v1/jobs/{job['id']}/metrics").json()["points"]
    assert [p["step"] for p in points] == [1, 4]
    assert points[1] == {"step": 4, "total_steps": 4, "loss": 0.5, "pel_norm": 0.25, "val_dice": 0.8}
    assert client.get(f"/v1/jobs/{job['id']}/metrics", params={"after_step": 1}).json()["points"] == points[1:]

    done = client.get(f"/v1/jobs/{job['id']}").json()
    assert done["status"] == "succeeded" and done["summary"] == {"best_step": 4}
    assert done["output_checkpoint_id"] == output["id"] and done["finished_at"] is not None
    download = client.get(f"/v1/jobs/{job['id']}/checkpoint")
    assert download.status_code == 200
    assert download.content == (tmp_path / "init.pt").read_bytes()


def test_unreachable_broker_fails_the_job_with_503(settings: Settings, dataset_id: str) -> None:
    dead = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(dead)) as client:
        response = client.post("/v1/jobs", json={"kind": "baseline", "dataset_id": dataset_id})
        assert response.status_code == 503
        assert "not queued" in response.json()["detail"]
        job_id = response.json()["detail"].split()[1]
        job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed" and "could not reach the job queue" in job["error"]


def test_job_message_lands_in_a_real_redis_queue(settings: Settings, dataset_id: str) -> None:
    redis = redis_client()
    queue = f"test-{uuid.uuid4().hex[:10]}"
    with TestClient(create_app(settings.model_copy(update={"broker_url": REDIS_URL, "task_queue": queue}))) as client:
        try:
            response = client.post("/v1/jobs", json={"kind": "baseline", "dataset_id": dataset_id})
            assert response.status_code == 201, response.text
            assert redis.llen(queue) == 1
            message = json.loads(redis.lindex(queue, 0))
            assert message["headers"]["task"] == "peltune.run_job"
            assert message_args(message) == [response.json()["id"]]
        finally:
            forget_redis_queue(redis, queue)


def test_dataset_archive_then_job(client: TestClient, tmp_path: Path) -> None:
    archive = make_archive(make_dataset(tmp_path / "zipped", n=4, size=(128, 128)), tmp_path / "zipped.zip")
    with open(archive, "rb") as stream:
        dataset = client.post("/v1/datasets", files={"file": ("zipped.zip", stream)}).json()
    response = client.post("/v1/jobs", json={"kind": "baseline", "dataset_id": dataset["id"], "nprocs": 2})
    assert response.status_code == 201


def test_broker_errors_never_show_passwords() -> None:
    from api.queue import _redact

    assert _redact("redis://user:s3cret@redis:6379/0") == "redis://user:***@redis:6379/0"
    assert _redact("filesystem://") == "filesystem://"


def test_cancel_a_queued_job_then_it_never_runs(client: TestClient, settings: Settings, dataset_id: str) -> None:
    job = client.post("/v1/jobs", json={"kind": "baseline", "dataset_id": dataset_id}).json()
    response = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 200, response.text
    cancelled = response.json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    with session_scope(settings.database_url) as session:
        assert not crud.claim_job(session, job_id=job["id"])  # its message arrives later: nothing to run
    again = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert again.status_code == 409
    assert again.json()["detail"] == (
        f"job {job['id']} is already cancelled: only queued or running jobs can be cancelled"
    )
    events = client.get(f"/v1/jobs/{job['id']}/events").json()
    assert [(e["from_status"], e["to_status"], e["reason"]) for e in events] == [
        (None, "queued", "submitted"),
        ("queued", "cancelled", "cancelled by request"),
    ]
    assert client.post("/v1/jobs/abc/cancel").status_code == 404


def test_cancelling_a_job_queued_for_another_attempt_deletes_its_snapshot(
    client: TestClient, settings: Settings, dataset_id: str, tmp_path: Path
) -> None:
    store = get_store(settings)
    (tmp_path / "snapshot.pt").write_bytes(b"state of step 40")
    job_ids = [client.post("/v1/jobs", json={"kind": "baseline", "dataset_id": dataset_id}).json()["id"] for _ in "ab"]
    for job_id in job_ids:  # attempt 1 shipped a snapshot, then its rank was killed: queued again
        with session_scope(settings.database_url) as session:
            assert crud.claim_job(session, job_id=job_id)
            assert crud.record_snapshot(session, job_id=job_id, step=40)
            assert crud.retry_job(session, job_id=job_id, reason="rank 0 was killed by SIGKILL")
        store.put_file(f"jobs/{job_id}/snapshot.pt", tmp_path / "snapshot.pt")  # worker.tasks.snapshot_key
    cancelled, other = job_ids
    assert client.post(f"/v1/jobs/{cancelled}/cancel").json()["status"] == "cancelled"
    # No worker will ever claim it again, so the API removes the snapshot; the other job keeps its own.
    assert not store.exists(f"jobs/{cancelled}/snapshot.pt")
    assert not (settings.home / "objects" / "jobs" / cancelled / "snapshot.pt").exists()
    assert store.exists(f"jobs/{other}/snapshot.pt")


def test_every_transition_is_an_event_and_finished_jobs_cannot_be_cancelled(
    client: TestClient, settings: Settings, dataset_id: str
) -> None:
    job_id = client.post("/v1/jobs", json={"kind": "baseline", "dataset_id": dataset_id}).json()["id"]
    with session_scope(settings.database_url) as session:
        assert crud.claim_job(session, job_id=job_id, worker="host-a")
        assert crud.retry_job(session, job_id=job_id, reason="rank 1 was killed by SIGKILL")
        assert crud.claim_job(session, job_id=job_id)
        assert not crud.retry_job(session, job_id="0" * 32, reason="no such job")
        assert crud.finish_job(session, job_id=job_id, status=JobStatus.failed, error="ValueError: bad")
        with pytest.raises(ValueError, match="illegal job transition failed -> running"):
            crud._transition(session, job_id, JobStatus.failed, JobStatus.running, reason="resurrect")
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["attempt"] == 2 and job["error"] == "ValueError: bad"
    events = client.get(f"/v1/jobs/{job_id}/events").json()
    assert [(e["from_status"], e["to_status"], e["reason"]) for e in events] == [
        (None, "queued", "submitted"),
        ("queued", "running", "attempt 1 on host-a"),
        ("running", "queued", "rank 1 was killed by SIGKILL"),
        ("queued", "running", "attempt 2"),
        ("running", "failed", "ValueError: bad"),
    ]
    times = [e["at"] for e in events]
    assert times == sorted(times)
    response = client.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 409 and "already failed" in response.json()["detail"]


def test_cancel_a_running_job_marks_it_for_its_worker(client: TestClient, settings: Settings, dataset_id: str) -> None:
    job_id = client.post("/v1/jobs", json={"kind": "baseline", "dataset_id": dataset_id}).json()["id"]
    with session_scope(settings.database_url) as session:
        assert crud.claim_job(session, job_id=job_id)
    assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    with session_scope(settings.database_url) as session:
        # What the supervising worker sees at its next poll: the job is no longer its to run or to finish.
        assert not crud.record_progress(session, job_id=job_id, step=3)
        assert not crud.finish_job(session, job_id=job_id, status=JobStatus.succeeded)
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"


def test_idempotency_key_returns_the_same_job(client: TestClient, settings: Settings, dataset_id: str) -> None:
    key = f"submit-{uuid.uuid4().hex}"
    body = {"kind": "baseline", "dataset_id": dataset_id, "config": {"steps": 20}}
    first = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
    assert first.status_code == 201, first.text
    # The same request again (a client retry after a timeout), spelled differently: same job, no second message.
    same = {"config": {"steps": 20, "lr": TrainConfig().lr}, "nprocs": 1, **body}
    second = client.post("/v1/jobs", json=same, headers={"Idempotency-Key": key})
    assert second.status_code == 200 and second.json()["id"] == first.json()["id"]
    assert len(queued_messages(settings)) == 1

    other = client.post("/v1/jobs", json={**body, "config": {"steps": 21}}, headers={"Idempotency-Key": key})
    assert other.status_code == 409
    assert other.json()["detail"] == (
        f"Idempotency-Key {key!r} was already used for a different request (job {first.json()['id']}); "
        "use a new key for a new job"
    )
    # Without a key, or with another key, the same body is a new job.
    assert client.post("/v1/jobs", json=body).json()["id"] != first.json()["id"]
    fresh = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": f"{key}-2"})
    assert fresh.status_code == 201 and fresh.json()["id"] != first.json()["id"]
    assert len(queued_messages(settings)) == 3
    too_long = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k" * 256})
    assert too_long.status_code == 422 and too_long.json()["detail"][0]["loc"] == ["header", "idempotency-key"]


def test_the_client_submits_idempotently_cancels_and_reads_events(client: TestClient, dataset_id: str) -> None:
    from api.client import ApiError, PelTuneClient

    api = PelTuneClient("http://testserver")
    api._http = client  # the same httpx interface, served in-process (what `pel-tune jobs ...` calls)
    key = f"cli-{uuid.uuid4().hex}"
    job = api.submit_job(kind="baseline", dataset_id=dataset_id, config={"steps": 5}, idempotency_key=key)
    assert api.submit_job(kind="baseline", dataset_id=dataset_id, config={"steps": 5}, idempotency_key=key) == job
    assert api.cancel_job(job["id"])["status"] == "cancelled"
    assert [e["to_status"] for e in api.events(job["id"])] == ["queued", "cancelled"]
    with pytest.raises(ApiError, match="is already cancelled") as refused:
        api.cancel_job(job["id"])
    assert refused.value.status_code == 409


def test_compile_loss_is_an_opt_in_boolean_setting(client: TestClient, settings: Settings, dataset_id: str) -> None:
    body = {"kind": "baseline", "dataset_id": dataset_id}
    response = client.post("/v1/jobs", json={**body, "config": {"compile_loss": True, "steps": 5}})
    assert response.status_code == 201, response.text
    assert response.json()["config"]["compile_loss"] is True
    assert TrainConfig.from_dict({**response.json()["config"], "mode": "baseline"}).compile_loss is True
    assert client.post("/v1/jobs", json=body).json()["config"]["compile_loss"] is False  # off unless asked for
    for bad in ("true", 1, None):
        rejected = client.post("/v1/jobs", json={**body, "config": {"compile_loss": bad}})
        assert rejected.status_code == 422, bad
        assert any(e["loc"][-1] == "compile_loss" for e in rejected.json()["detail"]), rejected.json()
    assert len(queued_messages(settings)) == 2


def test_a_patch_larger_than_the_smallest_image_is_refused_at_submission(client: TestClient, tmp_path: Path) -> None:
    folder = make_dataset(tmp_path / "small", n=4, size=(48, 64))
    dataset = client.post("/v1/datasets", data={"uri": folder.as_uri()}).json()
    assert (dataset["min_height"], dataset["min_width"]) == (48, 64)
    before = client.get("/v1/jobs").json()
    job = {"kind": "baseline", "dataset_id": dataset["id"]}
    refused = client.post("/v1/jobs", json={**job, "config": {"patch_size": 64}})
    assert refused.status_code == 422, refused.text
    detail = refused.json()["detail"][0]
    assert detail["loc"] == ["body", "config", "patch_size"]
    assert "patch_size 64" in detail["msg"] and "smallest image height 48" in detail["msg"]
    assert client.get("/v1/jobs").json() == before  # nothing queued
    fits = client.post("/v1/jobs", json={**job, "config": {"patch_size": 48}})
    assert fits.status_code == 201, fits.text


def test_a_negative_learning_rate_is_refused_naming_the_field(client: TestClient, dataset_id: str) -> None:
    refused = client.post("/v1/jobs", json={"kind": "baseline", "dataset_id": dataset_id, "config": {"lr": -1e-3}})
    assert refused.status_code == 422, refused.text
    assert refused.json()["detail"][0]["loc"] == ["body", "config", "lr"]


def test_racing_requests_with_one_idempotency_key_get_one_job_and_no_500(
    client: TestClient, settings: Settings, dataset_id: str
) -> None:
    """Eight clients retry the same submission at the same instant: one job, every answer its replay or 409."""
    key = f"race-{uuid.uuid4().hex}"
    bodies = [
        {"kind": "baseline", "dataset_id": dataset_id, "config": {"steps": 20 + i % 2}} for i in range(8)
    ]  # two different bodies: one of them wins, the other is a conflict
    barrier = threading.Barrier(len(bodies))

    def submit(body: dict) -> tuple[int, dict]:
        barrier.wait()
        response = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
        return response.status_code, response.json()

    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(submit, bodies))
    codes = sorted(code for code, _ in answers)
    assert set(codes) <= {200, 201, 409}, answers
    assert codes.count(201) == 1
    winner = next(body for code, body in answers if code == 201)
    assert all(body["id"] == winner["id"] for code, body in answers if code == 200)
    assert codes.count(409) == 4 and len(queued_messages(settings)) == 1  # the other body's four requests


@pytest.mark.parametrize(
    "path",
    [
        "/v1/jobs?offset=99999999999999999999999",
        "/v1/datasets?offset=9223372036854775808",
        "/v1/checkpoints?offset=9223372036854775808",
        "/v1/jobs/{job}/metrics?after_step=99999999999999999999999",
        "/v1/jobs/{job}/metrics?after_step=-99999999999999999999999",
    ],
)
def test_huge_query_numbers_are_422_not_500(client: TestClient, dataset_id: str, path: str) -> None:
    job = client.post("/v1/jobs", json={"kind": "baseline", "dataset_id": dataset_id}).json()
    response = client.get(path.format(job=job["id"]))
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"][0] == "query"
