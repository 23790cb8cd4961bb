"""Segmentation datasets on disk: ``images/`` and ``masks/`` paired by file stem, plus an optional ``splits.json``.

Images are PNG or TIFF, 8- or 16-bit, grey or RGB(A); each is scaled per image from its 1st–99.8th percentile to
[0, 1] (one range for all channels so colours keep their balance). Masks are instance or class label images and
become training targets: ``"binary"`` (0 background, 1 foreground) or ``"boundary"`` (0 background, 1 interior,
2 the one-pixel rim of each instance, which separates touching nuclei).
"""

from __future__ import annotations

import json
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import numpy as np
import tifffile
from PIL import Image

__all__ = [
    "DatasetError",
    "DatasetIndex",
    "IMAGE_SUFFIXES",
    "SPLITS",
    "Sample",
    "TARGETS",
    "extract_archive",
    "load_split",
    "make_target",
    "normalise_image",
    "num_classes_for",
    "open_dataset",
    "read_image",
    "read_mask",
]

IMAGE_SUFFIXES = (".png", ".tif", ".tiff")
SPLITS = ("train", "val", "test")
TARGETS = ("binary", "boundary")
_TIFF_SUFFIXES = (".tif", ".tiff")
_MAX_NAMES = 10
_DEFAULT_SPLIT_SEED = 0
_LOW_PERCENTILE, _HIGH_PERCENTILE = 1.0, 99.8
# Archive bomb limits (the API passes its own settings): total uncompressed bytes and number of members.
MAX_ARCHIVE_BYTES = 8 * 1024**3
MAX_ARCHIVE_MEMBERS = 200_000


class DatasetError(ValueError):
    """The dataset cannot be used as given; the message names the problem and the file(s)."""


@dataclass(frozen=True)
class DatasetIndex:
    """What :func:`open_dataset` found: ids (sorted file stems), the splits and the paired file paths.

    ``channels`` is the image channel count shared by every image (1 for grey, 3 for RGB); ``min_size`` is the
    smallest height and the smallest width over all images (a training patch must fit in both).
    """

    root: Path
    ids: list[str]
    splits: dict[str, list[str]]
    image_paths: dict[str, Path]
    mask_paths: dict[str, Path]
    channels: int = 1
    min_size: tuple[int, int] = (0, 0)


@dataclass
class Sample:
    """One loaded pair: ``image`` (C, H, W) float32 in [0, 1] and ``mask`` (H, W) int64 target classes;
    ``instances`` (H, W) int32 holds the mask file's own labels (nuclei ids) when asked for, for object metrics."""

    id: str
    image: np.ndarray
    mask: np.ndarray = field(repr=False)
    instances: np.ndarray | None = field(default=None, repr=False)


def num_classes_for(target: str) -> int:
    """Number of output classes (background included) a model needs for ``target``."""
    if target == "binary":
        return 2
    if target == "boundary":
        return 3
    raise ValueError(f"unknown target {target!r} (expected one of {', '.join(TARGETS)})")


