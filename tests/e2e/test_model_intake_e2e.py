"""Models users bring, through the whole service (uvicorn, Celery worker, torchrun, PostgreSQL, Redis, moto S3) on
real BBBC039 microscopy: a TorchScript module of a custom architecture fine-tuned on 2 gloo ranks comes back as
TorchScript; a safetensors state_dict of the built-in U-Net comes back as safetensors with its architecture; an
smp state_dict fails with the reason when the workers lack segmentation_models_pytorch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pel.models import UNet, UNetConfig
from tests.e2e.test_full_stack import Stack, stack  # noqa: F401 - the module-scoped service fixture
from tests.factories import copy_bbbc039_subset, make_archive

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]

TINY = {"loss": "pel_ce", "patch_size": 64, "batch_size": 2, "steps": 3, "lr": 1e-3, "val_every": 3, "val_images": 1}


class SmallSegNet(torch.nn.Module):
    """Any architecture a user might bring as TorchScript: here a two-scale conv net with GroupNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.GroupNorm(2, 8), torch.nn.ReLU())
        self.down = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, stride=2, padding=1), torch.nn.ReLU())
        self.head = torch.nn.Conv2d(16, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.stem(x)
        b = torch.nn.functional.interpolate(self.down(a), size=a.shape[-2:], mode="nearest")
        return self.head(torch.cat([a, b], dim=1))


def register(stack: Stack, path: Path, architecture: dict | None = None) -> dict:  # noqa: F811
    data = {"architecture": json.dumps(architecture)} if architecture is not None else {}
    with open(path, "rb") as stream:
        response = stack.http.post("/v1/checkpoints", files={"file": (path.name, stream)}, data=data)
    assert response.status_code == 201, response.text
    return response.json()


def download(stack: Stack, checkpoint_id: str, dest: Path) -> Path:  # noqa: F811
    response = stack.http.get(f"/v1/checkpoints/{checkpoint_id}/download")
    assert response.status_code == 200
    dest.write_bytes(response.content)
    return dest


def test_brought_models_come_back_in_their_format(stack: Stack, bbbc039_root: Path, tmp_path: Path) -> None:  # noqa: F811
    http = stack.http
    subset, _ = copy_bbbc039_subset(bbbc039_root, tmp_path / "bbbc039-mini", train=4, val=1, test=1)
    archive = make_archive(subset, tmp_path / "bbbc039-mini.zip")
    with open(archive, "rb") as stream:
        dataset = http.post("/v1/datasets", files={"file": (archive.name, stream)}).json()

    torch.manual_seed(0)
    scripted = torch.jit.script(SmallSegNet())
    torch.jit.save(scripted, tmp_path / "custom.pt")
    config = UNetConfig(width=4, depth=1)
    unet_in = UNet(config).state_dict()
    save_file(unet_in, str(tmp_path / "unet.safetensors"))
    architecture = {"name": "unet", **config.to_dict()}
    smp_arch = {"name": "smp", "arch": "Unet", "encoder": "resnet18", "in_channels": 1, "classes": 2}
    torch.save({"encoder.conv1.weight": torch.zeros(64, 1, 7, 7)}, tmp_path / "smp.pt")

    ts_row = register(stack, tmp_path / "custom.pt")
    st_row = register(stack, tmp_path / "unet.safetensors", architecture)
    smp_row = register(stack, tmp_path / "smp.pt", smp_arch)
    assert (ts_row["format"], st_row["format"], smp_row["format"]) == ("torchscript", "safetensors", "state_dict")

    def finetune(row: dict, nprocs: int) -> str:
        body = {"kind": "finetune", "dataset_id": dataset["id"], "checkpoint_id": row["id"], "nprocs": nprocs}
        response = http.post("/v1/jobs", json={**body, "config": TINY})
        assert response.status_code == 201, response.text
        return response.json()["id"]

    ts_job, st_job, smp_job = finetune(ts_row, 2), finetune(st_row, 1), finetune(smp_row, 1)

    job = stack.wait(ts_job)
    assert job["status"] == "succeeded", job["error"]
    assert job["summary"]["world_size"] == 2  # DDP over a ScriptModule, on 2 gloo ranks
    out = http.get(f"/v1/checkpoints/{job['output_checkpoint_id']}").json()
    assert (out["format"], out["architecture"]) == ("torchscript", None)
    tuned = torch.jit.load(str(download(stack, out["id"], tmp_path / "tuned-custom.pt")))
    assert isinstance(tuned, torch.jit.ScriptModule)
    x = torch.rand(1, 1, 96, 80)
    with torch.no_grad():
        assert tuned(x).shape == (1, 2, 96, 80)
    changed = [k for k, v in tuned.state_dict().items() if not torch.equal(v, scripted.state_dict()[k])]
    assert "head.weight" in changed  # trained, not copied

    job = stack.wait(st_job)
    assert job["status"] == "succeeded", job["error"]
    out = http.get(f"/v1/checkpoints/{job['output_checkpoint_id']}").json()
    assert (out["format"], out["architecture"]) == ("safetensors", architecture)
    assert out["uri"].endswith("/model.safetensors")
    state = load_file(str(download(stack, out["id"], tmp_path / "tuned.safetensors")))
    model = UNet(config)
    model.load_state_dict(state)  # the documented one-liner load, strict
    assert not torch.equal(state["head.weight"], unet_in["head.weight"])

    job = stack.wait(smp_job)
    try:
        import segmentation_models_pytorch  # noqa: F401
    except ImportError:
        assert job["status"] == "failed"
        assert "segmentation_models_pytorch is not installed on the workers" in job["error"]
    else:  # with the extra: the one-tensor state_dict does not fit smp's Unet, named before any step
        assert job["status"] == "failed" and "missing keys:" in job["error"]
    assert job["output_checkpoint_id"] is None
