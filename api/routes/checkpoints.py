"""/v1/checkpoints: register (upload or URI), list, get, download."""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from pathlib import Path

from fastapi import APIRouter, Query, status
from fastapi.responses import StreamingResponse

from api.db import crud
from api.db.models import Checkpoint, new_id
from api.deps import CheckpointDep, SessionDep, SettingsDep, StoreDep, UploadFormDep
from api.errors import Conflict, InvalidField
from api.routes._multipart import FILE_FIELD, display_name, safe_name, source_of, upload_body
from api.schemas import CheckpointOut
from api.settings import Settings
from api.storage import (
    ObjectNotFound,
    ObjectStore,
    StorageError,
    file_digest,
    file_uri_path,
    localize,
    normalise_uri,
    store_for_uri,
)

router = APIRouter(prefix="/v1/checkpoints", tags=["checkpoints"])


def is_torch_file(path: Path) -> bool:
    """torch.save's zip layout (``<name>/data.pkl`` inside a zip). Loading is the worker's job: the API never
    unpickles user files."""
    if not path.is_file():
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name == "data.pkl" or name.endswith("/data.pkl") for name in archive.namelist())
    except zipfile.BadZipFile:
        return False


NOT_A_CHECKPOINT = "not a PyTorch checkpoint (expected a torch.save zip file containing data.pkl)"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")


@router.post(
    "", status_code=status.HTTP_201_CREATED, openapi_extra=upload_body("a torch.save checkpoint file (model.pt)")
)
def register_checkpoint(
    form: UploadFormDep, session: SessionDep, store: StoreDep, settings: SettingsDep
) -> CheckpointOut:
    """Upload a checkpoint (multipart ``file``) or register one by ``uri``.

    A ``file://`` checkpoint is copied into the object store, as an upload is (the row's uri is the store's): a
    later change at the source path (a rewrite, a symlink swapped in) can reach neither downloads nor jobs. An
    ``s3://`` checkpoint is registered in place; its sha256 and size are recorded and every job verifies them.
    """
    kind, uri = source_of(form)
    checkpoint_id = new_id()
    if kind == "file":
        assert form.file is not None
        if not is_torch_file(form.file.path):
            raise InvalidField(("body", FILE_FIELD), NOT_A_CHECKPOINT, kind="invalid_checkpoint")
        name = display_name(form.text("name"), form.file.filename, CHECKPOINT_SUFFIXES)
        key = f"checkpoints/{checkpoint_id}/{safe_name(form.file.filename, 'model.pt')}"
        stored_uri = store.put_file(key, form.file.path)
        size, sha256 = form.file.size, form.file.sha256
    else:
        assert uri is not None
        stored_uri, size, sha256, source = _inspect_checkpoint_uri(uri, settings, store, checkpoint_id)
        name = display_name(form.text("name"), source, CHECKPOINT_SUFFIXES)
    checkpoint = crud.create_checkpoint(
        session, checkpoint_id=checkpoint_id, name=name, uri=stored_uri, size_bytes=size, sha256=sha256
    )
    session.commit()
    return CheckpointOut.model_validate(checkpoint)


def _inspect_checkpoint_uri(
    uri: str, settings: Settings, store: ObjectStore, checkpoint_id: str
) -> tuple[str, int, str, str]:
    """(stored uri, size, sha256, source path or uri for the display name). A ``file://`` source is copied once,
    checked and digested as that copy, and the copy is what goes into the store (no window between the check and
    the copy for the source to change)."""
    try:
        uri = normalise_uri(uri)
        with tempfile.TemporaryDirectory(dir=settings.scratch_dir()) as tmp:
            source = file_uri_path(uri) if uri.startswith("file:") else None
            if source is not None:
                if not source.is_file():
                    raise ObjectNotFound(f"no file at {uri}")
                path = Path(tmp) / "checkpoint"
                try:
                    shutil.copyfile(source, path)
                except OSError as exc:
                    raise StorageError(f"cannot read {uri}: {exc.strerror or exc}") from None
            else:
                path = localize(uri, Path(tmp), settings)
            if not is_torch_file(path):
                raise InvalidField(("body", "uri"), f"{uri}: {NOT_A_CHECKPOINT}", kind="invalid_checkpoint")
            size, sha256 = file_digest(path)
            stored_uri = uri
            if source is not None:
                key = f"checkpoints/{checkpoint_id}/{safe_name(source.name, 'model.pt')}"
                stored_uri = store.put_file(key, path)
    except ObjectNotFound as exc:
        raise InvalidField(("body", "uri"), str(exc), kind="not_found") from None
    except StorageError as exc:
        raise InvalidField(("body", "uri"), str(exc)) from None
    return stored_uri, size, sha256, str(source) if source is not None else uri


@router.get("")
def list_checkpoints(
    session: SessionDep, limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0)
) -> list[CheckpointOut]:
    return [CheckpointOut.model_validate(c) for c in crud.list_checkpoints(session, limit=limit, offset=offset)]


@router.get("/{checkpoint_id}")
def get_checkpoint(checkpoint: CheckpointDep) -> CheckpointOut:
    return CheckpointOut.model_validate(checkpoint)


@router.get(
    "/{checkpoint_id}/download",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "the checkpoint file, streamed"}},
)
def download_checkpoint(checkpoint: CheckpointDep, settings: SettingsDep) -> StreamingResponse:
    return checkpoint_stream(checkpoint, settings)


def checkpoint_stream(checkpoint: Checkpoint, settings: Settings) -> StreamingResponse:
    """Stream a checkpoint from its store in 1 MiB chunks; it is never held in memory whole.

    The ETag is the sha256 recorded at registration. The bytes are not re-hashed here (that would mean reading the
    whole object before sending it); an object whose size no longer matches the row is refused with 409, and jobs
    verify size and sha256 of every checkpoint they stage."""
    store, key = store_for_uri(checkpoint.uri, settings)
    size = store.size(key)  # the object's real size: Content-Length must match the bytes we send
    if size != checkpoint.size_bytes:
        raise Conflict(
            f"checkpoint {checkpoint.id} changed since it was registered "
            f"(size {size} bytes, registered {checkpoint.size_bytes} bytes)"
        )
    filename = safe_name(checkpoint.name, "model") + ".pt"
    return StreamingResponse(
        store.open_stream(key),
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(size),
            "Content-Disposition": f'attachment; filename="{filename}"',
            "ETag": f'"{checkpoint.sha256}"',
        },
    )
