"""Operations signals: readiness checks (/readyz), Prometheus metrics (/metrics) and the request access log.

Metrics (one registry per app, so apps built by tests do not share counters):

- ``peltune_http_requests_total{method,route,status}`` and ``peltune_http_request_duration_seconds{method,route}``
  (a histogram): ``route`` is the matched route template (``/v1/jobs/{job_id}``), never the raw path, so ids do
  not explode the label set; requests that match no route count as ``route="unmatched"``.
- Read from the database and the broker at scrape time (Prometheus scrapes every 15-60 s; each costs one small
  SQL query and one broker call): ``peltune_jobs{status}`` (jobs by state), ``peltune_job_duration_seconds``
  (a histogram of started->finished over finished jobs, by final status), ``peltune_queue_depth{queue}``
  (messages waiting in the broker: Redis list lengths, or the filesystem broker's message files) and
  ``peltune_workers{queue}`` (Celery workers that answer a remote-control call within the readiness timeout and
  consume the queue; absent with the filesystem broker, which has no remote control). A source that fails makes
  ``peltune_scrape_errors{source}`` 1 instead of failing the scrape.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select, text
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import SettingsDep
from api.logs import current_scope
from api.settings import FILESYSTEM_BROKER, Settings

log = logging.getLogger("api.access")

DURATION_BUCKETS = (60.0, 300.0, 900.0, 1800.0, 3600.0, 2 * 3600.0, 6 * 3600.0, 12 * 3600.0, 24 * 3600.0)
# kombu's Redis transport keeps one list per priority step: the queue itself and "{queue}\x06\x16{step}".
REDIS_PRIORITY_STEPS = (0, 3, 6, 9)
QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})


router = APIRouter(tags=["meta"])


@router.get("/readyz", responses={503: {"description": "a dependency did not answer; the body names which"}})
def readyz(settings: SettingsDep) -> JSONResponse:
    """Ready to serve: the database, the broker and the object store all answer (503 naming those that do not)."""
    checks = readiness(settings)
    failed = [check.name for check in checks if not check.ok]
    body = {
        "status": "unready" if failed else "ready",
        "failed": failed,
        "checks": {check.name: check.detail for check in checks},
    }
    return JSONResponse(body, status_code=503 if failed else 200)


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """Prometheus text exposition of this process's request metrics and the service's job metrics."""
    return Response(generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST)


def install_observability(app: Any) -> None:
    """Request metrics middleware, /readyz and /metrics on ``app`` (job metrics join at startup)."""
    app.state.metrics_registry = CollectorRegistry()
    app.state.job_metrics = False
    app.add_middleware(RequestMetrics, registry=app.state.metrics_registry)
    app.include_router(router)


def start_job_metrics(app: Any, settings: Settings) -> None:
    """Add the job collector once the app's settings are known (lifespan; once per app)."""
    if not app.state.job_metrics:
        app.state.metrics_registry.register(JobCollector(settings))
        app.state.job_metrics = True


# -- request metrics and access log ---------------------------------------------------------------------------------


