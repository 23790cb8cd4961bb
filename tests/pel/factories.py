"""Helpers that write small datasets for the pel tests: synthetic PIL/tifffile folders and real BBBC039 subsets."""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image


def blobs_mask(shape: tuple[int, int], centres: list[tuple[int, int]], radius: int) -> np.ndarray:
    """Instance labels 1..N: discs of ``radius`` at ``centres`` (later discs overwrite earlier ones)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, dtype=np.uint16)
    for i, (cy, cx) in enumerate(centres, start=1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = i
    return labels


def write_png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array, mode=mode) if mode else Image.fromarray(array)
    image.save(path)
    return path


def write_blank_png(path: Path, height: int, width: int) -> Path:
    """A valid, all-black 1-bit PNG of height × width, written chunk by chunk without holding the pixels: a
    decompression bomb (10000×10000 is 100M pixels in about 12 KB)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the packed bits
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


def write_tiff(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, array)
    return path


def synthetic_dataset(
    root: Path,
    ids: list[str],
    *,
    shape: tuple[int, int] = (40, 48),
    rgb: bool = False,
    splits: dict[str, list[str]] | None = None,
) -> Path:
    """A folder of bright discs on a dark background: 16-bit grey (or 8-bit RGB) images and instance masks."""
    rng = np.random.default_rng(0)
    for k, sample_id in enumerate(ids):
        centres = [(10 + 3 * k % 20, 12), (25, 30)]
        labels = blobs_mask(shape, centres, radius=6)
        signal = (labels > 0) * 3000.0 + rng.normal(300, 30, shape)
        if rgb:
            grey = np.clip(signal / 16, 0, 255).astype(np.uint8)
            write_png(root / "images" / f"{sample_id}.png", np.stack([grey, grey // 2, grey], axis=-1))
        else:
            write_png(root / "images" / f"{sample_id}.png", signal.astype(np.uint16))
        write_png(root / "masks" / f"{sample_id}.png", labels)
    if splits is not None:
        (root / "splits.json").write_text(json.dumps(splits))
    return root


def real_subset(src: Path, dest: Path, counts: dict[str, int]) -> tuple[Path, dict[str, list[str]]]:
    """Copy the first ``counts[split]`` pairs of each BBBC039 split into ``dest`` with a matching splits.json."""
    source_splits = json.loads((src / "splits.json").read_text())
    splits = {split: source_splits[split][:n] for split, n in counts.items()}
    for folder in ("images", "masks"):
        (dest / folder).mkdir(parents=True, exist_ok=True)
    for ids in splits.values():
        for sample_id in ids:
            for folder in ("images", "masks"):
                shutil.copy(src / folder / f"{sample_id}.png", dest / folder / f"{sample_id}.png")
    (dest / "splits.json").write_text(json.dumps(splits))
    return dest, splits
