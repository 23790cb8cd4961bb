"""Datasets: the real BBBC039 folder, image formats and normalisation, targets, errors and archive safety."""

from __future__ import annotations

import dataclasses
import io
import json
import stat
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pel.data import (
    DatasetError,
    extract_archive,
    load_split,
    make_target,
    normalise_image,
    num_classes_for,
    open_dataset,
)
from tests.factories import make_dataset
from tests.pel.factories import blobs_mask, synthetic_dataset, write_blank_png, write_png, write_tiff

# ---------------------------------------------------------------------------------------------------- real data


def test_real_bbbc039_index(bbbc039_root: Path) -> None:
    index = open_dataset(bbbc039_root)
    expected = json.loads((bbbc039_root / "splits.json").read_text())
    assert len(index.ids) == 200
    assert {k: len(v) for k, v in index.splits.items()} == {"train": 100, "val": 50, "test": 50}
    assert index.splits == {k: expected[k] for k in ("train", "val", "test")}  # the "note" key is ignored
    assert index.channels == 1
    assert all(index.image_paths[i].is_file() and index.mask_paths[i].is_file() for i in index.ids)


def test_real_bbbc039_samples(bbbc039_root: Path) -> None:
    index = open_dataset(bbbc039_root)
    ids = index.splits["test"][:2]
    samples = load_split(dataclasses.replace(index, splits={"test": ids}), "test")
    assert [s.id for s in samples] == ids
    for sample in samples:
        raw_image = np.asarray(Image.open(index.image_paths[sample.id]))
        raw_labels = np.asarray(Image.open(index.mask_paths[sample.id]))
        assert raw_image.dtype == np.uint16  # genuinely 16-bit input
        assert sample.image.shape == (1, 520, 696) and sample.image.dtype == np.float32
        assert sample.image.min() == 0.0 and sample.image.max() == 1.0
        # Percentile scaling: about 1% of the pixels clip at 0 and 0.2% at 1 (ties can add a little).
        assert 0.009 <= (sample.image == 0).mean() <= 0.05
        assert 0.0015 <= (sample.image == 1).mean() <= 0.01
        # Scaling is monotone: brighter raw pixels never become darker.
        order = np.argsort(raw_image.ravel(), kind="stable")
        assert np.all(np.diff(sample.image.ravel()[order]) >= 0)
        assert sample.mask.dtype == np.int64 and sample.mask.shape == (520, 696)
        np.testing.assert_array_equal(sample.mask, (raw_labels > 0).astype(np.int64))
        assert 0.05 < sample.mask.mean() < 0.5


def test_real_boundary_target(bbbc039_root: Path) -> None:
    index = open_dataset(bbbc039_root)
    sample_id = index.splits["train"][0]
    labels = np.asarray(Image.open(index.mask_paths[sample_id])).astype(np.int64)
    target = load_split(dataclasses.replace(index, splits={"train": [sample_id]}), "train", "boundary")[0].mask
    assert set(np.unique(target)) == {0, 1, 2}
    np.testing.assert_array_equal(target > 0, labels > 0)
    # Interior pixels have all four neighbours in their own instance; each instance has a rim.
    ys, xs = np.nonzero((target == 1)[1:-1, 1:-1])
    ys, xs = ys + 1, xs + 1
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        assert np.all(labels[ys + dy, xs + dx] == labels[ys, xs])
    rim_labels = set(np.unique(labels[target == 2]))
    assert rim_labels == set(np.unique(labels[labels > 0]))


# -------------------------------------------------------------------------------------------- targets, scaling


def test_boundary_separates_touching_instances() -> None:
    labels = np.zeros((7, 10), dtype=np.int64)
    labels[1:6, 1:5] = 1
    labels[1:6, 5:9] = 2  # touches instance 1 along a column
    target = make_target(labels, "boundary")
    assert np.all(target[1:6, 4] == 2) and np.all(target[1:6, 5] == 2)  # both sides of the contact
    assert np.all(target[2:5, 2:4] == 1) and np.all(target[2:5, 6:8] == 1)
    assert target[0, 0] == 0
    np.testing.assert_array_equal(make_target(labels, "binary"), (labels > 0).astype(np.int64))


