"""Rank entry point that torchrun runs for one training job; it wraps :func:`pel.train.train`.

Launch (from the repository root; ``--init`` only for a fine-tune)::

    # 1 process (no process group; uses a GPU when one is visible)
    python -m worker.train_entry --config cfg.json --dataset DATA_DIR --out OUT_DIR [--init model.pt]

    # N CPU ranks (gloo), here 2, each with cpu_count // 2 threads
    python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        -m worker.train_entry --config cfg.json --dataset DATA_DIR --out OUT_DIR [--init model.pt]

    # N GPUs on one host (NCCL, one GPU per rank by LOCAL_RANK), here 4
    python -m torch.distributed.run --standalone --nproc-per-node 4 \\
        -m worker.train_entry --config cfg.json --dataset DATA_DIR --out OUT_DIR [--init model.pt]

``cfg.json`` holds a ``TrainConfig`` dict (unknown keys are an error). Each rank uses
max(1, CPUs // LOCAL_WORLD_SIZE) torch threads; the environment variable ``PELTUNE_THREADS`` overrides that.
Outputs (rank 0): ``metrics.jsonl``, ``model.pt``, ``summary.json``; on failure every rank writes
``error-rank{rank}.txt`` and the process exits with status 1. This module imports nothing from ``api``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

import torch

from pel.config import TrainConfig
from pel.train import train


def thread_count() -> int:
    """Threads for this rank: the CPUs this process may use, shared among the ranks on this host."""
    override = os.environ.get("PELTUNE_THREADS")
    if override:
        try:
            value = int(override)
        except ValueError:
            raise ValueError(f"PELTUNE_THREADS must be a positive integer, got {override!r}") from None
        if value < 1:
            raise ValueError(f"PELTUNE_THREADS must be a positive integer, got {override!r}")
        return value
    # The affinity mask, not os.cpu_count(), is what a container or taskset actually grants.
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cpus // max(1, ranks_here))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m worker.train_entry", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="JSON file with a TrainConfig dict")
    parser.add_argument("--dataset", type=Path, required=True, help="dataset folder with images/ and masks/")
    parser.add_argument("--out", type=Path, required=True, help="output folder (rank 0 writes here)")
    parser.add_argument("--init", type=Path, default=None, help="init checkpoint (model.pt) for a fine-tune")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = os.environ.get("RANK", "0")
    try:
        torch.set_num_threads(thread_count())
        config = TrainConfig.from_dict(json.loads(args.config.read_text()))
    except Exception as exc:
        # train() writes the error file for its own failures; failures before it are reported the same way.
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"error-rank{rank}.txt").write_text(f"{type(exc).__name__}: {exc}\n")
        traceback.print_exc()
        return 1
    try:
        train(config, dataset_dir=args.dataset, out_dir=args.out, init_checkpoint=args.init)
    except Exception:
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
