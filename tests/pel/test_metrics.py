"""Confusion counts and Dice/IoU on hand-computed cases, the empty-ground-truth policy and the DDP all-reduce."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pel.metrics import SegmentationMetrics, confusion_counts


@pytest.mark.parametrize(
    ("pred", "target", "num_classes", "expected"),
    [
        pytest.param([[0, 1], [1, 1]], [[0, 0], [1, 1]], 2, [[1, 0, 1], [2, 1, 0]], id="binary"),
        pytest.param([[0, 2, 2], [1, 0, 2]], [[0, 1, 2], [1, 1, 2]], 3, [[1, 1, 0], [1, 0, 2], [2, 1, 0]], id="3class"),
        pytest.param([[1, 1]], [[1, 1]], 3, [[0, 0, 0], [2, 0, 0], [0, 0, 0]], id="absent-classes"),
        pytest.param([[0, 0, 0]], [[1, 1, 1]], 2, [[0, 3, 0], [0, 0, 3]], id="all-wrong"),
    ],
)
def test_confusion_counts_by_hand(
    pred: list[list[int]], target: list[list[int]], num_classes: int, expected: list[list[int]]
) -> None:
    for convert in (np.array, torch.tensor):
        got = confusion_counts(convert(pred), convert(target), num_classes)
        assert got.shape == (num_classes, 3) and got.dtype == np.int64
        np.testing.assert_array_equal(got, np.array(expected))


def test_confusion_counts_rows_add_up_on_random_maps() -> None:
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 4, (17, 23))
    target = rng.integers(0, 4, (17, 23))
    counts = confusion_counts(pred, target, 4)
    for c in range(4):
        assert counts[c, 0] + counts[c, 1] == (pred == c).sum()
        assert counts[c, 0] + counts[c, 2] == (target == c).sum()
        assert counts[c, 0] == ((pred == c) & (target == c)).sum()


@pytest.mark.parametrize(
    ("pred", "target"),
    [
        (np.array([[0, 2]]), np.array([[0, 1]])),
        (np.array([[0, 1]]), np.array([[-1, 1]])),
        (np.zeros((2, 2)), np.zeros((2, 3))),
    ],
)
def test_confusion_counts_reject_bad_input(pred: np.ndarray, target: np.ndarray) -> None:
    with pytest.raises(ValueError):
        confusion_counts(pred.astype(np.int64), target.astype(np.int64), 2)


def test_single_image_dice_and_iou_by_hand() -> None:
    metrics = SegmentationMetrics(2)
    metrics.update(np.array([[0, 1], [1, 1]]), np.array([[0, 0], [1, 1]]))
    out = metrics.compute()
    # class 0: tp 1, fp 0, fn 1; class 1: tp 2, fp 1, fn 0
    assert out["dice"] == pytest.approx([2 / 3, 4 / 5])
    assert out["iou"] == pytest.approx([1 / 2, 2 / 3])
    assert out["mean_image_dice"] == pytest.approx(out["dice"])
    assert out["mean_image_iou"] == pytest.approx(out["iou"])
    assert out["num_images"] == 1
    json.dumps(out)  # plain Python values, ready for summary.json


def test_pooled_versus_per_image() -> None:
    metrics = SegmentationMetrics(2)
    metrics.update(np.array([[0, 0], [0, 1]]), np.array([[0, 0], [0, 1]]))  # perfect, one foreground pixel
    metrics.update(np.array([[1, 1], [0, 0]]), np.array([[1, 1], [1, 1]]))  # half the foreground found
    out = metrics.compute()
    # Pooled: class 1 tp 3, fp 0, fn 2; class 0 tp 3, fp 2, fn 0.
    assert out["dice"] == pytest.approx([6 / 8, 6 / 8])
    assert out["iou"] == pytest.approx([3 / 5, 3 / 5])
    # Per image: class 1 dice 1 and 4/6; class 0 dice 1 and 0 (absent from the ground truth but predicted).
    assert out["mean_image_dice"] == pytest.approx([(1 + 0) / 2, (1 + 4 / 6) / 2])
    assert out["mean_image_iou"] == pytest.approx([(1 + 0) / 2, (1 + 2 / 4) / 2])
    assert out["num_images"] == 2


@pytest.mark.parametrize(
    ("pred", "target", "expected_image_dice"),
    [
        pytest.param([[0, 0], [0, 0]], [[0, 0], [0, 0]], [1.0, 1.0, 1.0], id="absent-everywhere-scores-1"),
        pytest.param([[0, 2], [0, 0]], [[0, 0], [0, 0]], [6 / 7, 1.0, 0.0], id="predicted-not-in-gt-scores-0"),
        pytest.param([[0, 0], [0, 0]], [[0, 0], [1, 0]], [6 / 7, 0.0, 1.0], id="missed-gt-scores-0"),
    ],
)
def test_empty_ground_truth_policy(
    pred: list[list[int]], target: list[list[int]], expected_image_dice: list[float]
) -> None:
    metrics = SegmentationMetrics(3)
    metrics.update(np.array(pred), np.array(target))
    out = metrics.compute()
    assert out["mean_image_dice"] == pytest.approx(expected_image_dice)
    # A single image: pooled sums give the same values, including 1.0 for a class absent everywhere.
    assert out["dice"] == pytest.approx(expected_image_dice)


def test_empty_policy_across_images_affects_mean_not_pool() -> None:
    metrics = SegmentationMetrics(2)
    metrics.update(np.zeros((3, 3), dtype=np.int64), np.zeros((3, 3), dtype=np.int64))  # class 1 absent: 1.0
    pred = np.zeros((3, 3), dtype=np.int64)
    target = np.zeros((3, 3), dtype=np.int64)
    target[0, :2] = 1
    pred[0, 0] = 1  # class 1: tp 1, fn 1 -> dice 2/3
    metrics.update(pred, target)
    out = metrics.compute()
    assert out["mean_image_dice"][1] == pytest.approx((1.0 + 2 / 3) / 2)
    assert out["dice"][1] == pytest.approx(2 / 3)


def test_compute_without_images_raises_and_reset_clears() -> None:
    metrics = SegmentationMetrics(2)
    with pytest.raises(ValueError):
        metrics.compute()
    metrics.update(np.ones((2, 2), dtype=np.int64), np.ones((2, 2), dtype=np.int64))
    metrics.reset()
    with pytest.raises(ValueError):
        metrics.compute()


def _images(seed: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 3, (9, 11)), rng.integers(0, 3, (9, 11))) for _ in range(count)]


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        metrics = SegmentationMetrics(3)
        # Uneven shards: rank 0 sees 3 images, rank 1 sees 2.
        shard = _images(0, 5)[:3] if rank == 0 else _images(0, 5)[3:]
        for pred, target in shard:
            metrics.update(pred, target)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(metrics.compute()))
    finally:
        dist.destroy_process_group()


def test_distributed_compute_equals_single_process(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    single = SegmentationMetrics(3)
    for pred, target in _images(0, 5):
        single.update(pred, target)
    expected = single.compute()
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["num_images"] == 5
        for key in ("dice", "iou", "mean_image_dice", "mean_image_iou"):
            assert got[key] == pytest.approx(expected[key], abs=1e-12)