def open_dataset(
    root: str | Path,
    *,
    verify: bool = False,
    num_classes: int | None = None,
    max_image_pixels: int | None = None,
) -> DatasetIndex:
    """Index the dataset at ``root`` and check it can be trained on, reading only the file headers.

    Raises :class:`DatasetError` for a missing ``images/`` or ``masks/`` folder, no images, unsupported or
    unreadable files, images without masks (or masks without images), image/mask size mismatches, images with
    different channel counts, a malformed ``splits.json`` (including ids it names that do not exist) and an empty
    train, val or test split (from ``splits.json``, or from the default split of fewer than 3 images).

    With ``verify=True`` every image and mask is also decoded once, as :func:`load_split` reads them, so
    truncated or corrupt pixel data and invalid mask values (negative, non-integer or NaN labels) are caught
    here rather than when a job loads the split; the error names the file and the problem. ``num_classes``
    declares the masks as class label images (labels 0 to num_classes - 1): a label outside that range is an
    error naming the file and the labels (checked with ``verify``; without a declaration masks are instance
    labels and any non-negative integer is valid).

    An image or mask whose header declares more than ``max_image_pixels`` pixels (height × width; None: no
    limit; the service passes Settings.max_image_pixels) is refused before anything is decoded: decoding it would
    need gigabytes of memory, and a decompression bomb compresses a huge blank image to kilobytes.
    """
    if num_classes is not None and num_classes < 2:
        raise DatasetError(f"num_classes must be at least 2 (background and one class), got {num_classes}")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}")
    folders = {name: root / name for name in ("images", "masks")}
    for name, folder in folders.items():
        if not folder.is_dir():
            raise DatasetError(f"dataset {root} has no {name}/ folder (expected images/ and masks/ side by side)")
    image_paths = _list_files(folders["images"], root)
    mask_paths = _list_files(folders["masks"], root)
    if not image_paths:
        raise DatasetError(f"empty dataset: no PNG or TIFF images in {folders['images']}")

    without_mask = sorted(set(image_paths) - set(mask_paths))
    if without_mask:
        raise DatasetError(
            f"{len(without_mask)} image(s) in {folders['images']} have no mask in {folders['masks']} "
            f"(paired by file name without extension): {_names(image_paths[i].name for i in without_mask)}"
        )
    without_image = sorted(set(mask_paths) - set(image_paths))
    if without_image:
        raise DatasetError(
            f"{len(without_image)} mask(s) in {folders['masks']} have no image in {folders['images']}: "
            f"{_names(mask_paths[i].name for i in without_image)}"
        )

    ids = sorted(image_paths)
    channels: dict[int, list[str]] = {}
    sizes: list[tuple[int, int]] = []
    for sample_id in ids:
        image_size, image_channels = _probe(image_paths[sample_id], max_pixels=max_image_pixels)
        mask_size, mask_channels = _probe(mask_paths[sample_id], mask=True, max_pixels=max_image_pixels)
        if mask_channels != 1:
            raise DatasetError(
                f"mask {mask_paths[sample_id]} has {mask_channels} channels; masks must be single-channel label images"
            )
        if image_size != mask_size:
            raise DatasetError(
                f"image/mask size mismatch for {sample_id!r}: {image_paths[sample_id]} is {_hw(image_size)} but "
                f"{mask_paths[sample_id]} is {_hw(mask_size)}"
            )
        channels.setdefault(image_channels, []).append(image_paths[sample_id].name)
        sizes.append(image_size)
    if len(channels) > 1:
        detail = "; ".join(f"{c} channel(s): {_names(names)}" for c, names in sorted(channels.items()))
        raise DatasetError(f"images in {folders['images']} have different channel counts ({detail})")

    splits = _read_splits(root, ids)
    if verify:
        for sample_id in ids:
            _verify_pair(sample_id, image_paths[sample_id], mask_paths[sample_id], num_classes)
    return DatasetIndex(
        root=root,
        ids=ids,
        splits=splits,
        image_paths=image_paths,
        mask_paths=mask_paths,
        channels=next(iter(channels)),
        min_size=(min(h for h, _ in sizes), min(w for _, w in sizes)),
    )


def load_split(
    index: DatasetIndex, split: str, target: str = "binary", *, with_instances: bool = False
) -> list[Sample]:
    """Load and normalise the images of ``split`` (in the split's order) with their ``target`` masks, and with
    the mask files' instance labels when ``with_instances`` (evaluation splits only: they cost memory)."""
    num_classes_for(target)  # validates the target name before any file is read
    if split not in index.splits:
        raise DatasetError(f"unknown split {split!r} (the dataset has {', '.join(index.splits)})")
    samples = []
    for sample_id in index.splits[split]:
        image = normalise_image(read_image(index.image_paths[sample_id]))
        labels = read_mask(index.mask_paths[sample_id])
        if image.shape[1:] != labels.shape:
            raise DatasetError(
                f"image/mask size mismatch for {sample_id!r}: {index.image_paths[sample_id]} is "
                f"{_hw(image.shape[1:])} but {index.mask_paths[sample_id]} is {_hw(labels.shape)}"
            )
        instances = labels.astype(np.int32) if with_instances else None
        samples.append(Sample(id=sample_id, image=image, mask=make_target(labels, target), instances=instances))
    return samples


