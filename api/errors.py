"""Domain errors, and the one place that maps them (and storage/queue failures) to HTTP.

Routes and services raise these; nothing below the edge knows about status codes. Every error body has a
``detail``: a string, or for field problems a list shaped like FastAPI's own validation errors
(``[{"loc": ["body", "config", "lr"], "msg": ..., "type": ...}]``) so clients handle both kinds alike.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc

from api.storage import ObjectNotFound, StorageError

log = logging.getLogger(__name__)

DATABASE_UNAVAILABLE = "database unavailable, retry later"
# Seconds a client should wait before retrying a 503 (the database or broker is expected back).
RETRY_AFTER_S = 5


class DomainError(Exception):
    status_code: int = status.HTTP_400_BAD_REQUEST

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def detail(self) -> Any:
        return self.message


class NotFound(DomainError):
    status_code = status.HTTP_404_NOT_FOUND

    def __init__(self, resource: str, resource_id: str) -> None:
        super().__init__(f"{resource} {resource_id!r} not found")
        self.resource = resource
        self.resource_id = resource_id


class InvalidField(DomainError):
    """A request field is well-formed but unacceptable (unknown reference, invalid archive, ...)."""

    status_code = status.HTTP_422_UNPROCESSABLE_CONTENT

    def __init__(self, loc: tuple[str | int, ...], message: str, kind: str = "value_error") -> None:
        super().__init__(f"{'.'.join(str(part) for part in loc)}: {message}")
        self.loc = loc
        self.msg = message
        self.kind = kind

    def detail(self) -> Any:
        return [{"loc": list(self.loc), "msg": self.msg, "type": self.kind}]


class Conflict(DomainError):
    status_code = status.HTTP_409_CONFLICT


class PayloadTooLarge(DomainError):
    status_code = status.HTTP_413_CONTENT_TOO_LARGE


class ServiceUnavailable(DomainError):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE


class ClientGone(DomainError):
    """The client closed the connection before its request body arrived; nobody reads the answer."""

    status_code = status.HTTP_400_BAD_REQUEST


def is_database_outage(exc: BaseException) -> bool:
    """True for failures that mean "the database cannot be reached now", not "this request is wrong": connection
    refused/reset/timed out (OperationalError, also SQLite's "database is locked"), a connection dropped mid-query
    (invalidated), a closed connection (InterfaceError) and an exhausted connection pool."""
    if isinstance(exc, sa_exc.TimeoutError | sa_exc.OperationalError | sa_exc.InterfaceError):
        return True
    return isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes each bad "input"; a NaN there cannot be encoded as JSON and became a 500.
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)

    @app.exception_handler(DomainError)
    async def _domain(_request: Request, exc: DomainError) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if isinstance(exc, ServiceUnavailable) else None
        return JSONResponse({"detail": exc.detail()}, status_code=exc.status_code, headers=headers)

    @app.exception_handler(sa_exc.SQLAlchemyError)
    async def _database(request: Request, exc: sa_exc.SQLAlchemyError) -> JSONResponse:
        if not is_database_outage(exc):
            raise exc  # a bug or a schema problem: a real 500 with its traceback
        # One line, no traceback: an outage is an operational event, and the pool reconnects once it is over.
        log.warning("%s %s: database unavailable: %s", request.method, request.url.path, str(exc).splitlines()[0])
        return JSONResponse(
            {"detail": DATABASE_UNAVAILABLE},
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )

    @app.exception_handler(ObjectNotFound)
    async def _missing_object(_request: Request, exc: ObjectNotFound) -> JSONResponse:
        # A row points at an object that is gone: the server's data is inconsistent, not the request.
        return JSONResponse({"detail": f"stored object missing: {exc}"}, status_code=status.HTTP_502_BAD_GATEWAY)

    @app.exception_handler(StorageError)
    async def _storage(_request: Request, exc: StorageError) -> JSONResponse:
        return JSONResponse({"detail": f"object store error: {exc}"}, status_code=status.HTTP_502_BAD_GATEWAY)
