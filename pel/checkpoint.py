"""Checkpoint files: a plain dict saved with ``torch.save``, loaded only with ``weights_only=True``.

Layout: ``{"format": "pel-tune.unet/1", "architecture": UNetConfig.to_dict(), "state_dict": {...}, "meta": {...}}``.
Checkpoints arrive from users, so loading never unpickles arbitrary objects: anything but tensors and plain
containers is refused before it can run.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pel.models import UNet, UNetConfig

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_FORMAT = "pel-tune.unet/1"
_MAX_NAMES = 8  # key lists in messages are cut here: a wrong architecture can differ in hundreds of keys


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
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
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _weights_only_reason(str(exc))
        raise CheckpointError(
            f"{path}: refused to load: the file contains objects other than tensors and plain data, which could run "
            f"code when unpickled ({reason})"
        ) from None
    except Exception as exc:  # torch reports a foreign file as KeyError, EOFError, RuntimeError, ... depending on bytes
        raise CheckpointError(f"{path}: not a PyTorch checkpoint file ({type(exc).__name__}: {exc})") from None

    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: not a PEL Tune checkpoint: expected a dict, found {type(payload).__name__}")
    if "format" not in payload:
        raise CheckpointError(
            f'{path}: not a PEL Tune checkpoint: the "format" entry is missing (expected "{CHECKPOINT_FORMAT}"; '
            f"top-level keys: {_names(payload)})"
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
        raise CheckpointError(f"{path}: state_dict entries that are not tensors: {_names(non_tensors)}")
    _check_fits(path, model, state)
    model.load_state_dict(state, strict=True)
    meta = payload.get("meta") or {}
    if not isinstance(meta, dict):
        raise CheckpointError(f'{path}: the "meta" entry must be a dict, found {type(meta).__name__}')
    return model.to(map_location).eval(), meta


def _check_fits(path: Path, model: UNet, state: dict[str, torch.Tensor]) -> None:
    """Raise naming every way ``state`` differs from ``model``: load_state_dict's own message is hard to act on."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if not (missing or unexpected or mismatched):
        return
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {_names(mismatched)}")
    raise CheckpointError(
        f"{path}: the weights do not fit the declared architecture {model.config.to_dict()}: " + "; ".join(problems)
    )


def _names(items: Any) -> str:
    items = [str(i) for i in items]
    shown = ", ".join(items[:_MAX_NAMES])
    return shown + (f", ... ({len(items) - _MAX_NAMES} more)" if len(items) > _MAX_NAMES else "")


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
