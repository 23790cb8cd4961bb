"""Test data builders: small datasets, archives and checkpoints (all real files, nothing mocked)."""

from __future__ import annotations

import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image


def make_dataset(
    root: Path,
    *,
    n: int = 6,
    size: tuple[int, int] = (48, 64),
    seed: int = 0,
    splits: dict[str, list[int]] | None = None,
) -> Path:
    """images/ + masks/ of n synthetic 8-bit grey images with bright discs (instance-labelled masks).

    ``splits`` maps split names to image indices; by default 4/1/1 (or as close as n allows) in splits.json.
    """
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    ids = [f"img{i:02d}" for i in range(n)]
    for image_id in ids:
        labels = np.zeros((h, w), np.uint16)
        for label in range(1, 4):
            cy, cx, r = rng.integers(6, h - 6), rng.integers(6, w - 6), rng.integers(3, 6)
            labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = label
        image = 30 + 170 * (labels > 0) + rng.normal(0, 10, (h, w))
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "images" / f"{image_id}.png")
        Image.fromarray(labels).save(root / "masks" / f"{image_id}.png")
    if splits is None:
        splits = {"train": list(range(max(1, n - 2))), "val": [n - 2], "test": [n - 1]} if n >= 3 else None
    if splits is not None:
        (root / "splits.json").write_text(json.dumps({k: [ids[i] for i in v] for k, v in splits.items()}))
    return root


def make_archive(folder: Path, dest: Path) -> Path:
    """Pack folder (as a top-level directory) into dest: .zip, .tar or .tar.gz by dest's name."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.name.endswith(".zip"):
        with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(folder.rglob("*")):
                archive.write(path, Path(folder.name) / path.relative_to(folder))
    else:
        mode = "w:gz" if dest.name.endswith((".tar.gz", ".tgz")) else "w"
        with tarfile.open(dest, mode) as archive:
            archive.add(folder, arcname=folder.name)
    return dest


def make_checkpoint(path: Path, *, width: int = 4, depth: int = 1, in_channels: int = 1, out_channels: int = 2) -> Path:
    """A real PEL Tune checkpoint of a tiny (randomly initialised) U-Net."""
    import torch

    from pel.checkpoint import save_checkpoint
    from pel.models import UNet, UNetConfig

    torch.manual_seed(0)
    model = UNet(UNetConfig(in_channels=in_channels, out_channels=out_channels, width=width, depth=depth))
    save_checkpoint(path, model, meta={"made_by": "tests"})
    return path


def make_foreign_torch_file(path: Path) -> Path:
    """A genuine torch.save zip (it passes the API's format check) that is not a PEL Tune checkpoint."""
    import torch

    torch.save({"weights": torch.zeros(3), "note": "not a pel-tune checkpoint"}, path)
    return path


def copy_bbbc039_subset(source: Path, dest: Path, *, train: int, val: int, test: int) -> tuple[Path, list[str]]:
    """Copy the first pairs of BBBC039's own train/val/test splits into dest with a matching splits.json.

    Returns (dest, the test ids). Real microscopy (16-bit nuclei images with instance masks), just fewer of them.
    """
    splits = json.loads((source / "splits.json").read_text())
    chosen = {"train": splits["train"][:train], "val": splits["val"][:val], "test": splits["test"][:test]}
    for sub in ("images", "masks"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
    for ids in chosen.values():
        for image_id in ids:
            for sub in ("images", "masks"):
                (matches,) = list((source / sub).glob(f"{image_id}.*"))
                shutil.copy2(matches, dest / sub / matches.name)
    (dest / "splits.json").write_text(json.dumps(chosen, indent=1))
    return dest, chosen["test"]
