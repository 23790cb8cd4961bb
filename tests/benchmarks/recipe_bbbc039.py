"""Demo-recipe benchmark on BBBC039: step time, baseline, PEL+CE fine-tune and whole-image test evaluation.

Not part of the default test run. From the repository root::

    .venv/bin/python tests/benchmarks/recipe_bbbc039.py [--threads 2] [--baseline-steps 400] [--finetune-steps 150]

Prints one JSON report (also written to ``<out>/recipe_report.json``). Timings on shared 2-core machines swing
with the neighbours' load, so the step time is the median of several timed steps, each phase reports its process
CPU time beside its wall time, and the 1-minute load average is recorded at the end of each phase.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pel import (
    CompoundLoss,
    SegmentationMetrics,
    TrainConfig,
    UNet,
    UNetConfig,
    crop,
    load_checkpoint,
    load_split,
    open_dataset,
    random_positions,
    sliding_window_predict,
    train,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def step_time(data: Path, *, width: int, depth: int, patch: int, batch: int, steps: int = 15) -> float:
    """Median seconds of one training step (forward, Dice+CE, backward, Adam) on real patches."""
    index = open_dataset(data)
    samples = load_split(index, "train")[:20]
    rng = np.random.default_rng(0)
    model = UNet(UNetConfig(width=width, depth=depth)).train()
    loss_fn = CompoundLoss("dice")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    times = []
    for i in range(steps + 3):
        picks = rng.integers(0, len(samples), size=batch)
        images, masks = [], []
        for k in picks:
            pos = random_positions(samples[k].mask, (patch, patch), 1, 0.5, rng)[0]
            images.append(crop(samples[k].image, pos, (patch, patch)))
            masks.append(crop(samples[k].mask, pos, (patch, patch)))
        start = time.perf_counter()
        x, y = torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(masks))
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 3:  # the first steps pay for allocator warm-up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def evaluate(model_path: Path, data: Path, window: int) -> tuple[float, float]:
    """(foreground Dice pooled over the test split, seconds) for stitched prediction with ``window``."""
    model, _ = load_checkpoint(model_path)
    test = load_split(open_dataset(data), "test")
    metrics = SegmentationMetrics(2)
    start = time.perf_counter()  # image loading excluded: it is the same for every window size
    for sample in test:
        probs = sliding_window_predict(model, torch.from_numpy(sample.image), patch=window, overlap=0.25, batch_size=4)
        metrics.update(probs.argmax(0), sample.mask)
    return metrics.compute()["dice"][1], time.perf_counter() - start


def main() -> None:
    default_data = Path(os.environ.get("PELTUNE_DATA", REPO_ROOT.parent / "shared" / "data")) / "bbbc039"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=default_data)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--patch", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--baseline-steps", type=int, default=400)
    parser.add_argument("--baseline-lr", type=float, default=1e-3)
    parser.add_argument("--finetune-steps", type=int, default=150)
    parser.add_argument("--finetune-lr", type=float, default=1e-4)
    parser.add_argument("--val-every", type=int, default=100)
    parser.add_argument("--val-images", type=int, default=10)
    parser.add_argument("--windows", type=int, nargs="*", default=[128, 256], help="extra evaluation windows")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="pel-recipe-"))
    report: dict[str, object] = {"threads": args.threads, "out": str(out)}

    report["step_load1"] = os.getloadavg()[0]
    report["step_seconds"] = step_time(
        args.data, width=args.width, depth=args.depth, patch=args.patch, batch=args.batch
    )
    print(json.dumps({"step_seconds": report["step_seconds"]}), flush=True)

    common = {
        "target": "binary",
        "patch_size": args.patch,
        "batch_size": args.batch,
        "val_every": args.val_every,
        "val_images": args.val_images,
        "model": {"width": args.width, "depth": args.depth},
    }
    baseline_cfg = TrainConfig(
        mode="baseline", loss="dice_ce", steps=args.baseline_steps, lr=args.baseline_lr, **common
    )
    start, cpu = time.perf_counter(), time.process_time()
    base = train(baseline_cfg, dataset_dir=args.data, out_dir=out / "baseline")
    report["baseline_seconds"] = time.perf_counter() - start
    report["baseline_cpu_seconds"] = time.process_time() - cpu
    report["baseline_load1"] = os.getloadavg()[0]
    assert base is not None
    report["baseline_test_dice"] = base["test_after"]["dice"][1]
    report["baseline_best_step"] = base["best_step"]
    print(json.dumps({k: report[k] for k in ("baseline_seconds", "baseline_test_dice")}), flush=True)

    finetune_cfg = TrainConfig(mode="finetune", loss="pel_ce", steps=args.finetune_steps, lr=args.finetune_lr, **common)
    start, cpu = time.perf_counter(), time.process_time()
    tuned = train(
        finetune_cfg, dataset_dir=args.data, out_dir=out / "finetune", init_checkpoint=out / "baseline/model.pt"
    )
    report["finetune_seconds"] = time.perf_counter() - start
    report["finetune_cpu_seconds"] = time.process_time() - cpu
    report["finetune_load1"] = os.getloadavg()[0]
    assert tuned is not None
    report["finetune_test_dice_before"] = tuned["test_before"]["dice"][1]
    report["finetune_test_dice_after"] = tuned["test_after"]["dice"][1]
    report["finetune_best_step"] = tuned["best_step"]
    report["finetune_metrics"] = [
        json.loads(line) for line in (out / "finetune/metrics.jsonl").read_text().splitlines() if "val_dice" in line
    ]

    for window in args.windows:
        dice, seconds = evaluate(out / "finetune/model.pt", args.data, window)
        report[f"eval50_window{window}"] = {"dice": dice, "seconds": seconds, "load1": os.getloadavg()[0]}
    text = json.dumps(report, indent=2)
    (out / "recipe_report.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
