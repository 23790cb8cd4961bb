"""Patch geometry: grid coverage, random sampling, cropping and padding; one check on a real BBBC039 mask."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pel.patches import crop, grid_positions, pad_to_min, random_positions


def coverage(shape: tuple[int, int], positions: list[tuple[int, int]], patch: tuple[int, int]) -> np.ndarray:
    """How many windows cover each pixel; also asserts every window lies inside the image."""
    cover = np.zeros(shape, dtype=np.int64)
    for y, x in positions:
        assert y >= 0 and x >= 0 and y + patch[0] <= shape[0] and x + patch[1] <= shape[1]
        cover[y : y + patch[0], x : x + patch[1]] += 1
    return cover


@pytest.mark.parametrize(
    ("shape", "patch", "stride"),
    [
        ((10, 10), (4, 4), (4, 4)),
        ((10, 10), (4, 4), (3, 3)),
        ((11, 7), (4, 3), (2, 3)),
        ((33, 17), (8, 8), (6, 1)),
        ((5, 9), (5, 4), (5, 4)),
        ((128, 128), (64, 64), (48, 48)),
    ],
)
def test_grid_covers_every_pixel_with_last_window_on_the_edge(
    shape: tuple[int, int], patch: tuple[int, int], stride: tuple[int, int]
) -> None:
    positions = grid_positions(shape, patch, stride)
    assert (coverage(shape, positions, patch) >= 1).all()
    ys = sorted({y for y, _ in positions})
    xs = sorted({x for _, x in positions})
    assert ys[0] == 0 and xs[0] == 0
    assert ys[-1] == shape[0] - patch[0] and xs[-1] == shape[1] - patch[1]
    # Steps are the stride except possibly the last one, which is shortened to hit the edge.
    for starts, step in ((ys, stride[0]), (xs, stride[1])):
        gaps = np.diff(starts)
        assert (gaps[:-1] == step).all() and (len(gaps) == 0 or 0 < gaps[-1] <= step)
    assert len(positions) == len(ys) * len(xs) == len(set(positions))


def test_grid_without_overlap_tiles_exactly_when_divisible() -> None:
    positions = grid_positions((12, 8), (4, 4), (4, 4))
    assert (coverage((12, 8), positions, (4, 4)) == 1).all()
    assert positions == [(y, x) for y in (0, 4, 8) for x in (0, 4)]


@pytest.mark.parametrize(("shape", "patch"), [((6, 9), (6, 9)), ((3, 4), (8, 8)), ((3, 20), (8, 8))])
def test_grid_single_window_when_image_not_larger_than_patch(shape: tuple[int, int], patch: tuple[int, int]) -> None:
    positions = grid_positions(shape, patch, (2, 2))
    ys = {y for y, _ in positions}
    assert ys == {0}
    if shape[1] <= patch[1]:
        assert positions == [(0, 0)]


@pytest.mark.parametrize(
    ("shape", "patch", "stride"),
    [((10, 10), (4, 4), (5, 4)), ((10, 10), (4, 4), (4, 5)), ((10, 10), (4, 4), (0, 2)), ((10, 10), (0, 4), (1, 1))],
)
def test_grid_rejects_bad_geometry(shape: tuple[int, int], patch: tuple[int, int], stride: tuple[int, int]) -> None:
    with pytest.raises(ValueError):
        grid_positions(shape, patch, stride)


def test_random_positions_in_bounds_and_reproducible() -> None:
    mask = np.zeros((40, 50), dtype=np.uint8)
    mask[3, 47] = 1  # a corner pixel: centring on it must be clipped back into the image
    patch = (16, 12)
    a = random_positions(mask, patch, 200, 0.5, np.random.default_rng(1))
    b = random_positions(mask, patch, 200, 0.5, np.random.default_rng(1))
    assert a == b and len(a) == 200
    coverage(mask.shape, a, patch)  # asserts bounds
    assert all(isinstance(v, int) for pos in a for v in pos)


@pytest.mark.parametrize(("count", "fg_fraction"), [(100, 0.3), (50, 1.0), (40, 0.0), (7, 0.5)])
def test_random_positions_honour_foreground_fraction(count: int, fg_fraction: float) -> None:
    # One 2x2 object in a 200x200 image: a uniform 16x16 patch contains it with probability ~0.8%.
    mask = np.zeros((200, 200), dtype=np.int32)
    mask[150:152, 20:22] = 7
    patch = (16, 16)
    positions = random_positions(mask, patch, count, fg_fraction, np.random.default_rng(2))
    assert len(positions) == count
    has_fg = np.array([crop(mask, pos, patch).any() for pos in positions])
    n_fg = round(count * fg_fraction)
    assert has_fg[:n_fg].all()
    # The uniform remainder hits the object only by chance.
    assert has_fg[n_fg:].sum() <= max(2, 0.1 * (count - n_fg))


def test_random_positions_without_foreground_fall_back_to_uniform() -> None:
    mask = np.zeros((30, 30), dtype=np.uint16)
    positions = random_positions(mask, (8, 8), 300, 1.0, np.random.default_rng(3))
    ys = np.array([y for y, _ in positions])
    assert len(positions) == 300 and ys.min() >= 0 and ys.max() <= 22
    assert len(set(ys.tolist())) > 10  # spread, not piled at one corner


def test_random_positions_centre_on_foreground_with_multichannel_mask_and_small_image() -> None:
    mask = np.zeros((2, 6, 5), dtype=np.uint8)
    mask[1, 4, 1] = 3
    assert random_positions(mask, (8, 8), 5, 1.0, np.random.default_rng(4)) == [(0, 0)] * 5
    positions = random_positions(mask, (3, 3), 20, 1.0, np.random.default_rng(5))
    assert all(crop(mask[1], pos, (3, 3)).any() for pos in positions)
    # Centred (y - 1, x - 1) for the single pixel at (4, 1), then clipped into [0, H - 3] x [0, W - 3].
    assert set(positions) == {(3, 0)}


@pytest.mark.parametrize(("count", "fg_fraction"), [(-1, 0.5), (5, 1.5), (5, -0.1)])
def test_random_positions_reject_bad_arguments(count: int, fg_fraction: float) -> None:
    with pytest.raises(ValueError):
        random_positions(np.ones((8, 8)), (4, 4), count, fg_fraction, np.random.default_rng(0))


def test_crop_takes_trailing_dims_and_checks_bounds() -> None:
    array = np.arange(2 * 5 * 6).reshape(2, 5, 6)
    out = crop(array, (1, 2), (3, 4))
    assert out.shape == (2, 3, 4)
    assert out[1, 0, 0] == array[1, 1, 2] and out[0, 2, 3] == array[0, 3, 5]
    with pytest.raises(ValueError):
        crop(array, (3, 0), (3, 4))


@pytest.mark.parametrize(
    ("shape", "size", "expected"),
    [((3, 4), (5, 6), (5, 6)), ((2, 3, 4), (2, 9), (2, 3, 9)), ((7, 8), (5, 6), (7, 8)), ((3, 9), (6, 2), (6, 9))],
)
def test_pad_to_min_pads_bottom_right_only(
    shape: tuple[int, ...], size: tuple[int, int], expected: tuple[int, ...]
) -> None:
    array = np.arange(1, int(np.prod(shape)) + 1).reshape(shape)
    out = pad_to_min(array, size, value=-5)
    assert out.shape == expected
    h, w = shape[-2:]
    np.testing.assert_array_equal(out[..., :h, :w], array)
    assert (out[..., h:, :] == -5).all() and (out[..., :, w:] == -5).all()
    if expected == shape:
        assert out is array


def test_random_positions_2d_stream_unchanged_by_the_nd_rewrite() -> None:
    # Values from the 2D-only sampler before it became dimension-generic: same seed, same training patches.
    mask = np.zeros((40, 50), dtype=np.uint16)
    mask[10:14, 30:33] = 3
    mask[35, 2] = 1
    got = random_positions(mask, (16, 12), 6, 0.5, np.random.default_rng(11))
    assert got == [(2, 25), (2, 25), (5, 25), (12, 27), (14, 1), (15, 18)]


def coverage_nd(shape: tuple[int, ...], positions: list[tuple[int, ...]], patch: tuple[int, ...]) -> np.ndarray:
    cover = np.zeros(shape, dtype=np.int64)
    for pos in positions:
        assert all(p >= 0 and p + w <= n for p, w, n in zip(pos, patch, shape, strict=True))
        cover[tuple(slice(p, p + w) for p, w in zip(pos, patch, strict=True))] += 1
    return cover


@pytest.mark.parametrize(
    ("shape", "patch", "stride"),
    [
        ((10, 11, 12), (4, 4, 4), (3, 4, 2)),
        ((7, 33, 17), (7, 8, 8), (7, 6, 1)),
        ((3, 20, 20), (8, 8, 8), (4, 4, 4)),  # depth smaller than the patch: one window at 0
        ((16, 16, 16), (8, 8, 8), (8, 8, 8)),
    ],
)
def test_grid_3d_covers_every_voxel_with_last_window_on_the_edge(
    shape: tuple[int, int, int], patch: tuple[int, int, int], stride: tuple[int, int, int]
) -> None:
    positions = grid_positions(shape, patch, stride)
    assert all(len(pos) == 3 for pos in positions) and len(positions) == len(set(positions))
    clipped = tuple(min(p, n) for p, n in zip(patch, shape, strict=True))
    assert (coverage_nd(shape, positions, clipped) >= 1).all()
    for axis in range(3):
        starts = sorted({pos[axis] for pos in positions})
        assert starts[0] == 0 and starts[-1] == max(shape[axis] - patch[axis], 0)
    if shape == (16, 16, 16):
        assert (coverage_nd(shape, positions, patch) == 1).all() and len(positions) == 8


def test_grid_rejects_mixed_dimensions() -> None:
    with pytest.raises(ValueError):
        grid_positions((10, 10, 10), (4, 4), (2, 2))
    with pytest.raises(ValueError):
        grid_positions((10,), (4,), (2,))


def test_random_positions_3d_foreground_and_bounds() -> None:
    mask = np.zeros((2, 20, 30, 40), dtype=np.uint16)  # (C, D, H, W)
    mask[1, 18, 2, 39] = 5  # a corner voxel: centring must be clipped back inside
    patch = (8, 8, 8)
    positions = random_positions(mask, patch, 50, 0.6, np.random.default_rng(7))
    assert len(positions) == 50 and all(len(p) == 3 for p in positions)
    coverage_nd((20, 30, 40), positions, patch)
    assert set(positions[:30]) == {(12, 0, 32)}
    assert all(crop(mask, p, patch).any() for p in positions[:30])
    # Smaller than the patch along depth: corner 0 there, and padding makes every crop valid.
    small = np.zeros((4, 30, 40), dtype=np.uint8)
    small[2, 10, 10] = 1
    pos = random_positions(small, patch, 10, 1.0, np.random.default_rng(8))
    assert all(p[0] == 0 for p in pos)
    padded = pad_to_min(small, patch)
    assert padded.shape == (8, 30, 40)
    assert all(crop(padded, p, patch).shape == patch and crop(padded, p, patch).any() for p in pos)


def test_crop_and_pad_3d() -> None:
    array = np.arange(2 * 5 * 6 * 7).reshape(2, 5, 6, 7)
    out = crop(array, (1, 2, 3), (3, 4, 4))
    assert out.shape == (2, 3, 4, 4)
    np.testing.assert_array_equal(out, array[:, 1:4, 2:6, 3:7])
    with pytest.raises(ValueError):
        crop(array, (3, 0, 0), (3, 4, 4))
    with pytest.raises(ValueError):
        crop(array, (0, 0), (3, 4, 4))
    padded = pad_to_min(array, (6, 6, 9), value=-1)
    assert padded.shape == (2, 6, 6, 9)
    np.testing.assert_array_equal(padded[:, :5, :, :7], array)
    assert (padded[:, 5:] == -1).all() and (padded[..., 7:] == -1).all()


def _first_mask(root: Path) -> np.ndarray:
    path = sorted((root / "masks").glob("*.png"))[0]
    return np.array(Image.open(path))


def test_real_bbbc039_mask_grid_and_foreground_sampling(bbbc039_root: Path) -> None:
    mask = _first_mask(bbbc039_root)
    assert mask.dtype == np.uint16 and mask.ndim == 2
    assert (mask > 0).any()
    patch = (128, 128)
    positions = grid_positions(mask.shape, patch, (96, 96))
    assert (coverage(mask.shape, positions, patch) >= 1).all()

    samples = random_positions(mask, patch, 64, 1.0, np.random.default_rng(6))
    crops = [crop(mask, pos, patch) for pos in samples]
    assert all(c.shape == patch for c in crops)
    assert all((c > 0).any() for c in crops)
