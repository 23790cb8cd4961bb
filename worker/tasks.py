"""``peltune.run_job``: run one training job end to end, exactly once.

1. Claim the row (conditional UPDATE queued -> running). A redelivered message, or a second worker, finds it
   claimed and exits without touching it.
2. Stage inputs into ``{work_dir}/{job_id}``: the dataset (an archive is downloaded and unpacked; a ``file://``
   folder is used in place) and, for a fine-tune, the init checkpoint (always copied, and its size and sha256
   checked against its row: a changed checkpoint fails the job); write ``config.json`` (a TrainConfig).
3. Launch ``worker.train_entry`` (1 process, or torchrun with N ranks) in its own process group, output to
   ``train.log``, and follow ``out/metrics.jsonl`` into SQL every poll (metric points, step, progress, heartbeat).
4. Exit 0: upload ``model.pt`` as a new Checkpoint row and store ``summary.json`` on the job -> succeeded.
   Otherwise -> failed, with the ranks' ``error-rank*.txt`` (or the log's tail) as the reason.

Whatever happens in between (an exception, a timeout, the worker being told to stop), the training process group
is killed and the job is left succeeded or failed, never running.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from api.db import crud
from api.db.models import JobKind, JobStatus, new_id
from api.db.session import get_sessionmaker, session_scope
from api.queue import RUN_JOB_TASK
from api.settings import Settings, get_settings
from api.storage import StorageError, file_digest, file_uri_path, get_store, localize, store_for_uri
from pel.config import TrainConfig
from pel.data import DatasetError, extract_archive
from worker.celery_app import app
from worker.launcher import TrainingProcess, build_command

log = logging.getLogger(__name__)

ERROR_TEXT_LIMIT = 4000
LOG_TAIL_BYTES = 3000
# How often a claimed job's heartbeat is refreshed (one UPDATE); far below Settings.heartbeat_timeout_s.
HEARTBEAT_EVERY_S = 10.0


class JobFailed(Exception):
    """The job cannot succeed; the message is the reason stored on the job."""


class Heartbeat:
    """Refreshes the job's heartbeat from a thread for as long as the job is ours: through staging (a large
    download can take longer than the stale-job timeout), training and publishing. ``lost`` turns true when the
    row stopped being "running" under us (failed by a reaper)."""

    def __init__(self, job_id: str, settings: Settings, every_s: float = HEARTBEAT_EVERY_S) -> None:
        self.job_id = job_id
        self.settings = settings
        self.every_s = every_s
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id[:8]}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                with session_scope(self.settings.database_url) as session:
                    if not crud.record_progress(session, job_id=self.job_id):
                        self.lost = True
                        return
            except SQLAlchemyError as exc:  # a database blip must not stop the training; try again next beat
                log.warning("job %s: heartbeat failed: %s", self.job_id, exc)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


@dataclass(frozen=True)
class JobSpec:
    id: str
    kind: JobKind
    nprocs: int
    config: dict[str, Any]
    dataset_uri: str
    dataset_name: str
    checkpoint_uri: str | None
    checkpoint_name: str | None
    checkpoint_id: str | None = None
    checkpoint_size: int | None = None
    checkpoint_sha256: str | None = None

    @property
    def input_name(self) -> str:
        return self.checkpoint_name if self.kind is JobKind.finetune and self.checkpoint_name else self.dataset_name


@dataclass(frozen=True)
class Output:
    checkpoint_id: str
    uri: str
    size_bytes: int
    sha256: str
    summary: dict[str, Any] | None


# A database that is down before the claim would otherwise drop the message and strand the job as queued; after
# the claim a retry is harmless (it finds the job claimed and exits).
@app.task(name=RUN_JOB_TASK, autoretry_for=(SQLAlchemyError,), retry_backoff=5, retry_backoff_max=300, max_retries=10)
def run_job(job_id: str) -> str | None:
    status = execute_job(job_id, settings=get_settings())
    return status.value if status is not None else None


def execute_job(job_id: str, *, settings: Settings) -> JobStatus | None:
    """Run the job if this call claims it; returns its status afterwards (None for an unknown id)."""
    reap_stale_jobs(settings)
    with session_scope(settings.database_url) as session:
        claimed = crud.claim_job(session, job_id=job_id)
        if not claimed:
            job = crud.get_job(session, job_id=job_id)
            status = job.status if job is not None else None
    if not claimed:
        log.info("job %s not claimed (status %s): already taken by another delivery, or unknown", job_id, status)
        return status

    log.info("job %s claimed", job_id)
    job_dir = settings.work_dir / job_id
    output: Output | None = None
    error: str | None = "the worker stopped before the job finished"
    spec: JobSpec | None = None
    try:
        with Heartbeat(job_id, settings) as heartbeat:
            spec = load_spec(job_id, settings)
            output = run_claimed(spec, job_dir, settings, heartbeat)
        error = None
    except JobFailed as exc:
        error = str(exc)
    except Exception as exc:
        log.exception("job %s: unexpected error", job_id)
        error = f"worker error: {type(exc).__name__}: {exc}"
    finally:
        # Also reached on KeyboardInterrupt/SystemExit (cold worker shutdown): the row must not stay "running".
        status = record_outcome(job_id, spec, output, error, settings)
    log.info("job %s %s%s", job_id, status.value if status else "not recorded", f": {error}" if error else "")
    if status is JobStatus.succeeded and not settings.keep_work_dirs:
        shutil.rmtree(job_dir, ignore_errors=True)
    return status


def reap_stale_jobs(settings: Settings) -> list[str]:
    with session_scope(settings.database_url) as session:
        reaped = crud.fail_stale_jobs(session, heartbeat_timeout_s=settings.heartbeat_timeout_s)
    for job_id in reaped:
        log.warning("job %s failed: its worker stopped sending heartbeats", job_id)
    return reaped


def reaper_interval_s(settings: Settings) -> float:
    """How often a worker looks for stale jobs: often enough that one is failed soon after its heartbeat timeout."""
    return min(60.0, settings.heartbeat_timeout_s / 2)


def reap_periodically(settings: Settings, stop: threading.Event, interval_s: float | None = None) -> None:
    """Run the stale-job reaper now and then every interval until stop is set. Every worker process runs this in a
    daemon thread, so a job whose worker was killed is failed on time even when no worker starts another job. A
    database error (not migrated yet, down for a moment) is logged and tried again at the next round."""
    interval = reaper_interval_s(settings) if interval_s is None else interval_s
    while True:
        try:
            reap_stale_jobs(settings)
        except Exception as exc:
            log.warning("could not check for stale running jobs (will retry in %.0f s): %s", interval, exc)
        if stop.wait(interval):
            return


def start_reaper(settings: Settings, interval_s: float | None = None) -> tuple[threading.Thread, threading.Event]:
    """Start reap_periodically in a daemon thread; set the returned event to stop it."""
    stop = threading.Event()
    thread = threading.Thread(
        target=reap_periodically, args=(settings, stop, interval_s), name="stale-job-reaper", daemon=True
    )
    thread.start()
    return thread, stop


def load_spec(job_id: str, settings: Settings) -> JobSpec:
    with session_scope(settings.database_url) as session:
        job = crud.get_job(session, job_id=job_id)
        assert job is not None, "a claimed job exists"
        dataset = crud.get_dataset(session, dataset_id=job.dataset_id)
        checkpoint = (
            crud.get_checkpoint(session, checkpoint_id=job.checkpoint_id) if job.checkpoint_id is not None else None
        )
        if dataset is None:
            raise JobFailed(f"dataset {job.dataset_id} no longer exists")
        if job.kind is JobKind.finetune and checkpoint is None:
            raise JobFailed(f"init checkpoint {job.checkpoint_id} no longer exists")
        return JobSpec(
            id=job.id,
            kind=job.kind,
            nprocs=job.nprocs,
            config=dict(job.config),
            dataset_uri=dataset.uri,
            dataset_name=dataset.name,
            checkpoint_uri=checkpoint.uri if checkpoint else None,
            checkpoint_name=checkpoint.name if checkpoint else None,
            checkpoint_id=checkpoint.id if checkpoint else None,
            checkpoint_size=checkpoint.size_bytes if checkpoint else None,
            checkpoint_sha256=checkpoint.sha256 if checkpoint else None,
        )


def run_claimed(spec: JobSpec, job_dir: Path, settings: Settings, heartbeat: Heartbeat) -> Output:
    if job_dir.exists():  # a previous attempt's leftovers must not be mistaken for this run's outputs
        shutil.rmtree(job_dir)
    job_dir.mkdir(parents=True)
    dataset_dir, init = stage_inputs(spec, job_dir / "inputs", settings)
    config_path = write_config(spec, job_dir / "config.json")
    out_dir = job_dir / "out"
    out_dir.mkdir()
    argv = build_command(nprocs=spec.nprocs, config=config_path, dataset=dataset_dir, out=out_dir, init=init)
    log_path = job_dir / "train.log"
    log.info("job %s: launching %s", spec.id, " ".join(argv))
    with TrainingProcess(argv, log_path=log_path, cwd=job_dir) as process:
        code = supervise(process, MetricsFollower(out_dir / "metrics.jsonl"), spec.id, settings, heartbeat)
    if code != 0:
        raise JobFailed(failure_reason(out_dir, log_path, code))
    return publish(spec, out_dir, settings)


def stage_inputs(spec: JobSpec, inputs: Path, settings: Settings) -> tuple[Path, Path | None]:
    """(dataset folder, init checkpoint path or None), downloading and unpacking what is not local."""
    inputs.mkdir(parents=True, exist_ok=True)
    try:
        if spec.dataset_uri.startswith("file:") and file_uri_path(spec.dataset_uri).is_dir():
            dataset_dir = file_uri_path(spec.dataset_uri)  # registered in place: read, never copied or deleted
        else:
            archive = localize(spec.dataset_uri, inputs / "archive", settings)
            dataset_dir = extract_archive(archive, inputs / "dataset")
            if archive.is_relative_to(inputs):
                archive.unlink()  # a downloaded copy; the unpacked folder is all training needs
        init = None
        if spec.kind is JobKind.finetune:
            init = stage_checkpoint(spec, inputs / "checkpoint", settings)
    except (StorageError, DatasetError) as exc:
        raise JobFailed(f"could not stage the job's inputs: {exc}") from None
    return dataset_dir, init


def stage_checkpoint(spec: JobSpec, dest_dir: Path, settings: Settings) -> Path:
    """Copy the init checkpoint into the job's folder (never used in place, even from ``file://``) and check the
    copy's size and sha256 against the row: training only ever reads bytes that match what was registered."""
    assert spec.checkpoint_uri is not None
    store, key = store_for_uri(spec.checkpoint_uri, settings)
    path = store.get_file(key, dest_dir / (Path(key).name or "model.pt"))
    size, sha256 = file_digest(path)
    if sha256 != spec.checkpoint_sha256 or size != spec.checkpoint_size:
        raise JobFailed(
            f"checkpoint {spec.checkpoint_id} changed since it was registered (sha256 {sha256}, {size} bytes; "
            f"registered sha256 {spec.checkpoint_sha256}, {spec.checkpoint_size} bytes)"
        )
    return path


