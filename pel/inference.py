"""Whole-image prediction by overlapping sliding windows, for evaluation on images larger than a training patch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pel.patches import grid_positions

__all__ = ["sliding_window_predict"]


@torch.no_grad()
def sliding_window_predict(
    model: nn.Module, image: Tensor, *, patch: int, overlap: float = 0.25, batch_size: int = 8
) -> Tensor:
    """Class probabilities ``(K, H, W)`` for one image ``(C, H, W)``.

    ``model`` maps ``(b, C, patch, patch)`` to logits ``(b, K, patch, patch)``. Windows lie on
    :func:`pel.patches.grid_positions` with stride ``round(patch * (1 - overlap))`` (at least 1); logits are
    averaged where windows overlap, then softmax over K (sigmoid if K == 1). An image smaller than the patch is
    zero-padded at the bottom/right and the padding is cropped away. The model runs in eval mode (its previous
    mode is restored afterwards) on the image's device; the result is float32 on that device.
    """
    if image.dim() != 3:
        raise ValueError(f"image must be (C, H, W), got shape {tuple(image.shape)}")
    if patch < 1:
        raise ValueError(f"patch must be >= 1, got {patch}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must lie in [0, 1), got {overlap}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    _, h, w = image.shape
    padded = F.pad(image, (0, max(patch - w, 0), 0, max(patch - h, 0)))
    ph, pw = padded.shape[-2:]
    stride = max(1, round(patch * (1 - overlap)))
    positions = grid_positions((ph, pw), (patch, patch), (stride, stride))

    was_training = model.training
    # BatchNorm/dropout in train mode would change both the output and the running statistics.
    model.eval()
    try:
        logit_sum: Tensor | None = None
        count = torch.zeros((1, ph, pw), dtype=torch.float32, device=image.device)
        for start in range(0, len(positions), batch_size):
            chunk = positions[start : start + batch_size]
            batch = torch.stack([padded[:, y : y + patch, x : x + patch] for y, x in chunk])
            out = model(batch).float()
            if out.dim() != 4 or out.shape[0] != len(chunk) or out.shape[-2:] != (patch, patch):
                raise ValueError(f"model must return (b, K, {patch}, {patch}) logits, got {tuple(out.shape)}")
            if logit_sum is None:
                logit_sum = torch.zeros((out.shape[1], ph, pw), dtype=torch.float32, device=image.device)
            for (y, x), logits in zip(chunk, out, strict=True):
                logit_sum[:, y : y + patch, x : x + patch] += logits
                count[:, y : y + patch, x : x + patch] += 1
    finally:
        model.train(was_training)

    assert logit_sum is not None  # grid_positions always yields at least one window
    # Contiguous so the result does not keep the padded buffer alive.
    logits = (logit_sum / count)[:, :h, :w].contiguous()
    return torch.sigmoid(logits) if logits.shape[0] == 1 else torch.softmax(logits, dim=0)
