"""Dice and IoU from hard label maps, pooled over a dataset and averaged per image, DDP-aware; object-level
metrics (F1 at an IoU threshold, panoptic quality, aggregated Jaccard index) from instance label maps.

Label maps may be 2D or 3D. Empty-ground-truth policy for per-image values: a class absent from both prediction
and ground truth scores 1.0; absent from the ground truth but predicted scores 0.0 (this falls out of the
formulas). Pooled values use the dataset-wide sums; a class absent from every prediction and ground truth also
scores 1.0 there. Objects follow the same rule: an image with no objects in either map scores 1.0 on every object
metric, one with objects on one side only scores 0.0; pooled object metrics use the summed counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "ObjectCounts",
    "ObjectMetrics",
    "SegmentationMetrics",
    "confusion_counts",
    "label_instances",
    "object_metrics",
]


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


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _sum_over_ranks(parts: list) -> np.ndarray:
    """The concatenated parts summed over all ranks in one float64 all-reduce (a collective): counts stay exact
    below 2**53. NCCL only reduces CUDA tensors."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    buf = torch.from_numpy(np.concatenate(parts).astype(np.float64)).to(device)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.cpu().numpy()


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
        if not _distributed():
            return self._counts, self._image_dice_sum, self._image_iou_sum, self._num_images
        k = self.num_classes
        out = _sum_over_ranks(
            [self._counts.ravel().astype(np.float64), self._image_dice_sum, self._image_iou_sum, [self._num_images]]
        )
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


# ---------------------------------------------------------------------------------------------------------------
# Object-level metrics for instance label maps (nuclei are judged by objects, not pixels).
# ---------------------------------------------------------------------------------------------------------------

# Order of the per-image counts in ObjectCounts.as_array() and in the all-reduced buffer.
_OBJECT_FIELDS = ("tp", "fp", "fn", "matched_iou_sum", "aji_intersection", "aji_union", "num_pred", "num_true")


@dataclass(frozen=True)
class ObjectCounts:
    """Per-image object counts; sums of them over images give the dataset-pooled metrics.

    ``tp``/``fp``/``fn``: matched pairs (IoU > threshold), unmatched predictions, unmatched ground-truth objects.
    ``matched_iou_sum``: the IoUs of the matched pairs summed (PQ's numerator). ``aji_intersection`` and
    ``aji_union``: the aggregated intersection C and union U of Kumar et al. (2017). ``num_pred``/``num_true``:
    object counts.
    """

    tp: int
    fp: int
    fn: int
    matched_iou_sum: float
    aji_intersection: int
    aji_union: int
    num_pred: int
    num_true: int

    def as_array(self) -> np.ndarray:
        return np.array([getattr(self, name) for name in _OBJECT_FIELDS], dtype=np.float64)

    @property
    def f1(self) -> float:
        """F1 = 2TP / (2TP + FP + FN); 1.0 when the image has no objects in either map."""
        return _object_scores(self.as_array())["f1"]

    @property
    def pq(self) -> float:
        """Panoptic quality = SQ × RQ; 1.0 when the image has no objects in either map."""
        return _object_scores(self.as_array())["pq"]

    @property
    def aji(self) -> float:
        """Aggregated Jaccard index C / U; 1.0 when the image has no objects in either map."""
        return _object_scores(self.as_array())["aji"]


def _instance_index(labels: np.ndarray, name: str) -> tuple[np.ndarray, int]:
    """Relabel to consecutive 0..N (0 stays background) as a flat int64 array; returns it and N."""
    if labels.dtype.kind not in "iub":
        raise ValueError(f"{name} must be an integer instance label map, got {labels.dtype}")
    values, inverse = np.unique(labels.ravel(), return_inverse=True)
    if values.size and values[0] < 0:
        raise ValueError(f"{name} labels must be >= 0 (0 = background), got {values[0]}")
    inverse = inverse.astype(np.int64, copy=False).ravel()
    if values.size and values[0] != 0:
        inverse += 1  # no background pixel: index 0 stays reserved for background
        return inverse, int(values.size)
    return inverse, int(values.size) - 1


