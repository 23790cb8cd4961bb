"""Baseline training and fine-tuning on patches, for 1 process or N DDP ranks, with whole-image evaluation.

One code path: under torchrun each rank joins the process group (``pel.distributed.setup``), wraps the model in
DistributedDataParallel and draws its own patches from a rank-seeded generator; a single process runs the same
code without a group. Evaluation (validation and test) is sharded: each rank predicts every ``world_size``-th
image by stitched sliding windows and ``SegmentationMetrics.compute`` all-reduces the counts, so every rank
gets the same scores and agrees on the best step. Only rank 0 writes to ``out_dir``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from pel import distributed
from pel.checkpoint import load_checkpoint, save_checkpoint
from pel.data import TARGETS, DatasetError, Sample, load_split, num_classes_for, open_dataset
from pel.inference import sliding_window_predict
from pel.losses import CompoundLoss
from pel.metrics import SegmentationMetrics
from pel.models import UNet, UNetConfig
from pel.patches import crop, pad_to_min, random_positions

__all__ = ["LOSS_REGIONS", "TrainConfig", "train"]

# config.loss -> CompoundLoss region term (cross entropy is always added).
LOSS_REGIONS: dict[str, Literal["pel", "dice", "none"]] = {"pel_ce": "pel", "dice_ce": "dice", "ce": "none"}
MODES = ("baseline", "finetune")
LOG_EVERY = 10  # training steps per metrics.jsonl line (plus the first step, validation steps and the last)
# Evaluation windows are at least this large: a fully convolutional net sees more context per window, and on
# CPU a few large windows are faster than many overlapping small ones.
MIN_EVAL_PATCH = 256
EVAL_BATCH = 4


@dataclass
class TrainConfig:
    """Everything a training job needs besides its paths; round-trips through JSON (``to_dict``/``from_dict``).

    ``batch_size`` is per rank. ``model`` (a ``UNetConfig`` dict) is used only by ``mode="baseline"``, whose
    ``in_channels``/``out_channels`` are taken from the dataset and the target; a fine-tune keeps the
    architecture of its init checkpoint. ``val_images`` limits validation to the first N val images (for speed).
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
    model: dict[str, Any] = field(default_factory=lambda: UNetConfig().to_dict())

    def __post_init__(self) -> None:
        _choice("mode", self.mode, MODES)
        _choice("loss", self.loss, tuple(LOSS_REGIONS))
        _choice("target", self.target, TARGETS)
        for name in ("patch_size", "batch_size", "steps", "val_every"):
            _integer(name, getattr(self, name), minimum=1)
        _integer("seed", self.seed, minimum=0)
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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        if not isinstance(data, dict):
            raise ValueError(f"TrainConfig.from_dict expects a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys: {', '.join(unknown)}")
        return cls(**data)