def write_config(spec: JobSpec, path: Path) -> Path:
    try:
        config = TrainConfig.from_dict({**spec.config, "mode": spec.kind.value}).to_dict()
    except (TypeError, ValueError) as exc:
        raise JobFailed(f"invalid training config: {exc}") from None
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


class MetricsFollower:
    """Reads the complete lines appended to metrics.jsonl since the last call (a partial last line waits)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""

    def read_new(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as stream:
                stream.seek(self.offset)
                data = stream.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        points = []
        for line in lines:
            if not line.strip():
                continue
            try:
                point = json.loads(line)
                point["step"] = int(point["step"])
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring a malformed metrics line in %s: %r", self.path, line[:200])
                continue
            points.append(json_safe(point))
        return points


def supervise(
    process: TrainingProcess, follower: MetricsFollower, job_id: str, settings: Settings, heartbeat: Heartbeat
) -> int:
    """Wait for the training to exit, copying metrics into SQL as they appear; returns its exit code."""
    deadline = time.monotonic() + settings.job_timeout_s
    pending: list[dict[str, Any]] = []
    while True:
        code = process.wait(timeout=settings.poll_interval_s)
        pending += follower.read_new()
        if pending and _write_progress(job_id, pending, settings) is False:
            heartbeat.lost = True
        if heartbeat.lost:
            raise JobFailed("the job stopped being running while it trained (failed by another process)")
        if code is not None:
            for _ in range(3):  # the last points matter (final step, validation); give the database a few tries
                if not pending or _write_progress(job_id, pending, settings) is not None:
                    break
                time.sleep(1.0)
            return code
        if time.monotonic() > deadline:
            raise JobFailed(f"timed out: still training after {settings.job_timeout_s:.0f} s (PELTUNE_JOB_TIMEOUT_S)")


def _write_progress(job_id: str, pending: list[dict[str, Any]], settings: Settings) -> bool | None:
    """Store pending points (clearing them) and refresh step/progress/heartbeat. None if the database failed:
    training goes on and the points are retried at the next poll."""
    try:
        with session_scope(settings.database_url) as session:
            crud.add_metric_points(session, job_id=job_id, points=pending)
            last = pending[-1] if pending else None
            running = crud.record_progress(
                session,
                job_id=job_id,
                step=last["step"] if last else None,
                total_steps=_int_or_none(last.get("total_steps")) if last else None,
            )
    except SQLAlchemyError as exc:
        log.warning("job %s: could not record progress (will retry): %s", job_id, exc)
        return None
    pending.clear()
    return running


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


# torchrun's summary of a failed group names the rank that failed first and how.
ROOT_CAUSE = re.compile(r"Root Cause \(first observed failure\):.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.S)


def failure_reason(out_dir: Path, log_path: Path, code: int) -> str:
    """The ranks' own error reports if they wrote any, else the end of the log; led by the rank that torchrun saw
    fail first when that rank wrote no report (a rank killed by a signal leaves none, and the survivors' reports
    only say their peer went away)."""
    reports = []
    for path in sorted(out_dir.glob("error-rank*.txt"), key=_rank_of):
        text = path.read_text(errors="replace").strip()
        if text:
            reports.append((_rank_of(path), text))
    root = ROOT_CAUSE.search(_tail(log_path))
    first = None
    if root and int(root[1]) not in {rank for rank, _ in reports}:
        first = f"rank {root[1]} {_how(int(root[2]))} (torchrun's first observed failure)"
    if reports:
        texts = {text for _, text in reports}
        reason = reports[0][1] if len(texts) == 1 else "\n".join(f"rank {rank}: {text}" for rank, text in reports)
        if first:
            reason = f"{first}; then {reason}"
        return reason[:ERROR_TEXT_LIMIT]
    return f"{first or f'training {_how(code)}'}; end of its log:\n{_tail(log_path)}"[:ERROR_TEXT_LIMIT]


def _how(code: int) -> str:
    return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"


def _rank_of(path: Path) -> int:
    match = re.search(r"error-rank(\d+)\.txt$", path.name)
    return int(match.group(1)) if match else 1 << 30


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as stream:
            stream.seek(0, 2)
            stream.seek(max(0, stream.tell() - LOG_TAIL_BYTES))
            return stream.read().decode("utf-8", "replace").strip()
    except OSError as exc:
        return f"(no log: {exc})"


def publish(spec: JobSpec, out_dir: Path, settings: Settings) -> Output:
    """Upload model.pt to the object store; the rows are written by record_outcome, in one transaction."""
    model = out_dir / "model.pt"
    if not model.is_file():
        raise JobFailed("training exited cleanly but wrote no model.pt")
    summary_path = out_dir / "summary.json"
    summary = None
    if summary_path.is_file():
        try:
            summary = json_safe(json.loads(summary_path.read_text()))
        except ValueError as exc:
            log.warning("job %s: unreadable summary.json: %s", spec.id, exc)
    size, sha256 = file_digest(model)
    checkpoint_id = new_id()
    uri = get_store(settings).put_file(f"checkpoints/{checkpoint_id}/model.pt", model)
    return Output(checkpoint_id=checkpoint_id, uri=uri, size_bytes=size, sha256=sha256, summary=summary)


def record_outcome(
    job_id: str, spec: JobSpec | None, output: Output | None, error: str | None, settings: Settings
) -> JobStatus | None:
    """Write the final state: the output Checkpoint row and "succeeded" together, or "failed" with the reason."""
    with get_sessionmaker(settings.database_url)() as session:
        try:
            if error is None and output is not None and spec is not None:
                crud.create_checkpoint(
                    session,
                    checkpoint_id=output.checkpoint_id,
                    name=f"{spec.kind.value} of {spec.input_name}"[:255],
                    uri=output.uri,
                    size_bytes=output.size_bytes,
                    sha256=output.sha256,
                    source_job_id=job_id,
                )
                finished = crud.finish_job(
                    session,
                    job_id=job_id,
                    status=JobStatus.succeeded,
                    summary=output.summary,
                    output_checkpoint_id=output.checkpoint_id,
                )
            else:
                finished = crud.finish_job(
                    session, job_id=job_id, status=JobStatus.failed, error=error or "unknown error"
                )
            if finished:
                session.commit()
            else:  # someone else finished it (the reaper): their verdict stands, ours (and its checkpoint) goes
                session.rollback()
            job = crud.get_job(session, job_id=job_id)
            return job.status if job is not None else None
        except BaseException:
            session.rollback()
            log.exception("job %s: could not record its outcome", job_id)
            raise


def json_safe(value: Any) -> Any:
    """JSON that every database accepts: NaN and infinities (which json.dumps writes bare) become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