def read_image(path: Path) -> np.ndarray:
    """Read an image file as (C, H, W) in its stored dtype: grey → 1 channel, RGB and RGBA (alpha dropped) → 3."""
    array = _read_array(path)
    if array.ndim == 2:
        return array[None]
    if array.ndim == 3:
        if array.shape[-1] in (3, 4) and array.shape[0] not in (1, 3, 4):
            return np.moveaxis(array[..., :3], -1, 0)
        if array.shape[0] in (1, 3, 4):  # TIFF stored channels-first
            return array[:3] if array.shape[0] == 4 else array
        if array.shape[-1] == 1:
            return np.moveaxis(array, -1, 0)
    raise DatasetError(f"unsupported image shape {array.shape} in {path} (expected H×W, H×W×3/4 or 3×H×W)")


def read_mask(path: Path) -> np.ndarray:
    """Read a label image as (H, W) int64; labels must be non-negative integers."""
    array = _read_array(path, mask=True)
    if array.ndim == 3 and 1 in (array.shape[0], array.shape[-1]):
        array = array.reshape(array.shape[1:] if array.shape[0] == 1 else array.shape[:-1])
    if array.ndim != 2:
        raise DatasetError(f"mask {path} has shape {array.shape}; masks must be single-channel label images")
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise DatasetError(f"mask {path} holds non-integer values; masks must be integer labels")
    elif array.dtype.kind not in "biu":
        raise DatasetError(f"mask {path} has unsupported data type {array.dtype}")
    labels = array.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise DatasetError(f"mask {path} holds negative labels; labels must be 0 (background) or positive")
    return labels


def normalise_image(image: np.ndarray) -> np.ndarray:
    """Scale (C, H, W) so the 1st–99.8th percentile range maps to [0, 1], clipped; a flat image becomes zeros."""
    values = image.astype(np.float32)
    low, high = np.percentile(values, [_LOW_PERCENTILE, _HIGH_PERCENTILE])
    if not high > low:
        return np.zeros_like(values)
    return np.clip((values - low) / (high - low), 0.0, 1.0, out=values)


def make_target(labels: np.ndarray, target: str) -> np.ndarray:
    """Turn an instance/class label image into ``target`` classes (int64, same shape)."""
    foreground = labels > 0
    if target == "binary":
        return foreground.astype(np.int64)
    if target != "boundary":
        raise ValueError(f"unknown target {target!r} (expected one of {', '.join(TARGETS)})")
    # A foreground pixel is on the boundary when a 4-neighbour carries another label (background included).
    # Edge padding keeps objects cut by the image border from gaining a rim along the border itself.
    padded = np.pad(labels, 1, mode="edge")
    centre = padded[1:-1, 1:-1]
    differs = (
        (padded[:-2, 1:-1] != centre)
        | (padded[2:, 1:-1] != centre)
        | (padded[1:-1, :-2] != centre)
        | (padded[1:-1, 2:] != centre)
    )
    out = foreground.astype(np.int64)
    out[foreground & differs] = 2
    return out


