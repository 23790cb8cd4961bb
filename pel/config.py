"""Configuration of models and training jobs: plain dataclasses that round-trip through JSON.

Torch-free on purpose: the API validates job settings with these classes and must never import torch (its image
ships without it); the worker and ``pel.train`` use the same classes, so both sides accept exactly the same values.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from pel.data import TARGETS

__all__ = ["LOSS_REGIONS", "TrainConfig", "UNetConfig"]

NormKind = Literal["batch", "group"]


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of :class:`UNet`; stored in checkpoints so a model can be rebuilt without code.

    ``width`` is the channel count of the first level and doubles at each of the ``depth`` downsamplings.
    ``norm`` picks BatchNorm (fast, the default) or GroupNorm (independent of the batch size).
    """

    in_channels: int = 1
    out_channels: int = 2
    width: int = 16
    depth: int = 3
    norm: NormKind = "batch"

    def __post_init__(self) -> None:
        for name in ("in_channels", "out_channels", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"UNetConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.depth, int) or isinstance(self.depth, bool) or not 0 <= self.depth <= 6:
            raise ValueError(f"UNetConfig.depth must be an integer in [0, 6], got {self.depth!r}")
        if self.norm not in ("batch", "group"):
            raise ValueError(f"UNetConfig.norm must be 'batch' or 'group', got {self.norm!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNetConfig:
        if not isinstance(data, dict):
            raise ValueError(f"UNetConfig.from_dict expects a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown UNetConfig keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**data)


# config.loss -> CompoundLoss region term (cross entropy is always added).
LOSS_REGIONS: dict[str, Literal["pel", "dice", "none"]] = {"pel_ce": "pel", "dice_ce": "dice", "ce": "none"}
MODES = ("baseline", "finetune")
SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    """Everything a training job needs besides its paths; round-trips through JSON (``to_dict``/``from_dict``).

    ``batch_size`` is per rank. ``amp`` runs the training forward pass under bf16 autocast on CUDA only (a no-op
    on CPU; evaluation always runs in float32). ``grad_clip`` caps the global L2 norm of the gradients (None: no
    clipping). The learning rate of step s (1-based) is ``lr * lr_factor(s)``: a linear warm-up ``s / warmup_steps``
    for the first ``warmup_steps`` steps, then 1 (``"constant"``) or a half cosine from 1 at step warmup_steps + 1
    towards 0 one step past the last (``"cosine"``, so every step trains). ``snapshot_every`` is the snapshot
    cadence in steps (see the module docstring). ``model`` (a ``UNetConfig`` dict) is used only by
    ``mode="baseline"``, whose ``in_channels``/``out_channels`` are taken from the dataset and the target; a
    fine-tune keeps the architecture of its init checkpoint. ``val_images`` limits validation to the first N val
    images (for speed).
    """

    mode: Literal["baseline", "finetune"] = "finetune"
    loss: Literal["pel_ce", "dice_ce", "ce"] = "pel_ce"
    alpha: float = 20.0
    n: float = 3.0
    region_weight: float = 1.0
    ce_weight: float = 1.0
    target: Literal["binary", "boundary"] = "binary"
    patch_size: int = 128
    batch_size: int = 8
    fg_fraction: float = 0.5
    steps: int = 200
    lr: float = 1e-4
    weight_decay: float = 0.0
    val_every: int = 50
    val_images: int | None = None
    eval_overlap: float = 0.25
    seed: int = 0
    amp: bool = True
    grad_clip: float | None = None
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    snapshot_every: int = 50
    # Opt-in torch.compile of the loss's per-pixel kernels (pel.losses, compile=True; docs/performance.md): the
    # same values, faster per step, but seconds of compilation at the first step of each rank.
    compile_loss: bool = False
    model: dict[str, Any] = field(default_factory=lambda: UNetConfig().to_dict())

    def __post_init__(self) -> None:
        _choice("mode", self.mode, MODES)
        _choice("loss", self.loss, tuple(LOSS_REGIONS))
        _choice("target", self.target, TARGETS)
        _choice("lr_schedule", self.lr_schedule, SCHEDULES)
        for name in ("patch_size", "batch_size", "steps", "val_every", "snapshot_every"):
            _integer(name, getattr(self, name), minimum=1)
        _integer("seed", self.seed, minimum=0)
        _integer("warmup_steps", self.warmup_steps, minimum=0)
        if self.warmup_steps > self.steps:
            raise ValueError(
                f"TrainConfig.warmup_steps must be <= steps ({self.steps}), got {self.warmup_steps}: "
                "the learning rate would never reach lr"
            )
        if not isinstance(self.amp, bool):
            raise ValueError(f"TrainConfig.amp must be true or false, got {self.amp!r}")
        if not isinstance(self.compile_loss, bool):
            raise ValueError(f"TrainConfig.compile_loss must be true or false, got {self.compile_loss!r}")
        if self.grad_clip is not None:
            _number("grad_clip", self.grad_clip, low=0.0, low_open=True)
        if self.val_images is not None:
            _integer("val_images", self.val_images, minimum=1)
        _number("alpha", self.alpha, low=0.0, low_open=True)
        _number("n", self.n, low=0.0, low_open=True)
        _number("region_weight", self.region_weight, low=0.0)
        _number("ce_weight", self.ce_weight, low=0.0)
        _number("lr", self.lr, low=0.0, low_open=True)
        _number("weight_decay", self.weight_decay, low=0.0)
        _number("fg_fraction", self.fg_fraction, low=0.0, high=1.0)
        _number("eval_overlap", self.eval_overlap, low=0.0, high=1.0, high_open=True)
        if not isinstance(self.model, dict):
            raise ValueError(f"TrainConfig.model must be a dict of UNetConfig fields, got {type(self.model).__name__}")
        try:
            self.model = UNetConfig.from_dict(self.model).to_dict()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"TrainConfig.model: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``lr`` at 1-based training ``step`` (warm-up, then constant or cosine decay)."""
        if step <= self.warmup_steps:
            return step / self.warmup_steps
        if self.lr_schedule == "constant":
            return 1.0
        # Progress 0 at the first step after warm-up; the 0 of the cosine falls one step past the last (the
        # scheduler also asks for that step, so it is clamped there, and the warm-up may fill every step).
        progress = min(1.0, (step - self.warmup_steps - 1) / max(1, self.steps - self.warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        if not isinstance(data, dict):
            raise ValueError(f"TrainConfig.from_dict expects a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys: {', '.join(unknown)}")
        return cls(**data)


def _choice(name: str, value: Any, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"TrainConfig.{name} must be one of {', '.join(options)}, got {value!r}")


def _integer(name: str, value: Any, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"TrainConfig.{name} must be an integer >= {minimum}, got {value!r}")


def _number(
    name: str,
    value: Any,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"TrainConfig.{name} must be a number in {lo}{low}, {high}{hi}, got {value!r}")
