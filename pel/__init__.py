"""PEL Tune's ML core: the PointWise Exponential Loss, a U-Net, data, patches, inference, metrics and training.

The names below are the supported public API; the submodules hold the details.
"""

from pel.checkpoint import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint, save_checkpoint
from pel.data import (
    DatasetError,
    DatasetIndex,
    Sample,
    extract_archive,
    load_split,
    num_classes_for,
    open_dataset,
)
from pel.distributed import DistInfo
from pel.inference import sliding_window_predict
from pel.losses import CompoundLoss, PELLoss, dice_loss, pel_loss, pel_normalised
from pel.metrics import SegmentationMetrics, confusion_counts
from pel.models import UNet, UNetConfig
from pel.patches import crop, grid_positions, pad_to_min, random_positions
from pel.train import TrainConfig, train

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
