"""PEL Tune's ML core: the PointWise Exponential Loss, a U-Net, data, patches, inference, metrics and training.

The names below are the supported public API; the submodules hold the details.

Imports are lazy (PEP 562): ``import pel.config`` or ``import pel.data`` must not pull in torch, because the API
process validates job settings and datasets with them and ships without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CHECKPOINT_FORMAT": "pel.checkpoint",
    "CheckpointError": "pel.checkpoint",
    "load_checkpoint": "pel.checkpoint",
    "save_checkpoint": "pel.checkpoint",
    "TrainConfig": "pel.config",
    "UNetConfig": "pel.config",
    "DatasetError": "pel.data",
    "DatasetIndex": "pel.data",
    "Sample": "pel.data",
    "extract_archive": "pel.data",
    "load_split": "pel.data",
    "num_classes_for": "pel.data",
    "open_dataset": "pel.data",
    "DistInfo": "pel.distributed",
    "sliding_window_predict": "pel.inference",
    "CompoundLoss": "pel.losses",
    "PELLoss": "pel.losses",
    "dice_loss": "pel.losses",
    "pel_loss": "pel.losses",
    "pel_normalised": "pel.losses",
    "SegmentationMetrics": "pel.metrics",
    "confusion_counts": "pel.metrics",
    "UNet": "pel.models",
    "crop": "pel.patches",
    "grid_positions": "pel.patches",
    "pad_to_min": "pel.patches",
    "random_positions": "pel.patches",
    "train": "pel.train",
}

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "CompoundLoss",
    "DatasetError",
    "DatasetIndex",
    "DistInfo",
    "PELLoss",
    "Sample",
    "SegmentationMetrics",
    "TrainConfig",
    "UNet",
    "UNetConfig",
    "confusion_counts",
    "crop",
    "dice_loss",
    "extract_archive",
    "grid_positions",
    "load_checkpoint",
    "load_split",
    "num_classes_for",
    "open_dataset",
    "pad_to_min",
    "pel_loss",
    "pel_normalised",
    "random_positions",
    "save_checkpoint",
    "sliding_window_predict",
    "train",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pel' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
