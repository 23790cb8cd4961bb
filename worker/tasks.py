"""``peltune.run_job``: run one training job end to end, exactly once.

1. Claim the row (conditional UPDATE queued -> running, counting the attempt). A redelivered message, or a second
   worker, finds it claimed (or cancelled) and exits without touching it.
2. Stage inputs into ``{work_dir}/{job_id}``: the dataset (an archive is downloaded and unpacked; a ``file://``
   folder is used in place) and, for a fine-tune, the init checkpoint (always copied, and its size and sha256
   checked against its row: a changed checkpoint fails the job); write ``config.json`` (a TrainConfig).
   A retry first downloads the job's last snapshot (``jobs/{id}/snapshot.pt`` in the object store) into ``out/``,
   so the trainer resumes from it: weights, optimizer, LR schedule, step and RNG states.
3. Launch ``worker.train_entry`` (1 process, or torchrun with N ranks) in its own process group, output to
   ``train.log``, and every poll: follow ``out/metrics.jsonl`` into SQL (metric points, step, progress, heartbeat),
   upload a new ``snapshot.pt`` to the object store, and stop if the row is no longer running (cancelled).
4. Exit 0: upload ``model.pt`` as a new Checkpoint row and store ``summary.json`` on the job -> succeeded.
   A rank killed by a signal (or the worker stopping) -> queued again while attempts are left
   (``Settings.max_attempts``); any other failure -> failed, with the ranks' ``error-rank*.txt`` (or the log's
   tail) as the reason.

Whatever happens in between (an exception, a timeout, a cancel, the worker being told to stop), the training
process group is killed and the job is left succeeded, failed, cancelled or queued for a retry, never running.
Database writes of a running job are retried with backoff (``Settings.db_retry_s``): training goes on through a
database outage and the outcome is recorded once the database is back.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from api.db import crud
from api.db.models import FINAL_STATUSES, Job, JobKind, JobStatus, new_id, utcnow
from api.db.session import get_sessionmaker, session_scope
from api.queue import RUN_JOB_TASK, EnqueueError, enqueue_job
from api.settings import Settings, get_settings
from api.storage import StorageError, file_digest, file_uri_path, get_store, localize, store_for_uri
from pel.config import TrainConfig
from pel.data import DatasetError, extract_archive, open_dataset
from pel.models.intake import IntakeError, file_suffix, inspect_file, write_spec
from worker.celery_app import app
from worker.launcher import TrainingProcess, build_command

log = logging.getLogger(__name__)

ERROR_TEXT_LIMIT = 4000
LOG_TAIL_BYTES = 3000
# How often a claimed job's heartbeat is refreshed (one UPDATE); far below Settings.heartbeat_timeout_s.
HEARTBEAT_EVERY_S = 10.0


T = TypeVar("T")


class JobFailed(Exception):
    """This attempt cannot succeed; the message is the reason stored on the job. ``retryable``: the cause is
    outside the job (a rank killed by a signal: OOM killer, preemption), so another attempt may well succeed."""

    def __init__(self, reason: str, *, retryable: bool = False) -> None:
        super().__init__(reason)
        self.retryable = retryable


class JobStopped(Exception):
    """The row stopped being "running" under us (cancelled, or requeued by a reaper): kill the training, record
    nothing."""


# Per database URL, the monotonic time until which this process does not judge heartbeats: right after a database
# outage every job's heartbeat is stale only because nobody could write it.
_db_trouble_until: dict[str, float] = {}


def note_db_trouble(settings: Settings) -> None:
    _db_trouble_until[settings.database_url] = time.monotonic() + settings.heartbeat_timeout_s


def with_db_retry(what: str, job_id: str, settings: Settings, action: Callable[[], T]) -> T:
    """``action()``, retried with exponential backoff (0.5 s doubling up to 30 s) while the database is unreachable,
    for up to ``settings.db_retry_s``: a job must not be lost because PostgreSQL restarted under it."""
    deadline = time.monotonic() + settings.db_retry_s
    delay = 0.5
    while True:
        try:
            return action()
        except SQLAlchemyError as exc:
            note_db_trouble(settings)
            if time.monotonic() + delay > deadline:
                raise
            log.warning("job %s: could not %s (retrying in %.1f s): %s", job_id, what, delay, exc)
            time.sleep(delay)
            delay = min(30.0, delay * 2)


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
                note_db_trouble(self.settings)
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
    checkpoint_format: str = "pel-tune"
    checkpoint_architecture: dict[str, Any] | None = None
    attempt: int = 1
    resume_step: int = 0

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
    format: str = "pel-tune"
    architecture: dict[str, Any] | None = None


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
        claimed = crud.claim_job(session, job_id=job_id, worker=socket.gethostname())
        if not claimed:
            job = crud.get_job(session, job_id=job_id)
            status = job.status if job is not None else None
    if not claimed:
        log.info("job %s not claimed (status %s): already taken by another delivery, or unknown", job_id, status)
        return status

    log.info("job %s claimed", job_id)
    job_dir = settings.work_dir / job_id
    output: Output | None = None
    # Unless the attempt ends below, the worker itself is stopping (cold shutdown): another attempt is in order.
    error: str | None = "the worker stopped before the job finished"
    retryable, stopped = True, False
    spec: JobSpec | None = None
    try:
        with Heartbeat(job_id, settings) as heartbeat:
            spec = load_spec(job_id, settings)
            output = run_claimed(spec, job_dir, settings, heartbeat)
        error = None
    except JobStopped as exc:
        error, stopped = str(exc), True
    except JobFailed as exc:
        error, retryable = str(exc), exc.retryable
    except Exception as exc:
        log.exception("job %s: unexpected error", job_id)
        error, retryable = f"worker error: {type(exc).__name__}: {exc}", False
    finally:
        # Also reached on KeyboardInterrupt/SystemExit (cold worker shutdown): the row must not stay "running", and
        # a job put back in the queue gets its message. A stopped job is someone else's to record (and to send).
        if not stopped:
            status = record_outcome(job_id, spec, output, error, settings, retryable=retryable)
            if status is JobStatus.queued:
                _send(job_id, settings)
    if stopped:
        status = _status_of(job_id, settings)
    log.info("job %s %s%s", job_id, status.value if status else "not recorded", f": {error}" if error else "")
    if status in FINAL_STATUSES:
        _drop_snapshot(job_id, settings)
    if status is JobStatus.succeeded and not settings.keep_work_dirs:
        shutil.rmtree(job_dir, ignore_errors=True)
    return status


def _status_of(job_id: str, settings: Settings) -> JobStatus | None:
    def read() -> JobStatus | None:
        with session_scope(settings.database_url) as session:
            job = crud.get_job(session, job_id=job_id)
            return job.status if job is not None else None

    return with_db_retry("read the job's status", job_id, settings, read)


def _send(job_id: str, settings: Settings) -> None:
    """Send a run_job message for a job just put back in the queue; if the broker is down, the reconciler
    re-sends it after Settings.requeue_after_s."""
    try:
        enqueue_job(job_id, settings)
    except EnqueueError as exc:
        log.warning("job %s: queued again, but its message was not sent (the reconciler will): %s", job_id, exc)


def snapshot_key(job_id: str) -> str:
    return f"jobs/{job_id}/snapshot.pt"


def _drop_snapshot(job_id: str, settings: Settings) -> None:
    """A finished job needs no snapshot; a failure to delete one only leaves a file behind."""
    try:
        store = get_store(settings)
        if store.exists(snapshot_key(job_id)):
            store.delete(snapshot_key(job_id))
    except (StorageError, OSError) as exc:
        log.warning("job %s: could not delete its snapshot: %s", job_id, exc)


def reap_stale_jobs(settings: Settings) -> list[str]:
    """Put running jobs whose worker is gone back in the queue (attempts permitting, and send their messages) or
    fail them; re-send the messages of jobs queued for longer than Settings.requeue_after_s (a broker restart may
    have lost them). Returns the ids of the stale jobs. Skipped right after a database outage, when every
    heartbeat looks stale only because nobody could write it."""
    if time.monotonic() < _db_trouble_until.get(settings.database_url, 0.0):
        return []
    with session_scope(settings.database_url) as session:
        requeued, failed = crud.recover_stale_jobs(
            session, heartbeat_timeout_s=settings.heartbeat_timeout_s, max_attempts=settings.max_attempts
        )
    for job_id in failed:
        log.warning("job %s failed: its worker stopped sending heartbeats and no attempts are left", job_id)
        _drop_snapshot(job_id, settings)
    for job_id in requeued:
        log.warning("job %s queued again: its worker stopped sending heartbeats", job_id)
        _send(job_id, settings)
    with session_scope(settings.database_url) as session:
        resend = crud.jobs_to_resend(session, older_than_s=settings.requeue_after_s)
    for job_id in resend:
        # Harmless if the broker still holds the first message: whichever delivery comes first claims the row.
        log.warning(
            "job %s still queued %.0f s after its message was sent: sending it again", job_id, settings.requeue_after_s
        )
        _send(job_id, settings)
    return requeued + failed


def prune_work_dirs(settings: Settings, *, now: datetime | None = None) -> list[str]:
    """Remove the work folders (``{work_dir}/{job_id}``) of failed and cancelled jobs that finished more than
    Settings.keep_failed_work_dirs_s ago: kept that long for debugging (staged inputs, train.log, the ranks' error
    reports), then they only fill the disk. Folders of queued or running jobs, of succeeded jobs kept on purpose
    (Settings.keep_work_dirs) and of ids the database does not know are left alone. Returns the removed ids."""
    try:
        names = sorted(path.name for path in settings.work_dir.iterdir() if path.is_dir())
    except FileNotFoundError:
        return []
    cutoff_s = settings.keep_failed_work_dirs_s
    cutoff = (now or utcnow()) - timedelta(seconds=cutoff_s)
    done: list[str] = []
    with session_scope(settings.database_url) as session:
        for start in range(0, len(names), 500):  # bounded IN lists
            done += session.scalars(
                select(Job.id).where(
                    Job.id.in_(names[start : start + 500]),
                    Job.status.in_((JobStatus.failed, JobStatus.cancelled)),
                    Job.finished_at < cutoff,
                )
            ).all()
    for job_id in done:
        log.info("job %s: removing its work folder (finished over %.0f s ago)", job_id, cutoff_s)
        shutil.rmtree(settings.work_dir / job_id, ignore_errors=True)
    return done


def reaper_interval_s(settings: Settings) -> float:
    """How often a worker looks for stale jobs: often enough that one is failed soon after its heartbeat timeout."""
    return min(60.0, settings.heartbeat_timeout_s / 2)


def reap_periodically(settings: Settings, stop: threading.Event, interval_s: float | None = None) -> None:
    """Run the stale-job reaper now and then every interval until stop is set. Every worker process runs this in a
    daemon thread, so a job whose worker was killed is requeued (or failed) on time even when no worker starts
    another job, and a message the broker lost is sent again; old work folders of failed and cancelled jobs are
    pruned (prune_work_dirs). A database error (not migrated yet, down for a moment) is logged and tried again at
    the next round."""
    interval = reaper_interval_s(settings) if interval_s is None else interval_s
    while True:
        try:
            reap_stale_jobs(settings)
            prune_work_dirs(settings)
        except Exception as exc:
            if isinstance(exc, SQLAlchemyError):
                note_db_trouble(settings)
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
            checkpoint_format=checkpoint.format if checkpoint else "pel-tune",
            checkpoint_architecture=checkpoint.architecture if checkpoint else None,
            attempt=job.attempt,
            resume_step=job.resume_step,
        )


def run_claimed(spec: JobSpec, job_dir: Path, settings: Settings, heartbeat: Heartbeat) -> Output:
    if job_dir.exists():  # a previous attempt's leftovers must not be mistaken for this run's outputs
        shutil.rmtree(job_dir)
    job_dir.mkdir(parents=True)
    dataset_dir, init = stage_inputs(spec, job_dir / "inputs", settings)
    config_path = write_config(spec, job_dir / "config.json")
    out_dir = job_dir / "out"
    out_dir.mkdir()
    restore_snapshot(spec, out_dir, settings)
    argv = build_command(nprocs=spec.nprocs, config=config_path, dataset=dataset_dir, out=out_dir, init=init)
    log_path = job_dir / "train.log"
    log.info("job %s: launching %s", spec.id, " ".join(argv))
    shipper = SnapshotShipper(spec.id, out_dir, settings)
    with TrainingProcess(argv, log_path=log_path, cwd=job_dir) as process:
        code = supervise(process, MetricsFollower(out_dir / "metrics.jsonl"), spec.id, settings, heartbeat, shipper)
    if code != 0:
        raise JobFailed(failure_reason(out_dir, log_path, code), retryable=killed_by_signal(log_path, code))
    return publish(spec, out_dir, settings)


def restore_snapshot(spec: JobSpec, out_dir: Path, settings: Settings) -> None:
    """Before a retry: put the job's last snapshot where the trainer looks (``out/snapshot.pt``) and drop the metric
    points past its step, which the resumed run writes again. No snapshot (none written yet, or lost): from step 0."""
    step = 0
    if spec.resume_step > 0:
        try:
            get_store(settings).get_file(snapshot_key(spec.id), out_dir / SNAPSHOT)
            step = spec.resume_step
            log.info("job %s: attempt %d resumes from the snapshot at step %d", spec.id, spec.attempt, step)
        except StorageError as exc:
            log.warning("job %s: its snapshot could not be fetched, starting from step 0: %s", spec.id, exc)
            (out_dir / SNAPSHOT).unlink(missing_ok=True)

    def drop_points() -> None:
        with session_scope(settings.database_url) as session:
            crud.delete_metric_points_after(session, job_id=spec.id, step=step)

    with_db_retry("drop metric points past the resume step", spec.id, settings, drop_points)


# The names pel.train writes in out/ (not imported from there: pel.train imports torch).
SNAPSHOT = "snapshot.pt"
SNAPSHOT_INFO = "snapshot.json"


class SnapshotShipper:
    """Copies each new ``out/snapshot.pt`` to the object store (``jobs/{id}/snapshot.pt``) and records its step on
    the job, so a retry on any machine resumes from it. The object store rather than the worker's disk: a worker
    that died may never come back, and its replacement may be another host.

    The trainer writes ``snapshot.json`` ({"step", "inode"}) after each ``snapshot.pt``; the shipper hard-links the
    snapshot (a stable copy for free, even while the next one replaces it) and ships it only when the link's inode
    is the one the info names, so an upload is never labelled with a step it does not hold."""

    def __init__(self, job_id: str, out_dir: Path, settings: Settings) -> None:
        self.job_id = job_id
        self.out_dir = out_dir
        self.settings = settings
        self.shipped_step = 0

    def poll(self, recorded_step: int) -> None:
        """Ship the newest snapshot if the metric points up to its step are in SQL (``recorded_step``): a retry
        resumes after the snapshot and never writes those points again, so they must be stored first."""
        try:
            info = json.loads((self.out_dir / SNAPSHOT_INFO).read_text())
            step, inode = int(info["step"]), int(info["inode"])
        except (OSError, ValueError, KeyError, TypeError):
            return  # none yet, or being written
        if step <= self.shipped_step or step > recorded_step:
            return
        link = self.out_dir.parent / ".snapshot-upload.pt"
        link.unlink(missing_ok=True)
        try:
            os.link(self.out_dir / SNAPSHOT, link)
        except OSError:
            return
        try:
            if os.stat(link).st_ino != inode:
                return  # replaced since the info was written; the next poll sees the next info
            get_store(self.settings).put_file(snapshot_key(self.job_id), link)
        except StorageError as exc:
            log.warning("job %s: could not upload the snapshot of step %d (will retry): %s", self.job_id, step, exc)
            return
        finally:
            link.unlink(missing_ok=True)
        self.shipped_step = step
        try:
            with session_scope(self.settings.database_url) as session:
                crud.record_snapshot(session, job_id=self.job_id, step=step)
        except SQLAlchemyError as exc:  # the object is there; a retry that does not know it starts from step 0
            note_db_trouble(self.settings)
            self.shipped_step = 0  # record it again at the next poll
            log.warning("job %s: could not record the snapshot of step %d: %s", self.job_id, step, exc)


def stage_inputs(spec: JobSpec, inputs: Path, settings: Settings) -> tuple[Path, Path | None]:
    """(dataset folder, init checkpoint path or None), downloading and unpacking what is not local."""
    inputs.mkdir(parents=True, exist_ok=True)
    try:
        if spec.dataset_uri.startswith("file:") and file_uri_path(spec.dataset_uri).is_dir():
            dataset_dir = file_uri_path(spec.dataset_uri)  # registered in place: read, never copied or deleted
        else:
            archive = localize(spec.dataset_uri, inputs / "archive", settings)
            dataset_dir = extract_archive(
                archive,
                inputs / "dataset",
                max_bytes=settings.max_archive_bytes,
                max_members=settings.max_archive_members,
            )
            if archive.is_relative_to(inputs):
                archive.unlink()  # a downloaded copy; the unpacked folder is all training needs
        # Image headers only, before the training decodes every pixel: refuses an image over the pixel limit (a
        # decompression bomb) and a folder changed since registration, with the file named in the job's error.
        open_dataset(dataset_dir, max_image_pixels=settings.max_image_pixels)
        init = None
        if spec.kind is JobKind.finetune:
            init = stage_checkpoint(spec, inputs / "checkpoint", settings)
    except (StorageError, DatasetError) as exc:
        raise JobFailed(f"could not stage the job's inputs: {exc}") from None
    return dataset_dir, init


def stage_checkpoint(spec: JobSpec, dest_dir: Path, settings: Settings) -> Path:
    """Copy the init checkpoint into the job's folder (never used in place, even from ``file://``) and check the
    copy's size and sha256 against the row: training only ever reads bytes that match what was registered. The
    row's format and architecture go beside it (``<file>.json``, pel.models.intake.write_spec) for the trainer,
    which loads the model and checks it against the job (weights fit, channels) before any training step."""
    assert spec.checkpoint_uri is not None
    store, key = store_for_uri(spec.checkpoint_uri, settings)
    path = store.get_file(key, dest_dir / (Path(key).name or "model.pt"))
    size, sha256 = file_digest(path)
    if sha256 != spec.checkpoint_sha256 or size != spec.checkpoint_size:
        raise JobFailed(
            f"checkpoint {spec.checkpoint_id} changed since it was registered (sha256 {sha256}, {size} bytes; "
            f"registered sha256 {spec.checkpoint_sha256}, {spec.checkpoint_size} bytes)"
        )
    write_spec(path, spec.checkpoint_format, spec.checkpoint_architecture)
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
    process: TrainingProcess,
    follower: MetricsFollower,
    job_id: str,
    settings: Settings,
    heartbeat: Heartbeat,
    shipper: SnapshotShipper | None = None,
) -> int:
    """Wait for the training to exit, copying metrics into SQL and snapshots to the object store as they appear;
    returns its exit code. Every poll also asks the row whether the job is still ours: a cancelled job raises
    JobStopped here, and leaving the TrainingProcess block kills its whole process group."""
    deadline = time.monotonic() + settings.job_timeout_s
    pending: list[dict[str, Any]] = []
    recorded_step = 0  # the newest step whose metric points are stored
    while True:
        code = process.wait(timeout=settings.poll_interval_s)
        pending += follower.read_new()
        newest = max((int(point["step"]) for point in pending), default=None)
        written = _write_progress(job_id, pending, settings)
        if written is False:
            heartbeat.lost = True
        elif written and newest is not None:
            recorded_step = max(recorded_step, newest)
        if shipper is not None:
            shipper.poll(recorded_step)
        if heartbeat.lost:
            status = _status_of(job_id, settings)
            raise JobStopped(f"the job stopped being running while it trained (now {status.value if status else '?'})")
        if code is not None:
            # The last points matter (final step, validation): wait for the database if it is away.
            with_db_retry("record the last metric points", job_id, settings, partial(_flush, job_id, pending, settings))
            return code
        if time.monotonic() > deadline:
            raise JobFailed(f"timed out: still training after {settings.job_timeout_s:.0f} s (PELTUNE_JOB_TIMEOUT_S)")


class _DatabaseDown(SQLAlchemyError):
    """_write_progress reported a database failure (it logs and swallows the original)."""


def _flush(job_id: str, pending: list[dict[str, Any]], settings: Settings) -> None:
    if pending and _write_progress(job_id, pending, settings) is None:
        raise _DatabaseDown("the database is unreachable")


def _write_progress(job_id: str, pending: list[dict[str, Any]], settings: Settings) -> bool | None:
    """Store pending points (clearing them) and refresh step/progress/heartbeat. None if the database failed:
    training goes on and the points are retried at the next poll. False when the job is no longer running."""
    try:
        with session_scope(settings.database_url) as session:
            if pending:
                crud.add_metric_points(session, job_id=job_id, points=pending)
            last = pending[-1] if pending else None
            running = crud.record_progress(
                session,
                job_id=job_id,
                step=last["step"] if last else None,
                total_steps=_int_or_none(last.get("total_steps")) if last else None,
            )
            if not running:
                session.rollback()  # not ours any more: its points are not ours to add either
                return False
    except SQLAlchemyError as exc:
        note_db_trouble(settings)
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


def killed_by_signal(log_path: Path, code: int) -> bool:
    """Whether the training (or, under torchrun, the rank that failed first) was killed by a signal: the OOM
    killer, a preempted host, an operator. Worth another attempt, unlike an error the training reported itself
    (a bad checkpoint or a NaN loss fails the same way every time)."""
    if code < 0:
        return True
    root = ROOT_CAUSE.search(_tail(log_path))
    return root is not None and int(root[2]) < 0


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
    # The trainer writes the kind of file it was given; the row says which, torch-free, as registration does.
    try:
        inspection = inspect_file(model)
    except IntakeError as exc:
        raise JobFailed(f"training wrote an unreadable model.pt: {exc}") from None
    architecture = inspection.architecture
    if architecture is None and spec.kind is JobKind.finetune and inspection.format == spec.checkpoint_format:
        architecture = spec.checkpoint_architecture  # a state_dict's architecture is the one it was trained as
    size, sha256 = file_digest(model)
    checkpoint_id = new_id()
    name = "model" + file_suffix(inspection.format)
    uri = get_store(settings).put_file(f"checkpoints/{checkpoint_id}/{name}", model)
    return Output(
        checkpoint_id=checkpoint_id,
        uri=uri,
        size_bytes=size,
        sha256=sha256,
        summary=summary,
        format=inspection.format,
        architecture=architecture,
    )


def record_outcome(
    job_id: str,
    spec: JobSpec | None,
    output: Output | None,
    error: str | None,
    settings: Settings,
    *,
    retryable: bool = False,
) -> JobStatus | None:
    """Write the attempt's outcome, retrying while the database is away (Settings.db_retry_s): the output
    Checkpoint row and "succeeded" together; or, for a retryable failure with attempts left, "queued" again (the
    caller sends the message); else "failed" with the reason."""
    return with_db_retry(
        "record its outcome",
        job_id,
        settings,
        partial(_record_outcome_once, job_id, spec, output, error, settings, retryable),
    )


def _record_outcome_once(
    job_id: str, spec: JobSpec | None, output: Output | None, error: str | None, settings: Settings, retryable: bool
) -> JobStatus | None:
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
                    format=output.format,
                    architecture=output.architecture,
                )
                finished = crud.finish_job(
                    session,
                    job_id=job_id,
                    status=JobStatus.succeeded,
                    summary=output.summary,
                    output_checkpoint_id=output.checkpoint_id,
                )
            else:
                error = error or "unknown error"
                job = crud.get_job(session, job_id=job_id)
                attempt = job.attempt if job is not None else 0
                if retryable and attempt < settings.max_attempts:
                    finished = crud.retry_job(
                        session,
                        job_id=job_id,
                        reason=f"{error} (attempt {attempt} of {settings.max_attempts}; queued again)",
                    )
                else:
                    if retryable:
                        error = f"{error} (attempt {attempt} of {settings.max_attempts}; no attempts left)"
                    finished = crud.finish_job(session, job_id=job_id, status=JobStatus.failed, error=error)
            if finished:
                session.commit()
            else:  # someone else finished it (the reaper): their verdict stands, ours (and its checkpoint) goes
                session.rollback()
            session.expire_all()  # the UPDATEs bypassed the identity map: read the row afresh
            job = crud.get_job(session, job_id=job_id)
            return job.status if job is not None else None
        except BaseException:
            session.rollback()
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
