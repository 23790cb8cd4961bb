"""Confusion counts and Dice/IoU on hand-computed cases, the empty-ground-truth policy and the DDP all-reduce."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pel.metrics import ObjectMetrics, SegmentationMetrics, confusion_counts, label_instances, object_metrics


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
    """One spawn for both accumulators: starting two processes costs seconds, the metrics themselves nothing."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        metrics = SegmentationMetrics(3)
        # Uneven shards: rank 0 sees 3 images, rank 1 sees 2.
        shard = _images(0, 5)[:3] if rank == 0 else _images(0, 5)[3:]
        for pred, target in shard:
            metrics.update(pred, target)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(metrics.compute()))

        objects = ObjectMetrics()
        images = _object_images(1, 5)
        for pred, true in images[:3] if rank == 0 else images[3:]:
            objects.update(pred, true)
        Path(out_dir, f"objects-rank{rank}.json").write_text(json.dumps(objects.compute()))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_ddp_worker, args=(2, str(out / "init"), str(out)), nprocs=2, join=True)
    return out


def test_distributed_compute_equals_single_process(ddp_results: Path) -> None:
    tmp_path = ddp_results
    single = SegmentationMetrics(3)
    for pred, target in _images(0, 5):
        single.update(pred, target)
    expected = single.compute()
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["num_images"] == 5
        for key in ("dice", "iou", "mean_image_dice", "mean_image_iou"):
            assert got[key] == pytest.approx(expected[key], abs=1e-12)


# --- Object-level metrics --------------------------------------------------------------------------------------


def rect(shape: tuple[int, int], boxes: dict[int, tuple[int, int, int, int]]) -> np.ndarray:
    """Instance map from {label: (y0, y1, x0, x1)} rectangles, painted in order."""
    out = np.zeros(shape, dtype=np.int32)
    for label, (y0, y1, x0, x1) in boxes.items():
        out[y0:y1, x0:x1] = label
    return out


TWO_TOUCHING = rect((6, 10), {1: (1, 5, 1, 5), 2: (1, 5, 5, 9)})  # two 4x4 objects sharing an edge


def test_two_touching_objects_found_with_other_ids() -> None:
    pred = rect((6, 10), {70: (1, 5, 1, 5), 3: (1, 5, 5, 9)})
    counts = object_metrics(pred, TWO_TOUCHING)
    assert (counts.tp, counts.fp, counts.fn, counts.num_pred, counts.num_true) == (2, 0, 0, 2, 2)
    assert counts.matched_iou_sum == 2.0 and counts.aji_intersection == counts.aji_union == 32
    assert counts.f1 == counts.pq == counts.aji == 1.0


def test_merged_objects_match_nothing_at_iou_exactly_half() -> None:
    # One prediction over both: IoU 16/32 = 0.5 with each, not above the threshold.
    merged = rect((6, 10), {1: (1, 5, 1, 9)})
    counts = object_metrics(merged, TWO_TOUCHING)
    assert (counts.tp, counts.fp, counts.fn) == (0, 1, 2)
    assert counts.f1 == 0.0 and counts.pq == 0.0
    # AJI: both true objects pair with the merged one (reused): C = 16 + 16, U = 32 + 32.
    assert (counts.aji_intersection, counts.aji_union) == (32, 64) and counts.aji == 0.5
    # Label the semantic prediction: touching objects merge under both connectivities.
    assert label_instances(TWO_TOUCHING > 0).max() == 1


def test_split_object_even_and_uneven() -> None:
    true = rect((6, 10), {1: (1, 5, 1, 9)})  # 32 pixels
    even = object_metrics(rect((6, 10), {4: (1, 5, 1, 5), 9: (1, 5, 5, 9)}), true)
    assert (even.tp, even.fp, even.fn) == (0, 2, 1)
    # AJI: tie at IoU 0.5, paired with the lower id (4): C = 16, U = 32 + the unpaired 16.
    assert (even.aji_intersection, even.aji_union) == (16, 48)

    uneven = object_metrics(rect((6, 10), {1: (1, 5, 1, 6), 2: (1, 5, 6, 9)}), true)  # 20 + 12 pixels
    assert (uneven.tp, uneven.fp, uneven.fn) == (1, 1, 0)
    assert uneven.matched_iou_sum == pytest.approx(20 / 32)
    assert uneven.f1 == pytest.approx(2 / 3)
    assert uneven.pq == pytest.approx((20 / 32) * (2 / 3))  # SQ x RQ
    assert (uneven.aji_intersection, uneven.aji_union) == (20, 44)


def test_missed_and_spurious_objects() -> None:
    true = rect((8, 8), {1: (0, 2, 0, 2)})
    pred = rect((8, 8), {5: (5, 8, 5, 7)})  # no overlap: FN 1, FP 1
    counts = object_metrics(pred, true)
    assert (counts.tp, counts.fp, counts.fn) == (0, 1, 1)
    assert (counts.aji_intersection, counts.aji_union) == (0, 4 + 6)
    assert counts.f1 == counts.pq == counts.aji == 0.0


