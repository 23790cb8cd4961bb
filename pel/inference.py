"""Whole-image prediction by overlapping sliding windows, for evaluation on images larger than a training patch.

Works for 2D images ``(C, H, W)`` and 3D volumes ``(C, D, H, W)``. Overlapping window logits are blended with a
constant weight (plain average) or a Gaussian importance map (as MONAI's ``sliding_window_inference`` with
``mode="gaussian"`` and nnU-Net), which down-weights window borders where a convolutional net sees less context.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pel.patches import grid_positions

__all__ = ["gaussian_importance_map", "sliding_window_predict"]

GAUSSIAN_SIGMA_SCALE = 1.0 / 8  # sigma per axis as a fraction of the window size (MONAI's and nnU-Net's default)


@functools.lru_cache(maxsize=8)
def _gaussian_map_cpu(window: tuple[int, ...], sigma_scale: float) -> Tensor:
    axes = []
    for size in window:
        # Centred on the window's middle (between two pixels for even sizes) so the map is symmetric.
        coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
        sigma = max(size * sigma_scale, 1e-6)
        axes.append(torch.exp(-0.5 * (coords / sigma) ** 2))
    weights = axes[0]
    for axis in axes[1:]:
        weights = weights[..., None] * axis
    weights = weights / weights.max()
    # exp underflow could leave exact zeros at far corners; a pixel covered only by such corners would then divide
    # 0 by 0. nnU-Net clamps to the smallest positive weight for the same reason.
    positive = weights[weights > 0]
    return weights.clamp_min(float(positive.min())).to(torch.float32)


def gaussian_importance_map(window: tuple[int, ...], sigma_scale: float = GAUSSIAN_SIGMA_SCALE) -> Tensor:
    """Separable Gaussian weights of shape ``window`` (float32, max 1, strictly positive), sigma = scale × size."""
    if not window or any(int(w) != w or w < 1 for w in window):
        raise ValueError(f"window must be positive integers, got {window!r}")
    if sigma_scale <= 0:
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale}")
    return _gaussian_map_cpu(tuple(int(w) for w in window), float(sigma_scale)).clone()


@torch.no_grad()
def sliding_window_predict(
    model: nn.Module,
    image: Tensor,
    *,
    patch: int | tuple[int, ...],
    overlap: float = 0.25,
    batch_size: int = 8,
    blend: Literal["constant", "gaussian"] = "constant",
) -> Tensor:
    """Class probabilities ``(K, *S)`` for one image ``(C, *S)``, S = (H, W) or (D, H, W).

    ``model`` maps ``(b, C, *window)`` to logits ``(b, K, *window)``; ``patch`` is the window, one int for every
    axis or a tuple per axis. Windows lie on :func:`pel.patches.grid_positions` with stride
    ``round(window * (1 - overlap))`` per axis (at least 1) and are run ``batch_size`` at a time. Where windows
    overlap their logits are blended: ``"constant"`` averages them, ``"gaussian"`` weights each window by
    :func:`gaussian_importance_map` (sigma = 1/8 of the window) and divides by the summed weights. Softmax over K
    follows (sigmoid if K == 1). An image smaller than the window is zero-padded at the far edges and the padding
    is cropped away. Blending accumulates in float64, so a model returning its input reconstructs it exactly.
    The model runs in eval mode (its previous mode is restored afterwards) on the image's device; the result is
    float32 on that device.
    """
    if image.dim() not in (3, 4):
        raise ValueError(f"image must be (C, H, W) or (C, D, H, W), got shape {tuple(image.shape)}")
    nd = image.dim() - 1
    window = (patch,) * nd if isinstance(patch, int) else tuple(patch)
    if len(window) != nd or any(int(p) != p or p < 1 for p in window):
        raise ValueError(f"patch must be an int >= 1 or {nd} ints >= 1 for a {nd}D image, got {patch!r}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must lie in [0, 1), got {overlap}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if blend not in ("constant", "gaussian"):
        raise ValueError(f"blend must be 'constant' or 'gaussian', got {blend!r}")

    spatial = tuple(image.shape[1:])
    # F.pad takes (last axis low, last axis high, second-to-last low, ...): pad the far end of each axis.
    pads: list[int] = []
    for size, w in zip(reversed(spatial), reversed(window), strict=True):
        pads += [0, max(w - size, 0)]
    padded = F.pad(image, pads)
    padded_shape = tuple(padded.shape[1:])
    stride = tuple(max(1, round(w * (1 - overlap))) for w in window)
    positions = grid_positions(padded_shape, window, stride)

    device = image.device
    # float64 accumulators: sum(w * x) / sum(w) then rounds back to x exactly in float32 for any weights, and
    # many overlapping windows add up without drift. Memory is 8 bytes per class and pixel of one image.
    if blend == "gaussian":
        weight = gaussian_importance_map(window).to(device=device, dtype=torch.float64)
    else:
        weight = torch.ones(window, dtype=torch.float64, device=device)
    weight_sum = torch.zeros(padded_shape, dtype=torch.float64, device=device)

    def region(corner: tuple[int, ...]) -> tuple[slice, ...]:
        return tuple(slice(c, c + w) for c, w in zip(corner, window, strict=True))

    was_training = model.training
    # BatchNorm/dropout in train mode would change both the output and the running statistics.
    model.eval()
    try:
        logit_sum: Tensor | None = None
        for start in range(0, len(positions), batch_size):
            chunk = positions[start : start + batch_size]
            batch = torch.stack([padded[(slice(None), *region(pos))] for pos in chunk])
            out = model(batch)
            if out.dim() != nd + 2 or out.shape[0] != len(chunk) or tuple(out.shape[2:]) != window:
                expected = ", ".join(map(str, window))
                raise ValueError(f"model must return (b, K, {expected}) logits, got {tuple(out.shape)}")
            if logit_sum is None:
                logit_sum = torch.zeros((out.shape[1], *padded_shape), dtype=torch.float64, device=device)
            weighted = out.to(torch.float64) * weight
            for pos, logits in zip(chunk, weighted, strict=True):
                where = region(pos)
                logit_sum[(slice(None), *where)] += logits
                weight_sum[where] += weight
    finally:
        model.train(was_training)

    assert logit_sum is not None  # grid_positions always yields at least one window
    crop_back = tuple(slice(0, n) for n in spatial)
    # Contiguous float32 so the result does not keep the padded float64 buffers alive.
    logits = (logit_sum / weight_sum)[(slice(None), *crop_back)].to(torch.float32).contiguous()
    return torch.sigmoid(logits) if logits.shape[0] == 1 else torch.softmax(logits, dim=0)
