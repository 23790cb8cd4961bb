"""Shared test set-up: thread pinning and the real-data location."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# These machines have 2 shared cores: more threads than that makes timings swing tenfold.
torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]


def real_data_root() -> Path:
    """Where the shared real datasets live (PELTUNE_DATA overrides ../shared/data beside the checkout)."""
    return Path(os.environ.get("PELTUNE_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def bbbc039_root() -> Path:
    root = real_data_root() / "bbbc039"
    if not (root / "images").is_dir():
        pytest.fail(f"real BBBC039 data not found at {root}; set PELTUNE_DATA to the folder holding bbbc039/")
    return root
