"""Patch sampling + cropping of one training batch against one U-Net training step, in the same run.

    .venv/bin/python tests/benchmarks/bench_patches.py               # 1 thread, 100 BBBC039 train images
    .venv/bin/python tests/benchmarks/bench_patches.py --threads 2   # both cores
    .venv/bin/python tests/benchmarks/bench_patches.py --data DIR    # another dataset folder (images/, masks/)

Not part of the default test run (pyproject's addopts ignore tests/benchmarks); naming the file runs its smoke test:
``.venv/bin/pytest tests/benchmarks/bench_patches.py``.

What is measured, and why:

- sampling: what pel.train does per step on each rank, with the training defaults (batch 8, 128x128 patches,
  fg_fraction 0.5): pick images (foreground-centred patches only from images with foreground), one
  ``random_positions`` per patch on the full 520x696 mask, ``crop`` of image and mask, ``np.stack`` and
  ``torch.from_numpy``. The 100 train images are loaded, normalised and padded in memory first, as training does,
  so file reading is not counted (it happens once, before the first step).
- training step: ``UNet(UNetConfig(width=16, depth=3))`` forward, ``CompoundLoss("pel")`` (PEL + cross entropy,
  the default loss) and backward, gradients zeroed per step; the optimizer step is left out, which only makes the
  step shorter and the ratio more conservative.
- Both are the median (and minimum) of ``--repeats`` calls after warm-up, interleaved (one sampling, one step) so a
  neighbour taking a core on these shared machines slows both alike. ``torch.set_num_threads`` is pinned.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pel.data import load_split, open_dataset  # noqa: E402
from pel.losses import CompoundLoss  # noqa: E402
from pel.models import UNet, UNetConfig  # noqa: E402
from pel.patches import crop, pad_to_min, random_positions  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "bbbc039"


class Sampler:
    """pel.train's per-step patch sampling (``_sample_batch``) on images held in memory."""

    def __init__(self, images: list[np.ndarray], masks: list[np.ndarray], patch: int, batch: int, fg: float) -> None:
        p = (patch, patch)
        self.patch = p
        self.batch = batch
        self.fg_fraction = fg
        self.images = [pad_to_min(image, p) for image in images]
        self.masks = [pad_to_min(mask, p) for mask in masks]
        self.with_foreground = np.flatnonzero([m.any() for m in self.masks])
        self.rng = np.random.default_rng(0)

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        n_fg = round(self.batch * self.fg_fraction) if self.with_foreground.size else 0
        picks = np.concatenate(
            [
                self.rng.choice(self.with_foreground, size=n_fg) if n_fg else np.empty(0, np.int64),
                self.rng.integers(0, len(self.images), size=self.batch - n_fg),
            ]
        )
        images, masks = [], []
        for i, idx in enumerate(picks):
            pos = random_positions(self.masks[idx], self.patch, 1, 1.0 if i < n_fg else 0.0, self.rng)[0]
            images.append(crop(self.images[idx], pos, self.patch))
            masks.append(crop(self.masks[idx], pos, self.patch))
        return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(masks))


def run(data: Path, *, images: int, repeats: int, warmup: int, threads: int, patch: int, batch: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    index = open_dataset(data)
    samples = load_split(index, "train")[:images]
    sampler = Sampler([s.image for s in samples], [s.mask for s in samples], patch, batch, fg=0.5)

    model = UNet(UNetConfig(width=16, depth=3))
    model.train()
    loss_fn = CompoundLoss("pel")

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    x, y = sampler()
    sample_s: list[float] = []
    step_s: list[float] = []
    for k in range(warmup + repeats):
        t0 = time.perf_counter()
        sampler()
        t1 = time.perf_counter()
        step(x, y)
        t2 = time.perf_counter()
        if k >= warmup:
            sample_s.append(t1 - t0)
            step_s.append(t2 - t1)
    sample_med, step_med = statistics.median(sample_s), statistics.median(step_s)
    return {
        "images": len(samples),
        "image_shape": tuple(samples[0].image.shape),
        "batch": tuple(x.shape),
        "threads": threads,
        "repeats": repeats,
        "sample_ms": (1e3 * sample_med, 1e3 * min(sample_s)),
        "step_ms": (1e3 * step_med, 1e3 * min(step_s)),
        "ratio": sample_med / step_med,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset folder (default: shared BBBC039)")
    parser.add_argument("--images", type=int, default=100, help="train images loaded into memory")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--patch", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)
    r = run(
        args.data,
        images=args.images,
        repeats=args.repeats,
        warmup=args.warmup,
        threads=args.threads,
        patch=args.patch,
        batch=args.batch,
    )
    print(f"{r['images']} images {r['image_shape']} in memory; batch {r['batch']}; {r['threads']} thread(s)")
    print("| what | median ms | min ms |")
    print("|---|---|---|")
    print(f"| sample + crop one batch | {r['sample_ms'][0]:.2f} | {r['sample_ms'][1]:.2f} |")
    print(f"| U-Net step (forward + CompoundLoss + backward) | {r['step_ms'][0]:.1f} | {r['step_ms'][1]:.1f} |")
    print(f"sampling / step = {r['ratio']:.4f} ({100 * r['ratio']:.2f}% of a step)")


def test_smoke() -> None:
    if not (DEFAULT_DATA / "images").is_dir():
        import pytest

        pytest.skip(f"BBBC039 not found at {DEFAULT_DATA}")
    r = run(DEFAULT_DATA, images=4, repeats=2, warmup=0, threads=1, patch=64, batch=4)
    assert r["batch"] == (4, 1, 64, 64) and 0 < r["ratio"] < 1


if __name__ == "__main__":
    main()
