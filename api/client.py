"""A small REST client for PEL Tune, used by the `pel-tune` command line and the demo.

It speaks only HTTP (httpx), so it runs anywhere the API is reachable; it never imports torch.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from api.settings import LOCAL_KEYS_FILE

FINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})


class ApiError(RuntimeError):
    """The API answered with an error; the message carries its status code and detail."""

    def __init__(self, response: httpx.Response) -> None:
        try:
            detail: Any = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        super().__init__(
            f"HTTP {response.status_code} from {response.request.method} {response.request.url}: {_readable(detail)}"
        )
        self.status_code = response.status_code
        self.detail = detail


def _readable(detail: Any) -> str:
    """FastAPI's validation errors (a list of {loc, msg}) as "body.config.lr: Input should be greater than 0"."""
    if isinstance(detail, list) and all(isinstance(item, dict) and "msg" in item for item in detail):
        return "; ".join(f"{'.'.join(str(part) for part in item.get('loc', []))}: {item['msg']}" for item in detail)
    return str(detail)


def local_api_key(home: Path) -> str | None:
    """The default tenant's key an embedded (development) API generated in {home}/local-keys.json, if any."""
    try:
        return json.loads((home.expanduser() / LOCAL_KEYS_FILE).read_text())["api_key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def default_api_key() -> str | None:
    """PELTUNE_API_KEY, else the embedded API's key under PELTUNE_HOME (default ./.peltune)."""
    if key := os.environ.get("PELTUNE_API_KEY", "").strip():
        return key
    return local_api_key(Path(os.environ.get("PELTUNE_HOME", ".peltune")))


class PelTuneClient:
    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = 60.0) -> None:
        """``api_key`` defaults to :func:`default_api_key`; it is sent as ``Authorization: Bearer <key>``."""
        api_key = api_key or default_api_key()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout, headers=headers)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> PelTuneClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, path, **kwargs)
        if response.is_error:
            raise ApiError(response)
        return response.json()

    # -- datasets and checkpoints -------------------------------------------------------------------------------

    def register_dataset(self, *, uri: str | None = None, file: Path | None = None, name: str | None = None) -> dict:
        """Register a dataset by object-store URI (archive, or a file:// folder) or by uploading an archive."""
        return self._register("/v1/datasets", uri=uri, file=file, name=name)

    def register_checkpoint(
        self,
        *,
        uri: str | None = None,
        file: Path | None = None,
        name: str | None = None,
        architecture: dict | str | None = None,
    ) -> dict:
        """``architecture`` (a dict or its JSON) is required for a state_dict or safetensors file, e.g.
        ``{"name": "unet", "width": 16, "depth": 3}`` or ``{"name": "smp", "arch": "Unet", "encoder": "resnet34"}``."""
        if isinstance(architecture, dict):
            architecture = json.dumps(architecture)
        return self._register("/v1/checkpoints", uri=uri, file=file, name=name, architecture=architecture)

    def _register(
        self, path: str, *, uri: str | None, file: Path | None, name: str | None, architecture: str | None = None
    ) -> dict:
        if (uri is None) == (file is None):
            raise ValueError("give exactly one of uri or file")
        fields = {"uri": uri, "name": name, "architecture": architecture}
        data = {k: v for k, v in fields.items() if v is not None}
        if file is None:
            return self._call("POST", path, data=data)
        with open(file, "rb") as stream:  # httpx streams the open file; it is never read whole into memory
            return self._call("POST", path, data=data, files={"file": (Path(file).name, stream)})

    def datasets(self) -> list[dict]:
        return self._call("GET", "/v1/datasets")

    def checkpoints(self) -> list[dict]:
        return self._call("GET", "/v1/checkpoints")

    # -- jobs -----------------------------------------------------------------------------------------------------

    def submit_job(
        self,
        *,
        kind: str,
        dataset_id: str,
        config: dict,
        checkpoint_id: str | None = None,
        nprocs: int = 1,
        idempotency_key: str | None = None,
    ) -> dict:
        """Queue a job; with ``idempotency_key`` a retried submission returns the job the first one created."""
        body: dict[str, Any] = {"kind": kind, "dataset_id": dataset_id, "config": config, "nprocs": nprocs}
        if checkpoint_id is not None:
            body["checkpoint_id"] = checkpoint_id
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key is not None else None
        return self._call("POST", "/v1/jobs", json=body, headers=headers)

    def cancel_job(self, job_id: str) -> dict:
        return self._call("POST", f"/v1/jobs/{job_id}/cancel")

    def events(self, job_id: str) -> list[dict]:
        return self._call("GET", f"/v1/jobs/{job_id}/events")

    def job(self, job_id: str) -> dict:
        return self._call("GET", f"/v1/jobs/{job_id}")

    def jobs(self) -> list[dict]:
        return self._call("GET", "/v1/jobs")

    def metrics(self, job_id: str) -> list[dict]:
        return self._call("GET", f"/v1/jobs/{job_id}/metrics")["points"]

    def wait(
        self,
        job_id: str,
        *,
        timeout: float,
        poll: float = 1.0,
        on_update: Callable[[dict], None] | None = None,
    ) -> dict:
        """Poll until the job reaches a final state; raise TimeoutError naming the job's last state."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if on_update is not None:
                on_update(job)
            if job["status"] in FINAL_STATES:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout:.0f} s")
            time.sleep(poll)

    def download_checkpoint(self, job_id: str, dest: Path) -> Path:
        """Stream the job's fine-tuned checkpoint to dest (written to a temporary name, then renamed)."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(dest.name + ".part")
        with self._http.stream("GET", f"/v1/jobs/{job_id}/checkpoint") as response:
            if response.is_error:
                response.read()
                raise ApiError(response)
            with open(partial, "wb") as out:
                for chunk in response.iter_bytes(1 << 20):
                    out.write(chunk)
        partial.replace(dest)
        return dest
