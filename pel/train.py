"""Baseline training and fine-tuning on patches, for 1 process or N DDP ranks, with whole-image evaluation.

One code path: under torchrun each rank joins the process group (``pel.distributed.setup``), wraps the model in
DistributedDataParallel and draws its own patches from a rank-seeded generator; a single process runs the same
code without a group. Evaluation (validation and test) is sharded: each rank predicts every ``world_size``-th
image by stitched sliding windows and ``SegmentationMetrics.compute`` all-reduces the counts, so every rank
gets the same scores and agrees on the best step. Only rank 0 writes to ``out_dir``.

Training steps run under bf16 autocast on CUDA (``amp``), clip the global gradient norm (``grad_clip``) and follow
a warm-up + constant/cosine learning-rate schedule. Every ``snapshot_every`` steps rank 0 writes
``out_dir/snapshot.pt`` (weights, optimiser, scheduler, best-so-far, every rank's RNG states); a run that finds one
in its ``out_dir`` resumes from it, so an interrupted job restarted on the same folder ends with the same weights
as an uninterrupted one. The snapshot is removed once ``summary.json`` is written. ``snapshot.json`` names the step
and inode of the current snapshot, for a supervisor that copies snapshots away (worker/tasks.py). A loss that
turns NaN or infinite fails the run at that step (``FloatingPointError``), before it reaches the weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from pel import distributed
from pel.checkpoint import load_model, save_model
from pel.config import LOSS_REGIONS, TrainConfig, UNetConfig
from pel.data import Sample, load_split, num_classes_for, open_dataset
from pel.inference import sliding_window_predict
from pel.losses import CompoundLoss
from pel.metrics import ObjectMetrics, SegmentationMetrics, label_instances
from pel.models import UNet
from pel.models.zoo import check_model_io
from pel.patches import crop, pad_to_min, random_positions

__all__ = ["train"]

LOG_EVERY = 10  # training steps per metrics.jsonl line (plus the first step, validation steps and the last)
# Evaluation windows are at least this large: a fully convolutional net sees more context per window, and on
# CPU a few large windows are faster than many overlapping small ones.
MIN_EVAL_PATCH = 256
EVAL_BATCH = 4
SNAPSHOT = "snapshot.pt"
SNAPSHOT_FORMAT = "pel-tune.snapshot/1"
SNAPSHOT_INFO = "snapshot.json"  # {"step", "inode"} of the current snapshot.pt


def train(
    config: TrainConfig, *, dataset_dir: Path, out_dir: Path, init_checkpoint: Path | None = None
) -> dict[str, Any] | None:
    """Train per ``config``; rank 0 writes ``metrics.jsonl``, ``model.pt`` and ``summary.json`` to ``out_dir``.

    If ``out_dir`` holds a ``snapshot.pt`` of the same config and world size, training resumes from it.
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
        # A resumed run must not be reported as failed by the error file of the attempt it continues.
        (out_dir / f"error-rank{rank}.txt").unlink(missing_ok=True)
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
        self.index = open_dataset(dataset_dir)  # refuses empty train/val/test splits

        torch.manual_seed(config.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
        self.model = self._build_model()
        self.loss_fn = CompoundLoss(
            LOSS_REGIONS[config.loss],
            region_weight=config.region_weight,
            ce_weight=config.ce_weight,
            alpha=config.alpha,
            n=config.n,
            compile=config.compile_loss,
        )
        # AdamW with weight_decay 0 is exactly Adam.
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        # LambdaLR's counter is the number of steps done, so step s (1-based) trains with lr * lr_factor(s).
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda done: config.lr_factor(done + 1))
        self.rng = np.random.default_rng([config.seed, info.rank])
        # bf16 needs no loss scaling (same exponent range as float32); CPU autocast would only slow a CPU run down.
        self.amp = config.amp and info.device.type == "cuda"

        # State carried across steps, and across an interruption by the snapshot.
        self.start_step = 0
        self.best_dice, self.best_step = -math.inf, 0
        self.best_state: dict[str, Tensor] | None = None
        self.test_before: dict[str, Any] | None = None
        self.sums: dict[str, Tensor] = {}  # loss terms summed since the last metrics line
        self.count = 0
        self.resumed = self._restore_snapshot()
        # Wrap after restoring: DDP broadcasts rank 0's weights at construction (all ranks loaded the same ones).
        self.net: torch.nn.Module = (
            DistributedDataParallel(self.model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
            if info.distributed
            else self.model
        )

        # Every rank samples from the whole train split; evaluation images are sharded across ranks.
        train_samples = load_split(self.index, "train", config.target)
        val_ids = self.index.splits["val"][: config.val_images]
        self.val_shard = self._load_shard("val", val_ids)
        self.test_shard = self._load_shard("test", self.index.splits["test"], with_instances=True)
        p = config.patch_size
        self.images = [pad_to_min(s.image, (p, p)) for s in train_samples]
        self.masks = [pad_to_min(s.mask, (p, p)) for s in train_samples]
        self.with_foreground = np.flatnonzero([m.any() for m in self.masks])

    def _build_model(self) -> torch.nn.Module:
        """The init checkpoint's model (any format PEL Tune accepts, checked against this job before any step),
        or a fresh U-Net; sets ``model_format``/``model_architecture``, the kind of file the result is saved as."""
        if self.init_checkpoint is not None:
            loaded = load_model(self.init_checkpoint)
            model, self.model_format, self.model_architecture = loaded.model, loaded.format, loaded.architecture
            p = self.config.patch_size
            check_model_io(
                model,
                in_channels=self.index.channels,
                num_classes=self.num_classes,
                target=self.config.target,
                sizes=(p, max(p, MIN_EVAL_PATCH)),  # the training patch and the evaluation window
            )
        else:
            arch = {**self.config.model, "in_channels": self.index.channels, "out_channels": self.num_classes}
            model = UNet(UNetConfig.from_dict(arch))
            self.model_format, self.model_architecture = "pel-tune", {"name": "unet", **model.config.to_dict()}
        return model.to(self.info.device)

    def _load_shard(self, split: str, ids: list[str], *, with_instances: bool = False) -> list[Sample]:
        shard = ids[self.info.rank :: self.info.world_size]
        index = dataclasses.replace(self.index, splits={split: shard})
        return load_split(index, split, self.config.target, with_instances=with_instances)

    def run(self) -> dict[str, Any] | None:
        cfg = self.config
        is_main = self.info.is_main
        started = time.monotonic()
        if cfg.mode == "finetune" and not self.resumed:
            self.test_before = self._evaluate(self.test_shard, with_objects=True)
        log = self._open_log() if is_main else None
        try:
            for step in range(self.start_step + 1, cfg.steps + 1):
                terms, lr = self._train_step(step)
                for key, value in terms.items():
                    self.sums[key] = self.sums[key] + value if key in self.sums else value
                self.count += 1
                validate = step % cfg.val_every == 0 or step == cfg.steps
                point: dict[str, Any] | None = None
                if validate or step == 1 or step % LOG_EVERY == 0:
                    # Loss terms are rank 0's own patches, averaged since the last line (no extra collective).
                    point = {"step": step, "total_steps": cfg.steps, "lr": lr}
                    point.update({k: float(v / self.count) for k, v in self.sums.items()})
                    self.sums, self.count = {}, 0
                if validate:
                    val_dice = _foreground_dice(self._evaluate(self.val_shard, with_objects=False))
                    assert point is not None
                    point["val_dice"] = val_dice
                    if val_dice > self.best_dice:  # Dice, never the loss: raw PEL is negative
                        self.best_dice, self.best_step = val_dice, step
                        self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                if point is not None and log is not None:
                    log.write(json.dumps(point) + "\n")
                    log.flush()
                # After the step's metrics line and validation, so a resume neither repeats nor misses them.
                # The last step needs none: the outputs written next supersede it.
                if step % cfg.snapshot_every == 0 and step < cfg.steps:
                    self._save_snapshot(step)
        finally:
            if log is not None:
                log.close()

        assert self.best_state is not None  # the last step always validates
        best_dice, best_step = self.best_dice, self.best_step
        self.model.load_state_dict(self.best_state)
        if is_main:
            save_model(  # the kind of file the init checkpoint was: TorchScript in, TorchScript out
                self.out_dir / "model.pt",
                self.model,
                self.model_format,
                self.model_architecture,
                meta={
                    "mode": cfg.mode,
                    "target": cfg.target,
                    "num_classes": self.num_classes,
                    "best_step": best_step,
                    "best_val_dice": best_dice,
                    "config": cfg.to_dict(),
                },
            )
        test_after = self._evaluate(self.test_shard, with_objects=True)
        if not is_main:
            return None
        summary = {
            "test_before": self.test_before,
            "test_after": test_after,
            "best_step": best_step,
            "best_val_dice": best_dice,
            "steps": cfg.steps,
            "num_classes": self.num_classes,
            "world_size": self.info.world_size,
            "wall_seconds": round(time.monotonic() - started, 3),
        }
        _write_json_atomic(self.out_dir / "summary.json", summary)
        # The job is complete: its outputs replace the snapshot, and a rerun on this folder starts afresh.
        (self.out_dir / SNAPSHOT).unlink(missing_ok=True)
        (self.out_dir / SNAPSHOT_INFO).unlink(missing_ok=True)
        return summary

    def _open_log(self) -> IO[str]:
        """metrics.jsonl for appending; on a resume, first cut the lines after the snapshot's step."""
        path = self.out_dir / "metrics.jsonl"
        if not self.resumed:
            return path.open("w")
        kept = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    step = int(json.loads(line)["step"])
                except (ValueError, KeyError, TypeError):
                    continue  # e.g. a line cut short by the interruption
                if step <= self.start_step:
                    kept.append(line + "\n")
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
        return path.open("a")

    def _save_snapshot(self, step: int) -> None:
        """Rank 0 writes everything a resume needs to ``snapshot.pt`` atomically (a collective: RNG gather)."""
        rng = {
            "numpy": self.rng.bit_generator.state,  # plain dict of str/int
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(self.info.device) if self.info.device.type == "cuda" else None,
        }
        # One file with every rank's RNG state, rather than a file per rank: a single atomic rename can never
        # leave ranks' states from different steps side by side.
        if self.info.distributed:
            rngs: list[Any] = [None] * self.info.world_size
            dist.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        if not self.info.is_main:
            return
        snapshot = {
            "format": SNAPSHOT_FORMAT,
            "step": step,
            "config": self.config.to_dict(),
            "world_size": self.info.world_size,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "best_val_dice": self.best_dice,
            "best_step": self.best_step,
            "best_state": self.best_state,
            "test_before": self.test_before,
            "sums": {k: v.detach().cpu() for k, v in self.sums.items()},
            "count": self.count,
            "rng": rngs,
        }
        path = self.out_dir / SNAPSHOT
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(snapshot, tmp)
        os.replace(tmp, path)
        # For a supervisor that ships snapshots elsewhere without loading them: which step, and which file (inode)
        # holds it, so a copy taken while the next snapshot replaces this one is never labelled with this step.
        _write_json_atomic(self.out_dir / SNAPSHOT_INFO, {"step": step, "inode": os.stat(path).st_ino})

    def _restore_snapshot(self) -> bool:
        """Load ``out_dir/snapshot.pt`` if there is one (every rank reads it); True when resuming."""
        path = self.out_dir / SNAPSHOT
        if not path.exists():
            return False
        try:
            snap = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # any unreadable file gets the same explanation
            raise ValueError(f"cannot read the snapshot {path}: {exc}; delete it to start afresh") from None
        if not isinstance(snap, dict) or snap.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"{path} is not a PEL Tune snapshot; delete it to start afresh")
        differ = sorted(k for k, v in self.config.to_dict().items() if snap["config"].get(k) != v)
        if differ:
            raise ValueError(
                f"{path} was written by a run with a different config (differs in: {', '.join(differ)}); "
                "use a fresh out_dir or delete the snapshot"
            )
        if snap["world_size"] != self.info.world_size:
            raise ValueError(
                f"{path} was written by {snap['world_size']} rank(s) but this run has {self.info.world_size}: "
                "each rank's patch sampler would not continue; rerun with the same number of processes"
            )
        device = self.info.device
        self.model.load_state_dict(snap["model"])
        self.optimizer.load_state_dict(snap["optimizer"])  # moves the moments to the parameters' device
        self.scheduler.load_state_dict(snap["scheduler"])
        self.start_step = int(snap["step"])
        self.best_dice, self.best_step = float(snap["best_val_dice"]), int(snap["best_step"])
        best = snap["best_state"]
        self.best_state = None if best is None else {k: v.to(device) for k, v in best.items()}
        self.test_before = snap["test_before"]
        self.sums = {k: v.to(device) for k, v in snap["sums"].items()}
        self.count = int(snap["count"])
        rng = snap["rng"][self.info.rank]
        self.rng.bit_generator.state = rng["numpy"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], device)
        return True

    def _train_step(self, step: int) -> tuple[dict[str, Tensor], float]:
        """One optimiser step; returns the detached loss terms and the learning rate the step used. A loss that is
        NaN or infinite stops the run here, before it poisons the weights (nothing is saved: no model.pt)."""
        images, masks = self._sample_batch()
        device = self.info.device
        x = torch.from_numpy(images).to(device, non_blocking=True)
        y = torch.from_numpy(masks).to(device, non_blocking=True)
        self.net.train()
        lr = float(self.optimizer.param_groups[0]["lr"])
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits = self.net(x)
        # The loss stays outside autocast: it computes in float32 whatever the logits' dtype.
        terms = self.loss_fn.terms(logits, y)
        loss = float(terms["loss"].detach())  # one host sync per step: the price of failing at the step it happens
        if not math.isfinite(loss):
            raise FloatingPointError(f"the loss became {loss} at step {step}; no checkpoint was saved")
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if self.config.grad_clip is not None:
            # The unwrapped parameters: under DDP their grads are already all-reduced, so every rank clips alike.
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return {k: v.detach() for k, v in terms.items()}, lr

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
    def _evaluate(self, shard: list[Sample], *, with_objects: bool) -> dict[str, Any]:
        """Stitched whole-image metrics over this rank's shard, all-reduced over ranks (a collective)."""
        if self.info.distributed:
            # Each rank's BatchNorm statistics drift after DDP's last buffer broadcast: evaluate rank 0's.
            for buffer in self.model.buffers():
                dist.broadcast(buffer, src=0)
        metrics = SegmentationMetrics(self.num_classes)
        # Object metrics on the test split (loaded with instance labels): nuclei users judge by objects.
        objects = ObjectMetrics() if with_objects else None
        window = max(self.config.patch_size, MIN_EVAL_PATCH)
        for sample in shard:
            image = torch.from_numpy(sample.image).to(self.info.device)
            probs = sliding_window_predict(
                self.model, image, patch=window, overlap=self.config.eval_overlap, batch_size=EVAL_BATCH
            )
            pred = probs.argmax(0)
            metrics.update(pred, sample.mask)
            if objects is not None:
                # Predicted objects: connected components of class 1 (foreground, or the interior when a boundary
                # class separates touching nuclei).
                objects.update(label_instances(pred.cpu().numpy() == 1), sample.instances)
        result = metrics.compute()
        if objects is not None:
            result["objects"] = objects.compute()
        return result


def _foreground_dice(metrics: dict[str, Any]) -> float:
    """Mean over the foreground classes of the dataset-pooled Dice."""
    return float(np.mean(metrics["dice"][1:]))


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