def test_instance_cut_by_the_border_gets_no_rim_along_the_border() -> None:
    labels = np.zeros((6, 6), dtype=np.int64)
    labels[0:3, 0:3] = 4
    target = make_target(labels, "boundary")
    assert target[0, 0] == 1 and target[1, 1] == 1
    assert target[2, 0] == 2 and target[0, 2] == 2


def test_normalisation_maps_percentiles_to_unit_range() -> None:
    image = np.arange(1000, dtype=np.uint16).reshape(1, 25, 40)
    out = normalise_image(image)
    # numpy's linear percentiles of 0..999: 1st = 9.99, 99.8th = 997.002.
    assert out.dtype == np.float32
    assert out.ravel()[500] == pytest.approx((500 - 9.99) / (997.002 - 9.99), rel=1e-5)
    assert out.ravel()[5] == 0.0 and out.ravel()[999] == 1.0
    assert np.all(normalise_image(np.full((1, 4, 4), 7, np.uint8)) == 0)  # flat image, no division by zero


def test_num_classes_for() -> None:
    assert num_classes_for("binary") == 2
    assert num_classes_for("boundary") == 3
    with pytest.raises(ValueError, match="unknown target 'instances'"):
        num_classes_for("instances")


# ------------------------------------------------------------------------------------------------- file formats


def _one_per_split(root: Path) -> None:
    """Copy the pair ``a`` to ``b`` and ``c`` and write a splits.json with a in train, b in val and c in test."""
    for folder in ("images", "masks"):
        (source,) = (root / folder).glob("a.*")
        for copy in ("b", "c"):
            (root / folder / f"{copy}{source.suffix}").write_bytes(source.read_bytes())
    (root / "splits.json").write_text(json.dumps({"train": ["a"], "val": ["b"], "test": ["c"]}))


