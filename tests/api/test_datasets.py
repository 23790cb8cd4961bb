"""/v1/datasets: archives are unpacked and indexed with pel.data before a row exists; folders register in place."""

from __future__ import annotations

import shutil
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.db import crud
from api.db.session import get_sessionmaker
from api.errors import InvalidField
from api.main import create_app
from api.routes.datasets import check_fits
from api.settings import Settings
from api.storage import file_digest
from tests.factories import make_archive, make_dataset
from tests.pel.factories import write_blank_png
from tests.services import S3_BUCKET, s3_client
from tests.tcp_proxy import HttpFaultProxy


def upload(client: TestClient, path: Path, **data: str):  # noqa: ANN201 - httpx.Response
    with open(path, "rb") as stream:
        return client.post("/v1/datasets", files={"file": (path.name, stream)}, data=data)


@pytest.mark.parametrize("archive_name", ["cells.zip", "cells.tar.gz", "cells.tar"])
def test_upload_archive(client: TestClient, settings: Settings, tmp_path: Path, archive_name: str) -> None:
    archive = make_archive(make_dataset(tmp_path / "cells", n=6), tmp_path / archive_name)
    response = upload(client, archive)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["name"] == "cells"
    assert body["num_images"] == 6
    assert body["splits"] == {"train": 4, "val": 1, "test": 1}
    stored = Path(body["uri"].removeprefix("file://"))
    assert stored.is_file() and stored.read_bytes() == archive.read_bytes()
    assert stored.name.endswith(archive_name.split(".", 1)[1])  # the archive kind survives in the key
    assert client.get(f"/v1/datasets/{body['id']}").json() == body
    assert body["id"] in {d["id"] for d in client.get("/v1/datasets").json()}


def test_default_splits_when_no_splits_json(client: TestClient, tmp_path: Path) -> None:
    folder = make_dataset(tmp_path / "plain", n=20)
    (folder / "splits.json").unlink()
    response = upload(client, make_archive(folder, tmp_path / "plain.zip"), name="no splits file")
    assert response.status_code == 201, response.text
    assert response.json()["name"] == "no splits file"
    assert sum(response.json()["splits"].values()) == 20


def test_register_folder_in_place(client: TestClient, settings: Settings, tmp_path: Path) -> None:
    folder = make_dataset(tmp_path / "in place", n=5)
    response = client.post("/v1/datasets", data={"uri": folder.as_uri()})
    assert response.status_code == 201, response.text
    assert response.json()["uri"] == folder.as_uri()
    assert response.json()["num_images"] == 5
    assert not (settings.home / "objects").exists()  # nothing was copied


def test_register_real_bbbc039_in_place(client: TestClient, bbbc039_root: Path) -> None:
    response = client.post("/v1/datasets", data={"uri": bbbc039_root.as_uri(), "name": "bbbc039"})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["num_images"] == 200
    assert body["splits"] == {"train": 100, "val": 50, "test": 50}


def test_register_archive_uris(client: TestClient, settings: Settings, s3_endpoint: str, tmp_path: Path) -> None:
    archive = make_archive(make_dataset(tmp_path / "remote", n=4), tmp_path / "remote.tar.gz")
    local = client.post("/v1/datasets", data={"uri": archive.as_uri()})
    assert local.status_code == 201, local.text
    assert local.json()["num_images"] == 4

    key = f"external/{tmp_path.name}/remote.tar.gz"
    s3_client(s3_endpoint).upload_file(str(archive), S3_BUCKET, key)
    with TestClient(create_app(settings.model_copy(update={"s3_endpoint_url": s3_endpoint}))) as s3_aware:
        remote = s3_aware.post("/v1/datasets", data={"uri": f"s3://{S3_BUCKET}/{key}"})
    assert remote.status_code == 201, remote.text
    assert remote.json()["uri"] == f"s3://{S3_BUCKET}/{key}"
    assert remote.json()["num_images"] == 4


def test_upload_to_s3_store(s3_client_app: TestClient, s3_endpoint: str, tmp_path: Path) -> None:
    archive = make_archive(make_dataset(tmp_path / "s3ds", n=3), tmp_path / "s3ds.zip")
    response = upload(s3_client_app, archive)
    assert response.status_code == 201, response.text
    key = response.json()["uri"].removeprefix(f"s3://{S3_BUCKET}/")
    assert s3_client(s3_endpoint).head_object(Bucket=S3_BUCKET, Key=key)["ContentLength"] == archive.stat().st_size