def train(
    config: TrainConfig, *, dataset_dir: Path, out_dir: Path, init_checkpoint: Path | None = None
) -> dict[str, Any] | None:
    """Train per ``config``; rank 0 writes ``metrics.jsonl``, ``model.pt`` and ``summary.json`` to ``out_dir``.

    Returns the summary on rank 0 and None on other ranks. Joins the process group described by torchrun's
    environment if nobody has yet (and then leaves it at the end). Thread counts are the caller's choice.
    On an exception every rank writes ``out_dir/error-rank{rank}.txt`` ("<Type>: <message>") and re-raises.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    owns_group = not (dist.is_available() and dist.is_initialized())
    rank = int(os.environ.get("RANK", "0"))
    try:
        info = distributed.setup()
        rank = info.rank
        return _Trainer(config, info, Path(dataset_dir), out_dir, init_checkpoint).run()
    except Exception as exc:
        (out_dir / f"error-rank{rank}.txt").write_text(f"{type(exc).__name__}: {exc}\n")
        raise
    finally:
        if owns_group:
            distributed.cleanup()


class _Trainer:
    def __init__(
        self,
        config: TrainConfig,
        info: distributed.DistInfo,
        dataset_dir: Path,
        out_dir: Path,
        init_checkpoint: Path | None,
    ) -> None:
        if config.mode == "finetune" and init_checkpoint is None:
            raise ValueError("a fine-tune needs an init checkpoint")
        if config.mode == "baseline" and init_checkpoint is not None:
            raise ValueError("a baseline trains from scratch: pass no init checkpoint (or use mode 'finetune')")
        self.config = config
        self.info = info
        self.out_dir = out_dir
        self.init_checkpoint = init_checkpoint
        self.num_classes = num_classes_for(config.target)
        self.index = open_dataset(dataset_dir)
        for split in ("train", "val", "test"):
            if not self.index.splits[split]:
                raise DatasetError(f"the {split} split of {dataset_dir} is empty")

        torch.manual_seed(config.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
        self.model = self._build_model()
        self.net: torch.nn.Module = (
            DistributedDataParallel(self.model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
            if info.distributed
            else self.model
        )
        self.loss_fn = CompoundLoss(
            LOSS_REGIONS[config.loss],
            region_weight=config.region_weight,
            ce_weight=config.ce_weight,
            alpha=config.alpha,
            n=config.n,
        )
        # AdamW with weight_decay 0 is exactly Adam.
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.rng = np.random.default_rng([config.seed, info.rank])

        # Every rank samples from the whole train split; evaluation images are sharded across ranks.
        self.train_samples = load_split(self.index, "train", config.target)
        val_ids = self.index.splits["val"][: config.val_images]
        self.val_shard = self._load_shard("val", val_ids)
        self.test_shard = self._load_shard("test", self.index.splits["test"])
        p = config.patch_size
        self.images = [pad_to_min(s.image, (p, p)) for s in self.train_samples]
        self.masks = [pad_to_min(s.mask, (p, p)) for s in self.train_samples]
        self.with_foreground = np.flatnonzero([m.any() for m in self.masks])

    def _build_model(self) -> UNet:
        if self.init_checkpoint is not None:
            model, _ = load_checkpoint(self.init_checkpoint)
            c = model.config
            if c.out_channels != self.num_classes:
                raise ValueError(
                    f"the init checkpoint predicts {c.out_channels} classes but target {self.config.target!r} "
                    f"needs {self.num_classes}"
                )
            if c.in_channels != self.index.channels:
                raise ValueError(
                    f"the init checkpoint expects {c.in_channels}-channel images but the dataset's images have "
                    f"{self.index.channels} channel(s)"
                )
        else:
            arch = {**self.config.model, "in_channels": self.index.channels, "out_channels": self.num_classes}
            model = UNet(UNetConfig.from_dict(arch))
        return model.to(self.info.device)

    def _load_shard(self, split: str, ids: list[str]) -> list[Sample]:
        shard = ids[self.info.rank :: self.info.world_size]
        return load_split(dataclasses.replace(self.index, splits={split: shard}), split, self.config.target)

    def run(self) -> dict[str, Any] | None:
        cfg = self.config
        is_main = self.info.is_main
        started = time.monotonic()
        test_before = self._evaluate(self.test_shard) if cfg.mode == "finetune" else None
        best_dice, best_step, best_state = -math.inf, 0, None
        log = (self.out_dir / "metrics.jsonl").open("w") if is_main else None
        try:
            sums: dict[str, Tensor] = {}
            count = 0
            for step in range(1, cfg.steps + 1):
                terms = self._train_step()
                for key, value in terms.items():
                    sums[key] = sums[key] + value if key in sums else value
                count += 1
                validate = step % cfg.val_every == 0 or step == cfg.steps
                point: dict[str, Any] | None = None
                if validate or step == 1 or step % LOG_EVERY == 0:
                    # Loss terms are rank 0's own patches, averaged since the last line (no extra collective).
                    point = {"step": step, "total_steps": cfg.steps, "lr": self.optimizer.param_groups[0]["lr"]}
                    point.update({k: float(v / count) for k, v in sums.items()})
                    sums, count = {}, 0
                if validate:
                    val_dice = _foreground_dice(self._evaluate(self.val_shard))
                    assert point is not None
                    point["val_dice"] = val_dice
                    if val_dice > best_dice:  # Dice, never the loss: raw PEL is negative
                        best_dice, best_step = val_dice, step
                        best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                if point is not None and log is not None:
                    log.write(json.dumps(point) + "\n")
                    log.flush()
        finally:
            if log is not None:
                log.close()

        assert best_state is not None  # the last step always validates
        self.model.load_state_dict(best_state)
        if is_main:
            save_checkpoint(
                self.out_dir / "model.pt",
                self.model,
                meta={
                    "mode": cfg.mode,
                    "target": cfg.target,
                    "num_classes": self.num_classes,
                    "best_step": best_step,
                    "best_val_dice": best_dice,
                    "config": cfg.to_dict(),
                },
            )
        test_after = self._evaluate(self.test_shard)
        if not is_main:
            return None
        summary = {
            "test_before": test_before,
            "test_after": test_after,
            "best_step": best_step,
            "best_val_dice": best_dice,
            "steps": cfg.steps,
            "num_classes": self.num_classes,
            "world_size": self.info.world_size,
            "wall_seconds": round(time.monotonic() - started, 3),
        }
        _write_json_atomic(self.out_dir / "summary.json", summary)
        return summary

    def _train_step(self) -> dict[str, Tensor]:
        images, masks = self._sample_batch()
        device = self.info.device
        x = torch.from_numpy(images).to(device, non_blocking=True)
        y = torch.from_numpy(masks).to(device, non_blocking=True)
        self.net.train()
        terms = self.loss_fn.terms(self.net(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        self.optimizer.step()
        return {k: v.detach() for k, v in terms.items()}

    def _sample_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """``batch_size`` patches: round(batch_size * fg_fraction) centred on foreground, the rest uniform.

        Deciding the foreground share per batch (rather than per image) keeps fg_fraction exact for any batch
        size; foreground-centred patches come from images that have foreground.
        """
        cfg = self.config
        p = (cfg.patch_size, cfg.patch_size)
        n_fg = round(cfg.batch_size * cfg.fg_fraction) if self.with_foreground.size else 0
        picks = np.concatenate(
            [
                self.rng.choice(self.with_foreground, size=n_fg) if n_fg else np.empty(0, np.int64),
                self.rng.integers(0, len(self.images), size=cfg.batch_size - n_fg),
            ]
        )
        images, masks = [], []
        for i, idx in enumerate(picks):
            pos = random_positions(self.masks[idx], p, 1, 1.0 if i < n_fg else 0.0, self.rng)[0]
            images.append(crop(self.images[idx], pos, p))
            masks.append(crop(self.masks[idx], pos, p))
        return np.stack(images), np.stack(masks)

    @torch.no_grad()
    def _evaluate(self, shard: list[Sample]) -> dict[str, Any]:
        """Stitched whole-image metrics over this rank's shard, all-reduced over ranks (a collective)."""
        if self.info.distributed:
            # Each rank's BatchNorm statistics drift after DDP's last buffer broadcast: evaluate rank 0's.
            for buffer in self.model.buffers():
                dist.broadcast(buffer, src=0)
        metrics = SegmentationMetrics(self.num_classes)
        window = max(self.config.patch_size, MIN_EVAL_PATCH)
        for sample in shard:
            image = torch.from_numpy(sample.image).to(self.info.device)
            probs = sliding_window_predict(
                self.model, image, patch=window, overlap=self.config.eval_overlap, batch_size=EVAL_BATCH
            )
            metrics.update(probs.argmax(0), sample.mask)
        return metrics.compute()


def _foreground_dice(metrics: dict[str, Any]) -> float:
    """Mean over the foreground classes of the dataset-pooled Dice."""
    return float(np.mean(metrics["dice"][1:]))


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


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
