"""/v1/datasets: register (archive upload, archive URI, or a file:// folder used in place), list, get.

A dataset is validated before its row exists: the archive is unpacked to a temporary folder and indexed with
``pel.data.open_dataset`` (images/masks pairing, sizes, splits); any problem is a 422 carrying its message.
"""

from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path

from fastapi import APIRouter, Query, status

from api.db import crud
from api.db.models import new_id
from api.deps import DatasetDep, SessionDep, SettingsDep, StoreDep, UploadFormDep
from api.errors import InvalidField
from api.routes._multipart import FILE_FIELD, display_name, safe_name, source_of, upload_body
from api.schemas import DatasetOut
from api.settings import Settings
from api.storage import ObjectNotFound, StorageError, file_uri_path, localize, normalise_uri
from pel.data import DatasetError, DatasetIndex, extract_archive, open_dataset

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

ARCHIVE_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tar", ".zip")


def archive_key_name(filename: str, path: Path) -> str:
    """The stored archive's file name, keeping (or, when missing, guessing) its archive suffix."""
    name = safe_name(filename, "dataset")
    if name.lower().endswith(ARCHIVE_SUFFIXES):
        return name
    return f"{name}.zip" if zipfile.is_zipfile(path) else f"{name}.tar"


def index_archive(archive: Path, loc: tuple[str, ...], tmp_root: Path) -> DatasetIndex:
    """Unpack to a scratch folder below tmp_root and index it; the folder is removed before returning."""
    with tempfile.TemporaryDirectory(prefix="dataset-", dir=tmp_root) as tmp:
        try:
            return open_dataset(extract_archive(archive, Path(tmp)), verify=True)
        except DatasetError as exc:
            # Name files inside the archive, not the server's scratch folder.
            message = str(exc).replace(f"{tmp}/", "").replace(tmp, "the archive")
            raise InvalidField(loc, message, kind="invalid_dataset") from None


@router.post("", status_code=status.HTTP_201_CREATED, openapi_extra=upload_body("a zip or tar(.gz) archive"))
def register_dataset(form: UploadFormDep, session: SessionDep, store: StoreDep, settings: SettingsDep) -> DatasetOut:
    """Upload an archive with images/ and masks/ (``file``), or register one by ``uri`` (an archive in a store,
    or a ``file://`` folder that the worker then reads in place)."""
    kind, uri = source_of(form)
    dataset_id = new_id()
    tmp_root = settings.scratch_dir()
    if kind == "file":
        assert form.file is not None
        index = index_archive(form.file.path, ("body", FILE_FIELD), tmp_root)
        key = f"datasets/{dataset_id}/{archive_key_name(form.file.filename, form.file.path)}"
        stored_uri = store.put_file(key, form.file.path)
        name = display_name(form.text("name"), form.file.filename, ARCHIVE_SUFFIXES)
    else:
        assert uri is not None
        stored_uri, index = _index_uri(uri, settings)
        name = display_name(form.text("name"), stored_uri, ARCHIVE_SUFFIXES)
    dataset = crud.create_dataset(
        session,
        dataset_id=dataset_id,
        name=name,
        uri=stored_uri,
        num_images=len(index.ids),
        splits={split: len(ids) for split, ids in index.splits.items()},
    )
    session.commit()
    return DatasetOut.model_validate(dataset)


def _index_uri(uri: str, settings: Settings) -> tuple[str, DatasetIndex]:
    loc = ("body", "uri")
    tmp_root = settings.scratch_dir()
    try:
        uri = normalise_uri(uri)
        if uri.startswith("file:") and file_uri_path(uri).is_dir():
            try:
                return uri, open_dataset(file_uri_path(uri), verify=True)
            except DatasetError as exc:
                raise InvalidField(loc, str(exc), kind="invalid_dataset") from None
        with tempfile.TemporaryDirectory(prefix="fetch-", dir=tmp_root) as tmp:
            archive = localize(uri, Path(tmp), settings)
            return uri, index_archive(archive, loc, tmp_root)
    except ObjectNotFound as exc:
        raise InvalidField(loc, str(exc), kind="not_found") from None
    except StorageError as exc:
        raise InvalidField(loc, str(exc)) from None


@router.get("")
def list_datasets(
    session: SessionDep, limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0)
) -> list[DatasetOut]:
    return [DatasetOut.model_validate(d) for d in crud.list_datasets(session, limit=limit, offset=offset)]


@router.get("/{dataset_id}")
def get_dataset(dataset: DatasetDep) -> DatasetOut:
    return DatasetOut.model_validate(dataset)
