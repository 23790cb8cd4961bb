"""Dice and IoU from hard label maps, pooled over a dataset and averaged per image, DDP-aware.

Empty-ground-truth policy for per-image values: a class absent from both prediction and ground truth scores
1.0; absent from the ground truth but predicted scores 0.0 (this falls out of the formulas). Pooled values use
the dataset-wide sums; a class absent from every prediction and ground truth also scores 1.0 there.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["SegmentationMetrics", "confusion_counts"]


def _to_numpy(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def confusion_counts(pred: Any, target: Any, num_classes: int) -> np.ndarray:
    """Per-class ``(tp, fp, fn)`` as an int64 array ``(num_classes, 3)``.

    pred, target: integer label maps of the same shape, typically (H, W), numpy arrays or tensors, values in
    ``[0, num_classes)``.
    """
    p = _to_numpy(pred)
    t = _to_numpy(target)
    if p.shape != t.shape:
        raise ValueError(f"pred and target shapes differ: {p.shape} vs {t.shape}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if p.dtype.kind not in "iub" or t.dtype.kind not in "iub":
        raise ValueError(f"pred and target must be integer label maps, got {p.dtype} and {t.dtype}")
    p = p.astype(np.int64, copy=False).ravel()
    t = t.astype(np.int64, copy=False).ravel()
    for name, a in (("pred", p), ("target", t)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{name} labels must lie in [0, {num_classes}), got [{a.min()}, {a.max()}]")
    # Confusion matrix by one bincount: row = true class, column = predicted class.
    cm = np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    return np.stack([tp, fp, fn], axis=1).astype(np.int64)


def _dice_iou(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(K, 3) counts -> per-class Dice and IoU, 1.0 where a class is absent from prediction and ground truth."""
    tp, fp, fn = (counts[:, i].astype(np.float64) for i in range(3))
    dice_den = 2 * tp + fp + fn
    iou_den = tp + fp + fn
    empty = iou_den == 0
    dice = np.where(empty, 1.0, 2 * tp / np.where(empty, 1.0, dice_den))
    iou = np.where(empty, 1.0, tp / np.where(empty, 1.0, iou_den))
    return dice, iou


class SegmentationMetrics:
    """Accumulates hard predictions image by image; :meth:`compute` gives pooled and mean-per-image scores."""

    def __init__(self, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.reset()

    def reset(self) -> None:
        self._counts = np.zeros((self.num_classes, 3), dtype=np.int64)
        self._image_dice_sum = np.zeros(self.num_classes, dtype=np.float64)
        self._image_iou_sum = np.zeros(self.num_classes, dtype=np.float64)
        self._num_images = 0

    def update(self, pred: Any, target: Any) -> None:
        """Add one image: pred and target integer label maps (H, W)."""
        counts = confusion_counts(pred, target, self.num_classes)
        dice, iou = _dice_iou(counts)
        self._counts += counts
        self._image_dice_sum += dice
        self._image_iou_sum += iou
        self._num_images += 1

    def _global_state(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self._counts, self._image_dice_sum, self._image_iou_sum, self._num_images
        k = self.num_classes
        # One float64 all-reduce: counts stay exact below 2**53 pixels. NCCL only reduces CUDA tensors.
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        packed = np.concatenate(
            [self._counts.ravel().astype(np.float64), self._image_dice_sum, self._image_iou_sum, [self._num_images]]
        )
        buf = torch.from_numpy(packed).to(device)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        out = buf.cpu().numpy()
        counts = np.rint(out[: 3 * k]).astype(np.int64).reshape(k, 3)
        return counts, out[3 * k : 4 * k], out[4 * k : 5 * k], int(round(out[-1]))

    def compute(self) -> dict[str, Any]:
        """Scores over every image seen (by every rank when torch.distributed is initialised).

        Returns ``{"dice": [per class, pooled over the dataset], "iou": [...], "mean_image_dice": [per class,
        mean of per-image values], "mean_image_iou": [...], "num_images": int}`` with plain Python floats.
        Under DDP every rank must call it (it is a collective). Raises ValueError when no image was seen.
        """
        counts, dice_sum, iou_sum, num_images = self._global_state()
        if num_images == 0:
            raise ValueError("no images were added to SegmentationMetrics")
        dice, iou = _dice_iou(counts)
        return {
            "dice": [float(v) for v in dice],
            "iou": [float(v) for v in iou],
            "mean_image_dice": [float(v) for v in dice_sum / num_images],
            "mean_image_iou": [float(v) for v in iou_sum / num_images],
            "num_images": num_images,
        }