def test_png_and_tiff_formats(tmp_path: Path) -> None:
    labels = blobs_mask((20, 30), [(10, 10)], 4)
    grey16 = (labels > 0).astype(np.uint16) * 4000 + 100
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[..., 0] = 200  # red only: channel order must survive
    rgba = np.concatenate([rgb, np.full((20, 30, 1), 255, np.uint8)], axis=-1)
    write_png(tmp_path / "grey16/images/a.png", grey16)
    write_png(tmp_path / "grey8/images/a.png", (grey16 // 20).astype(np.uint8))
    write_png(tmp_path / "rgb/images/a.png", rgb)
    write_png(tmp_path / "rgba/images/a.png", rgba, mode="RGBA")
    write_tiff(tmp_path / "tif16/images/a.tif", grey16)
    write_tiff(tmp_path / "tifrgb/images/a.tiff", rgb)
    for name in ("grey16", "grey8", "rgb", "rgba"):
        write_png(tmp_path / name / "masks/a.png", labels)
    write_tiff(tmp_path / "tif16/masks/a.tif", labels)
    write_tiff(tmp_path / "tifrgb/masks/a.tiff", labels.astype(np.int32))

    expected_channels = {"grey16": 1, "grey8": 1, "rgb": 3, "rgba": 3, "tif16": 1, "tifrgb": 3}
    for name, channels in expected_channels.items():
        root = tmp_path / name
        _one_per_split(root)
        index = open_dataset(root, verify=True)
        assert index.channels == channels, name
        (sample,) = load_split(index, "train")
        assert sample.image.shape == (channels, 20, 30), name
        assert sample.image.dtype == np.float32
        np.testing.assert_array_equal(sample.mask, (labels > 0).astype(np.int64))
        if channels == 1:
            assert sample.image[0, 10, 10] == 1.0 and sample.image[0, 0, 0] == 0.0, name
        else:
            assert np.all(sample.image[0] == 1.0) and np.all(sample.image[1:] == 0.0), name


def test_default_split_is_deterministic_70_15_15(tmp_path: Path) -> None:
    ids = [f"img{i:02d}" for i in range(20)]
    root = synthetic_dataset(tmp_path, ids, shape=(8, 8))
    first, second = open_dataset(root), open_dataset(root)
    assert first.splits == second.splits
    assert [len(first.splits[s]) for s in ("train", "val", "test")] == [14, 3, 3]
    assert sorted(sum(first.splits.values(), [])) == ids


# ------------------------------------------------------------------------------------------------------- errors


def _pair(root: Path, name: str, shape: tuple[int, int] = (8, 8), mask_shape: tuple[int, int] | None = None) -> None:
    write_png(root / "images" / f"{name}.png", np.full(shape, 100, np.uint8))
    write_png(root / "masks" / f"{name}.png", np.zeros(mask_shape or shape, np.uint8))


def test_missing_folders(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="dataset folder not found"):
        open_dataset(tmp_path / "nowhere")
    (tmp_path / "masks").mkdir()
    with pytest.raises(DatasetError, match=r"has no images/ folder"):
        open_dataset(tmp_path)
    (tmp_path / "masks").rmdir()
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError, match=r"has no masks/ folder"):
        open_dataset(tmp_path)


def test_empty_dataset(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "images" / ".DS_Store").write_bytes(b"\0")  # hidden files are ignored, not counted
    with pytest.raises(DatasetError, match="empty dataset: no PNG or TIFF images in"):
        open_dataset(tmp_path)


def test_images_without_masks_are_named(tmp_path: Path) -> None:
    _pair(tmp_path, "ok")
    write_png(tmp_path / "images" / "lonely1.png", np.zeros((8, 8), np.uint8))
    write_tiff(tmp_path / "images" / "lonely2.tif", np.zeros((8, 8), np.uint8))
    with pytest.raises(DatasetError, match=r"2 image\(s\) .* have no mask .*: lonely1\.png, lonely2\.tif"):
        open_dataset(tmp_path)


def test_masks_without_images_are_named(tmp_path: Path) -> None:
    _pair(tmp_path, "ok")
    write_png(tmp_path / "masks" / "orphan.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DatasetError, match=r"1 mask\(s\) .* have no image .*: orphan\.png"):
        open_dataset(tmp_path)


def test_size_mismatch_names_both_files(tmp_path: Path) -> None:
    _pair(tmp_path, "a")
    _pair(tmp_path, "b", shape=(8, 8), mask_shape=(8, 9))
    with pytest.raises(DatasetError, match=r"size mismatch for 'b': .*images/b\.png is 8×8 but .*masks/b\.png is 8×9"):
        open_dataset(tmp_path)


def test_unreadable_file_is_named(tmp_path: Path) -> None:
    _pair(tmp_path, "a")
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png at all")
    write_png(tmp_path / "masks" / "broken.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DatasetError, match=r"unreadable file .*images/broken\.png"):
        open_dataset(tmp_path)


def test_truncated_pixel_data_is_named_at_load(tmp_path: Path) -> None:
    _pair(tmp_path, "a", shape=(64, 64))
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(buffer, "PNG")
    (tmp_path / "images" / "a.png").write_bytes(buffer.getvalue()[:200])  # header intact, pixels cut
    _pair(tmp_path, "b", shape=(64, 64))
    _pair(tmp_path, "c", shape=(64, 64))
    (tmp_path / "splits.json").write_text(json.dumps({"train": ["a"], "val": ["b"], "test": ["c"]}))
    index = open_dataset(tmp_path)  # the header is fine; only decoding the pixels finds the damage
    with pytest.raises(DatasetError, match=r"unreadable file .*images/a\.png"):
        load_split(index, "train")
    with pytest.raises(DatasetError, match=r"unreadable file .*images/a\.png: OSError: .*truncated") as info:
        open_dataset(tmp_path, verify=True)
    assert str(tmp_path / "images" / "a.png") in str(info.value)


def test_unsupported_file_type_is_named(tmp_path: Path) -> None:
    _pair(tmp_path, "a")
    (tmp_path / "images" / "notes.jpg").write_bytes(b"x")
    with pytest.raises(DatasetError, match=r"unsupported file type .*: notes\.jpg"):
        open_dataset(tmp_path)


def test_mixed_channel_counts(tmp_path: Path) -> None:
    _pair(tmp_path, "grey")
    write_png(tmp_path / "images" / "colour.png", np.zeros((8, 8, 3), np.uint8))
    write_png(tmp_path / "masks" / "colour.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DatasetError, match=r"different channel counts \(1 channel\(s\): grey\.png; 3 .*colour\.png"):
        open_dataset(tmp_path)


def test_bad_mask_values(tmp_path: Path) -> None:
    write_png(tmp_path / "images" / "a.png", np.zeros((8, 8), np.uint8))
    write_tiff(tmp_path / "masks" / "a.tif", np.full((8, 8), -1, np.int16))
    _pair(tmp_path, "b")
    _pair(tmp_path, "c")
    (tmp_path / "splits.json").write_text(json.dumps({"train": ["a"], "val": ["b"], "test": ["c"]}))
    with pytest.raises(DatasetError, match=r"mask .*a\.tif holds negative labels"):
        load_split(open_dataset(tmp_path), "train")
    write_tiff(tmp_path / "masks" / "a.tif", np.full((8, 8), 0.5, np.float32))
    with pytest.raises(DatasetError, match=r"mask .*a\.tif holds non-integer values"):
        load_split(open_dataset(tmp_path), "train")


def _mask_values(kind: str) -> np.ndarray:
    labels = blobs_mask((8, 8), [(4, 4)], 2).astype(np.float32)
    if kind == "negative":
        return (labels * -1).astype(np.int16)
    if kind == "fraction":
        labels[0, 0] = 0.5
    elif kind == "nan":
        labels[0, 0] = np.nan
    elif kind == "inf":
        labels[0, 0] = np.inf
    return labels


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("negative", "holds negative labels"),
        ("fraction", "holds non-integer values"),
        ("nan", "holds non-integer values"),
        ("inf", "holds non-integer values"),
    ],
)
def test_verify_rejects_bad_mask_values(tmp_path: Path, kind: str, message: str) -> None:
    _pair(tmp_path, "a")
    _pair(tmp_path, "b")
    _pair(tmp_path, "c")
    write_png(tmp_path / "masks" / "b.png", blobs_mask((8, 8), [(4, 4)], 2).astype(np.uint8))
    (tmp_path / "masks" / "a.png").unlink()
    write_tiff(tmp_path / "masks" / "a.tif", _mask_values(kind))
    index = open_dataset(tmp_path)  # headers alone look fine
    assert index.ids == ["a", "b", "c"]
    with pytest.raises(DatasetError, match=rf"mask .*masks/a\.tif {message}") as info:
        open_dataset(tmp_path, verify=True)
    assert str(tmp_path / "masks" / "a.tif") in str(info.value)


def test_verify_accepts_good_data_and_float_masks_with_integer_values(tmp_path: Path) -> None:
    root = synthetic_dataset(tmp_path, ["a", "b", "c", "d"], shape=(16, 16))
    (root / "masks" / "d.png").unlink()
    write_tiff(root / "masks" / "d.tif", blobs_mask((16, 16), [(8, 8)], 3).astype(np.float32))  # 0.0 and 1.0
    plain, verified = open_dataset(root), open_dataset(root, verify=True)
    assert verified == plain
    assert [len(verified.splits[s]) for s in ("train", "val", "test")] == [2, 1, 1]


def test_real_bbbc039_verifies(bbbc039_root: Path) -> None:
    index = open_dataset(bbbc039_root, verify=True)
    assert len(index.ids) == 200 and index == open_dataset(bbbc039_root)


@pytest.mark.parametrize("n", [1, 2])
def test_default_split_of_fewer_than_three_images_is_rejected(tmp_path: Path, n: int) -> None:
    for name in "ab"[:n]:
        _pair(tmp_path, name)
    with pytest.raises(DatasetError, match=rf'has only {n} image\(s\), so the default split leaves "val" empty') as e:
        open_dataset(tmp_path)
    assert "splits.json" in str(e.value)


@pytest.mark.parametrize("n", [3, 4, 5, 6])
def test_default_split_gives_every_split_an_image_from_three(tmp_path: Path, n: int) -> None:
    for name in "abcdef"[:n]:
        _pair(tmp_path, name)
    sizes = {split: len(ids) for split, ids in open_dataset(tmp_path).splits.items()}
    assert sizes == {"train": n - 2, "val": 1, "test": 1}


@pytest.mark.parametrize(
    ("splits", "empty"),
    [
        ({"train": [], "val": ["a"], "test": ["b"]}, "train"),
        ({"train": ["a"], "val": [], "test": ["b"]}, "val"),
        ({"train": ["a", "b"], "val": ["c"], "test": []}, "test"),
    ],
)
def test_empty_split_in_splits_json_is_rejected(tmp_path: Path, splits: dict[str, list[str]], empty: str) -> None:
    for name in "abc":
        _pair(tmp_path, name)
    (tmp_path / "splits.json").write_text(json.dumps(splits))
    with pytest.raises(DatasetError, match=rf'splits\.json: "{empty}" is empty; .*the dataset has 3 image\(s\)'):
        open_dataset(tmp_path)


@pytest.mark.parametrize(
    ("splits", "message"),
    [
        ('{"train": ["a", "ghost1"], "val": ["ghost2"], "test": []}', r'"train" names 1 id\(s\) .*: ghost1'),
        ('{"train": ["a"], "val": [], "test": ["zzz"]}', r'"test" names 1 id\(s\) with no image/mask pair: zzz'),
        ('{"train": ["a"', "is not valid JSON"),
        ('["a"]', "must be an object"),
        ('{"train": ["a"], "val": []}', '"test" must be a list of image ids'),
        ('{"train": ["a"], "val": ["a"], "test": []}', 'id \'a\' is listed in both "train" and "val"'),
    ],
)
def test_bad_splits_json(tmp_path: Path, splits: str, message: str) -> None:
    _pair(tmp_path, "a")
    (tmp_path / "splits.json").write_text(splits)
    with pytest.raises(DatasetError, match=message) as info:
        open_dataset(tmp_path)
    assert "splits.json" in str(info.value)


def test_unknown_split_and_target(tmp_path: Path) -> None:
    index = open_dataset(synthetic_dataset(tmp_path, ["a", "b", "c"], shape=(8, 8)))
    with pytest.raises(DatasetError, match="unknown split 'holdout'"):
        load_split(index, "holdout")
    with pytest.raises(ValueError, match="unknown target"):
        load_split(index, "train", target="semantic")


# ----------------------------------------------------------------------------------------------------- archives


def _dataset_files(tmp_path: Path) -> dict[str, bytes]:
    root = synthetic_dataset(tmp_path / "src", ["a", "b", "c"], shape=(8, 8))
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def _zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def _tar(path: Path, files: dict[str, bytes], mode: str = "w:gz", extra: list[tarfile.TarInfo] | None = None) -> Path:
    with tarfile.open(path, mode) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tf.addfile(info)
    return path


def test_extract_zip_with_nested_folder(tmp_path: Path) -> None:
    files = {f"mydata/{k}": v for k, v in _dataset_files(tmp_path).items()}
    files["__MACOSX/mydata/._a.png"] = b"resource fork"
    root = extract_archive(_zip(tmp_path / "ds.zip", files), tmp_path / "out")
    assert root == tmp_path / "out" / "mydata"
    assert open_dataset(root).ids == ["a", "b", "c"]


@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_extract_flat_tar(tmp_path: Path, mode: str) -> None:
    root = extract_archive(_tar(tmp_path / "ds.tar", _dataset_files(tmp_path), mode), tmp_path / "out")
    assert root == tmp_path / "out"
    assert len(open_dataset(root).ids) == 3


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


@pytest.mark.parametrize(
    ("name", "extra", "message"),
    [
        ("/etc/evil.png", None, "has an absolute path"),
        ("images/../../evil.png", None, r"contains '\.\.'"),
        (None, _link("images/x.png", "/etc/passwd", tarfile.SYMTYPE), "is a symbolic link"),
        (None, _link("images/y.png", "masks/a.png", tarfile.LNKTYPE), "is a hard link"),
    ],
)
def test_unsafe_tar_members_are_rejected_before_extraction(
    tmp_path: Path, name: str | None, extra: tarfile.TarInfo | None, message: str
) -> None:
    files = _dataset_files(tmp_path)
    if name:
        files[name] = b"x"
    archive = _tar(tmp_path / "ds.tar.gz", files, extra=[extra] if extra else None)
    out = tmp_path / "out"
    with pytest.raises(DatasetError, match=message) as info:
        extract_archive(archive, out)
    assert "ds.tar.gz" in str(info.value)
    assert list(out.rglob("*")) == []  # nothing written, not even the safe members
    assert not (tmp_path / "evil.png").exists()


@pytest.mark.parametrize(
    ("name", "message"),
    [("/abs/images/a.png", "has an absolute path"), ("../escape.png", r"contains '\.\.'"), ("C:/x.png", "absolute")],
)
def test_unsafe_zip_names_are_rejected(tmp_path: Path, name: str, message: str) -> None:
    archive = tmp_path / "ds.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("images/a.png", b"x")
        zf.writestr(zipfile.ZipInfo(name), b"x")  # ZipInfo keeps the name as given
    with pytest.raises(DatasetError, match=message):
        extract_archive(archive, tmp_path / "out")
    assert list((tmp_path / "out").rglob("*")) == []


def test_zip_symlink_is_rejected(tmp_path: Path) -> None:
    archive = tmp_path / "ds.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        link = zipfile.ZipInfo("images/a.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    with pytest.raises(DatasetError, match=r"'images/a\.png' is a symbolic link"):
        extract_archive(archive, tmp_path / "out")


def test_only_the_members_the_dataset_uses_are_written(tmp_path: Path) -> None:
    files = _dataset_files(tmp_path)
    unused = {
        "images": b"a file named like the folder",  # used to clash with the folder when everything was written
        "notes/big.bin": bytes(MiB),
        "images/sub/x.png": b"x",  # open_dataset reads only the files directly in images/ and masks/
        "masks/.hidden.png": b"x",
        "__MACOSX/images/._a.png": b"resource fork",
    }
    for name, archive in [
        ("clash.zip", _zip(tmp_path / "clash.zip", {**unused, **files})),
        ("clash.tar", _tar(tmp_path / "clash.tar", {**files, **unused}, "w")),
    ]:
        out = tmp_path / f"out-{name}"
        assert extract_archive(archive, out) == out
        written = sorted(str(p.relative_to(out)) for p in _files_written(out))
        assert written == sorted(files), name
    # The byte cap counts only what is written: the unused MiB does not count against it.
    extract_archive(_zip(tmp_path / "c2.zip", {**files, **unused}), tmp_path / "c2", max_bytes=MiB // 2)


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_zip_with_a_corrupted_member(tmp_path: Path, compression: int) -> None:
    payload = bytes(range(256)) * 64  # 16 KiB; deflate shrinks it but keeps it well above the flipped offset
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w", compression) as zf:
        zf.writestr("images/a.png", b"fine")
        zf.writestr("masks/a.png", payload)
    raw = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo("masks/a.png")
    # The data starts after the 30-byte local header, the name and the extra field; flip a byte well inside it.
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw[start + info.compress_size // 2] ^= 0xFF
    archive.write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match=r"bad\.zip: cannot extract member 'masks/a\.png' \(BadZipFile: Bad CRC-32"):
        extract_archive(archive, tmp_path / "out")


def test_archive_errors(tmp_path: Path) -> None:
    (tmp_path / "junk.zip").write_bytes(b"definitely not an archive")
    with pytest.raises(DatasetError, match="is not a zip or tar archive"):
        extract_archive(tmp_path / "junk.zip", tmp_path / "out1")
    with pytest.raises(DatasetError, match="no folder in the archive holds both images/ and masks/"):
        extract_archive(_zip(tmp_path / "a.zip", {"photos/a.png": b"x"}), tmp_path / "out2")
    files = _dataset_files(tmp_path)
    two = {f"{top}/{k}": v for top in ("one", "two") for k, v in files.items()}
    with pytest.raises(DatasetError, match=r"several folders hold images/ and masks/ \(one, two\)"):
        extract_archive(_zip(tmp_path / "b.zip", two), tmp_path / "out3")


# ------------------------------------------------------------------------------------- archive bombs, classes

MiB = 1024 * 1024


def _files_written(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def test_zip_bomb_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    files = _dataset_files(tmp_path)
    archive = _zip(tmp_path / "bomb.zip", files)
    with zipfile.ZipFile(archive, "a", zipfile.ZIP_DEFLATED) as zf, zf.open("images/zeros.png", "w") as member:
        for _ in range(64):
            member.write(bytes(MiB))  # 64 MiB of zeros: about 64 KiB compressed
    assert archive.stat().st_size < MiB
    total = 64 * MiB + sum(len(data) for data in files.values())
    with pytest.raises(DatasetError, match=rf"bomb\.zip: expands to {total} bytes, more than the limit of 16777216"):
        extract_archive(archive, tmp_path / "out", max_bytes=16 * MiB)
    assert _files_written(tmp_path / "out") == []
    # Under a cap it fits, it unpacks (the cap is the only thing that refused it).
    extract_archive(archive, tmp_path / "ok", max_bytes=128 * MiB)
    assert (tmp_path / "ok" / "images" / "zeros.png").stat().st_size == 64 * MiB


def test_tar_bomb_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    archive = tmp_path / "bomb.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for name, data in _dataset_files(tmp_path).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("images/zeros.png")
        info.size = 64 * MiB
        with open("/dev/zero", "rb") as zeros:
            tf.addfile(info, zeros)
    assert archive.stat().st_size < MiB
    with pytest.raises(DatasetError, match=r"bomb\.tar\.gz: expands to \d+ bytes, more than the limit of 16777216"):
        extract_archive(archive, tmp_path / "out", max_bytes=16 * MiB)
    assert _files_written(tmp_path / "out") == []


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_archives_with_too_many_members_are_refused(tmp_path: Path, kind: str) -> None:
    files = {**_dataset_files(tmp_path), **{f"images/extra/{i}.txt": b"" for i in range(50)}}
    archive = _zip(tmp_path / "many.zip", files) if kind == "zip" else _tar(tmp_path / "many.tar", files, "w")
    with pytest.raises(DatasetError, match=r"too many members \(more than 20\)"):
        extract_archive(archive, tmp_path / "out", max_members=20)
    assert _files_written(tmp_path / "out") == []


def test_declared_classes_bound_the_mask_labels(tmp_path: Path) -> None:
    root = synthetic_dataset(tmp_path / "ds", ["a", "b", "c"])  # instance masks with labels 0, 1, 2
    assert open_dataset(root, verify=True).min_size == (40, 48)
    assert open_dataset(root, verify=True, num_classes=3).ids == ["a", "b", "c"]
    with pytest.raises(DatasetError, match=r"masks/a\.png holds label\(s\) 2 outside the declared classes 0\.\.1"):
        open_dataset(root, verify=True, num_classes=2)
    with pytest.raises(DatasetError, match="num_classes must be at least 2"):
        open_dataset(root, num_classes=1)


def test_min_size_is_the_smallest_height_and_width(tmp_path: Path) -> None:
    root = synthetic_dataset(tmp_path / "ds", ["a", "b", "c"], shape=(40, 48))
    labels = blobs_mask((64, 32), [(20, 16)], radius=5)
    write_png(root / "images" / "a.png", (labels > 0).astype(np.uint8) * 200)
    write_png(root / "masks" / "a.png", labels)
    assert open_dataset(root).min_size == (40, 32)  # heights 64, 40, 40; widths 32, 48, 48


# ------------------------------------------------------------------------- decompression and scratch-disk bombs


def test_images_over_the_pixel_limit_are_refused_from_their_header(tmp_path: Path) -> None:
    root = synthetic_dataset(tmp_path / "ds", ["a", "b", "c"])  # 40×48
    # A real, valid 9000×9000 PNG of 11 KB: 81M pixels, under Pillow's own bomb warning (89M).
    write_blank_png(root / "images" / "b.png", 9000, 9000)
    write_blank_png(root / "masks" / "b.png", 9000, 9000)
    limit = 8000 * 8000
    with pytest.raises(
        DatasetError,
        match=rf"image .*images/b\.png is 9000×9000 \(81000000 pixels\), more than the limit of {limit} pixels",
    ):
        open_dataset(root, verify=True, max_image_pixels=limit)
    # The limit applies to masks and TIFFs too, from their headers (height × width).
    (root / "images" / "b.png").unlink()
    write_tiff(root / "images" / "b.tif", np.zeros((40, 48), np.uint16))
    write_png(root / "masks" / "b.png", np.zeros((40, 48), np.uint16))
    assert open_dataset(root, verify=True, max_image_pixels=40 * 48).ids == ["a", "b", "c"]
    with pytest.raises(DatasetError, match=r"image .*images/a\.png is 40×48 \(1920 pixels\), more than the limit"):
        open_dataset(root, max_image_pixels=1919)
    write_png(root / "masks" / "a.png", np.zeros((48, 48), np.uint16))
    with pytest.raises(DatasetError, match=r"mask .*masks/a\.png is 48×48 \(2304 pixels\), more than the limit"):
        open_dataset(root, max_image_pixels=2000)
    (root / "images" / "a.png").unlink()
    (root / "masks" / "a.png").unlink()
    with pytest.raises(DatasetError, match=r"image .*images/b\.tif is 40×48 \(1920 pixels\), more than the limit"):
        open_dataset(root, max_image_pixels=1919)


def test_an_archive_without_a_dataset_layout_writes_nothing(tmp_path: Path) -> None:
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("data/huge.bin", "w") as member:
        for _ in range(16):
            member.write(bytes(MiB))  # 16 MiB of zeros: about 16 KiB compressed
    assert archive.stat().st_size < 100_000
    with pytest.raises(DatasetError, match=r"bomb\.zip: no folder in the archive holds both images/ and masks/"):
        extract_archive(archive, tmp_path / "out", max_bytes=64 * MiB)  # under the cap: the layout refuses it
    assert _files_written(tmp_path / "out") == []
    # images/ alone (no masks/ beside it) is no dataset either, whatever its size.
    files = {"ds/images/a.png": bytes(MiB), "ds/labels/a.png": b"x"}
    for packed in (_zip(tmp_path / "half.zip", files), _tar(tmp_path / "half.tar", files, "w")):
        with pytest.raises(DatasetError, match=rf"{packed.name}: no folder in the archive holds both"):
            extract_archive(packed, tmp_path / packed.stem)
        assert _files_written(tmp_path / packed.stem) == []


def test_the_pixel_limit_on_real_data(bbbc039_root: Path) -> None:
    # BBBC039 fields are 520×696 (361 920 pixels): far under the service default of 8000×8000.
    assert len(open_dataset(bbbc039_root, max_image_pixels=8000 * 8000).ids) == 200
    with pytest.raises(DatasetError, match=r"is 520×696 \(361920 pixels\), more than the limit of 361919 pixels"):
        open_dataset(bbbc039_root, max_image_pixels=520 * 696 - 1)


def test_files_linking_outside_the_dataset_are_refused(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds", n=4)
    secret = tmp_path / "secret.png"
    (root / "images" / "img00.png").rename(secret)  # the real file now lives outside the dataset
    (root / "images" / "img00.png").symlink_to(secret)
    with pytest.raises(DatasetError, match=r"images/img00.png links outside the dataset folder"):
        open_dataset(root)
    # A link that stays inside the dataset folder is fine.
    (root / "images" / "img00.png").unlink()
    (root / "original.png").write_bytes(secret.read_bytes())
    (root / "images" / "img00.png").symlink_to(root / "original.png")
    assert "img00" in open_dataset(root).ids