@pytest.mark.parametrize(
    ("pred", "true", "expected"),
    [
        pytest.param(np.zeros((5, 5), int), np.zeros((5, 5), int), 1.0, id="both-empty-scores-1"),
        pytest.param(np.zeros((5, 5), int), rect((5, 5), {1: (0, 2, 0, 2)}), 0.0, id="all-missed-scores-0"),
        pytest.param(rect((5, 5), {1: (0, 2, 0, 2)}), np.zeros((5, 5), int), 0.0, id="no-gt-predicted-scores-0"),
    ],
)
def test_object_empty_policy(pred: np.ndarray, true: np.ndarray, expected: float) -> None:
    metrics = ObjectMetrics()
    metrics.update(pred, true)
    out = metrics.compute()
    for key in ("f1", "precision", "recall", "pq", "sq", "rq", "aji", "mean_image_f1", "mean_image_pq"):
        assert out[key] == expected, key


def test_object_pooling_ignores_empty_images_but_means_count_them() -> None:
    metrics = ObjectMetrics()
    metrics.update(np.zeros((6, 10), int), np.zeros((6, 10), int))  # no objects: 1.0 per image, adds no counts
    metrics.update(rect((6, 10), {1: (1, 5, 1, 9)}), TWO_TOUCHING)  # merged: F1 0, AJI 0.5
    out = metrics.compute()
    assert out["f1"] == 0.0 and out["aji"] == 0.5
    assert out["mean_image_f1"] == 0.5 and out["mean_image_aji"] == 0.75
    assert (out["tp"], out["fp"], out["fn"], out["num_images"]) == (0, 1, 2, 2)
    json.dumps(out)


def test_object_metrics_accept_tensors_3d_and_reject_bad_input() -> None:
    true = np.zeros((4, 6, 6), dtype=np.int64)
    true[:3, :3, :3] = 1
    true[3:, 3:, 3:] = 2
    pred = true.copy()
    pred[0] = 0  # object 1 loses a third of its voxels: IoU 2/3
    counts = object_metrics(torch.from_numpy(pred), torch.from_numpy(true))
    assert (counts.tp, counts.fp, counts.fn) == (2, 0, 0)
    assert counts.matched_iou_sum == pytest.approx(1 + 2 / 3)
    with pytest.raises(ValueError):
        object_metrics(pred, true, iou_threshold=0.3)
    with pytest.raises(ValueError):
        object_metrics(pred.astype(np.float32), true)
    with pytest.raises(ValueError):
        object_metrics(pred[:2], true)
    with pytest.raises(ValueError):
        object_metrics(-pred, true)
    with pytest.raises(ValueError):
        ObjectMetrics().compute()


def test_label_instances_connectivity_2d_and_3d() -> None:
    diagonal = np.eye(4, dtype=bool)
    assert label_instances(diagonal).max() == 4
    assert label_instances(diagonal, connectivity=8).max() == 1
    labels = label_instances(np.array([[0, 2, 2, 0, 1]]))  # any label > 0 is foreground
    np.testing.assert_array_equal(labels, [[0, 1, 1, 0, 2]])
    assert labels.dtype == np.int32
    cube = np.zeros((3, 3, 3), dtype=bool)
    cube[0, 0, 0] = cube[1, 1, 1] = True
    assert label_instances(cube).max() == 2 and label_instances(cube, connectivity=26).max() == 1
    with pytest.raises(ValueError):
        label_instances(cube, connectivity=8)
    with pytest.raises(ValueError):
        label_instances(np.zeros(5))


def brute_force(pred: np.ndarray, true: np.ndarray, threshold: float) -> tuple[int, float, float]:
    """TP, matched IoU sum and AJI straight from the definitions, one boolean mask per object."""
    pred_ids = [int(v) for v in np.unique(pred) if v]
    true_ids = [int(v) for v in np.unique(true) if v]
    iou = np.zeros((len(true_ids), len(pred_ids)))
    for i, t in enumerate(true_ids):
        for j, p in enumerate(pred_ids):
            iou[i, j] = ((true == t) & (pred == p)).sum() / ((true == t) | (pred == p)).sum()
    tp = int((iou > threshold).sum())
    iou_sum = float(iou[iou > threshold].sum())
    # Kumar et al. 2017, Algorithm 1.
    c = u = 0
    used: set[int] = set()
    for i, t in enumerate(true_ids):
        g = true == t
        if not pred_ids or iou[i].max() == 0:
            u += g.sum()
            continue
        j = int(np.argmax(iou[i]))  # first maximum = lowest predicted id
        s = pred == pred_ids[j]
        c += (g & s).sum()
        u += (g | s).sum()
        used.add(j)
    u += sum((pred == p).sum() for j, p in enumerate(pred_ids) if j not in used)
    aji = c / u if u else 1.0
    return tp, iou_sum, float(aji)


