"""Models users bring: torch-free format detection and tensor listing (checked against torch's own loading), the
U-Net's torch-free parameter table, refusal of code in every pickle-based format, fit messages, and
load_model/save_model round trips in each format."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pel.checkpoint import CheckpointError, load_model, save_checkpoint, save_model
from pel.models import UNet, UNetConfig
from pel.models.intake import (
    IntakeError,
    TensorInfo,
    fit_problems,
    inspect_file,
    parse_architecture,
    read_spec,
    resolve,
    unet_state_shapes,
    write_spec,
)
from pel.models.zoo import build_model, check_model_io


class FileCreatingPayload:
    """Unpickling this object calls os.system("touch PATH"): what a malicious checkpoint could do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.path}",))


class TinyNet(torch.nn.Module):
    """Not a U-Net: any architecture a user might script."""

    def __init__(self, in_channels: int = 1, classes: int = 2) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, 4, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Conv2d(4, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.conv(x))))


def unet(**kwargs: object) -> UNet:
    torch.manual_seed(0)
    return UNet(UNetConfig(**{"width": 4, "depth": 1, **kwargs}))  # type: ignore[arg-type]


def torch_shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.mark.parametrize(
    "config",
    [
        UNetConfig(),
        UNetConfig(in_channels=3, out_channels=3, width=4, depth=2),
        UNetConfig(width=8, depth=0),
        UNetConfig(width=6, depth=4, norm="group"),
        UNetConfig(in_channels=2, out_channels=1, width=5, depth=1, norm="group"),
    ],
)
def test_unet_table_equals_the_real_state_dict(config: UNetConfig) -> None:
    real = torch_shapes(UNet(config).state_dict())
    table = unet_state_shapes(config)
    assert list(table) == list(real)  # same names in the same order
    assert table == real


