"""Process-wide logging for the API and the worker: one JSON object per line, carrying job id and tenant where known.

Every line has ``time``, ``level``, ``logger``, ``message``, ``service`` (api | worker), ``job_id`` and
``tenant``. Each of the two comes from, in order: an ``extra={"job_id": ..., "tenant": ...}`` on the call; the
context (``current_job_id`` / ``current_tenant``: the worker sets the job id around ``peltune.run_job``, see
``install_worker_logging``); or the API request being served (its ``{job_id}`` path parameter, and the tenant its
authentication recorded in ``request.state.tenant_id``). Where none is known the field is null, never absent, so log
queries and dashboards can rely on it.

Only deployed processes call ``configure_logging`` (the API lifespan when it reads its settings from the
environment, the Celery worker's ``setup_logging`` signal); apps built by tests keep pytest's log capture.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import traceback
from collections.abc import MutableMapping
from datetime import UTC, datetime
from typing import Any

from api.queue import RUN_JOB_TASK
from api.settings import Settings, get_settings

# The job the current task or request is about, and the ASGI scope of the request being served (its path
# parameters appear in it once the router has matched).
current_job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("peltune_job_id", default=None)
current_tenant: contextvars.ContextVar[str | None] = contextvars.ContextVar("peltune_tenant", default=None)
current_scope: contextvars.ContextVar[MutableMapping[str, Any] | None] = contextvars.ContextVar(
    "peltune_request_scope", default=None
)


# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is written out as a field.
# (uvicorn's "color_message" repeats the message with terminal colours: dropped.)
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "color_message",
}


def job_id_for(record: logging.LogRecord) -> str | None:
    if explicit := getattr(record, "job_id", None):
        return str(explicit)
    if job_id := current_job_id.get():
        return job_id
    scope = current_scope.get()
    return scope.get("path_params", {}).get("job_id") if scope is not None else None


def tenant_for(record: logging.LogRecord) -> str | None:
    if explicit := getattr(record, "tenant", None):
        return str(explicit)
    if tenant := current_tenant.get():
        return tenant
    # api.deps.get_tenant records the caller's tenant as request.state.tenant_id, which lives in the ASGI scope:
    # the one object the request's threads and the middleware share (context variables set in a dependency's
    # worker thread never reach the middleware).
    scope = current_scope.get()
    return (scope.get("state") or {}).get("tenant_id") if scope is not None else None


class JsonFormatter(logging.Formatter):
    """A LogRecord as one line of JSON (never raises on odd ``extra`` values: they are written as strings)."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "service": self.service,
            "job_id": job_id_for(record),
            "tenant": tenant_for(record),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return json.dumps(entry, default=str)


def configure_logging(service: str, settings: Settings | None = None, level: str | int | None = None) -> None:
    """Send every logger's records to stderr, as JSON lines (or text, PELTUNE_LOG_FORMAT=text); idempotent."""
    settings = settings or get_settings()
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers = [handler]
    logging.captureWarnings(True)  # warnings.warn() output becomes a record too, so stderr stays all JSON
    root.setLevel(level or settings.log_level)
    # uvicorn installs its own text handlers before it imports the app: route them through ours instead. The
    # access log is ours too (api.observability writes one line per request with route, status and duration).
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True


def install_worker_logging() -> None:
    """Celery hooks: JSON logging instead of Celery's own set-up, and the running job's id on every line."""
    from celery.signals import setup_logging, task_postrun, task_prerun

    @setup_logging.connect(weak=False)
    def _setup(loglevel: str | int | None = None, **_: Any) -> None:
        # Connecting to setup_logging tells Celery not to configure logging itself.
        configure_logging("worker", level=loglevel)

    @task_prerun.connect(weak=False)
    def _job_started(task: Any = None, args: Any = None, **_: Any) -> None:
        if getattr(task, "name", None) == RUN_JOB_TASK and args:
            current_job_id.set(str(args[0]))
            current_tenant.set(_tenant_of_job(str(args[0])))

    @task_postrun.connect(weak=False)
    def _job_finished(**_: Any) -> None:
        current_job_id.set(None)
        current_tenant.set(None)


def _tenant_of_job(job_id: str) -> str | None:
    """The job's tenant (one indexed read per job); None when unknown. Logging must never fail a job."""
    try:
        from sqlalchemy import select

        from api.db.models import Job
        from api.db.session import get_sessionmaker

        with get_sessionmaker()() as session:
            return session.scalar(select(Job.tenant_id).where(Job.id == job_id))
    except Exception as exc:
        logging.getLogger(__name__).debug("no tenant for job %s: %s", job_id, exc)
        return None