class RequestMetrics:
    """Pure ASGI middleware (streamed downloads pass through untouched): counts, latency, one access-log line."""

    def __init__(self, app: ASGIApp, registry: CollectorRegistry) -> None:
        self.app = app
        self.requests = Counter(
            "peltune_http_requests",
            "HTTP requests served, by route template and status",
            ["method", "route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "peltune_http_request_duration_seconds",
            "Time from request start to the last byte of the response, by route template",
            ["method", "route"],
            registry=registry,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = current_scope.set(scope)  # log lines of this request find its {job_id} here (api.logs)
        started = time.perf_counter()
        status = 500  # if the app raises before it responds, the server answers 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope["method"]
            self.requests.labels(method, route, str(status)).inc()
            self.latency.labels(method, route).observe(elapsed)
            # Probes and scrapes arrive every few seconds from every replica: logged only at DEBUG unless they fail.
            quiet = route in QUIET_ROUTES and status < 400
            log.log(
                logging.DEBUG if quiet else logging.INFO,
                "%s %s %s",
                method,
                scope["path"],
                status,
                extra={"method": method, "route": route, "status": status, "duration_s": round(elapsed, 6)},
            )
            current_scope.reset(token)


# -- job and queue metrics, read at scrape time ---------------------------------------------------------------------


class JobCollector(Collector):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        errors = GaugeMetricFamily("peltune_scrape_errors", "1 when a metrics source failed", labels=["source"])
        for source, produce in (("database", self._jobs), ("broker", self._queue), ("workers", self._workers)):
            try:
                yield from produce()
                errors.add_metric([source], 0)
            except Exception as exc:  # a scrape must answer even when a dependency is down
                log.warning("metrics source %s failed: %s", source, exc)
                errors.add_metric([source], 1)
        yield errors

    def _jobs(self) -> Iterator[Metric]:
        from api.db.models import FINAL_STATUSES, Job, JobStatus
        from api.db.session import get_sessionmaker

        with get_sessionmaker(self.settings.database_url)() as session:
            counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            finished = session.execute(
                select(Job.status, Job.started_at, Job.finished_at).where(
                    Job.status.in_(FINAL_STATUSES), Job.started_at.is_not(None), Job.finished_at.is_not(None)
                )
            ).all()
        by_state = GaugeMetricFamily("peltune_jobs", "Jobs by state", labels=["status"])
        for status in JobStatus:
            by_state.add_metric([status.value], counts.get(status, 0))
        yield by_state

        durations = HistogramMetricFamily(
            "peltune_job_duration_seconds", "Run time (started to finished) of finished jobs", labels=["status"]
        )
        for status in sorted(FINAL_STATUSES):
            seconds = [(end - start).total_seconds() for s, start, end in finished if s == status]
            buckets = [(str(le), sum(1 for value in seconds if value <= le)) for le in DURATION_BUCKETS]
            buckets.append(("+Inf", len(seconds)))
            durations.add_metric([status.value], buckets, sum_value=sum(seconds))
        yield durations

    def _queue(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily("peltune_queue_depth", "Job messages waiting in the broker", labels=["queue"])
        depth.add_metric([self.settings.task_queue], queue_depth(self.settings))
        yield depth

    def _workers(self) -> Iterator[Metric]:
        if self.settings.broker_url.startswith(FILESYSTEM_BROKER):
            return  # no remote control on the filesystem broker: no honest count to give
        workers = GaugeMetricFamily(
            "peltune_workers", "Celery workers consuming the queue (answering within the timeout)", labels=["queue"]
        )
        workers.add_metric([self.settings.task_queue], worker_count(self.settings))
        yield workers


def queue_depth(settings: Settings) -> int:
    """Messages waiting (not yet taken by a worker) on the settings' queue."""
    if settings.broker_url.startswith(FILESYSTEM_BROKER):
        folder = Path(settings.broker_transport_options()["data_folder_in"])
        # kombu's filesystem transport names each message "{timestamp}_{uuid}.{queue}.msg".
        return sum(1 for _ in folder.glob(f"*.{settings.task_queue}.msg")) if folder.is_dir() else 0
    if settings.broker_url.startswith(("redis://", "rediss://")):
        client = _redis(settings.broker_url, settings.readiness_timeout_s)
        queue = settings.task_queue
        keys = [queue] + [f"{queue}\x06\x16{step}" for step in REDIS_PRIORITY_STEPS if step]
        return sum(int(client.llen(key)) for key in keys)
    raise NotImplementedError(f"queue depth is not read from {settings.broker_url.split(':', 1)[0]} brokers")


def worker_count(settings: Settings) -> int:
    """Workers that answer ``active_queues`` within the readiness timeout and consume the settings' queue."""
    control = _control_app(settings.broker_url, settings.task_queue).control
    replies = control.inspect(timeout=settings.readiness_timeout_s).active_queues() or {}
    return sum(1 for queues in replies.values() if any(q.get("name") == settings.task_queue for q in queues))


@lru_cache(maxsize=8)
def _control_app(broker_url: str, task_queue: str) -> Any:
    from celery import Celery

    from api.queue import celery_config

    app = Celery("peltune-metrics", set_as_current=False)
    app.conf.update(celery_config(Settings(broker_url=broker_url, task_queue=task_queue)))
    return app


@lru_cache(maxsize=8)
def _redis(url: str, timeout_s: float) -> Any:
    import redis

    return redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)


# -- readiness ------------------------------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def readiness(settings: Settings) -> list[Check]:
    """Whether the database, the broker and the object store answer, each within settings.readiness_timeout_s."""
    results = []
    for name, probe in (("database", _database), ("broker", _broker), ("object_store", _object_store)):
        try:
            results.append(Check(name, True, probe(settings)))
        except Exception as exc:
            results.append(Check(name, False, f"{type(exc).__name__}: {exc}"))
    return results


def _database(settings: Settings) -> str:
    from api.db.session import get_engine

    with get_engine(settings.database_url).connect() as connection:
        connection.execute(text("SELECT 1"))
    return "ok"


def _broker(settings: Settings) -> str:
    if settings.broker_url.startswith(FILESYSTEM_BROKER):
        settings.ensure_broker_folders()
        folder = Path(settings.broker_transport_options()["data_folder_in"])
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"broker folder {folder} is not writable")
        return "ok (filesystem)"
    if settings.broker_url.startswith(("redis://", "rediss://")):
        _redis(settings.broker_url, settings.readiness_timeout_s).ping()
        return "ok"
    from kombu import Connection

    with Connection(settings.broker_url, connect_timeout=settings.readiness_timeout_s) as connection:
        connection.ensure_connection(max_retries=1)
    return "ok"


def _object_store(settings: Settings) -> str:
    from urllib.parse import urlparse

    from api.storage import file_uri_path

    parsed = urlparse(settings.storage_url)
    if parsed.scheme == "file":
        root = file_uri_path(settings.storage_url)
        existing = next(p for p in (root, *root.parents) if p.exists())  # the store creates missing folders
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            raise PermissionError(f"{existing} is not a writable folder")
        return "ok (local folder)"
    if parsed.scheme == "s3":
        _s3(settings.s3_endpoint_url, settings.readiness_timeout_s).head_bucket(Bucket=parsed.netloc)
        return "ok"
    raise ValueError(f"unsupported storage URL {settings.storage_url!r}")


@lru_cache(maxsize=8)
def _s3(endpoint_url: str | None, timeout_s: float) -> Any:
    # Its own client: the store's client retries with backoff (right for transfers, too slow for a probe).
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=timeout_s, read_timeout=timeout_s, retries={"total_max_attempts": 1})
    return boto3.client("s3", endpoint_url=endpoint_url, config=config)