def object_metrics(pred_instances: Any, true_instances: Any, iou_threshold: float = 0.5) -> ObjectCounts:
    """Object counts for one image: instance label maps (any shape, 2D or 3D), 0 = background, ids need not be
    consecutive; numpy arrays or tensors.

    Matching: a predicted and a true object match when their IoU is strictly above ``iou_threshold``. For a
    threshold >= 0.5 each object can overlap at most one partner by more than half of their union, so the
    matching is unique and no assignment problem has to be solved (thresholds below 0.5 are rejected).

    AJI (Kumar et al. 2017, "A dataset and a technique for generalized nuclear segmentation"): every true object
    G is paired with the predicted object S of highest IoU with it (ties to the lowest predicted id); C adds
    |G ∩ S| and U adds |G ∪ S|; a predicted object may be paired with several true ones and then enters U for
    each. A true object that overlaps no prediction adds |G| to U. Every predicted object paired with no true one
    adds its area to U.

    Empty policy: with no objects in either map every score of the image is 1.0 (see :class:`ObjectMetrics`).
    """
    if not 0.5 <= iou_threshold < 1.0:
        raise ValueError(f"iou_threshold must lie in [0.5, 1) for a unique matching, got {iou_threshold}")
    p = _to_numpy(pred_instances)
    t = _to_numpy(true_instances)
    if p.shape != t.shape:
        raise ValueError(f"pred and true instance shapes differ: {p.shape} vs {t.shape}")
    p_idx, n_pred = _instance_index(p, "pred_instances")
    t_idx, n_true = _instance_index(t, "true_instances")
    area_p = np.bincount(p_idx, minlength=n_pred + 1)
    area_t = np.bincount(t_idx, minlength=n_true + 1)

    # Sparse pairwise intersections: only pairs that share a foreground pixel (a dense N_true x N_pred table
    # would be large on images with thousands of objects).
    both = (p_idx > 0) & (t_idx > 0)
    codes, inter = np.unique(t_idx[both] * (n_pred + 1) + p_idx[both], return_counts=True)
    ti, pi = np.divmod(codes, n_pred + 1)
    union = area_t[ti] + area_p[pi] - inter
    iou = inter / union

    matched = iou > iou_threshold
    tp = int(matched.sum())

    # AJI: per true object its best prediction, highest IoU first, then lowest predicted index (lexsort's last key
    # is the primary one).
    order = np.lexsort((pi, -iou, ti))
    first = order[np.unique(ti[order], return_index=True)[1]]
    aji_c = int(inter[first].sum())
    aji_u = int(union[first].sum())
    aji_u += int(area_t[1:].sum() - area_t[ti[first]].sum())  # true objects overlapping no prediction
    used = np.zeros(n_pred + 1, dtype=bool)
    used[pi[first]] = True
    aji_u += int(area_p[1:][~used[1:]].sum())

    return ObjectCounts(
        tp=tp,
        fp=n_pred - tp,
        fn=n_true - tp,
        matched_iou_sum=float(iou[matched].sum()),
        aji_intersection=aji_c,
        aji_union=aji_u,
        num_pred=n_pred,
        num_true=n_true,
    )


def _ratio(num: float, den: float, all_empty: bool) -> float:
    """num / den; an undefined ratio scores 1.0 when there are no objects at all, else 0.0."""
    if den > 0:
        return float(num / den)
    return 1.0 if all_empty else 0.0


def _object_scores(sums: np.ndarray) -> dict[str, float]:
    tp, fp, fn, iou_sum, aji_c, aji_u, n_pred, n_true = (float(v) for v in sums)
    empty = n_pred == 0 and n_true == 0
    return {
        "f1": _ratio(2 * tp, 2 * tp + fp + fn, empty),
        "precision": _ratio(tp, tp + fp, empty),
        "recall": _ratio(tp, tp + fn, empty),
        "sq": _ratio(iou_sum, tp, empty),
        "rq": _ratio(tp, tp + 0.5 * fp + 0.5 * fn, empty),
        # PQ = SQ × RQ = Σ IoU / (TP + FP/2 + FN/2), written directly so that TP = 0 needs no special case.
        "pq": _ratio(iou_sum, tp + 0.5 * fp + 0.5 * fn, empty),
        "aji": _ratio(aji_c, aji_u, empty),
    }


