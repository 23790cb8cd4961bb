"""Checkpoint files: PEL Tune's own format, and the models users bring (:func:`load_model` / :func:`save_model`).

PEL Tune's own layout (format ``"pel-tune"``), a plain dict saved with ``torch.save``:
``{"format": "pel-tune.unet/1", "architecture": UNetConfig.to_dict(), "state_dict": {...}, "meta": {...}}``.
Other formats (see :mod:`pel.models.intake`): ``"torchscript"`` (``torch.jit.save``), ``"state_dict"`` (a
``torch.save``d dict of tensors) and ``"safetensors"``, the last two with a declared architecture.
Checkpoints arrive from users, so loading never unpickles arbitrary objects: torch files are read only with
``weights_only=True`` (anything but tensors and plain containers is refused before it can run), safetensors holds
no code, and TorchScript is loaded by torch's own TorchScript reader, which builds TorchScript classes only.
A fine-tune writes its result in the format it was given (:func:`save_model`), so a user gets back what they brought.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pel.models.intake import (
    PEL_TUNE,
    PEL_TUNE_FILE_FORMAT,
    SAFETENSORS,
    SAFETENSORS_ARCH_KEY,
    STATE_DICT,
    TORCHSCRIPT,
    IntakeError,
    fit_problems,
    inspect_file,
    names_text,
    parse_architecture,
    read_spec,
)
from pel.models.unet import UNet, UNetConfig

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "LoadedModel",
    "load_checkpoint",
    "load_model",
    "save_checkpoint",
    "save_model",
]

CHECKPOINT_FORMAT = PEL_TUNE_FILE_FORMAT


class CheckpointError(ValueError):
    """The file is not a usable PEL Tune checkpoint; the message says why."""


def save_checkpoint(path: str | os.PathLike[str], model: nn.Module, meta: dict[str, Any] | None = None) -> None:
    """Write ``model`` (a :class:`UNet`, or a DDP wrapper of one) to ``path`` atomically.

    The file is written beside the target and renamed over it, so a reader never sees a half-written
    checkpoint and a crash leaves the previous file intact. ``meta`` must hold plain data only (str, int, float,
    bool, None, lists and dicts with str keys) so that ``weights_only`` loading accepts it.
    """
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    if not isinstance(model, UNet):
        raise TypeError(f"save_checkpoint expects a UNet, got {type(model).__name__}")
    meta = {} if meta is None else meta
    _check_plain(meta, "meta")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "architecture": model.config.to_dict(),
        "state_dict": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
        "meta": meta,
    }
    _write_atomic(path, lambda f: torch.save(payload, f))


def _write_atomic(path: str | os.PathLike[str], write: Callable[[Any], None]) -> None:
    """Call ``write(file object)`` on a temporary file beside ``path``, fsync it and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> tuple[UNet, dict[str, Any]]:
    """Rebuild the model stored at ``path``; returns ``(model, meta)``, the model in eval mode on ``map_location``.

    Raises :class:`CheckpointError` when the file is not a torch file, holds objects other than tensors and
    plain data (refused unexecuted), has a missing or foreign ``"format"``, or its weights do not fit the
    architecture it declares (the missing and unexpected keys are named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    payload = _torch_load(path)

    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: not a PEL Tune checkpoint: expected a dict, found {type(payload).__name__}")
    if "format" not in payload:
        raise CheckpointError(
            f'{path}: not a PEL Tune checkpoint: the "format" entry is missing (expected "{CHECKPOINT_FORMAT}"; '
            f"top-level keys: {names_text(payload)})"
        )
    if payload["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f'{path}: unsupported checkpoint format {payload["format"]!r} (expected "{CHECKPOINT_FORMAT}")'
        )
    for key in ("architecture", "state_dict"):
        if not isinstance(payload.get(key), dict):
            raise CheckpointError(f'{path}: the "{key}" entry is missing or not a dict')
    try:
        config = UNetConfig.from_dict(payload["architecture"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid architecture: {exc}") from None

    model = UNet(config)
    state = payload["state_dict"]
    non_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if non_tensors:
        raise CheckpointError(f"{path}: state_dict entries that are not tensors: {names_text(non_tensors)}")
    _check_fits(path, model, state, model.config.to_dict())
    model.load_state_dict(state, strict=True)
    meta = payload.get("meta") or {}
    if not isinstance(meta, dict):
        raise CheckpointError(f'{path}: the "meta" entry must be a dict, found {type(meta).__name__}')
    return model.to(map_location).eval(), meta


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _weights_only_reason(str(exc))
        raise CheckpointError(
            f"{path}: refused to load: the file contains objects other than tensors and plain data, which could run "
            f"code when unpickled ({reason})"
        ) from None
    except Exception as exc:  # torch reports a foreign file as KeyError, EOFError, RuntimeError, ... depending on bytes
        raise CheckpointError(f"{path}: not a PyTorch checkpoint file ({type(exc).__name__}: {exc})") from None


@dataclass
class LoadedModel:
    """A model ready to train, with what :func:`save_model` needs to write it back in the same kind of file."""

    model: nn.Module
    format: str
    architecture: dict[str, Any] | None
    meta: dict[str, Any]


def load_model(
    path: str | os.PathLike[str],
    format: str | None = None,
    architecture: dict[str, Any] | None = None,
    map_location: str | torch.device = "cpu",
) -> LoadedModel:
    """Load any model file PEL Tune accepts; the model comes back in eval mode on ``map_location``.

    ``format``/``architecture`` default to the spec file beside ``path`` (``model.pt.json``, written by the worker
    when it stages a checkpoint from the row's format and architecture), else to what the file itself says
    (:func:`pel.models.intake.inspect_file`). A state_dict or safetensors file needs an architecture; its tensors
    must fit it exactly (missing, unexpected keys and shape mismatches are named). A TorchScript module is returned
    as the ScriptModule it is. Every failure is a :class:`CheckpointError` that says why.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        if format is None:
            spec = read_spec(path)
            if spec is not None:
                format, architecture = spec[0], architecture if architecture is not None else spec[1]
            else:
                inspection = inspect_file(path)
                format = inspection.format
                architecture = architecture if architecture is not None else inspection.architecture
        if architecture is not None:
            architecture = parse_architecture(architecture)
        if format == PEL_TUNE:
            model, meta = load_checkpoint(path)
            arch = {"name": "unet", **model.config.to_dict()}
            if architecture is not None and architecture != arch:
                raise CheckpointError(f"{path}: declared architecture {architecture} differs from the file's {arch}")
            return LoadedModel(model.to(map_location), PEL_TUNE, arch, meta)
        if format == TORCHSCRIPT:
            return LoadedModel(_load_torchscript(path).to(map_location), TORCHSCRIPT, None, {})
        if format in (STATE_DICT, SAFETENSORS):
            if architecture is None:
                raise CheckpointError(f"{path}: a {format} file holds weights only and no architecture was declared")
            state = _load_safetensors(path) if format == SAFETENSORS else _torch_load(path)
            if not isinstance(state, dict) or not state:
                raise CheckpointError(f"{path}: expected a state_dict (a dict of tensors), got {type(state).__name__}")
            non_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
            if non_tensors:
                raise CheckpointError(f"{path}: state_dict entries that are not tensors: {names_text(non_tensors)}")
            from pel.models.zoo import build_model  # smp is imported only when a job uses it

            model = build_model(architecture)
            _check_fits(path, model, state, architecture)
            model.load_state_dict(state, strict=True)
            return LoadedModel(model.to(map_location).eval(), format, architecture, {})
    except IntakeError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    raise CheckpointError(f"{path}: unknown model format {format!r}")


def _load_torchscript(path: Path) -> torch.jit.ScriptModule:
    try:
        with _quiet_jit():
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a loadable TorchScript module ({first})") from None
    return module.eval()


@contextmanager
def _quiet_jit() -> Iterator[None]:
    """torch 2.13 deprecates torch.jit in favour of torch.export; TorchScript is what users bring, so it is kept."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=DeprecationWarning)
        yield


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def save_model(
    path: str | os.PathLike[str],
    model: nn.Module,
    format: str,
    architecture: dict[str, Any] | None,
    meta: dict[str, Any] | None = None,
) -> None:
    """Write ``model`` (or a DDP wrapper of it) to ``path`` in ``format``, atomically.

    ``"pel-tune"``: :func:`save_checkpoint` (with ``meta``). ``"torchscript"``: ``torch.jit.save`` of the
    ScriptModule. ``"state_dict"``: ``torch.save`` of the CPU state_dict. ``"safetensors"``: the state_dict with the
    architecture in the header's metadata (``"pel_tune.architecture"``). ``meta`` is kept by the pel-tune format
    only (a job's summary lives on the job).
    """
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    if format == PEL_TUNE:
        save_checkpoint(path, model, meta)
    elif format == TORCHSCRIPT:
        if not isinstance(model, torch.jit.ScriptModule):
            raise TypeError(f"the torchscript format needs a ScriptModule, got {type(model).__name__}")
        was_training = model.training
        device = next(model.parameters(), torch.zeros(0)).device
        # Saved in eval mode and on the CPU, so that a plain torch.jit.load runs it anywhere (a CUDA-saved module
        # would need a GPU or map_location); moved in place and back, so the trainer's references stay valid.
        model.eval().to("cpu")
        try:
            with _quiet_jit():
                _write_atomic(path, lambda f: torch.jit.save(model, f))
        finally:
            model.to(device).train(was_training)
    elif format in (STATE_DICT, SAFETENSORS):
        if architecture is None:
            raise ValueError(f"the {format} format needs an architecture to record")
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
        if format == STATE_DICT:
            _write_atomic(path, lambda f: torch.save(state, f))
        else:
            from safetensors.torch import save

            data = save(state, metadata={"format": "pt", SAFETENSORS_ARCH_KEY: json.dumps(architecture)})
            _write_atomic(path, lambda f: f.write(data))
    else:
        raise ValueError(f"unknown model format {format!r}")


def _check_fits(path: Path, model: nn.Module, state: dict[str, torch.Tensor], architecture: Any) -> None:
    """Raise naming every way ``state`` differs from ``model``: load_state_dict's own message is hard to act on."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = fit_problems(expected, {k: tuple(v.shape) for k, v in state.items()})
    if problems:
        raise CheckpointError(
            f"{path}: the weights do not fit the declared architecture {architecture}: " + "; ".join(problems)
        )


def _weights_only_reason(message: str) -> str:
    match = re.search(r"WeightsUnpickler error:\s*([^\n]+)", message)
    if not match:
        return message.splitlines()[0] if message else "unsupported content"
    return match.group(1).split(". ")[0].strip()


def _check_plain(value: Any, where: str) -> None:
    if value is None or isinstance(value, str | int | float | bool):
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: keys must be str, got {key!r}")
            _check_plain(item, f"{where}[{key!r}]")
        return
    raise TypeError(f"{where}: {type(value).__name__} is not plain data (str, int, float, bool, None, list, dict)")
