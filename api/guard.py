"""Checks at the edge, before any route reads a request body.

FastAPI reads and parses a JSON body before the route's dependencies run, so neither the key check nor any route
could stop a huge body from being held in memory. ``RequestGuard`` runs first:

- a body on a ``/v1`` route without any key is 401 before a byte of it is read (a wrong key is found by the
  route's own check, after a body of at most ``max_json_bytes``);
- a body larger than ``PELTUNE_MAX_JSON_BYTES`` is 413: at once when its Content-Length says so, else as soon as
  the bytes streamed in pass the limit. A multipart upload to an upload route is exempt: the upload dependency
  (api.deps.get_upload_form) lifts the cap before it streams the file to disk under its own limit,
  ``max_upload_bytes``. Any other route, multipart or not, stays capped.
"""

from __future__ import annotations

from fastapi import HTTPException, Request, status
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import BODY_CAP, missing_key, presented_key
from api.settings import get_settings


class RequestGuard:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        length = headers.get("content-length")
        if (length is None or length == "0") and "transfer-encoding" not in headers:  # no body
            await self.app(scope, receive, send)
            return
        settings = scope["app"].state.settings or get_settings()
        limit = settings.max_json_bytes
        # A multipart upload's size is checked against max_upload_bytes by its route (api/routes/_multipart.py).
        multipart = headers.get("content-type", "").startswith("multipart/form-data")
        if not multipart and length is not None and length.isdigit() and int(length) > limit:
            await _refuse(scope, receive, send, HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, _too_large(limit)))
            return
        if scope["path"].startswith("/v1/") and presented_key(Request(scope)) is None:
            await _refuse(scope, receive, send, missing_key(settings))
            return

        cap: dict[str, int | None] = {"limit": limit}  # an object, so that a copy of the scope shares it
        scope[BODY_CAP] = cap
        received = 0

        async def capped() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if cap["limit"] is not None and received > cap["limit"]:
                # Raised inside the route's body read: FastAPI passes HTTPExceptions on, and the app answers 413.
                raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, _too_large(limit))
            return message

        await self.app(scope, capped, send)


def _too_large(limit: int) -> str:
    return (
        f"request body larger than the limit of {limit} bytes (PELTUNE_MAX_JSON_BYTES); "
        "files go up as multipart uploads to /v1/datasets or /v1/checkpoints"
    )


async def _refuse(scope: Scope, receive: Receive, send: Send, error: HTTPException) -> None:
    response = JSONResponse({"detail": error.detail}, status_code=error.status_code, headers=error.headers)
    await response(scope, receive, send)
