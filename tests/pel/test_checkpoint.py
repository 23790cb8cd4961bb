"""Checkpoints: exact round trip, atomic writes, weights_only refusal of code, and clear errors."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from pel.checkpoint import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint, save_checkpoint
from pel.models import UNet, UNetConfig


def _trained_model(config: UNetConfig) -> UNet:
    """A model whose BatchNorm statistics moved away from their defaults, so buffers matter in the round trip."""
    torch.manual_seed(0)
    model = UNet(config)
    model.train()
    with torch.no_grad():
        model(torch.rand(4, config.in_channels, 32, 32) * 3 + 1)
    return model.eval()


class FileCreatingPayload:
    """Unpickling this object calls open(path, "w"), creating the file: what a malicious checkpoint could do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (str(self.path), "w"))


def test_round_trip_gives_identical_outputs_and_meta(tmp_path: Path) -> None:
    config = UNetConfig(in_channels=3, out_channels=3, width=4, depth=2)
    model = _trained_model(config)
    meta = {"best_step": 7, "best_val_dice": 0.9, "config": {"lr": 1e-4, "val_images": None}, "tags": ["a", 1]}
    path = tmp_path / "sub" / "model.pt"
    save_checkpoint(path, model, meta)

    loaded, loaded_meta = load_checkpoint(path)
    assert loaded.config == config
    assert loaded_meta == meta
    assert not loaded.training  # returned ready for inference
    x = torch.rand(2, 3, 29, 41)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_saved_file_has_the_documented_layout(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    save_checkpoint(path, _trained_model(UNetConfig(width=4, depth=1)))
    payload = torch.load(path, weights_only=True)
    assert set(payload) == {"format", "architecture", "state_dict", "meta"}
    assert payload["format"] == CHECKPOINT_FORMAT == "pel-tune.unet/1"
    assert payload["architecture"] == UNetConfig(width=4, depth=1).to_dict()
    assert payload["meta"] == {}


def test_save_replaces_atomically_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    save_checkpoint(path, _trained_model(UNetConfig(width=4, depth=1)), {"v": 1})
    save_checkpoint(path, _trained_model(UNetConfig(width=8, depth=1)), {"v": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]
    model, meta = load_checkpoint(path)
    assert meta == {"v": 2} and model.config.width == 8


def test_failed_save_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    save_checkpoint(path, _trained_model(UNetConfig(width=4, depth=1)), {"v": 1})
    with pytest.raises(TypeError, match=r"meta\['bad'\]: object is not plain data"):
        save_checkpoint(path, _trained_model(UNetConfig(width=4, depth=1)), {"bad": object()})
    assert load_checkpoint(path)[1] == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_code_in_the_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    model = _trained_model(UNetConfig(width=4, depth=1))
    marker = tmp_path / "created-by-unpickling"
    evil = tmp_path / "evil.pt"
    payload = {"format": CHECKPOINT_FORMAT, "architecture": model.config.to_dict(), "state_dict": model.state_dict()}
    torch.save({**payload, "meta": {"x": FileCreatingPayload(marker)}}, evil)

    with pytest.raises(CheckpointError, match=r"refused to load.*(builtins|io)\.open"):
        load_checkpoint(evil)
    assert not marker.exists()

    # The payload is real: a full unpickle (what load_checkpoint must never do) does create the file.
    torch.load(evil, weights_only=False)
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_plain_pickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"format": CHECKPOINT_FORMAT}))
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"this is text, not a checkpoint", "not a PyTorch checkpoint file"),
        (b"", "not a PyTorch checkpoint file"),
    ],
)
def test_not_a_torch_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_zip_that_is_not_a_torch_file(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint file"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ([1, 2, 3], "expected a dict, found list"),
        ({"state_dict": {}}, r'the "format" entry is missing .*top-level keys: state_dict'),
        ({"format": "pel-tune.unet/2"}, "unsupported checkpoint format 'pel-tune.unet/2'"),
        ({"format": CHECKPOINT_FORMAT, "state_dict": {}}, 'the "architecture" entry is missing'),
        ({"format": CHECKPOINT_FORMAT, "architecture": {"widht": 4}, "state_dict": {}}, "unknown UNetConfig keys"),
        ({"format": CHECKPOINT_FORMAT, "architecture": {}, "state_dict": {"a": 1}}, "not tensors: a"),
    ],
)
def test_wrong_structure_is_named(tmp_path: Path, payload: object, message: str) -> None:
    path = tmp_path / "model.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_keys_from_another_architecture_are_named(tmp_path: Path) -> None:
    # A depth-2 state_dict declared as depth 1: the extra level's keys are unexpected, and the head differs.
    deep = _trained_model(UNetConfig(width=4, depth=2))
    path = tmp_path / "model.pt"
    architecture = UNetConfig(width=4, depth=1).to_dict()
    torch.save({"format": CHECKPOINT_FORMAT, "architecture": architecture, "state_dict": deep.state_dict()}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "do not fit the declared architecture" in message
    assert "unexpected keys: encoders.1.0.weight" in message
    assert "shape mismatches: bottleneck.0.weight (checkpoint (16, 8, 3, 3), model (8, 4, 3, 3))" in message


def test_missing_keys_are_named(tmp_path: Path) -> None:
    model = _trained_model(UNetConfig(width=4, depth=1))
    state = model.state_dict()
    del state["head.weight"], state["head.bias"]
    path = tmp_path / "model.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "architecture": model.config.to_dict(), "state_dict": state}, path)
    with pytest.raises(CheckpointError, match=r"missing keys: head\.weight, head\.bias$"):
        load_checkpoint(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_ddp_style_wrapper_is_unwrapped(tmp_path: Path) -> None:
    model = _trained_model(UNetConfig(width=4, depth=1))
    wrapper = torch.nn.Module()
    wrapper.module = model  # what DistributedDataParallel exposes
    save_checkpoint(tmp_path / "model.pt", wrapper)
    assert load_checkpoint(tmp_path / "model.pt")[0].config == model.config