def _missing_mask(folder: Path) -> None:
    (folder / "masks" / "img01.png").unlink()


def _size_mismatch(folder: Path) -> None:
    from PIL import Image

    Image.new("L", (10, 10)).save(folder / "masks" / "img01.png")


def _no_masks_folder(folder: Path) -> None:
    shutil.rmtree(folder / "masks")


def _bad_splits(folder: Path) -> None:
    (folder / "splits.json").write_text('{"train": ["ghost"], "val": [], "test": []}')


def _empty_test_split(folder: Path) -> None:
    (folder / "splits.json").write_text('{"train": ["img00", "img01", "img02"], "val": ["img03"], "test": []}')


def _two_images_no_splits(folder: Path) -> None:
    for name in ("img02", "img03"):
        (folder / "images" / f"{name}.png").unlink()
        (folder / "masks" / f"{name}.png").unlink()
    (folder / "splits.json").unlink()


def _float_mask(value: float) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        import numpy as np
        import tifffile

        labels = np.zeros((48, 64), np.float32)
        labels[10:20, 10:20] = value
        (folder / "masks" / "img01.png").unlink()
        tifffile.imwrite(folder / "masks" / "img01.tif", labels)

    return damage


def _no_images(folder: Path) -> None:
    for sub in ("images", "masks"):
        for path in (folder / sub).iterdir():
            path.unlink()
    (folder / "splits.json").unlink()


def _garbage_image(folder: Path) -> None:
    (folder / "images" / "img01.png").write_bytes(b"this is not a PNG at all")


def _truncated_png(folder: Path) -> None:
    path = folder / "images" / "img01.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the header still reads; the pixel data is cut


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_missing_mask, "have no mask"),
        (_size_mismatch, "size mismatch"),
        (_no_masks_folder, "images/ and masks/"),
        (_bad_splits, "ghost"),
        (_empty_test_split, '"test" is empty'),
        (_two_images_no_splits, 'has only 2 image(s), so the default split leaves "val" empty'),
        (_float_mask(-1.0), "masks/img01.tif holds negative labels"),
        (_float_mask(float("nan")), "masks/img01.tif holds non-integer values"),
        (_truncated_png, "broken/images/img01.png: OSError: image file is truncated"),
        (_no_images, "empty dataset: no PNG or TIFF images"),
        (_garbage_image, "broken/images/img01.png: UnidentifiedImageError"),
    ],
)
def test_invalid_datasets_are_422_with_the_reason(client: TestClient, tmp_path: Path, damage, message: str) -> None:
    folder = make_dataset(tmp_path / "broken", n=4)
    damage(folder)
    before = len(client.get("/v1/datasets", params={"limit": 1000}).json())
    response = upload(client, make_archive(folder, tmp_path / "broken.zip"))
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "file"]
    assert message in error["msg"]
    assert "dataset-" not in error["msg"], "the server's scratch folder leaked into the message"
    # Validation happens before the row: nothing was registered. The folder form fails the same way.
    assert len(client.get("/v1/datasets", params={"limit": 1000}).json()) == before
    in_place = client.post("/v1/datasets", data={"uri": folder.as_uri()})
    assert in_place.status_code == 422 and message in in_place.json()["detail"][0]["msg"]


def test_broken_zip_members_are_422(client: TestClient, tmp_path: Path) -> None:
    import zipfile

    # (A file and a folder of the same name cannot clash any more: only images/, masks/ and splits.json are
    # written; tests/pel/test_data.py::test_only_the_members_the_dataset_uses_are_written.)
    corrupt = tmp_path / "corrupt.zip"
    with zipfile.ZipFile(corrupt, "w") as archive:
        archive.writestr("images/x.png", bytes(range(256)) * 16)
        archive.writestr("masks/x.png", b"x")
    raw = bytearray(corrupt.read_bytes())
    raw[30 + len("images/x.png") + 100] ^= 0xFF  # a byte of the (stored) member's data
    corrupt.write_bytes(bytes(raw))
    before = len(client.get("/v1/datasets", params={"limit": 1000}).json())
    response = upload(client, corrupt)
    assert response.status_code == 422, response.text
    assert "cannot extract member 'images/x.png' (BadZipFile: Bad CRC-32" in response.json()["detail"][0]["msg"]
    assert len(client.get("/v1/datasets", params={"limit": 1000}).json()) == before