def extract_archive(
    archive: str | Path,
    dest: str | Path,
    *,
    max_bytes: int = MAX_ARCHIVE_BYTES,
    max_members: int = MAX_ARCHIVE_MEMBERS,
) -> Path:
    """Unpack the dataset in a zip or tar(.gz/.bz2/.xz) ``archive`` into ``dest``; return the folder holding
    images/ and masks/.

    Every member is checked before anything is written: absolute paths, ``..`` components, symbolic or hard
    links and special files raise :class:`DatasetError` naming the member, and nothing is extracted. So does an
    archive with no dataset in it: the member names must show one folder holding both images/ and masks/. Only
    what the dataset uses is written (the files directly in that folder's images/ and masks/,
    and its splits.json); other members (notes, ``__MACOSX``, other folders) never touch the disk. So do
    archive bombs: more than ``max_members`` members, or sizes of the members to write adding up to more than
    ``max_bytes`` uncompressed (the sizes the archive declares; the bytes written are counted too, and extraction
    stops at the cap should a member expand past its declared size).
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise DatasetError(f"archive not found: {archive}")
    dest.mkdir(parents=True, exist_ok=True)
    limits = _Limits(archive, max_bytes, max_members)
    if zipfile.is_zipfile(archive):
        root = _extract_zip(archive, dest, limits)
    elif tarfile.is_tarfile(archive):
        root = _extract_tar(archive, dest, limits)
    else:
        raise DatasetError(f"{archive} is not a zip or tar archive")
    root_dir = dest.joinpath(*root)
    for name in ("images", "masks"):  # possibly empty: open_dataset names that problem
        (root_dir / name).mkdir(parents=True, exist_ok=True)
    return root_dir


@dataclass
class _Limits:
    """The archive bomb caps, and the bytes written so far."""

    archive: Path
    max_bytes: int
    max_members: int
    written: int = 0

    def check_members(self, count: int) -> None:
        if count > self.max_members:
            raise DatasetError(
                f"{self.archive}: too many members (more than {self.max_members}); the limit is {self.max_members}"
            )

    def check_declared(self, total: int) -> None:
        if total > self.max_bytes:
            raise DatasetError(
                f"{self.archive}: expands to {total} bytes, more than the limit of {self.max_bytes} bytes "
                "(archive bomb?); nothing was extracted"
            )

    def copy(self, src: BinaryIO, out: BinaryIO) -> None:
        """Copy one member, stopping as soon as the total would pass the cap (whatever the header said)."""
        while chunk := src.read(1 << 20):
            self.written += len(chunk)
            if self.written > self.max_bytes:
                raise DatasetError(
                    f"{self.archive}: expands to more than the limit of {self.max_bytes} bytes (archive bomb?)"
                )
            out.write(chunk)


def _extract_zip(archive: Path, dest: Path, limits: _Limits) -> tuple[str, ...]:
    member = None
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            limits.check_members(len(members))
            for info in members:
                _check_member_name(archive, info.filename)
                mode = info.external_attr >> 16  # Unix mode when the archiver recorded one; the type bits may be 0
                if stat.S_ISLNK(mode):
                    raise DatasetError(f"{archive}: member {info.filename!r} is a symbolic link; links are not allowed")
                if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                    raise DatasetError(f"{archive}: member {info.filename!r} is not a regular file or folder")
            names, is_file = [info.filename for info in members], [not info.is_dir() for info in members]
            root, keep = _dataset_members(archive, names, is_file)
            files = [info for info, kept in zip(members, keep, strict=True) if kept]
            limits.check_declared(sum(info.file_size for info in files))
            for info in files:
                member = info.filename
                target = dest.joinpath(*_parts(info.filename))
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as out:
                    limits.copy(src, out)
            return root
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError) as exc:
        # A file and a folder with the same name (FileExistsError, NotADirectoryError...), a damaged member
        # ("Bad CRC-32", zlib errors, truncation), an unsupported compression method or an encrypted member.
        where = f"cannot extract member {member!r}" if member is not None else "cannot read the zip archive"
        raise DatasetError(f"{archive}: {where} ({type(exc).__name__}: {exc})") from None


def _extract_tar(archive: Path, dest: Path, limits: _Limits) -> tuple[str, ...]:
    try:
        with tarfile.open(archive) as tf:
            members = []
            for member in tf:  # not getmembers(): stop reading the headers as soon as there are too many
                members.append(member)
                limits.check_members(len(members))
            for member in members:
                _check_member_name(archive, member.name)
                if member.issym() or member.islnk():
                    raise DatasetError(
                        f"{archive}: member {member.name!r} is a {'symbolic' if member.issym() else 'hard'} link; "
                        "links are not allowed"
                    )
                if not (member.isfile() or member.isdir()):
                    raise DatasetError(f"{archive}: member {member.name!r} is not a regular file or folder")
            names, is_file = [member.name for member in members], [member.isfile() for member in members]
            root, keep = _dataset_members(archive, names, is_file)
            files = [member for member, kept in zip(members, keep, strict=True) if kept]
            limits.check_declared(sum(member.size for member in files))
            for member in files:
                target = dest.joinpath(*_parts(member.name))
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tf.extractfile(member)
                assert src is not None  # regular files always have data
                with src, open(target, "wb") as out:
                    limits.copy(src, out)
            return root
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DatasetError(f"{archive}: cannot read the tar archive ({type(exc).__name__}: {exc})") from None


def _parts(name: str) -> list[str]:
    return [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]


def _check_member_name(archive: Path, name: str) -> None:
    normalised = name.replace("\\", "/")
    if normalised.startswith("/") or PurePosixPath(normalised).is_absolute() or (len(name) > 1 and name[1] == ":"):
        raise DatasetError(f"{archive}: member {name!r} has an absolute path; archives must hold relative paths")
    if ".." in normalised.split("/"):
        raise DatasetError(f"{archive}: member {name!r} contains '..'; archives must not point outside themselves")


def _dataset_members(archive: Path, names: list[str], is_file: list[bool]) -> tuple[tuple[str, ...], list[bool]]:
    """From the member names alone, before anything is written: the folder (as path parts) holding images/ and
    masks/, and for each member whether to write it: the files directly in that images/ and masks/ (not hidden)
    and its splits.json, all that open_dataset reads. A zip bomb without a dataset layout is thus refused without
    a byte written to scratch, and members the dataset does not use are never written."""
    parts = [tuple(_parts(name)) for name in names]
    found: dict[tuple[str, ...], set[str]] = {}
    for path in parts:
        if "__MACOSX" not in path:
            for i, part in enumerate(path):
                if part in ("images", "masks"):
                    found.setdefault(path[:i], set()).add(part)
    roots = sorted(folder for folder, kinds in found.items() if len(kinds) == 2)
    if not roots:
        raise DatasetError(f"{archive}: no folder in the archive holds both images/ and masks/; nothing was extracted")
    if len(roots) > 1:
        shown = _names("/".join(root) or "." for root in roots)
        raise DatasetError(f"{archive}: several folders hold images/ and masks/ ({shown}); upload one dataset")
    root = roots[0]
    used = {(*root, "images"), (*root, "masks")}
    keep = [
        file and ((path[:-1] in used and not path[-1].startswith(".")) or path == (*root, "splits.json"))
        for path, file in zip(parts, is_file, strict=True)
    ]
    return root, keep


def _list_files(folder: Path, root: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    unsupported = []
    inside = root.resolve()
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue  # hidden files such as .DS_Store or macOS "._x.png" resource forks
        if not path.resolve().is_relative_to(inside):
            # A link out of the dataset would let a registration read any file the service can (its own
            # database, another tenant's objects): only files that really lie in the dataset folder are read.
            raise DatasetError(f"{folder.name}/{path.name} links outside the dataset folder; copy the file in instead")
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            unsupported.append(path.name)
            continue
        if path.stem in files:
            raise DatasetError(f"{folder}: two files share the id {path.stem!r}: {files[path.stem].name}, {path.name}")
        files[path.stem] = path
    if unsupported:
        raise DatasetError(f"{folder}: unsupported file type (PNG or TIFF expected): {_names(unsupported)}")
    return files


def _probe(path: Path, *, mask: bool = False, max_pixels: int | None = None) -> tuple[tuple[int, int], int]:
    """(H, W) and channel count from the file header, without decoding the pixels; refuses an image of more
    than ``max_pixels`` pixels."""
    size, channels = _probe_header(path, mask)
    if max_pixels is not None and size[0] * size[1] > max_pixels:
        raise DatasetError(
            f"{'mask' if mask else 'image'} {path} is {_hw(size)} ({size[0] * size[1]} pixels), more than the "
            f"limit of {max_pixels} pixels per image (PELTUNE_MAX_IMAGE_PIXELS); nothing was decoded"
        )
    return size, channels


def _probe_header(path: Path, mask: bool) -> tuple[tuple[int, int], int]:
    try:
        if path.suffix.lower() in _TIFF_SUFFIXES:
            with tifffile.TiffFile(path) as tif:
                shape = tuple(tif.series[0].shape)
        else:
            with Image.open(path) as im:
                width, height = im.size
                bands = len(im.getbands())
                channels = 3 if (im.mode == "P" and not mask) or bands >= 3 else 1
                return (height, width), channels
    except Exception as exc:
        raise DatasetError(f"unreadable file {path}: {type(exc).__name__}: {exc}") from None
    if len(shape) == 2:
        return (shape[0], shape[1]), 1
    if len(shape) == 3 and shape[-1] in (1, 3, 4) and shape[0] not in (1, 3, 4):
        return (shape[0], shape[1]), min(shape[-1], 3)
    if len(shape) == 3 and shape[0] in (1, 3, 4):
        return (shape[1], shape[2]), min(shape[0], 3)
    raise DatasetError(f"unsupported image shape {shape} in {path} (expected H×W, H×W×3/4 or 3×H×W)")


def _read_array(path: Path, *, mask: bool = False) -> np.ndarray:
    try:
        if path.suffix.lower() in _TIFF_SUFFIXES:
            return np.asarray(tifffile.imread(path))
        with Image.open(path) as im:
            if im.mode == "P":
                # Palette PNGs are colour images, but for a mask the palette index is the label.
                return np.asarray(im) if mask else np.asarray(im.convert("RGB"))
            if im.mode in ("1", "LA"):
                return np.asarray(im.convert("L"))
            if im.mode == "I;16B":
                return np.asarray(im).astype(np.uint16)
            return np.asarray(im)
    except Exception as exc:
        raise DatasetError(f"unreadable file {path}: {type(exc).__name__}: {exc}") from None


def _verify_pair(sample_id: str, image_path: Path, mask_path: Path, num_classes: int | None = None) -> None:
    """Decode one pair as :func:`load_split` does (the readers raise for bad pixels and labels); compare sizes
    and, when classes are declared, the label range."""
    image = read_image(image_path)
    labels = read_mask(mask_path)
    if image.shape[1:] != labels.shape:
        raise DatasetError(
            f"image/mask size mismatch for {sample_id!r}: {image_path} is {_hw(image.shape[1:])} but "
            f"{mask_path} is {_hw(labels.shape)}"
        )
    if num_classes is not None and labels.size and labels.max() >= num_classes:
        outside = np.unique(labels[labels >= num_classes])
        raise DatasetError(
            f"mask {mask_path} holds label(s) {_names(outside.tolist())} outside the declared classes "
            f"0..{num_classes - 1} (num_classes={num_classes})"
        )


def _read_splits(root: Path, ids: list[str]) -> dict[str, list[str]]:
    path = root / "splits.json"
    if not path.is_file():
        splits = _default_splits(ids)
        for split in SPLITS:
            if not splits[split]:
                raise DatasetError(
                    f'dataset {root} has only {len(ids)} image(s), so the default split leaves "{split}" empty; '
                    "train, val and test each need at least one image: add images (3 or more) or a splits.json "
                    'that sets them ({"train": [...], "val": [...], "test": [...]}, ids are file names '
                    "without extension)"
                )
        return splits
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path} must be an object with the lists {', '.join(SPLITS)}")
    known = set(ids)
    splits: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    for split in SPLITS:  # other keys (e.g. a "note") are ignored
        members = data.get(split)
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise DatasetError(f'{path}: "{split}" must be a list of image ids (file names without extension)')
        unknown = [m for m in members if m not in known]
        if unknown:
            raise DatasetError(
                f'{path}: "{split}" names {len(unknown)} id(s) with no image/mask pair: {_names(unknown)}'
            )
        for m in members:
            if m in seen:
                raise DatasetError(f'{path}: id {m!r} is listed in both "{seen[m]}" and "{split}"')
            seen[m] = split
        splits[split] = list(members)
    for split in SPLITS:
        if not splits[split]:
            raise DatasetError(
                f'{path}: "{split}" is empty; train, val and test each need at least one image id '
                f"(the dataset has {len(ids)} image(s)); list some in splits.json"
            )
    return splits


def _default_splits(ids: list[str]) -> dict[str, list[str]]:
    """Deterministic 70/15/15 split of a seeded shuffle of the sorted ids (rounded).

    With 3 or more ids every split gets at least one (val and test take ``max(1, round(0.15 n))`` each, train
    the rest: 3 → 1/1/1, 4 → 2/1/1, 6 → 4/1/1, 20 → 14/3/3); with 1 or 2 ids val and test are empty, which
    :func:`open_dataset` rejects.
    """
    order = [ids[i] for i in np.random.default_rng(_DEFAULT_SPLIT_SEED).permutation(len(ids))]
    n = len(order)
    n_val = max(1, round(0.15 * n)) if n >= 3 else 0
    n_test = max(1, round(0.15 * n)) if n >= 3 else 0
    n_train = n - n_val - n_test
    return {
        "train": order[:n_train],
        "val": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }


def _names(items: Iterable[object]) -> str:
    items = [str(i) for i in items]
    shown = ", ".join(items[:_MAX_NAMES])
    return shown + (f", ... ({len(items) - _MAX_NAMES} more)" if len(items) > _MAX_NAMES else "")


def _hw(shape: tuple[int, ...]) -> str:
    return f"{shape[0]}×{shape[1]}"