def random_instances(rng: np.random.Generator, shape: tuple[int, int], count: int) -> np.ndarray:
    """Overlapping random rectangles with sparse random ids (later ones cover earlier ones)."""
    out = np.zeros(shape, dtype=np.int64)
    for label in rng.choice(np.arange(1, 1000), size=count, replace=False):
        y, x = rng.integers(0, shape[0] - 2), rng.integers(0, shape[1] - 2)
        h, w = rng.integers(2, 7, size=2)
        out[y : y + h, x : x + w] = label
    return out


def perturbed(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """A plausible prediction: shifted by up to a pixel, some objects dropped, a spurious one added."""
    out = np.roll(labels, tuple(rng.integers(-1, 2, size=2)), axis=(0, 1))
    for label in np.unique(out)[1:]:
        if rng.random() < 0.2:
            out[out == label] = 0
    y, x = rng.integers(0, labels.shape[0] - 3, size=2)
    out[y : y + 3, x : x + 3] = 5000
    return out


@pytest.mark.parametrize("threshold", [0.5, 0.7])
def test_object_metrics_against_brute_force_on_random_label_images(threshold: float) -> None:
    rng = np.random.default_rng(int(threshold * 10))
    for _ in range(40):
        true = random_instances(rng, (14, 16), int(rng.integers(0, 9)))
        pred = perturbed(rng, true) if rng.random() < 0.7 else random_instances(rng, (14, 16), 6)
        counts = object_metrics(pred, true, iou_threshold=threshold)
        tp, iou_sum, aji = brute_force(pred, true, threshold)
        assert counts.tp == tp and counts.matched_iou_sum == pytest.approx(iou_sum)
        assert counts.num_pred + counts.num_true == len(np.unique(pred)) + len(np.unique(true)) - 2 * (0 in pred)
        assert counts.aji == pytest.approx(aji if (pred.any() or true.any()) else 1.0)


def _erode_instances(labels: np.ndarray) -> np.ndarray:
    """Drop every pixel whose 4-neighbourhood leaves its object (object boundaries peel off by one pixel)."""
    padded = np.pad(labels, 1)
    keep = np.ones(labels.shape, dtype=bool)
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        keep &= padded[1 + dy : 1 + dy + labels.shape[0], 1 + dx : 1 + dx + labels.shape[1]] == labels
    return np.where(keep, labels, 0)


def _shift(labels: np.ndarray, pixels: int) -> np.ndarray:
    out = np.zeros_like(labels)
    out[pixels:, pixels:] = labels[:-pixels, :-pixels]
    return out


def test_real_bbbc039_mask_against_itself_eroded_and_shifted(bbbc039_root: Path) -> None:
    from PIL import Image

    true = np.array(Image.open(sorted((bbbc039_root / "masks").glob("*.png"))[0]))
    assert true.dtype == np.uint16 and true.max() > 10

    def scores(pred: np.ndarray) -> dict:
        metrics = ObjectMetrics()
        metrics.update(pred, true)
        return metrics.compute()

    same = scores(true)
    assert same["f1"] == same["pq"] == same["aji"] == 1.0 and same["fp"] == same["fn"] == 0

    eroded = scores(_erode_instances(true))
    shifted1, shifted2 = scores(_shift(true, 1)), scores(_shift(true, 2))
    for out in (eroded, shifted1):
        # Most nuclei survive a one-pixel change with IoU > 0.5 (only the smallest can drop out), but every
        # matched IoU falls below 1: PQ and AJI drop, F1 barely moves.
        assert 0.9 <= out["f1"] <= 1.0
        assert 0.5 < out["pq"] < 0.95 and 0.5 < out["aji"] < 0.95
    assert eroded["num_pred"] <= eroded["num_true"]  # erosion never creates objects (the smallest may vanish)
    # A larger shift is worse on every count.
    assert shifted2["pq"] < shifted1["pq"] and shifted2["aji"] < shifted1["aji"] and shifted2["f1"] <= shifted1["f1"]

    # Semantic foreground relabelled by connected components: touching nuclei merge, so fewer objects, lower F1.
    relabelled = label_instances(true > 0)
    merged = scores(relabelled)
    assert merged["num_pred"] < merged["num_true"]
    assert merged["f1"] < 1.0 and merged["aji"] < 1.0


def _object_images(seed: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(count):
        true = random_instances(rng, (14, 16), 0 if k == 2 else 6)  # one image without objects
        out.append((perturbed(rng, true), true))
    return out


def test_object_metrics_distributed_compute_equals_single_process(ddp_results: Path) -> None:
    tmp_path = ddp_results
    single = ObjectMetrics()
    for pred, true in _object_images(1, 5):
        single.update(pred, true)
    expected = single.compute()
    assert 0 < expected["f1"] < 1 and expected["tp"] > 0
    for rank in range(2):
        got = json.loads((tmp_path / f"objects-rank{rank}.json").read_text())
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-12), key
