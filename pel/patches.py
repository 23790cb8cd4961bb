"""Patch geometry on numpy arrays shaped ``(..., H, W)``: grid and random positions, cropping, padding.

Positions are top-left corners ``(y, x)``; ``patch`` and ``stride`` are ``(height, width)``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["crop", "grid_positions", "pad_to_min", "random_positions"]


def _check_pair(name: str, value: tuple[int, int], *, minimum: int) -> tuple[int, int]:
    if len(value) != 2 or any(int(v) != v or v < minimum for v in value):
        raise ValueError(f"{name} must be two integers >= {minimum}, got {value!r}")
    return int(value[0]), int(value[1])


def _axis_starts(size: int, patch: int, stride: int) -> list[int]:
    if size <= patch:
        # One window at 0; the caller pads the array up to the patch size (see pad_to_min).
        return [0]
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        # Align the last window to the far edge so the last pixels are covered without padding.
        starts.append(size - patch)
    return starts


def grid_positions(shape: tuple[int, int], patch: tuple[int, int], stride: tuple[int, int]) -> list[tuple[int, int]]:
    """Top-left corners of a sliding-window grid over an image of ``shape`` (H, W), row-major.

    Windows start every ``stride`` pixels and the last row/column is aligned to the far edge, so every pixel
    is covered. An axis no longer than the patch gets a single window at 0. ``stride > patch`` would leave
    gaps and is rejected.
    """
    h, w = _check_pair("shape", shape, minimum=1)
    ph, pw = _check_pair("patch", patch, minimum=1)
    sh, sw = _check_pair("stride", stride, minimum=1)
    if sh > ph or sw > pw:
        raise ValueError(f"stride {stride} larger than patch {patch} would leave pixels uncovered")
    return [(y, x) for y in _axis_starts(h, ph, sh) for x in _axis_starts(w, pw, sw)]


def random_positions(
    mask: np.ndarray, patch: tuple[int, int], count: int, fg_fraction: float, rng: np.random.Generator
) -> list[tuple[int, int]]:
    """``count`` random top-left corners for ``patch``-sized crops of ``mask`` (..., H, W).

    The first ``round(count * fg_fraction)`` are centred on a uniformly drawn foreground pixel (label > 0 in any
    leading channel), clipped to stay inside the image, so each of them contains foreground; the rest are
    uniform over all in-bounds corners. A mask without foreground gives uniform positions only. An axis shorter
    than the patch yields corner 0 (pad the arrays with :func:`pad_to_min` before cropping).
    """
    ph, pw = _check_pair("patch", patch, minimum=1)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if not 0.0 <= fg_fraction <= 1.0:
        raise ValueError(f"fg_fraction must lie in [0, 1], got {fg_fraction}")
    if mask.ndim < 2:
        raise ValueError(f"mask must be (..., H, W), got shape {mask.shape}")
    h, w = mask.shape[-2:]
    max_y, max_x = max(h - ph, 0), max(w - pw, 0)

    fg = mask > 0
    if fg.ndim > 2:
        fg = fg.reshape(-1, h, w).any(axis=0)
    fg_flat = np.flatnonzero(fg)
    n_fg = round(count * fg_fraction) if fg_flat.size else 0

    ys = np.empty(count, dtype=np.int64)
    xs = np.empty(count, dtype=np.int64)
    if n_fg:
        cy, cx = np.divmod(fg_flat[rng.integers(0, fg_flat.size, size=n_fg)], w)
        ys[:n_fg] = np.clip(cy - ph // 2, 0, max_y)
        xs[:n_fg] = np.clip(cx - pw // 2, 0, max_x)
    n_uni = count - n_fg
    ys[n_fg:] = rng.integers(0, max_y + 1, size=n_uni)
    xs[n_fg:] = rng.integers(0, max_x + 1, size=n_uni)
    return [(int(y), int(x)) for y, x in zip(ys, xs, strict=True)]


def crop(array: np.ndarray, pos: tuple[int, int], patch: tuple[int, int]) -> np.ndarray:
    """``array[..., y:y+ph, x:x+pw]`` as a view (copy it before writing). The window must lie inside the array."""
    y, x = _check_pair("pos", pos, minimum=0)
    ph, pw = _check_pair("patch", patch, minimum=1)
    h, w = array.shape[-2:]
    if y + ph > h or x + pw > w:
        raise ValueError(f"patch {patch} at {pos} exceeds the array's (H, W) = {(h, w)}; pad it first")
    return array[..., y : y + ph, x : x + pw]


def pad_to_min(array: np.ndarray, size: tuple[int, int], *, value: float = 0) -> np.ndarray:
    """Pad the bottom/right of ``array`` (..., H, W) with ``value`` up to at least ``size`` (H, W).

    Padding only at the far edges keeps pixel coordinates unchanged, so positions and crops stay valid and
    the original is ``result[..., :H, :W]``. Returns ``array`` itself when it is already large enough.
    """
    min_h, min_w = _check_pair("size", size, minimum=0)
    h, w = array.shape[-2:]
    pad_h, pad_w = max(min_h - h, 0), max(min_w - w, 0)
    if not pad_h and not pad_w:
        return array
    widths = [(0, 0)] * (array.ndim - 2) + [(0, pad_h), (0, pad_w)]
    return np.pad(array, widths, mode="constant", constant_values=value)
