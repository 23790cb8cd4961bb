"""/v1/checkpoints: uploads (streamed, size-capped), URI registration, model intake (format, architecture, fit),
streamed downloads."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from api.main import create_app
from api.settings import Settings
from api.storage import file_uri_path
from pel.models import UNet, UNetConfig
from tests.factories import make_checkpoint, make_foreign_torch_file
from tests.services import S3_BUCKET, s3_client


def upload(client: TestClient, path: Path, **data: str):  # noqa: ANN201 - httpx.Response
    with open(path, "rb") as stream:
        return client.post("/v1/checkpoints", files={"file": (path.name, stream)}, data=data)


def test_upload_then_get_list_and_download(client: TestClient, settings: Settings, tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "tiny-unet.pt")
    response = upload(client, path)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["name"] == "tiny-unet"
    assert body["size_bytes"] == path.stat().st_size
    assert body["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert body["source_job_id"] is None
    assert body["uri"].startswith((settings.home / "objects").as_uri())

    assert client.get(f"/v1/checkpoints/{body['id']}").json() == body
    assert body["id"] in {c["id"] for c in client.get("/v1/checkpoints").json()}

    with client.stream("GET", f"/v1/checkpoints/{body['id']}/download") as download:
        assert download.status_code == 200
        assert download.headers["content-type"] == "application/octet-stream"
        assert int(download.headers["content-length"]) == body["size_bytes"]
        data = b"".join(download.iter_bytes())
    assert data == path.read_bytes()


def test_name_can_be_given(client: TestClient, tmp_path: Path) -> None:
    response = upload(client, make_checkpoint(tmp_path / "m.pt"), name="my baseline")
    assert response.status_code == 201
    assert response.json()["name"] == "my baseline"


def test_register_by_file_uri_copies_into_the_store(client: TestClient, settings: Settings, tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "in place.pt")
    response = client.post("/v1/checkpoints", data={"uri": path.as_uri()})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["uri"].startswith((settings.home / "objects").as_uri())
    assert body["name"] == "in place"
    assert body["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert body["size_bytes"] == path.stat().st_size


def test_a_file_uri_source_changed_later_cannot_reach_the_download(client: TestClient, tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "x.pt")
    original = path.read_bytes()
    response = client.post("/v1/checkpoints", data={"uri": path.as_uri()})
    assert response.status_code == 201, response.text
    checkpoint_id = response.json()["id"]

    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    path.unlink()
    path.symlink_to(secret)  # the registered path now points at something else

    download = client.get(f"/v1/checkpoints/{checkpoint_id}/download")
    assert download.status_code == 200
    assert download.content == original
    assert download.headers["etag"] == f'"{hashlib.sha256(original).hexdigest()}"'


def test_register_by_s3_uri(client: TestClient, s3_endpoint: str, settings: Settings, tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "remote.pt")
    key = f"external/{tmp_path.name}/remote.pt"
    s3_client(s3_endpoint).upload_file(str(path), S3_BUCKET, key)
    app_settings = settings.model_copy(update={"s3_endpoint_url": s3_endpoint})
    with TestClient(create_app(app_settings)) as s3_aware:
        response = s3_aware.post("/v1/checkpoints", data={"uri": f"s3://{S3_BUCKET}/{key}"})
        assert response.status_code == 201, response.text
        checkpoint = response.json()
        assert checkpoint["size_bytes"] == path.stat().st_size
        downloaded = s3_aware.get(f"/v1/checkpoints/{checkpoint['id']}/download")
        assert downloaded.content == path.read_bytes()

        missing = s3_aware.post("/v1/checkpoints", data={"uri": f"s3://{S3_BUCKET}/external/none.pt"})
        assert missing.status_code == 422
        assert missing.json()["detail"][0]["loc"] == ["body", "uri"]


def test_upload_to_s3_store(s3_client_app: TestClient, s3_settings: Settings, s3_endpoint: str, tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "model.pt")
    response = upload(s3_client_app, path)
    assert response.status_code == 201, response.text
    uri = response.json()["uri"]
    assert uri.startswith(s3_settings.storage_url + "/checkpoints/")
    key = uri.removeprefix(f"s3://{S3_BUCKET}/")
    stored = s3_client(s3_endpoint).get_object(Bucket=S3_BUCKET, Key=key)["Body"].read()
    assert stored == path.read_bytes()
    downloaded = s3_client_app.get(f"/v1/checkpoints/{response.json()['id']}/download")
    assert downloaded.status_code == 200 and downloaded.content == stored


@pytest.mark.parametrize(
    ("content", "name"),
    [(b"definitely not a zip", "model.pt"), (b"PK\x03\x04 truncated zip", "model.pt")],
)
def test_non_checkpoints_are_refused(client: TestClient, tmp_path: Path, content: bytes, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    response = upload(client, path)
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "file"]
    assert "not a PyTorch checkpoint" in error["msg"]


def test_zip_without_data_pkl_is_refused(client: TestClient, tmp_path: Path) -> None:
    import zipfile

    path = tmp_path / "x.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/readme.txt", "hello")
    assert upload(client, path).status_code == 422


def test_a_torch_file_that_is_no_state_dict_is_refused(client: TestClient, tmp_path: Path) -> None:
    response = upload(client, make_foreign_torch_file(tmp_path / "foreign.pt"))
    assert response.status_code == 422
    assert "entries that are not tensors: note" in response.json()["detail"][0]["msg"]


@pytest.mark.parametrize(
    ("data", "files", "loc"),
    [
        ({}, None, ["body", "file"]),
        ({"uri": "file:///nonexistent/model.pt"}, None, ["body", "uri"]),
        ({"uri": "ftp://host/model.pt"}, None, ["body", "uri"]),
        ({"uri": "file:///x.pt"}, {"file": ("m.pt", b"PK")}, ["body"]),
    ],
)
def test_form_errors_name_the_field(client: TestClient, data: dict, files: dict | None, loc: list[str]) -> None:
    response = client.post("/v1/checkpoints", data=data, files=files)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == loc


def test_unknown_ids_are_404(client: TestClient) -> None:
    for path in ("/v1/checkpoints/0123", "/v1/checkpoints/0123/download"):
        response = client.get(path)
        assert response.status_code == 404
        assert "checkpoint '0123' not found" in response.json()["detail"]


def test_oversize_upload_is_413_and_leaves_nothing(settings: Settings, tmp_path: Path) -> None:
    small = settings.model_copy(update={"max_upload_bytes": 64 * 1024})
    path = make_checkpoint(tmp_path / "big.pt", width=16, depth=2)  # a few hundred KiB
    assert path.stat().st_size > 64 * 1024
    with TestClient(create_app(small)) as client:
        before = client.get("/v1/checkpoints", params={"limit": 1000}).json()
        response = upload(client, path)
        assert response.status_code == 413
        assert "limit" in response.json()["detail"]
        assert client.get("/v1/checkpoints", params={"limit": 1000}).json() == before
    uploads = small.home / "tmp" / "uploads"
    assert not uploads.exists() or not any(uploads.iterdir())  # the partial upload was removed


def test_oversize_by_content_length_is_refused_before_reading(settings: Settings) -> None:
    small = settings.model_copy(update={"max_upload_bytes": 1024})

    def body():  # noqa: ANN202 - a generator the server must not need to drain
        yield b"x" * 10

    with TestClient(create_app(small)) as client:
        response = client.post(
            "/v1/checkpoints",
            content=body(),
            headers={"content-type": "multipart/form-data; boundary=b", "content-length": str(50 * 1024 * 1024)},
        )
    assert response.status_code == 413


def test_a_stored_object_of_another_size_is_not_served(client: TestClient, tmp_path: Path) -> None:
    body = upload(client, make_checkpoint(tmp_path / "m.pt")).json()
    stored = file_uri_path(body["uri"])
    stored.write_bytes(stored.read_bytes() + b"appended later")
    response = client.get(f"/v1/checkpoints/{body['id']}/download")
    assert response.status_code == 409
    assert f"checkpoint {body['id']} changed since it was registered" in response.json()["detail"]


# -- models users bring --------------------------------------------------------------------------------------------

UNET_4_1 = {"name": "unet", "in_channels": 1, "out_channels": 2, "width": 4, "depth": 1, "norm": "batch"}
SMP = {"name": "smp", "arch": "Unet", "encoder": "resnet18", "in_channels": 1, "classes": 2}


class _Conv(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _FileCreatingPayload:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.path}",))


def _unet_state(**config: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return UNet(UNetConfig(**{"width": 4, "depth": 1, **config})).state_dict()


def stored_objects(settings: Settings) -> list[Path]:
    root = settings.home / "objects"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_each_format_is_registered_with_its_architecture(client: TestClient, tmp_path: Path) -> None:
    make_checkpoint(tmp_path / "own.pt")
    torch.jit.save(torch.jit.script(_Conv()), tmp_path / "scripted.pt")
    torch.save(_unet_state(), tmp_path / "weights.pt")
    save_file(_unet_state(), str(tmp_path / "weights.safetensors"))
    torch.save({"encoder.conv1.weight": torch.zeros(64, 1, 7, 7)}, tmp_path / "smp.pt")
    declared = json.dumps({"name": "unet", "width": 4, "depth": 1})  # defaults are filled in on the row
    cases = [
        ("own.pt", {}, "pel-tune", UNET_4_1),
        ("scripted.pt", {}, "torchscript", None),
        ("weights.pt", {"architecture": declared}, "state_dict", UNET_4_1),
        ("weights.safetensors", {"architecture": declared}, "safetensors", UNET_4_1),
        ("own.pt", {"architecture": declared}, "pel-tune", UNET_4_1),  # a declaration that agrees is fine
        # smp weights cannot be checked without torch: the worker checks them before any training step
        ("smp.pt", {"architecture": json.dumps(SMP)}, "state_dict", SMP),
    ]
    for name, data, fmt, architecture in cases:
        response = upload(client, tmp_path / name, **data)
        assert response.status_code == 201, (name, response.text)
        body = response.json()
        assert (body["format"], body["architecture"]) == (fmt, architecture), name
        assert client.get(f"/v1/checkpoints/{body['id']}").json() == body
    download = client.get(f"/v1/checkpoints/{body['id']}/download")
    assert 'filename="smp.pt"' in download.headers["content-disposition"]


def test_safetensors_by_uri_download_keeps_its_suffix(client: TestClient, tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file(_unet_state(depth=3, norm="group"), str(path))
    response = client.post(
        "/v1/checkpoints",
        data={
            "uri": path.as_uri(),
            "architecture": json.dumps({"name": "unet", "width": 4, "norm": "group"}),
        },
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["name"] == "w" and body["format"] == "safetensors" and body["architecture"]["norm"] == "group"
    download = client.get(f"/v1/checkpoints/{body['id']}/download")
    assert 'filename="w.safetensors"' in download.headers["content-disposition"]
    assert download.content == path.read_bytes()


def test_weights_that_do_not_fit_are_refused_naming_the_keys(
    client: TestClient, settings: Settings, tmp_path: Path
) -> None:
    path = tmp_path / "weights.pt"
    torch.save(_unet_state(depth=1), path)
    before = len(client.get("/v1/checkpoints").json())
    deeper = json.dumps({"name": "unet", "width": 4, "depth": 2})
    for response in (
        upload(client, path, architecture=deeper),
        client.post("/v1/checkpoints", data={"uri": path.as_uri(), "architecture": deeper}),
    ):
        assert response.status_code == 422
        (error,) = response.json()["detail"]
        assert error["type"] == "invalid_checkpoint" and error["loc"][:1] == ["body"]
        assert "do not fit the architecture" in error["msg"]
        assert "missing keys: encoders.1.0.weight, encoders.1.1.weight" in error["msg"]

    wider = upload(client, path, architecture=json.dumps({"name": "unet", "width": 8, "depth": 1}))
    assert "shape mismatches: encoders.0.0.weight (checkpoint (4, 1, 3, 3), model (8, 1, 3, 3))" in wider.text
    state = {**_unet_state(), "extra.weight": torch.zeros(2)}
    torch.save(state, path)
    extra = upload(client, path, architecture=json.dumps({"name": "unet", "width": 4, "depth": 1}))
    assert extra.status_code == 422 and "unexpected keys: extra.weight" in extra.text
    assert len(client.get("/v1/checkpoints").json()) == before and stored_objects(settings) == []  # nothing kept


@pytest.mark.parametrize(
    ("file", "architecture", "loc", "message"),
    [
        ("weights.pt", None, "file", "holds weights only: declare its architecture"),
        ("weights.pt", "{oops", "architecture", "architecture is not valid JSON"),
        (
            "weights.pt",
            '{"name": "smp", "arch": "Unet", "encoder": "resnet18", "classes": 0}',
            "architecture",
            "classes",
        ),
        ("scripted.pt", '{"name": "unet"}', "file", "TorchScript file carries its own architecture"),
        ("own.pt", '{"name": "unet", "width": 8, "depth": 1}', "file", "differs from the one in the file"),
    ],
)
def test_architecture_errors_are_named(
    client: TestClient, tmp_path: Path, file: str, architecture: str | None, loc: str, message: str
) -> None:
    torch.save(_unet_state(), tmp_path / "weights.pt")
    torch.jit.save(torch.jit.script(_Conv()), tmp_path / "scripted.pt")
    make_checkpoint(tmp_path / "own.pt")
    data = {"architecture": architecture} if architecture is not None else {}
    response = upload(client, tmp_path / file, **data)
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", loc] and message in error["msg"]


def test_a_pickle_with_code_is_refused_and_never_runs(client: TestClient, settings: Settings, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"conv.weight": torch.zeros(1), "x": _FileCreatingPayload(marker)}, path)
    response = upload(client, path, architecture=json.dumps({"name": "unet"}))
    assert response.status_code == 422
    assert "refused: data.pkl references posix.system" in response.json()["detail"][0]["msg"]
    assert not marker.exists() and stored_objects(settings) == []


def test_the_client_and_cli_pass_the_architecture(client: TestClient, tmp_path: Path) -> None:
    from api.cli import build_parser
    from api.client import ApiError, PelTuneClient

    path = tmp_path / "weights.pt"
    torch.save(_unet_state(), path)
    api = PelTuneClient("http://testserver")
    api._http = client  # the real app, in process (TestClient is an httpx.Client)
    row = api.register_checkpoint(file=path, architecture={"name": "unet", "width": 4, "depth": 1})
    assert (row["format"], row["architecture"]) == ("state_dict", UNET_4_1)
    with pytest.raises(ApiError, match="declare its architecture"):
        api.register_checkpoint(file=path)
    args = build_parser().parse_args(["checkpoints", "add", "--file", str(path), "--architecture", '{"name": "unet"}'])
    assert args.architecture == '{"name": "unet"}'
