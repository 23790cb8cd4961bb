"""Upload bodies that go wrong: too large, cut short, abandoned by the client. Each is refused with a clear
status, leaves no temporary file behind and stores nothing."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi.testclient import TestClient

from api.main import create_app
from api.settings import Settings
from tests.factories import make_archive, make_dataset
from tests.services import free_port, local_api_key, wait_until


def leftovers(settings: Settings) -> list[Path]:
    """Files in the upload scratch space and in the object store."""
    roots = (settings.home / "tmp", settings.home / "objects")
    return sorted(p for root in roots if root.exists() for p in root.rglob("*") if p.is_file())


def dataset_count(client: TestClient) -> int:
    return len(client.get("/v1/datasets", params={"limit": 1000}).json())


def test_oversized_upload_without_length_is_cut_off_at_the_limit(settings: Settings, tmp_path: Path) -> None:
    limit = 64 * 1024
    sent = []

    def body() -> Iterator[bytes]:
        # Chunked transfer (no Content-Length), so the server can only count: it must stop at the limit.
        yield b'--B\r\nContent-Disposition: form-data; name="file"; filename="big.zip"\r\n\r\n'
        for _ in range(1000):  # 64 MiB if it were all read
            sent.append(1)
            yield bytes(64 * 1024)
        yield b"\r\n--B--\r\n"

    with TestClient(create_app(settings.model_copy(update={"max_upload_bytes": limit}))) as client:
        before = dataset_count(client)
        response = client.post(
            "/v1/datasets", content=body(), headers={"content-type": "multipart/form-data; boundary=B"}
        )
        assert response.status_code == 413, response.text
        assert response.json()["detail"] == f"upload larger than the limit of {limit} bytes"
        assert dataset_count(client) == before
    assert leftovers(settings) == []


def test_oversized_upload_with_length_is_refused_before_reading(settings: Settings, tmp_path: Path) -> None:
    archive = make_archive(make_dataset(tmp_path / "big", n=6, size=(128, 128)), tmp_path / "big.tar")
    with TestClient(create_app(settings.model_copy(update={"max_upload_bytes": 4096}))) as client:
        with open(archive, "rb") as stream:
            response = client.post("/v1/datasets", files={"file": (archive.name, stream)})
        assert response.status_code == 413
        assert "larger than the limit of 4096 bytes" in response.json()["detail"]
    assert leftovers(settings) == []


@pytest.mark.parametrize("route", ["/v1/datasets", "/v1/checkpoints"])
def test_body_without_closing_boundary_is_400(
    client: TestClient, settings: Settings, tmp_path: Path, route: str
) -> None:
    archive = make_archive(make_dataset(tmp_path / "cells", n=3), tmp_path / "cells.zip")
    head = b'--B\r\nContent-Disposition: form-data; name="file"; filename="cells.zip"\r\n\r\n'
    # The whole, valid archive, but the body stops before "\r\n--B--": the client never finished its upload.
    truncated = head + archive.read_bytes()
    before = dataset_count(client)
    response = client.post(route, content=truncated, headers={"content-type": "multipart/form-data; boundary=B"})
    assert response.status_code == 400, response.text
    assert "ends before the closing boundary (--B--)" in response.json()["detail"]
    assert dataset_count(client) == before
    assert leftovers(settings) == []
    # The same bytes with the closing boundary are accepted (the archive itself was fine).
    complete = client.post(
        "/v1/datasets",
        content=truncated + b"\r\n--B--\r\n",
        headers={"content-type": "multipart/form-data; boundary=B"},
    )
    assert complete.status_code == 201, complete.text


@pytest.fixture
def live_server(settings: Settings) -> Iterator[str]:
    """The app under a real uvicorn server (a thread of this process, so its log records reach caplog)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, timeout=30, what="uvicorn")
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_client_disconnect_mid_upload_leaves_no_traceback_and_no_file(
    live_server: str, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    host, port = live_server.split(":")
    part = b'--B\r\nContent-Disposition: form-data; name="file"; filename="cells.zip"\r\n\r\n' + bytes(256 * 1024)
    head = (
        "POST /v1/datasets HTTP/1.1\r\n"
        f"Host: {live_server}\r\n"
        f"Authorization: Bearer {local_api_key(settings.home)}\r\n"
        "Content-Type: multipart/form-data; boundary=B\r\n"
        "Content-Length: 10000000\r\n\r\n"  # promises 10 MB, sends 256 KiB, then hangs up
    ).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(head + part)
        wait_until(lambda: any((settings.home / "tmp" / "uploads").glob("upload-*")), timeout=30, what="upload")
    wait_until(
        lambda: any("client disconnected mid-upload" in r.getMessage() for r in caplog.records),
        timeout=30,
        what="the disconnect being noticed",
    )
    wait_until(lambda: leftovers(settings) == [], timeout=30, what="temporary files removed")
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("route", ["/v1/datasets", "/v1/checkpoints"])
def test_an_absurd_multipart_boundary_is_a_clear_4xx(client: TestClient, route: str) -> None:
    response = client.post(route, content=b"x", headers={"Content-Type": f"multipart/form-data; boundary={'a' * 1000}"})
    assert response.status_code == 422, response.text
    assert "malformed multipart body" in response.json()["detail"][0]["msg"]


def test_startup_removes_scratch_left_by_a_killed_api_but_not_a_live_upload(settings: Settings) -> None:
    """What `kill -9` of the API mid-request leaves in home/tmp, an hour old; and another replica's work in progress."""
    scratch = settings.scratch_dir()
    two_hours_ago = time.time() - 2 * 3600

    def put(relative: str, data: bytes, *, old: bool) -> Path:
        path = scratch / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if old:
            for touched in (path, *path.relative_to(scratch).parents):
                os.utime(scratch / touched, (two_hours_ago, two_hours_ago))
        return path

    dead_upload = put("uploads/upload-dead/upload.bin", bytes(1 << 20), old=True)
    put("dataset-dead/cells/images/a.png", b"png", old=True)
    live_upload = put("uploads/upload-live/upload.bin", bytes(1 << 20), old=False)  # still growing
    put("fetch-live/cells.zip", b"zip", old=True)
    live_unpack = put("fetch-live/dataset/images/b.png", b"png", old=False)  # a file just written deep inside
    for folder in ("fetch-live", "fetch-live/dataset", "fetch-live/dataset/images"):  # ... old folders around it
        os.utime(scratch / folder, (two_hours_ago, two_hours_ago))
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200
    assert not dead_upload.parent.exists() and not (scratch / "dataset-dead").exists()
    assert live_upload.is_file() and live_unpack.is_file() and (scratch / "fetch-live" / "cells.zip").is_file()
    assert sorted(p.name for p in (scratch / "uploads").iterdir()) == ["upload-live"]