def test_not_an_archive(client: TestClient, tmp_path: Path) -> None:
    path = tmp_path / "data.zip"
    path.write_bytes(b"just bytes")
    response = upload(client, path)
    assert response.status_code == 422
    # Named as the client sent it, not by the server's scratch path.
    assert response.json()["detail"][0]["msg"] == "data.zip is not a zip or tar archive"


def test_unsafe_archive_members_are_refused(client: TestClient, tmp_path: Path) -> None:
    import zipfile

    path = tmp_path / "evil.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("../escape.png", b"x")
    response = upload(client, path)
    assert response.status_code == 422
    assert ".." in response.json()["detail"][0]["msg"]


def test_missing_uri_and_unknown_id(client: TestClient, tmp_path: Path) -> None:
    response = client.post("/v1/datasets", data={"uri": (tmp_path / "nothing").as_uri()})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "uri"]
    assert client.get("/v1/datasets/feed").status_code == 404


def test_oversize_archive_is_413(settings: Settings, tmp_path: Path) -> None:
    archive = make_archive(make_dataset(tmp_path / "big", n=6, size=(128, 128)), tmp_path / "big.tar")
    with TestClient(create_app(settings.model_copy(update={"max_upload_bytes": 4096}))) as client:
        assert upload(client, archive).status_code == 413


def dataset_row(settings: Settings, dataset_id: str):  # noqa: ANN201 - api.db.models.Dataset
    with get_sessionmaker(settings.database_url)() as session:
        return crud.get_dataset(session, dataset_id=dataset_id)


def stored_objects(settings: Settings) -> list[Path]:
    root = settings.home / "objects"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.mark.parametrize("archive_name", ["bomb.zip", "bomb.tar.gz"])
def test_archive_bomb_is_422_and_nothing_is_stored(settings: Settings, tmp_path: Path, archive_name: str) -> None:
    folder = make_dataset(tmp_path / "bomb", n=3)
    # A member of 8 MiB of zeros: a few KiB compressed, well under the upload limit, far over the unpack limit.
    (folder / "images" / "zeros.png").write_bytes(bytes(8 * 1024 * 1024))
    archive = make_archive(folder, tmp_path / archive_name)
    assert archive.stat().st_size < 100_000
    with TestClient(create_app(settings.model_copy(update={"max_archive_bytes": 1024 * 1024}))) as client:
        before = len(client.get("/v1/datasets", params={"limit": 1000}).json())
        response = upload(client, archive)
        assert response.status_code == 422, response.text
        (error,) = response.json()["detail"]
        assert error["loc"] == ["body", "file"]
        assert error["msg"].startswith(f"{archive_name}: expands to ")
        assert "more than the limit of 1048576 bytes" in error["msg"]
        assert len(client.get("/v1/datasets", params={"limit": 1000}).json()) == before
    assert stored_objects(settings) == []


def test_images_over_the_pixel_limit_are_422_before_decoding(
    client: TestClient, settings: Settings, tmp_path: Path
) -> None:
    folder = make_dataset(tmp_path / "huge", n=3)
    for kind in ("images", "masks"):  # a real, valid PNG pair of 9000×9000 (81M pixels) in 11 KB each
        write_blank_png(folder / kind / "img01.png", 9000, 9000)
    archive = make_archive(folder, tmp_path / "huge.zip")
    assert archive.stat().st_size < 100_000
    before = len(client.get("/v1/datasets", params={"limit": 1000}).json())
    response = upload(client, archive)
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "file"]
    assert error["msg"] == (
        "image huge/images/img01.png is 9000×9000 (81000000 pixels), more than the limit of 64000000 pixels per "
        "image (PELTUNE_MAX_IMAGE_PIXELS); nothing was decoded"
    )
    assert len(client.get("/v1/datasets", params={"limit": 1000}).json()) == before
    assert stored_objects(settings) == []
    # A folder registered in place is checked the same way; a raised limit accepts it.
    response = client.post("/v1/datasets", data={"uri": folder.as_uri()})
    assert response.status_code == 422 and "is 9000×9000 (81000000 pixels)" in response.text
    with TestClient(create_app(settings.model_copy(update={"max_image_pixels": 9000 * 9000}))) as roomy:
        assert upload(roomy, archive).status_code == 201