def test_state_dict_listing_matches_torch(tmp_path: Path) -> None:
    state = {
        **unet(norm="batch").state_dict(),
        "extra.half": torch.zeros(2, 3, dtype=torch.float16),
        "extra.bf16": torch.zeros(5, dtype=torch.bfloat16),
        "extra.flag": torch.zeros(1, 1, dtype=torch.bool),
        "extra.scalar": torch.tensor(3.0),
        "extra.param": torch.nn.Parameter(torch.zeros(4, 2)),
    }
    path = tmp_path / "sd.pt"
    torch.save(state, path)
    info = inspect_file(path)
    assert info.format == "state_dict" and info.architecture is None
    loaded = torch.load(path, weights_only=True)
    assert info.tensors == {
        k: TensorInfo(str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in loaded.items()
    }


def test_safetensors_listing_matches_the_library(tmp_path: Path) -> None:
    state = {k: v.contiguous() for k, v in unet(norm="group", depth=2).state_dict().items()}
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    info = inspect_file(path)
    assert info.format == "safetensors" and info.architecture is None
    assert {k: v.shape for k, v in info.tensors.items()} == torch_shapes(load_file(str(path)))
    assert {v.dtype for v in info.tensors.values()} == {"F32"}


def test_pel_tune_and_torchscript_files_are_recognised(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "own.pt", unet(out_channels=3))
    own = inspect_file(tmp_path / "own.pt")
    assert own.format == "pel-tune"
    assert own.architecture == {"name": "unet", **UNetConfig(width=4, depth=1, out_channels=3).to_dict()}
    assert resolve(own, None) == ("pel-tune", own.architecture)

    torch.jit.save(torch.jit.script(TinyNet()), tmp_path / "ts.pt")
    ts = inspect_file(tmp_path / "ts.pt")
    assert ts.format == "torchscript" and ts.tensors is None
    assert resolve(ts, None) == ("torchscript", None)
    with pytest.raises(IntakeError, match="TorchScript file carries its own architecture"):
        resolve(ts, {"name": "unet"})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"hello, not a model", "not a model file PEL Tune reads"),
        (b"\x80\x02\x8a\x0alegacy", "legacy"),
        (b"PK\x03\x04broken", "damaged zip"),
        ((100).to_bytes(8, "little") + b"{", "header length 100 exceeds the file"),
        ((3).to_bytes(8, "little") + b"{x}", "unreadable JSON header"),
    ],
)
def test_foreign_bytes_are_named(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad"
    path.write_bytes(content)
    with pytest.raises(IntakeError, match=message):
        inspect_file(path)


def test_safetensors_offsets_outside_the_file_are_refused(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    path = tmp_path / "short.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)  # 8 of the 16 bytes
    with pytest.raises(IntakeError, match="the data of 'w' lies outside the file"):
        inspect_file(path)


def test_a_dict_with_non_tensors_is_not_a_state_dict(tmp_path: Path) -> None:
    torch.save({"weights": torch.zeros(3), "note": "hello"}, tmp_path / "x.pt")
    with pytest.raises(IntakeError, match="entries that are not tensors: note"):
        inspect_file(tmp_path / "x.pt")


# -- malicious pickles never run ----------------------------------------------------------------------------------


def test_code_in_a_state_dict_is_refused_unexecuted(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"conv.weight": torch.zeros(1), "evil": FileCreatingPayload(marker)}, path)
    with pytest.raises(IntakeError, match=r"refused: data.pkl references (posix|os)\.system"):
        inspect_file(path)
    with pytest.raises(CheckpointError, match="refused"):
        load_model(path, "state_dict", {"name": "unet", "width": 4, "depth": 1})
    assert not marker.exists()


def test_code_in_a_pel_tune_file_is_refused_unexecuted(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    save_checkpoint(path, unet())
    payload = torch.load(path, weights_only=True)
    payload["meta"] = {"note": FileCreatingPayload(marker)}
    torch.save(payload, path)
    with pytest.raises(IntakeError, match="refused"):
        inspect_file(path)
    with pytest.raises(CheckpointError, match="refused"):
        load_model(path)
    assert not marker.exists()


def test_code_in_a_torchscript_archive_never_runs(tmp_path: Path) -> None:
    """torch.jit.load reads TorchScript's pickles with its own unpickler, which builds TorchScript classes only."""
    marker = tmp_path / "pwned"
    good = tmp_path / "ts.pt"
    torch.jit.save(torch.jit.script(TinyNet()), good)
    evil_pickle = torch.serialization.pickle.dumps(FileCreatingPayload(marker), protocol=2)
    for member in ("data.pkl", "constants.pkl"):
        evil = tmp_path / f"evil-{member}.pt"
        with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w") as dst:
            for item in src.infolist():
                data = src.read(item)
                dst.writestr(item, evil_pickle if item.filename.endswith("/" + member) else data)
        assert inspect_file(evil).format == "torchscript"
        with pytest.raises(CheckpointError, match="not a loadable TorchScript module"):
            load_model(evil)
    assert not marker.exists()


# -- architectures and fit ----------------------------------------------------------------------------------------


def test_mismatches_name_missing_unexpected_and_shapes(tmp_path: Path) -> None:
    path = tmp_path / "sd.pt"
    torch.save(unet(depth=1).state_dict(), path)
    info = inspect_file(path)

    assert resolve(info, {"name": "unet", "width": 4, "depth": 1}) == (
        "state_dict",
        {"name": "unet", **UNetConfig(width=4, depth=1).to_dict()},
    )
    with pytest.raises(IntakeError) as deeper:
        resolve(info, {"name": "unet", "width": 4, "depth": 2})
    assert "missing keys: encoders.1.0.weight" in str(deeper.value)
    with pytest.raises(IntakeError) as wider:
        resolve(info, {"name": "unet", "width": 8, "depth": 1})
    assert "shape mismatches: encoders.0.0.weight (checkpoint (4, 1, 3, 3), model (8, 1, 3, 3))" in str(wider.value)
    with pytest.raises(IntakeError) as group:
        resolve(info, {"name": "unet", "width": 4, "depth": 1, "norm": "group"})
    assert "unexpected keys: encoders.0.1.running_mean" in str(group.value)
    with pytest.raises(IntakeError, match="holds weights only: declare its architecture"):
        resolve(info, None)


def test_a_ddp_prefix_gets_a_hint() -> None:
    expected = unet_state_shapes(UNetConfig(width=4, depth=1))
    problems = fit_problems(expected, {f"module.{k}": v for k, v in expected.items()})
    assert problems[-1] == "hint: the names carry DDP's 'module.' prefix; save model.module.state_dict() instead"


def test_fit_problems_lists_are_cut_after_eight() -> None:
    expected = {f"layer{i}.weight": (1,) for i in range(20)}
    (missing,) = fit_problems(expected, {})
    assert missing.endswith("layer7.weight, ... (12 more)")
    assert fit_problems(expected, dict(expected)) == []


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("{not json", "not valid JSON"),
        ([1], "must be a JSON object"),
        ({"name": "resnet"}, 'must be "unet"'),
        ({"name": "unet", "widht": 4}, "unknown UNetConfig keys: widht"),
        ({"name": "unet", "depth": 9}, "depth must be an integer in"),
        ({"name": "smp", "arch": "Unet2", "encoder": "resnet34"}, "arch must be one of"),
        ({"name": "smp", "arch": "Unet", "encoder": "../x"}, "encoder must be an smp encoder name"),
        ({"name": "smp", "arch": "Unet", "encoder": "resnet34", "classes": 0}, "classes must be a positive integer"),
        ({"name": "smp", "arch": "Unet", "encoder": "resnet34", "weights": "imagenet"}, "unknown smp architecture"),
    ],
)
def test_invalid_architectures_are_named(value: object, message: str) -> None:
    with pytest.raises(IntakeError, match=message):
        parse_architecture(value)