def label_instances(foreground: Any, *, connectivity: int | None = None) -> np.ndarray:
    """Connected components of ``foreground`` (bool, or labels where > 0 is foreground), 2D or 3D, as int32 ids
    1..N with 0 = background; turns a semantic prediction into instances for :func:`object_metrics`.

    ``connectivity``: 4 (default in 2D) or 8 neighbours in 2D; 6 (default in 3D), 18 or 26 in 3D. Touching
    objects merge, so for nuclei predict the boundary class and label the interior (``pred == 1``) instead.
    """
    from scipy import ndimage  # only this helper needs scipy; keep `import pel.metrics` light

    fg = _to_numpy(foreground) > 0
    neighbours = {2: {None: 1, 4: 1, 8: 2}, 3: {None: 1, 6: 1, 18: 2, 26: 3}}
    if fg.ndim not in neighbours:
        raise ValueError(f"foreground must be 2D or 3D, got shape {fg.shape}")
    if connectivity not in neighbours[fg.ndim]:
        allowed = sorted(k for k in neighbours[fg.ndim] if k is not None)
        raise ValueError(f"connectivity must be one of {allowed} for {fg.ndim}D, got {connectivity}")
    structure = ndimage.generate_binary_structure(fg.ndim, neighbours[fg.ndim][connectivity])
    labels, _ = ndimage.label(fg, structure=structure)
    return labels.astype(np.int32, copy=False)


class ObjectMetrics:
    """Accumulates :func:`object_metrics` image by image; :meth:`compute` gives pooled and mean-per-image scores.

    Pooled scores use the dataset-wide sums (an image without objects adds nothing to them); per-image means
    score an image with no objects in either map as 1.0 on every metric and otherwise follow the formulas, where
    an undefined ratio (e.g. precision with no prediction) is 0.0.
    """

    def __init__(self, iou_threshold: float = 0.5) -> None:
        if not 0.5 <= iou_threshold < 1.0:
            raise ValueError(f"iou_threshold must lie in [0.5, 1) for a unique matching, got {iou_threshold}")
        self.iou_threshold = iou_threshold
        self.reset()

    def reset(self) -> None:
        self._sums = np.zeros(len(_OBJECT_FIELDS), dtype=np.float64)
        self._image_sums = np.zeros(3, dtype=np.float64)  # per-image F1, PQ, AJI summed
        self._num_images = 0

    def update(self, pred_instances: Any, true_instances: Any) -> ObjectCounts:
        """Add one image (instance label maps); returns its counts."""
        counts = object_metrics(pred_instances, true_instances, self.iou_threshold)
        self._sums += counts.as_array()
        scores = _object_scores(counts.as_array())
        self._image_sums += [scores["f1"], scores["pq"], scores["aji"]]
        self._num_images += 1
        return counts

    def _global_state(self) -> tuple[np.ndarray, np.ndarray, int]:
        if not _distributed():
            return self._sums, self._image_sums, self._num_images
        out = _sum_over_ranks([self._sums, self._image_sums, [self._num_images]])
        n = len(_OBJECT_FIELDS)
        return out[:n], out[n : n + 3], int(round(out[-1]))

    def compute(self) -> dict[str, Any]:
        """Scores over every image seen (by every rank when torch.distributed is initialised; a collective).

        Returns plain Python values: pooled ``"f1"``, ``"precision"``, ``"recall"``, ``"sq"``, ``"rq"``, ``"pq"``
        (= sq × rq), ``"aji"``; ``"mean_image_f1"``, ``"mean_image_pq"``, ``"mean_image_aji"``; the summed counts
        ``"tp"``, ``"fp"``, ``"fn"``, ``"num_pred"``, ``"num_true"``; ``"num_images"`` and ``"iou_threshold"``.
        Raises ValueError when no image was seen.
        """
        sums, image_sums, num_images = self._global_state()
        if num_images == 0:
            raise ValueError("no images were added to ObjectMetrics")
        out: dict[str, Any] = dict(_object_scores(sums))
        mean = image_sums / num_images
        out.update(mean_image_f1=float(mean[0]), mean_image_pq=float(mean[1]), mean_image_aji=float(mean[2]))
        for name in ("tp", "fp", "fn", "num_pred", "num_true"):
            out[name] = int(round(sums[_OBJECT_FIELDS.index(name)]))
        out.update(num_images=num_images, iou_threshold=self.iou_threshold)
        return out