def test_an_archive_without_a_dataset_is_422_before_anything_is_unpacked(
    client: TestClient, settings: Settings, tmp_path: Path
) -> None:
    archive = tmp_path / "junk.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("junk/huge.bin", "w") as member:
        for _ in range(16):
            member.write(bytes(1024 * 1024))  # 16 MiB of zeros, under the unpack limit
    response = upload(client, archive)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["msg"] == (
        "junk.zip: no folder in the archive holds both images/ and masks/; nothing was extracted"
    )
    assert stored_objects(settings) == []


def test_mask_labels_outside_the_declared_classes_are_422(
    client: TestClient, settings: Settings, tmp_path: Path
) -> None:
    archive = make_archive(make_dataset(tmp_path / "classes", n=3), tmp_path / "classes.zip")  # labels 0..3
    before = len(client.get("/v1/datasets", params={"limit": 1000}).json())
    response = upload(client, archive, num_classes="3")
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "file"]
    assert "classes/masks/img00.png holds label(s) 3 outside the declared classes 0..2 (num_classes=3)" in error["msg"]
    assert len(client.get("/v1/datasets", params={"limit": 1000}).json()) == before
    assert stored_objects(settings) == []

    for bad in ("1", "two", "-3"):
        response = upload(client, archive, num_classes=bad)
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"] == ["body", "num_classes"]

    accepted = upload(client, archive, num_classes="4")
    assert accepted.status_code == 201, accepted.text
    assert dataset_row(settings, accepted.json()["id"]).num_classes == 4


def test_registration_records_the_smallest_image_size_for_patch_checks(
    client: TestClient, settings: Settings, tmp_path: Path, bbbc039_root: Path
) -> None:
    response = client.post("/v1/datasets", data={"uri": make_dataset(tmp_path / "small", n=3).as_uri()})
    assert response.status_code == 201, response.text
    small = dataset_row(settings, response.json()["id"])
    assert (small.min_height, small.min_width) == (48, 64)
    check_fits(small, {"patch_size": 48})  # fits: no error
    with pytest.raises(InvalidField) as caught:
        check_fits(small, {"patch_size": 64})
    assert caught.value.loc == ("body", "config", "patch_size")
    assert "patch_size 64 is larger than the images" in caught.value.msg
    assert "smallest image height 48, smallest width 64" in caught.value.msg

    real = client.post("/v1/datasets", data={"uri": bbbc039_root.as_uri()})
    assert real.status_code == 201, real.text
    bbbc039 = dataset_row(settings, real.json()["id"])
    assert (bbbc039.min_height, bbbc039.min_width) == (520, 696)
    check_fits(bbbc039, {"patch_size": 512})
    with pytest.raises(InvalidField, match="use a patch_size of at most 520"):
        check_fits(bbbc039, {"patch_size": 1024})


def test_real_bbbc039_archive_goes_to_s3_as_retried_multipart(
    s3_endpoint: str, bbbc039_root: Path, tmp_path: Path
) -> None:
    """The real dataset as one ~70 MB upload into S3, through an endpoint that refuses the first connections."""
    archive = tmp_path / "bbbc039.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(bbbc039_root, arcname="bbbc039")
    host, port = s3_endpoint.removeprefix("http://").split(":")
    proxy = HttpFaultProxy((host, int(port)), faults=2)
    settings = Settings(
        home=tmp_path / "home",
        storage_url=f"s3://{S3_BUCKET}/real-{tmp_path.name}",
        s3_endpoint_url=proxy.endpoint,
        s3_multipart_threshold_bytes=8 * 1024 * 1024,
        s3_multipart_chunk_bytes=8 * 1024 * 1024,
    )
    try:
        with TestClient(create_app(settings)) as client:
            response = upload(client, archive)
        assert len(proxy.faulted) == 2
    finally:
        proxy.close()
    assert response.status_code == 201, response.text
    assert response.json()["splits"] == {"train": 100, "val": 50, "test": 50}
    key = response.json()["uri"].removeprefix(f"s3://{S3_BUCKET}/")
    head = s3_client(s3_endpoint).head_object(Bucket=S3_BUCKET, Key=key)
    parts = -(-archive.stat().st_size // (8 * 1024 * 1024))
    assert parts > 1 and head["ETag"].strip('"').endswith(f"-{parts}")
    copy = tmp_path / "copy.tar"
    s3_client(s3_endpoint).download_file(S3_BUCKET, key, str(copy))
    assert file_digest(copy) == file_digest(archive)
