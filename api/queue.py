"""Producer side of the job queue: send ``peltune.run_job`` by name.

The API never imports ``worker/`` (which would drag in the training stack and its process model); it only needs
the broker. ``celery_config`` is the one place broker options live, shared with ``worker.celery_app``.
"""

from __future__ import annotations

import threading
from typing import Any

from celery import Celery

from api.settings import FILESYSTEM_BROKER, Settings

RUN_JOB_TASK = "peltune.run_job"

_lock = threading.Lock()
_producers: dict[tuple[str, str], Celery] = {}


class EnqueueError(RuntimeError):
    """The broker did not take the message."""


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings common to the producer and the worker."""
    config: dict[str, Any] = {
        "broker_url": settings.broker_url,
        # visibility_timeout (Redis): an unacknowledged message is redelivered only after this; it must outlast
        # the longest job, and run_job is idempotent anyway (it claims the job row before doing anything).
        "broker_transport_options": settings.broker_transport_options(),
        "broker_connection_retry_on_startup": True,
        "task_default_queue": settings.task_queue,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,  # job state lives in SQL, not in a result backend
        "result_backend": None,
    }
    if settings.broker_url.startswith(FILESYSTEM_BROKER):
        # The filesystem transport has no broadcast worth having between a few local processes.
        config["worker_enable_remote_control"] = False
    return config


def _producer(settings: Settings) -> Celery:
    key = (settings.broker_url, str(settings.home))
    with _lock:
        if key not in _producers:
            settings.ensure_broker_folders()
            app = Celery("peltune-producer", set_as_current=False)
            app.conf.update(celery_config(settings))
            _producers[key] = app
        return _producers[key]


def enqueue_job(job_id: str, settings: Settings) -> str:
    """Send run_job(job_id) to the settings' queue; returns the message id. Raises EnqueueError."""
    app = _producer(settings)
    try:
        # retry_policy bounds the wait on an unreachable broker: the request fails in seconds, not minutes.
        result = app.send_task(
            RUN_JOB_TASK,
            args=[job_id],
            queue=settings.task_queue,
            retry=True,
            retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0},
        )
    except Exception as exc:  # kombu raises OperationalError and friends; the caller only needs "it failed"
        raise EnqueueError(f"could not reach the job queue at {_redact(settings.broker_url)}: {exc}") from exc
    return str(result.id)


def _redact(url: str) -> str:
    """The broker URL without its password, for error messages."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"
