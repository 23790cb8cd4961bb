"""Shared test set-up: thread pinning, the real-data location, and API keys for in-process test clients."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Starlette's TestClient suggests httpx2
    from fastapi.testclient import TestClient

# These machines have 2 shared cores: more threads than that makes timings swing tenfold.
torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]


def real_data_root() -> Path:
    """Where the shared real datasets live (PELTUNE_DATA overrides ../shared/data beside the checkout)."""
    return Path(os.environ.get("PELTUNE_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def bbbc039_root() -> Path:
    root = real_data_root() / "bbbc039"
    if not (root / "images").is_dir():
        pytest.fail(f"real BBBC039 data not found at {root}; set PELTUNE_DATA to the folder holding bbbc039/")
    return root


@pytest.fixture(autouse=True)
def _test_clients_use_the_local_key(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every ``with TestClient(create_app(settings))`` acts as the embedded default tenant, like the CLI does: once
    the app has started (and, in development, written {home}/local-keys.json), the client sends that key, unless
    the test set an Authorization or X-API-Key header itself. Tests of authentication clear or replace it."""
    from tests.services import local_api_key

    enter = TestClient.__enter__

    def enter_with_key(self: TestClient) -> TestClient:
        client = enter(self)
        state = getattr(self.app, "state", None)
        settings = getattr(state, "settings", None)
        key = local_api_key(settings.home) if settings is not None else None
        if key and "authorization" not in client.headers and "x-api-key" not in client.headers:
            client.headers["Authorization"] = f"Bearer {key}"
        return client

    monkeypatch.setattr(TestClient, "__enter__", enter_with_key)
    yield
