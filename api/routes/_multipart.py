"""Streaming form reception for uploads: the file part goes straight to a temporary file, chunk by chunk.

Starlette's ``request.form()`` would spool the whole upload before our code runs, so the size cap could only be
checked afterwards and the file would be copied twice. Here the parser is fed from ``request.stream()``: the
file is hashed and counted as it arrives, and the request is refused with 413 the moment it passes the cap
(or before reading anything, when ``Content-Length`` already says so).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio.to_thread
from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.requests import ClientDisconnect

from api.errors import ClientGone, DomainError, InvalidField, PayloadTooLarge

log = logging.getLogger(__name__)

FILE_FIELD = "file"
MAX_FIELD_BYTES = 64 * 1024
MAX_FIELDS = 16
# Multipart framing (boundaries, part headers, small fields) on top of the file itself.
ENVELOPE_BYTES = 1024 * 1024
# C0/C1 controls and the bidirectional overrides (U+202A-U+202E, U+2066-U+2069) that disguise text.
CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


@dataclass
class ReceivedFile:
    path: Path
    filename: str
    size: int
    sha256: str


@dataclass
class ReceivedForm:
    fields: dict[str, str] = field(default_factory=dict)
    file: ReceivedFile | None = None

    def text(self, name: str) -> str | None:
        value = self.fields.get(name)
        if value is not None and CONTROL_CHARACTERS.search(value):
            # NUL cannot be stored in PostgreSQL text, and the others only hide what a name or URI really says.
            raise InvalidField(("body", name), "must not contain control characters")
        return (value.strip() or None) if value is not None else None


class _Collector:
    """python-multipart callbacks: small fields in memory; the one file part hashed, counted and queued in
    ``pending`` for the caller to write (the callbacks run on the event loop and must not block)."""

    def __init__(self, max_file_bytes: int) -> None:
        self.max_file_bytes = max_file_bytes
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.file_size = 0
        self.digest = hashlib.sha256()
        self.pending: list[bytes] = []  # file data parsed from the current network chunk, written off-loop
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._name = ""
        self._is_file = False
        self._value = bytearray()

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self.on_part_begin,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
        }

    def on_part_begin(self) -> None:
        self._disposition = b""
        self._name = ""
        self._is_file = False
        self._value = bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = b""
        self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise InvalidField(("body",), "a form part has no name in its Content-Disposition header")
        self._name = options[b"name"].decode("utf-8", "replace")
        if b"filename" in options:
            if self._name != FILE_FIELD:
                raise InvalidField(("body", self._name), f'unexpected file part; upload the file as "{FILE_FIELD}"')
            if self.filename is not None:
                raise InvalidField(("body", FILE_FIELD), "only one file may be uploaded per request")
            self._is_file = True
            self.filename = options[b"filename"].decode("utf-8", "replace")
        elif len(self.fields) >= MAX_FIELDS:
            raise InvalidField(("body",), f"too many form fields (at most {MAX_FIELDS})")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._is_file:
            self.file_size += len(chunk)
            if self.file_size > self.max_file_bytes:
                raise PayloadTooLarge(f"upload larger than the limit of {self.max_file_bytes} bytes")
            self.digest.update(chunk)
            self.pending.append(chunk)
        else:
            self._value += chunk
            if len(self._value) > MAX_FIELD_BYTES:
                raise InvalidField(("body", self._name), f"form field larger than {MAX_FIELD_BYTES} bytes")

    def on_part_end(self) -> None:
        if not self._is_file:
            self.fields[self._name] = self._value.decode("utf-8", "replace")


async def receive_form(request: Request, *, max_file_bytes: int, tmp_root: Path) -> tuple[ReceivedForm, Path]:
    """Read a multipart (or urlencoded) form; returns the form and a temporary folder the caller must remove."""
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_file_bytes + ENVELOPE_BYTES:
        raise PayloadTooLarge(f"upload of {length} bytes is larger than the limit of {max_file_bytes} bytes")

    tmp_root.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix="upload-", dir=tmp_root))
    try:
        if not content_type:  # no body at all: an empty form, so the caller reports what is missing
            return ReceivedForm(), tmp_dir
        if content_type == b"application/x-www-form-urlencoded":
            form = await request.form(max_part_size=MAX_FIELD_BYTES)
            return ReceivedForm(fields={k: v for k, v in form.items() if isinstance(v, str)}), tmp_dir
        if content_type != b"multipart/form-data" or b"boundary" not in params:
            raise InvalidField(
                ("body",), "expected multipart/form-data (a file upload) or a form with a uri", kind="content_type"
            )
        sink_path = tmp_dir / "upload.bin"
        with open(sink_path, "wb") as sink:
            collector = _Collector(max_file_bytes)
            try:
                parser = MultipartParser(params[b"boundary"], collector.callbacks())  # refuses absurd boundaries
                async for chunk in request.stream():
                    parser.write(chunk)
                    if collector.pending:
                        data, collector.pending = b"".join(collector.pending), []
                        await anyio.to_thread.run_sync(sink.write, data)  # disk writes off the event loop
                parser.finalize()
            except FormParserError as exc:
                raise InvalidField(("body",), f"malformed multipart body: {exc}") from None
            except ClientDisconnect:
                # Not an error of ours: no traceback; the partial file goes with tmp_dir below.
                log.info("%s %s: client disconnected mid-upload", request.method, request.url.path)
                raise ClientGone("client disconnected before the upload finished") from None
            if parser.state != MultipartState.END:
                # The stream ended without the closing boundary: the upload was cut short, so what arrived is
                # not the client's whole file and must not be stored.
                raise DomainError(
                    "malformed multipart body: it ends before the closing boundary "
                    f"(--{params[b'boundary'].decode('latin-1')}--); the upload is incomplete"
                )
        received = None
        if collector.filename is not None:
            received = ReceivedFile(
                path=sink_path,
                filename=Path(collector.filename.replace("\\", "/")).name,
                size=collector.file_size,
                sha256=collector.digest.hexdigest(),
            )
        return ReceivedForm(fields=collector.fields, file=received), tmp_dir
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


# A request's scratch folder untouched this long belongs to an API process that died mid-request (kill -9, OOM
# killer): receive_form and TemporaryDirectory clean up after every request that ends, even in error. A younger
# one may be another API replica's, sharing the folder, mid-upload: its file grows, so its newest mtime is recent.
STALE_SCRATCH_S = 3600.0


def remove_stale_scratch(scratch_root: Path, older_than_s: float = STALE_SCRATCH_S) -> list[Path]:
    """Remove what dead API processes left in the scratch space (``home/tmp``): upload folders
    (``uploads/upload-*``) and the unpacked or fetched archives beside them, once nothing in one has been
    modified for ``older_than_s``. Called at API startup; returns the folders removed."""
    cutoff = time.time() - older_than_s
    uploads = scratch_root / "uploads"
    candidates = [*uploads.glob("upload-*"), *(p for p in scratch_root.iterdir() if p != uploads)]
    removed = []
    for folder in candidates:
        if not _modified_since(folder, cutoff):
            if folder.is_dir() and not folder.is_symlink():
                shutil.rmtree(folder, ignore_errors=True)
            else:
                folder.unlink(missing_ok=True)
            log.info("removed %s, left by an API process that stopped mid-request", folder)
            removed.append(folder)
    return removed


def _modified_since(path: Path, cutoff: float) -> bool:
    """Whether ``path`` or anything below it (links not followed) was modified after ``cutoff``."""
    try:
        if os.lstat(path).st_mtime > cutoff:
            return True
    except FileNotFoundError:
        return True  # gone already (its request just ended): nothing to do
    for folder, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            try:
                if os.lstat(os.path.join(folder, name)).st_mtime > cutoff:
                    return True
            except FileNotFoundError:
                continue
    return False


def source_of(form: ReceivedForm) -> tuple[str, str | None]:
    """("file", None) or ("uri", uri) for a registration form, refusing both and neither."""
    uri = form.text("uri")
    if form.file is not None and uri is not None:
        raise InvalidField(("body",), f'give either "{FILE_FIELD}" or "uri", not both')
    if form.file is None and uri is None:
        raise InvalidField(("body", FILE_FIELD), f'missing: upload a "{FILE_FIELD}" or give a "uri"', kind="missing")
    return ("uri", uri) if uri is not None else ("file", None)


def safe_name(filename: str, fallback: str) -> str:
    """A file name usable as the last part of an object key."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", filename).strip("._")[:120]
    return name or fallback


def display_name(given: str | None, source: str, suffixes: tuple[str, ...]) -> str:
    """The name a client gave, else the file or URI's last part without its (archive/checkpoint) suffix."""
    if given:
        return given[:255]
    name = Path(source.rstrip("/")).name
    for suffix in suffixes:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)][:255]
    return name[:255] or "unnamed"


def upload_body(file_description: str, extra_fields: dict[str, Any] | None = None) -> dict[str, Any]:
    """OpenAPI for a registration form (the route reads the body itself, so FastAPI cannot infer it)."""
    form_schema = {
        "type": "object",
        "properties": {
            **(extra_fields or {}),
            FILE_FIELD: {"type": "string", "format": "binary", "description": file_description},
            "uri": {
                "type": "string",
                "description": "instead of a file: s3://bucket/key or file:///absolute/path already in a store",
            },
            "name": {"type": "string", "description": "display name (default: from the file name or URI)"},
        },
    }
    uri_only = {k: v for k, v in form_schema["properties"].items() if k != FILE_FIELD}
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": form_schema},
                "application/x-www-form-urlencoded": {"schema": {**form_schema, "properties": uri_only}},
            },
        }
    }
