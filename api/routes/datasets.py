"""/v1/datasets: register (archive upload, archive URI, or a file:// folder used in place), list, get.

A dataset is validated before its row exists: the archive is unpacked to a temporary folder (within the archive
bomb caps) and indexed with ``pel.data.open_dataset`` (images/masks pairing, sizes, every pixel decoded, declared
mask classes, splits); any problem is a 422 carrying its message. The row records the smallest image size, so a
job whose patch cannot fit is refused at submission (:func:`check_fits`).
"""

from __future__ import annotations

import contextlib
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Query, status

from api.db import crud
from api.db.models import Dataset, new_id
from api.deps import (
    DatasetDep,
    SessionDep,
    SettingsDep,
    StoreDep,
    TenantDep,
    UploadFormDep,
    check_uri_allowed,
    get_tenant,
)
from api.errors import InvalidField
from api.routes._multipart import FILE_FIELD, display_name, safe_name, source_of, upload_body
from api.schemas import MAX_OFFSET, DatasetOut
from api.settings import Settings
from api.storage import ObjectNotFound, StorageError, file_uri_path, localize, removed_on_error
from pel.data import DatasetError, DatasetIndex, extract_archive, open_dataset

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], dependencies=[Depends(get_tenant)])

ARCHIVE_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tar", ".zip")


def archive_key_name(filename: str, path: Path) -> str:
    """The stored archive's file name, keeping (or, when missing, guessing) its archive suffix."""
    name = safe_name(filename, "dataset")
    if name.lower().endswith(ARCHIVE_SUFFIXES):
        return name
    return f"{name}.zip" if zipfile.is_zipfile(path) else f"{name}.tar"


def index_archive(
    archive: Path, loc: tuple[str, ...], settings: Settings, num_classes: int | None, shown: str
) -> DatasetIndex:
    """Unpack to a scratch folder and index it; the folder is removed before returning. Errors name the archive
    as ``shown`` (the client's file name or URI), never by its path in the server's scratch space."""
    with tempfile.TemporaryDirectory(prefix="dataset-", dir=settings.scratch_dir()) as tmp:
        try:
            root = extract_archive(
                archive, Path(tmp), max_bytes=settings.max_archive_bytes, max_members=settings.max_archive_members
            )
            return open_dataset(root, verify=True, num_classes=num_classes, max_image_pixels=settings.max_image_pixels)
        except DatasetError as exc:
            # Name files inside the archive, not the server's scratch folder.
            message = str(exc).replace(str(archive), shown).replace(f"{tmp}/", "").replace(tmp, "the archive")
            raise InvalidField(loc, message, kind="invalid_dataset") from None


NUM_CLASSES_FIELD = {
    "num_classes": {
        "type": "integer",
        "minimum": 2,
        "description": "declare the masks as class labels 0..num_classes-1 (default: instance labels)",
    }
}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    openapi_extra=upload_body("a zip or tar(.gz) archive", NUM_CLASSES_FIELD),
)
def register_dataset(
    tenant: TenantDep, form: UploadFormDep, session: SessionDep, store: StoreDep, settings: SettingsDep
) -> DatasetOut:
    """Upload an archive with images/ and masks/ (``file``), or register one by ``uri`` (an archive in a store,
    or a ``file://`` folder that the worker then reads in place)."""
    kind, uri = source_of(form)
    num_classes = _num_classes(form.text("num_classes"))
    dataset_id = new_id()
    key = None
    if kind == "file":
        assert form.file is not None
        index = index_archive(form.file.path, ("body", FILE_FIELD), settings, num_classes, form.file.filename)
        key = f"datasets/{dataset_id}/{archive_key_name(form.file.filename, form.file.path)}"
        stored_uri = store.put_file(key, form.file.path)
        name = display_name(form.text("name"), form.file.filename, ARCHIVE_SUFFIXES)
    else:
        assert uri is not None
        uri = check_uri_allowed(uri, tenant, settings)  # normalised: the form checked is the form used
        stored_uri, index = _index_uri(uri, settings, num_classes)
        name = display_name(form.text("name"), stored_uri, ARCHIVE_SUFFIXES)
    # An uploaded archive is stored before its row: should the insert fail (database gone), remove it again.
    with removed_on_error(store, key) if key is not None else contextlib.nullcontext():
        dataset = crud.create_dataset(
            session,
            dataset_id=dataset_id,
            name=name,
            uri=stored_uri,
            num_images=len(index.ids),
            splits={split: len(ids) for split, ids in index.splits.items()},
            min_height=index.min_size[0],
            min_width=index.min_size[1],
            num_classes=num_classes,
            tenant_id=tenant.id,
        )
        session.commit()
    return DatasetOut.model_validate(dataset)


def _num_classes(value: str | None) -> int | None:
    if value is None:
        return None
    if not value.isdigit() or int(value) < 2:
        raise InvalidField(
            ("body", "num_classes"),
            f"must be an integer of at least 2 (background and one class), got {value[:40]!r}",
            kind="int_parsing",
        )
    return int(value)


def check_fits(dataset: Dataset, config: dict[str, Any]) -> None:
    """Refuse (422 naming patch_size) a job whose training patch is larger than the dataset's smallest image.

    ``config`` is the job's resolved TrainConfig dict. Datasets registered before image sizes were recorded
    (NULL) are not checked."""
    patch = config.get("patch_size")
    if patch is None or dataset.min_height is None or dataset.min_width is None:
        return
    smallest = min(dataset.min_height, dataset.min_width)
    if patch > smallest:
        raise InvalidField(
            ("body", "config", "patch_size"),
            f"patch_size {patch} is larger than the images of dataset {dataset.id} (smallest image height "
            f"{dataset.min_height}, smallest width {dataset.min_width}): use a patch_size of at most {smallest}",
            kind="less_than_equal",
        )


def _index_uri(uri: str, settings: Settings, num_classes: int | None) -> tuple[str, DatasetIndex]:
    loc = ("body", "uri")
    try:
        if uri.startswith("file:") and file_uri_path(uri).is_dir():
            try:
                return uri, open_dataset(
                    file_uri_path(uri), verify=True, num_classes=num_classes, max_image_pixels=settings.max_image_pixels
                )
            except DatasetError as exc:
                raise InvalidField(loc, str(exc), kind="invalid_dataset") from None
        with tempfile.TemporaryDirectory(prefix="fetch-", dir=settings.scratch_dir()) as tmp:
            archive = localize(uri, Path(tmp), settings)
            return uri, index_archive(archive, loc, settings, num_classes, uri)
    except ObjectNotFound as exc:
        raise InvalidField(loc, str(exc), kind="not_found") from None
    except StorageError as exc:
        raise InvalidField(loc, str(exc)) from None


@router.get("")
def list_datasets(
    session: SessionDep,
    tenant: TenantDep,
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
) -> list[DatasetOut]:
    rows = crud.list_datasets(session, tenant_id=tenant.id, limit=limit, offset=offset)
    return [DatasetOut.model_validate(d) for d in rows]


@router.get("/{dataset_id}")
def get_dataset(dataset: DatasetDep) -> DatasetOut:
    return DatasetOut.model_validate(dataset)
