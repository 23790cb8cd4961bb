"""Patch geometry on numpy arrays shaped ``(..., *S)``: grid and random positions, cropping, padding.

Every function is dimension-generic: the number of spatial dimensions is the length of the ``patch`` / ``size``
/ ``pos`` tuple (2 for ``(H, W)``, 3 for ``(D, H, W)``) and any leading dimensions (channels) are carried along.
Positions are corners (the lowest index along every spatial axis), e.g. ``(y, x)`` or ``(z, y, x)``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

__all__ = ["crop", "grid_positions", "pad_to_min", "random_positions"]


def _check_tuple(name: str, value: Sequence[int], *, minimum: int, ndim: int | None = None) -> tuple[int, ...]:
    """Validate a per-axis integer tuple; ``ndim`` pins its length (2D and 3D are the supported cases)."""
    values = tuple(value)
    if ndim is None and len(values) not in (2, 3):
        raise ValueError(f"{name} must have 2 or 3 entries (2D or 3D), got {value!r}")
    if ndim is not None and len(values) != ndim:
        raise ValueError(f"{name} must have {ndim} entries to match the other arguments, got {value!r}")
    if any(int(v) != v or v < minimum for v in values):
        raise ValueError(f"{name} must be integers >= {minimum}, got {value!r}")
    return tuple(int(v) for v in values)


def _axis_starts(size: int, patch: int, stride: int) -> list[int]:
    if size <= patch:
        # One window at 0; the caller pads the array up to the patch size (see pad_to_min).
        return [0]
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        # Align the last window to the far edge so the last pixels are covered without padding.
        starts.append(size - patch)
    return starts


def grid_positions(shape: Sequence[int], patch: Sequence[int], stride: Sequence[int]) -> list[tuple[int, ...]]:
    """Corners of a sliding-window grid over an image of spatial ``shape`` ((H, W) or (D, H, W)), row-major.

    Windows start every ``stride`` pixels along each axis and the last one is aligned to the far edge, so every
    pixel is covered and no window leaves the image. An axis no longer than the patch gets a single window at 0
    (pad the array with :func:`pad_to_min`). ``stride > patch`` would leave gaps and is rejected.
    """
    dims = _check_tuple("shape", shape, minimum=1)
    sizes = _check_tuple("patch", patch, minimum=1, ndim=len(dims))
    steps = _check_tuple("stride", stride, minimum=1, ndim=len(dims))
    if any(s > p for s, p in zip(steps, sizes, strict=True)):
        raise ValueError(f"stride {tuple(stride)} larger than patch {tuple(patch)} would leave pixels uncovered")
    axes = [_axis_starts(n, p, s) for n, p, s in zip(dims, sizes, steps, strict=True)]
    return list(itertools.product(*axes))


def random_positions(
    mask: np.ndarray, patch: Sequence[int], count: int, fg_fraction: float, rng: np.random.Generator
) -> list[tuple[int, ...]]:
    """``count`` random corners for ``patch``-sized crops of ``mask`` (..., *S), S = ``len(patch)`` dims.

    The first ``round(count * fg_fraction)`` are centred on a uniformly drawn foreground pixel (label > 0 in any
    leading channel), clipped to stay inside the image, so each of them contains foreground; the rest are
    uniform over all in-bounds corners. A mask without foreground gives uniform positions only. An axis shorter
    than the patch yields corner 0 (pad the arrays with :func:`pad_to_min` before cropping).
    """
    sizes = _check_tuple("patch", patch, minimum=1)
    nd = len(sizes)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if not 0.0 <= fg_fraction <= 1.0:
        raise ValueError(f"fg_fraction must lie in [0, 1], got {fg_fraction}")
    if mask.ndim < nd:
        raise ValueError(f"mask must be (..., *S) with {nd} spatial dims, got shape {mask.shape}")
    spatial = mask.shape[-nd:]
    max_corner = np.array([max(n - p, 0) for n, p in zip(spatial, sizes, strict=True)], dtype=np.int64)

    n_fg = round(count * fg_fraction)
    if n_fg:
        # Only searched when needed: finding the foreground is most of the cost of a call on a whole image.
        fg = mask > 0
        if fg.ndim > nd:
            fg = fg.reshape(-1, *spatial).any(axis=0)
        # flatnonzero + unravel_index is cheaper than np.nonzero per axis and samples uniformly by flat index.
        fg_flat = np.flatnonzero(fg)
        n_fg = n_fg if fg_flat.size else 0

    corners = np.empty((count, nd), dtype=np.int64)
    if n_fg:
        centres = np.stack(np.unravel_index(fg_flat[rng.integers(0, fg_flat.size, size=n_fg)], spatial), axis=1)
        corners[:n_fg] = np.clip(centres - np.array(sizes) // 2, 0, max_corner)
    n_uni = count - n_fg
    # Axis by axis (not one (n, nd) draw) so 2D positions keep the random stream of the original 2D sampler.
    for axis in range(nd):
        corners[n_fg:, axis] = rng.integers(0, max_corner[axis] + 1, size=n_uni)
    return [tuple(int(v) for v in row) for row in corners]


def crop(array: np.ndarray, pos: Sequence[int], patch: Sequence[int]) -> np.ndarray:
    """``array[..., y:y+ph, x:x+pw]`` (or with z) as a view (copy it before writing); must lie inside the array."""
    corner = _check_tuple("pos", pos, minimum=0)
    sizes = _check_tuple("patch", patch, minimum=1, ndim=len(corner))
    nd = len(corner)
    if array.ndim < nd:
        raise ValueError(f"array must have at least {nd} dims, got shape {array.shape}")
    spatial = array.shape[-nd:]
    if any(c + p > n for c, p, n in zip(corner, sizes, spatial, strict=True)):
        raise ValueError(f"patch {tuple(patch)} at {tuple(pos)} exceeds the array's spatial shape {spatial}; pad it")
    return array[(Ellipsis, *(slice(c, c + p) for c, p in zip(corner, sizes, strict=True)))]


def pad_to_min(array: np.ndarray, size: Sequence[int], *, value: float = 0) -> np.ndarray:
    """Pad the far end of each of the last ``len(size)`` axes of ``array`` with ``value`` up to at least ``size``.

    Padding only at the far edges keeps pixel coordinates unchanged, so positions and crops stay valid and
    the original is ``result[..., :H, :W]``. Returns ``array`` itself when it is already large enough.
    """
    minimum = _check_tuple("size", size, minimum=0)
    nd = len(minimum)
    if array.ndim < nd:
        raise ValueError(f"array must have at least {nd} dims, got shape {array.shape}")
    pads = [max(m - n, 0) for m, n in zip(minimum, array.shape[-nd:], strict=True)]
    if not any(pads):
        return array
    widths = [(0, 0)] * (array.ndim - nd) + [(0, p) for p in pads]
    return np.pad(array, widths, mode="constant", constant_values=value)
