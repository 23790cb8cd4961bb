"""Domain errors, and the one place that maps them (and storage/queue failures) to HTTP.

Routes and services raise these; nothing below the edge knows about status codes. Every error body has a
``detail``: a string, or for field problems a list shaped like FastAPI's own validation errors
(``[{"loc": ["body", "config", "lr"], "msg": ..., "type": ...}]``) so clients handle both kinds alike.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from api.storage import ObjectNotFound, StorageError


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


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes each bad "input"; a NaN there cannot be encoded as JSON and became a 500.
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)

    @app.exception_handler(DomainError)
    async def _domain(_request: Request, exc: DomainError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail()}, status_code=exc.status_code)

    @app.exception_handler(ObjectNotFound)
    async def _missing_object(_request: Request, exc: ObjectNotFound) -> JSONResponse:
        # A row points at an object that is gone: the server's data is inconsistent, not the request.
        return JSONResponse({"detail": f"stored object missing: {exc}"}, status_code=status.HTTP_502_BAD_GATEWAY)

    @app.exception_handler(StorageError)
    async def _storage(_request: Request, exc: StorageError) -> JSONResponse:
        return JSONResponse({"detail": f"object store error: {exc}"}, status_code=status.HTTP_502_BAD_GATEWAY)
