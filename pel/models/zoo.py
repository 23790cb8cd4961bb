"""Build models from declared architectures and check that a model fits a training job (worker side, torch).

``{"name": "unet", ...}`` is the built-in :class:`UNet`; ``{"name": "smp", "arch", "encoder", "in_channels",
"classes"}`` is ``segmentation_models_pytorch.create_model(arch, encoder_name=encoder, encoder_weights=None, ...)``
and needs the optional extra ``pel-tune[smp]`` on the workers (the API never imports it; a job whose workers lack
it fails with that reason before any training step).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from pel.config import UNetConfig
from pel.models.intake import IntakeError, parse_architecture
from pel.models.unet import UNet

__all__ = ["PROBE_SIZE", "build_model", "check_model_io", "import_smp"]

# Side of the dummy input a brought model is probed with: a multiple of 32, which smp's encoders need.
PROBE_SIZE = 64
SMP_MISSING = (
    "segmentation_models_pytorch is not installed on the workers (install the extra: pip install 'pel-tune[smp]')"
)


def import_smp() -> Any:
    try:
        import segmentation_models_pytorch as smp
    except ImportError as exc:
        raise IntakeError(f"{SMP_MISSING}; importing it failed with: {exc}") from None
    return smp


def build_model(architecture: dict[str, Any]) -> nn.Module:
    """A freshly initialised model of ``architecture`` (validated by :func:`parse_architecture` first)."""
    arch = parse_architecture(architecture)
    if arch["name"] == "unet":
        return UNet(UNetConfig.from_dict({k: v for k, v in arch.items() if k != "name"}))
    smp = import_smp()
    return smp.create_model(
        arch["arch"],
        encoder_name=arch["encoder"],
        encoder_weights=None,  # the checkpoint supplies every weight; never download anything on a worker
        in_channels=arch["in_channels"],
        classes=arch["classes"],
    )


def check_model_io(
    model: nn.Module, *, in_channels: int, num_classes: int, target: str, sizes: Iterable[int] = (PROBE_SIZE,)
) -> None:
    """Refuse a model that cannot train on this job before any step, with a reason a user can act on.

    The built-in U-Net is checked from its config (it takes any size). Any other model (TorchScript, smp) is run
    once per side in ``sizes`` (the job's training patch and evaluation window) on a ``(1, in_channels, s, s)``
    zero input on the CPU and must return logits ``(1, num_classes, s, s)``.
    """
    if isinstance(model, UNet):
        c = model.config
        if c.out_channels != num_classes:
            raise ValueError(
                f"the init checkpoint predicts {c.out_channels} classes but target {target!r} needs {num_classes}"
            )
        if c.in_channels != in_channels:
            raise ValueError(
                f"the init checkpoint expects {c.in_channels}-channel images but the dataset's images have "
                f"{in_channels} channel(s)"
            )
        return
    was_training = model.training
    model.eval()
    try:
        for size in dict.fromkeys(sizes):
            _probe(model, in_channels, num_classes, target, size)
    finally:
        model.train(was_training)


def _probe(model: nn.Module, in_channels: int, num_classes: int, target: str, size: int) -> None:
    x = torch.zeros(1, in_channels, size, size, device=next(model.parameters(), torch.zeros(0)).device)
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        raise ValueError(
            f"the init model failed on a {tuple(x.shape)} input (the dataset's images have {in_channels} "
            f"channel(s); training uses {size}x{size} windows): {type(exc).__name__}: {lines[-1] if lines else ''}"
        ) from None
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"the init model must return one logits tensor, got {type(out).__name__}")
    want = (1, num_classes, size, size)
    if tuple(out.shape) != want:
        raise ValueError(
            f"the init model maps a {tuple(x.shape)} input to {tuple(out.shape)}, but target {target!r} needs "
            f"logits {want} (one channel per class, same height and width as the input)"
        )
    if not out.is_floating_point():
        raise ValueError(f"the init model must return floating-point logits, got {out.dtype}")
