"""The whole service, every part real: uvicorn + Celery worker processes, Redis, PostgreSQL, a moto S3 server over
HTTP, and torchrun with 2 gloo ranks, on real BBBC039 microscopy.

Flow: upload a zip of a few BBBC039 pairs -> baseline job (Dice+CE from scratch) -> PEL fine-tune on 2 ranks from
its output checkpoint -> download the fine-tuned checkpoint through the API, load it and segment a held-out image.
A torch file that is no checkpoint PEL Tune can load is refused at registration (422). A 2-rank job on BBBC039,
submitted with an Idempotency-Key, is cancelled over HTTP while it trains: no rank is left behind.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from tests.factories import copy_bbbc039_subset, make_archive, make_foreign_torch_file
from tests.services import (
    DUMMY_AWS,
    REDIS_URL,
    REPO_ROOT,
    S3_BUCKET,
    Process,
    alembic_upgrade_head,
    auth_headers,
    forget_redis_queue,
    free_port,
    fresh_postgres_database,
    moto_s3_server,
    redis_client,
    running,
    s3_client,
    wait_until,
)
from tests.worker.processes import alive, training_pids

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]

JOB_TIMEOUT_S = 150.0
BASELINE = {
    "loss": "dice_ce",
    "patch_size": 64,
    "batch_size": 4,
    "steps": 40,
    "lr": 1e-3,
    "val_every": 20,
    "model": {"width": 8, "depth": 2},
}
FINETUNE = {"loss": "pel_ce", "patch_size": 64, "batch_size": 2, "steps": 20, "lr": 1e-4, "val_every": 10}


class Stack:
    def __init__(self, url: str, home: Path, worker: Process, api: Process, s3_endpoint: str, prefix: str) -> None:
        # The API generated its local keys under its home when it started (development mode).
        self.http = httpx.Client(base_url=url, timeout=30, headers=auth_headers(home))
        self.worker = worker
        self.api = api
        self.s3_endpoint = s3_endpoint
        self.prefix = prefix

    def check(self) -> None:
        self.worker.check()
        self.api.check()

    def wait(self, job_id: str, timeout: float = JOB_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check()
            job = self.http.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {job['status']} after {timeout:.0f} s\n{self.worker.log()}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    redis = redis_client()  # skips (or fails under PELTUNE_REQUIRE_SERVICES=1) when Redis is not there
    tmp = tmp_path_factory.mktemp("e2e")
    queue = f"e2e-{uuid.uuid4().hex[:10]}"
    prefix = f"e2e-{uuid.uuid4().hex[:8]}"
    with fresh_postgres_database() as database_url, moto_s3_server(tmp / "moto.log") as s3_endpoint:
        env = {
            **os.environ,
            **DUMMY_AWS,
            "PYTHONPATH": str(REPO_ROOT),
            "PYTHONUNBUFFERED": "1",
            "PELTUNE_HOME": str(tmp / "home"),
            "PELTUNE_DATABASE_URL": database_url,
            "PELTUNE_BROKER_URL": REDIS_URL,
            "PELTUNE_TASK_QUEUE": queue,
            "PELTUNE_STORAGE_URL": f"s3://{S3_BUCKET}/{prefix}",
            "PELTUNE_S3_ENDPOINT_URL": s3_endpoint,
            "PELTUNE_POLL_INTERVAL_S": "0.5",
            "PELTUNE_AUTO_MIGRATE": "0",  # migrated below, by the real alembic command
        }
        alembic_upgrade_head(database_url, env=env)
        port = free_port()
        worker_argv = [
            *[sys.executable, "-m", "celery", "-A", "worker.celery_app:app", "worker"],
            *["--pool", "solo", "--concurrency", "1", "--without-gossip", "--without-mingle", "-l", "INFO"],
        ]
        api_argv = [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port)]
        try:
            with (
                running("worker", worker_argv, env=env, log_path=tmp / "worker.log") as worker,
                running("api", api_argv, env=env, log_path=tmp / "api.log") as api,
            ):
                url = f"http://127.0.0.1:{port}"
                wait_until(lambda: httpx.get(f"{url}/healthz").status_code == 200, timeout=60, what="uvicorn")
                wait_until(lambda: worker.check() or "ready." in worker.log(100_000), timeout=60, what="worker")
                yield Stack(url, tmp / "home", worker, api, s3_endpoint, prefix)
        finally:
            forget_redis_queue(redis, queue)


def test_baseline_then_distributed_pel_finetune(stack: Stack, bbbc039_root: Path, tmp_path: Path) -> None:
    http = stack.http
    subset, test_ids = copy_bbbc039_subset(bbbc039_root, tmp_path / "bbbc039-mini", train=6, val=2, test=2)
    archive = make_archive(subset, tmp_path / "bbbc039-mini.zip")
    with open(archive, "rb") as stream:
        response = http.post("/v1/datasets", files={"file": (archive.name, stream)})
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert dataset["num_images"] == 10 and dataset["splits"] == {"train": 6, "val": 2, "test": 2}
    assert dataset["uri"].startswith(f"s3://{S3_BUCKET}/{stack.prefix}/datasets/")

    baseline = http.post("/v1/jobs", json={"kind": "baseline", "dataset_id": dataset["id"], "config": BASELINE})
    assert baseline.status_code == 201, baseline.text

    # A genuine torch file that is no checkpoint PEL Tune can load is refused when registered, before any job.
    foreign = make_foreign_torch_file(tmp_path / "foreign.pt")
    with open(foreign, "rb") as stream:
        refused = http.post("/v1/checkpoints", files={"file": ("foreign.pt", stream)})
    assert refused.status_code == 422, refused.text

    baseline_job = stack.wait(baseline.json()["id"])
    assert baseline_job["status"] == "succeeded", baseline_job["error"]
    assert baseline_job["progress"] == 1.0 and baseline_job["step"] == 40
    baseline_points = http.get(f"/v1/jobs/{baseline_job['id']}/metrics").json()["points"]
    assert baseline_points[-1]["step"] == 40 and "dice" in baseline_points[0]

    finetune = http.post(
        "/v1/jobs",
        json={
            "kind": "finetune",
            "dataset_id": dataset["id"],
            "checkpoint_id": baseline_job["output_checkpoint_id"],
            "nprocs": 2,
            "config": FINETUNE,
        },
    )
    assert finetune.status_code == 201, finetune.text

    job = stack.wait(finetune.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["summary"]["world_size"] == 2  # it really ran on 2 gloo ranks
    assert job["summary"]["test_before"] is not None and job["summary"]["test_after"]["num_images"] == 2
    points = http.get(f"/v1/jobs/{job['id']}/metrics").json()["points"]
    assert [p["step"] for p in points][-1] == 20
    assert all(0.0 <= p["pel_norm"] <= 1.0 for p in points)
    assert any("val_dice" in p for p in points)

    output = http.get(f"/v1/checkpoints/{job['output_checkpoint_id']}").json()
    assert output["source_job_id"] == job["id"] and output["uri"].startswith(f"s3://{S3_BUCKET}/{stack.prefix}/")
    key = output["uri"].removeprefix(f"s3://{S3_BUCKET}/")
    assert s3_client(stack.s3_endpoint).head_object(Bucket=S3_BUCKET, Key=key)["ContentLength"] == output["size_bytes"]

    # Download through the API (streamed), load it the safe way, and segment a held-out image.
    downloaded = tmp_path / "finetuned.pt"
    with http.stream("GET", f"/v1/jobs/{job['id']}/checkpoint") as response:
        assert response.status_code == 200
        with open(downloaded, "wb") as out:
            for chunk in response.iter_bytes():
                out.write(chunk)
    assert downloaded.stat().st_size == output["size_bytes"]
    assert_segments_better_than_chance(downloaded, subset, test_ids)


def test_cancel_a_distributed_job_on_real_data_over_http(stack: Stack, bbbc039_root: Path, tmp_path: Path) -> None:
    """Submit (idempotently) a 2-rank job on BBBC039, cancel it while it trains: every rank is gone, the history says
    so, and a second cancel is refused."""
    http = stack.http
    subset, _ = copy_bbbc039_subset(bbbc039_root, tmp_path / "bbbc039-cancel", train=4, val=1, test=1)
    archive = make_archive(subset, tmp_path / "bbbc039-cancel.zip")
    with open(archive, "rb") as stream:
        dataset = http.post("/v1/datasets", files={"file": (archive.name, stream)}).json()
    endless = {**BASELINE, "steps": 1_000_000, "val_every": 1_000_000, "snapshot_every": 1_000_000}
    body = {"kind": "baseline", "dataset_id": dataset["id"], "nprocs": 2, "config": endless}
    key = f"e2e-{uuid.uuid4().hex}"
    submitted = http.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
    assert submitted.status_code == 201, submitted.text
    job_id = submitted.json()["id"]
    replay = http.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})  # a client retry
    assert replay.status_code == 200 and replay.json()["id"] == job_id

    wait_until(lambda: stack.check() or http.get(f"/v1/jobs/{job_id}").json()["step"] > 0, timeout=120, what="training")
    pids = training_pids(job_id)
    assert sorted(pids.values()) == ["", "0", "1"]
    cancelled = http.post(f"/v1/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    wait_until(lambda: not any(alive(pid) for pid in pids), timeout=30, what="every rank to stop")
    assert training_pids(job_id) == {}
    history = http.get(f"/v1/jobs/{job_id}/events").json()
    assert [(e["from_status"], e["to_status"]) for e in history] == [
        (None, "queued"),
        ("queued", "running"),
        ("running", "cancelled"),
    ]
    assert http.post(f"/v1/jobs/{job_id}/cancel").status_code == 409
    stack.check()  # the worker survived and is ready for the next job


def assert_segments_better_than_chance(checkpoint: Path, dataset: Path, test_ids: list[str]) -> None:
    from pel.checkpoint import load_checkpoint
    from pel.data import load_split, open_dataset
    from pel.inference import sliding_window_predict
    from pel.models import UNet

    model, meta = load_checkpoint(checkpoint)
    assert isinstance(model, UNet) and meta["mode"] == "finetune"
    (sample, *_) = load_split(open_dataset(dataset), "test")
    assert sample.id in test_ids  # never seen in training
    probs = sliding_window_predict(model, torch.from_numpy(sample.image), patch=256)
    predicted = probs.argmax(0).numpy() == 1
    truth = sample.mask == 1
    dice = 2 * np.logical_and(predicted, truth).sum() / (predicted.sum() + truth.sum())
    # The best a prediction blind to the image can expect is "all foreground": Dice 2p / (1 + p).
    p = truth.mean()
    chance = 2 * p / (1 + p)
    assert dice > max(0.6, chance + 0.2), f"Dice {dice:.3f} vs chance {chance:.3f}"


def test_embedded_default_needs_only_a_home(tmp_path: Path) -> None:
    """PELTUNE_HOME alone: SQLite (migrated by the API at startup), the kombu filesystem broker, a local store."""
    from tests.factories import make_dataset

    home = tmp_path / "home"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1", "PELTUNE_HOME": str(home)}
    for key in [k for k in env if k.startswith("PELTUNE_") and k != "PELTUNE_HOME"]:
        del env[key]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    worker_argv = [
        *[sys.executable, "-m", "celery", "-A", "worker.celery_app:app", "worker"],
        *["--pool", "solo", "--concurrency", "1", "--without-gossip", "--without-mingle", "-l", "INFO"],
    ]
    api_argv = [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port)]
    with (
        running("api", api_argv, env=env, log_path=tmp_path / "api.log") as api,
        running("worker", worker_argv, env=env, log_path=tmp_path / "worker.log") as worker,
    ):
        wait_until(lambda: httpx.get(f"{url}/healthz").status_code == 200, timeout=60, what="uvicorn")
        stack = Stack(url, home, worker, api, s3_endpoint="", prefix="")
        folder = make_dataset(tmp_path / "synthetic", n=6)
        dataset = stack.http.post("/v1/datasets", data={"uri": folder.as_uri()}).json()
        config = {**BASELINE, "patch_size": 32, "steps": 10, "val_every": 5, "model": {"width": 4, "depth": 1}}
        job = stack.http.post("/v1/jobs", json={"kind": "baseline", "dataset_id": dataset["id"], "config": config})
        assert job.status_code == 201, job.text
        done = stack.wait(job.json()["id"])
        assert done["status"] == "succeeded", done["error"]
        download = stack.http.get(f"/v1/jobs/{done['id']}/checkpoint")
        assert download.status_code == 200 and len(download.content) > 0
    assert (home / "peltune.db").is_file()
    assert (home / "objects" / "checkpoints" / done["output_checkpoint_id"] / "model.pt").is_file()
    assert not any((home / "broker" / "queue").iterdir())  # the message was consumed