def test_smp_architectures_need_the_extra() -> None:
    arch = {"name": "smp", "arch": "Unet", "encoder": "resnet18", "in_channels": 1, "classes": 2}
    assert parse_architecture(json.dumps(arch)) == arch
    try:
        import segmentation_models_pytorch  # noqa: F401
    except ImportError:
        with pytest.raises(IntakeError, match="segmentation_models_pytorch is not installed on the workers"):
            build_model(arch)
    else:  # with the extra installed: a real smp model that a 64x64 probe accepts
        model = build_model(arch)
        check_model_io(model, in_channels=1, num_classes=2, target="binary")


# -- load_model / save_model: the same kind of file out as in ----------------------------------------------------


@pytest.mark.parametrize("fmt", ["state_dict", "safetensors"])
def test_weights_round_trip_in_their_format(tmp_path: Path, fmt: str) -> None:
    model = unet(norm="group")
    arch = parse_architecture({"name": "unet", "width": 4, "depth": 1, "norm": "group"})
    source = tmp_path / "in"
    save_model(source, model, fmt, arch)
    with pytest.raises(CheckpointError, match="no architecture was declared"):
        load_model(source, fmt)
    write_spec(source, fmt, arch)  # what the worker writes beside a staged checkpoint
    assert read_spec(source) == (fmt, arch)
    loaded = load_model(source)
    assert loaded.format == fmt and loaded.architecture == arch and isinstance(loaded.model, UNet)
    x = torch.rand(1, 1, 20, 20)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model.eval()(x))

    out = tmp_path / "out"
    save_model(out, loaded.model, loaded.format, loaded.architecture)
    info = inspect_file(out)
    assert info.format == fmt
    if fmt == "safetensors":  # PEL Tune's safetensors carry their architecture in the header
        assert info.architecture == arch and resolve(info, None) == (fmt, arch)
    # and users load them with one line of their library
    state = load_file(str(out)) if fmt == "safetensors" else torch.load(out, weights_only=True)
    fresh = UNet(UNetConfig(width=4, depth=1, norm="group"))
    fresh.load_state_dict(state)


def test_a_state_dict_that_does_not_fit_fails_with_the_names(tmp_path: Path) -> None:
    path = tmp_path / "sd.pt"
    torch.save(unet(depth=1).state_dict(), path)
    with pytest.raises(CheckpointError, match="missing keys: encoders.1.0.weight"):
        load_model(path, "state_dict", {"name": "unet", "width": 4, "depth": 2})


def test_torchscript_round_trip_stays_torchscript(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "ts.pt"
    torch.jit.save(torch.jit.script(TinyNet()), path)
    loaded = load_model(path)
    assert loaded.format == "torchscript" and loaded.architecture is None
    assert isinstance(loaded.model, torch.jit.ScriptModule)
    check_model_io(loaded.model, in_channels=1, num_classes=2, target="binary")
    with torch.no_grad():
        loaded.model.head.bias.add_(1.0)  # "fine-tuned"
    out = tmp_path / "out.pt"
    save_model(out, loaded.model, "torchscript", None)
    back = torch.jit.load(str(out))
    x = torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(back(x), loaded.model(x))
    with pytest.raises(TypeError, match="needs a ScriptModule"):
        save_model(out, UNet(UNetConfig(width=4, depth=1)), "torchscript", None)


@pytest.mark.parametrize(
    ("model", "in_channels", "message"),
    [
        (TinyNet(classes=3), 1, r"maps a \(1, 1, 64, 64\) input to \(1, 3, 64, 64\), but target 'binary' needs"),
        (TinyNet(in_channels=3), 1, r"failed on a \(1, 1, 64, 64\) input"),
    ],
)
def test_torchscript_that_does_not_fit_the_job_is_refused(
    model: torch.nn.Module, in_channels: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        check_model_io(torch.jit.script(model), in_channels=in_channels, num_classes=2, target="binary")


class Coarse(torch.nn.Module):
    """Works only on sides that are multiples of 32, as many encoder-decoder models do."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Conv2d(1, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(self.head(torch.nn.functional.avg_pool2d(x, 32)), scale_factor=32.0)


def test_the_probe_uses_the_jobs_window_sizes() -> None:
    model = torch.jit.script(Coarse())
    check_model_io(model, in_channels=1, num_classes=2, target="binary", sizes=(64, 256))
    with pytest.raises(ValueError, match=r"maps a \(1, 1, 48, 48\) input to \(1, 2, 32, 32\)"):
        check_model_io(model, in_channels=1, num_classes=2, target="binary", sizes=(48, 256))
    assert model.training  # the probe leaves the mode as it found it
