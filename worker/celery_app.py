"""The Celery application that executes PEL Tune jobs.

Start a worker (from the repository root, with the same PELTUNE_* environment as the API)::

    celery -A worker.celery_app:app worker --pool solo --concurrency 1 --without-gossip --without-mingle -l INFO

It consumes the queue named by ``PELTUNE_TASK_QUEUE`` (default ``peltune``; ``-Q`` is not needed). Why these
options:

- ``--pool solo``: the task only supervises a training subprocess (torchrun and its ranks), so a worker runs one
  job at a time by design and scales out as more worker processes (one per GPU host). Solo runs the task in the
  worker's main process: no daemonic prefork child (which may not start children of its own), no engine
  inherited across fork, and the parent-death signal of the training group follows the process that supervises it.
- ``task_acks_late`` + ``worker_prefetch_multiplier=1``: a message is acknowledged only when its job finished, and
  a busy worker holds no second message that another idle worker could run.
- ``visibility_timeout`` (Redis) = longest job + 1 h: Redis redelivers unacknowledged messages after it; a shorter
  one would start a long job twice. ``peltune.run_job`` is idempotent regardless: it claims the job row first.
- Recovery does not wait for that redelivery: every worker process runs a reaper thread (``worker.tasks.
  reap_periodically``) that puts a running job whose heartbeat went stale (its worker was SIGKILLed, its host
  died) back in the queue and sends its message (it resumes from its last snapshot), and re-sends the message of a
  job still queued long after it was sent (Redis restarted or flushed). The SQL row, not the broker, is the
  source of truth; a duplicate message is harmless.
- ``--without-gossip --without-mingle``: no broadcast chatter; workers share nothing but the queue.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from celery import Celery
from celery.signals import worker_init, worker_process_init, worker_ready

from api.db.session import dispose_engines
from api.logs import install_worker_logging
from api.queue import celery_config
from api.settings import get_settings

log = logging.getLogger(__name__)

settings = get_settings()
install_worker_logging()  # JSON log lines carrying the running job's id and tenant (api/logs.py)

app = Celery("peltune", include=["worker.tasks"])
app.conf.update(
    celery_config(settings),
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    # A task whose worker died is not requeued by Celery: the job row already says "running", and the stale-job
    # reaper requeues it once its heartbeat is stale (its ranks died with the worker by the parent-death signal).
    task_reject_on_worker_lost=False,
    # A broker hiccup must not kill an hour-long training run; a redelivered message is harmless (claim).
    worker_cancel_long_running_tasks_on_connection_loss=False,
    worker_hijack_root_logger=False,
)


@worker_init.connect
def _broker_folders(**_: Any) -> None:
    # Before the consumer starts: the filesystem transport lists its queue folder on every poll.
    get_settings().ensure_broker_folders()


@worker_process_init.connect
def _fresh_database_connections(**_: Any) -> None:
    # A pool child inherits the parent's engine and its open sockets; sharing them corrupts both sides.
    dispose_engines()
    _start_stale_job_reaper()


@worker_ready.connect
def _reap_stale_jobs(**_: Any) -> None:
    _start_stale_job_reaper()


_reaper_pid: int | None = None
_reaper_lock = threading.Lock()


def _start_stale_job_reaper() -> None:
    """Every worker process recovers stale running jobs and re-sends lost messages periodically (a daemon thread;
    once per process: threads do not survive a fork, so a pool child starts its own). An idle worker thus requeues
    (or, with no attempts left, fails) a killed worker's job once its heartbeat is Settings.heartbeat_timeout_s
    stale, without waiting for a new job or a worker start."""
    global _reaper_pid
    with _reaper_lock:
        if _reaper_pid == os.getpid():
            return
        _reaper_pid = os.getpid()
    from worker.tasks import start_reaper

    start_reaper(get_settings())
