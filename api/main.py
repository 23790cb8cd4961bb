"""The PEL Tune REST API: ``uvicorn api.main:app`` (OpenAPI UI at /docs).

Environment: see api/settings.py (PELTUNE_HOME, PELTUNE_DATABASE_URL, PELTUNE_BROKER_URL, PELTUNE_STORAGE_URL,
PELTUNE_S3_ENDPOINT_URL + AWS_*, PELTUNE_TASK_QUEUE, PELTUNE_MAX_UPLOAD_BYTES, PELTUNE_MAX_JSON_BYTES,
PELTUNE_AUTO_MIGRATE).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI

from api.auth import CorsFromSettings, admin_key_at_startup
from api.db.migrate import upgrade_head
from api.errors import install_error_handlers
from api.guard import RequestGuard
from api.links import router as links_router
from api.logs import configure_logging
from api.observability import install_observability, start_job_metrics
from api.routes import checkpoints, datasets, jobs, tenants
from api.routes._multipart import remove_stale_scratch
from api.settings import Settings, get_settings

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; ``settings`` pins its configuration (tests), else the environment is read at startup."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        current = app.state.settings or get_settings()
        if app.state.settings is None:  # the deployed app (tests pin settings and keep pytest's log capture)
            configure_logging("api", current)
        start_job_metrics(app, current)
        if current.auto_migrate:
            await anyio.to_thread.run_sync(upgrade_head, current.database_url)
        # The key admin routes accept (api/auth.py); in development also the generated local keys.
        app.state.admin_key = await anyio.to_thread.run_sync(admin_key_at_startup, current)
        await anyio.to_thread.run_sync(remove_stale_scratch, current.scratch_dir())  # left by a killed API process
        yield

    app = FastAPI(
        title="PEL Tune",
        version="0.1.0",
        summary="Distributed PointWise Exponential Loss fine-tuning of segmentation models",
        lifespan=lifespan,
    )
    app.state.settings = settings
    install_error_handlers(app)
    app.add_middleware(RequestGuard)  # body-size cap, and no body read without a key (inside metrics and CORS)
    install_observability(app)  # /readyz, /metrics, request metrics and the JSON access log
    app.add_middleware(CorsFromSettings)  # closed unless PELTUNE_CORS_ORIGINS lists origins
    app.include_router(links_router)  # presigned checkpoint download links (api/links.py)
    for module in (checkpoints, datasets, jobs, tenants):
        app.include_router(module.router)

    @app.get("/healthz", tags=["meta"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


app = create_app()
