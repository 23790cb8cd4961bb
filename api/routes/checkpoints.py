"""/v1/checkpoints: register (upload or URI), list, get, download."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Query, status
from fastapi.responses import StreamingResponse

from api.db import crud
from api.db.models import Checkpoint, new_id
from api.deps import (
    CheckpointDep,
    SessionDep,
    SettingsDep,
    StoreDep,
    TenantDep,
    UploadFormDep,
    check_uri_allowed,
    get_tenant,
)
from api.errors import Conflict, InvalidField
from api.routes._multipart import FILE_FIELD, display_name, safe_name, source_of, upload_body
from api.schemas import MAX_OFFSET, CheckpointOut
from api.settings import Settings
from api.storage import (
    ObjectNotFound,
    ObjectStore,
    StorageError,
    file_digest,
    file_uri_path,
    localize,
    removed_on_error,
    store_for_uri,
)
from pel.models.intake import IntakeError, file_suffix, inspect_file, parse_architecture, resolve

router = APIRouter(prefix="/v1/checkpoints", tags=["checkpoints"], dependencies=[Depends(get_tenant)])


def inspect_checkpoint(path: Path, declared: str | None, loc: tuple[str, ...]) -> tuple[str, dict[str, Any] | None]:
    """(format, architecture) for the file at ``path``, checked torch-free (pel.models.intake), or a 422 naming the
    problem: an unknown file, a pickle that references anything but tensors (never unpickled for real), an invalid
    or missing architecture, or weights that do not fit it (missing/unexpected keys and shape mismatches)."""
    architecture = None
    if declared is not None:
        try:
            architecture = parse_architecture(declared)
        except IntakeError as exc:
            raise InvalidField(("body", "architecture"), str(exc)) from None
    try:
        inspection = inspect_file(path)
    except IntakeError as exc:
        raise InvalidField(loc, f"{NOT_A_CHECKPOINT}: {exc}", kind="invalid_checkpoint") from None
    try:
        return resolve(inspection, architecture)
    except IntakeError as exc:
        raise InvalidField(loc, str(exc), kind="invalid_checkpoint") from None


NOT_A_CHECKPOINT = "not a PyTorch checkpoint"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors")


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    openapi_extra=upload_body(
        "a model file: a PEL Tune checkpoint, a TorchScript module, or a state_dict (.pt or .safetensors)",
        extra_fields={
            "architecture": {
                "type": "string",
                "description": 'JSON; required for a state_dict or safetensors file: {"name": "unet", "width": 16, '
                '"depth": 3, ...} (the built-in U-Net) or {"name": "smp", "arch": "Unet", "encoder": "resnet34", '
                '"in_channels": 1, "classes": 2}',
            }
        },
    ),
)
def register_checkpoint(
    tenant: TenantDep, form: UploadFormDep, session: SessionDep, store: StoreDep, settings: SettingsDep
) -> CheckpointOut:
    """Upload a model file (multipart ``file``) or register one by ``uri``, with an optional ``architecture``.

    The file's format is detected and its tensors' names and shapes read without torch; the built-in U-Net's
    weights must fit the declared architecture exactly, else 422 names the missing and unexpected keys and the
    shape mismatches (smp architectures are checked by the worker, before any training step). Nothing is stored
    for a refused file. A ``file://`` checkpoint is copied into the object store, as an upload is (the row's uri is
    the store's): a later change at the source path (a rewrite, a symlink swapped in) can reach neither downloads
    nor jobs. An ``s3://`` checkpoint is registered in place; its sha256 and size are recorded and every job
    verifies them.
    """
    kind, uri = source_of(form)
    declared = form.text("architecture")
    checkpoint_id = new_id()
    if kind == "file":
        assert form.file is not None
        fmt, architecture = inspect_checkpoint(form.file.path, declared, ("body", FILE_FIELD))
        name = display_name(form.text("name"), form.file.filename, CHECKPOINT_SUFFIXES)
        key = f"checkpoints/{checkpoint_id}/{safe_name(form.file.filename, 'model.pt')}"
        stored_uri = store.put_file(key, form.file.path)
        size, sha256 = form.file.size, form.file.sha256
    else:
        assert uri is not None
        uri = check_uri_allowed(uri, tenant, settings)  # normalised: the form checked is the form used
        stored_uri, key, size, sha256, source, fmt, architecture = _inspect_checkpoint_uri(
            uri, settings, store, checkpoint_id, declared
        )
        name = display_name(form.text("name"), source, CHECKPOINT_SUFFIXES)
    # A file copied into the store before its row: should the insert fail (database gone), remove it again.
    with removed_on_error(store, key) if key is not None else contextlib.nullcontext():
        checkpoint = crud.create_checkpoint(
            session,
            checkpoint_id=checkpoint_id,
            name=name,
            uri=stored_uri,
            size_bytes=size,
            sha256=sha256,
            format=fmt,
            architecture=architecture,
            tenant_id=tenant.id,
        )
        session.commit()
    return CheckpointOut.model_validate(checkpoint)


def _inspect_checkpoint_uri(
    uri: str, settings: Settings, store: ObjectStore, checkpoint_id: str, declared: str | None
) -> tuple[str, str | None, int, str, str, str, dict[str, Any] | None]:
    """(stored uri, its key in our store (None: registered in place), size, sha256, source path or uri for the
    display name, format, architecture). A ``file://`` source is copied once, checked and digested as that copy,
    and the copy is what goes into the store (no window between the check and the copy for the source to change)."""
    try:
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
            fmt, architecture = inspect_checkpoint(path, declared, ("body", "uri"))
            size, sha256 = file_digest(path)
            stored_uri, key = uri, None
            if source is not None:
                key = f"checkpoints/{checkpoint_id}/{safe_name(source.name, 'model.pt')}"
                stored_uri = store.put_file(key, path)
    except ObjectNotFound as exc:
        raise InvalidField(("body", "uri"), str(exc), kind="not_found") from None
    except StorageError as exc:
        raise InvalidField(("body", "uri"), str(exc)) from None
    return stored_uri, key, size, sha256, str(source) if source is not None else uri, fmt, architecture


@router.get("")
def list_checkpoints(
    session: SessionDep,
    tenant: TenantDep,
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
) -> list[CheckpointOut]:
    rows = crud.list_checkpoints(session, tenant_id=tenant.id, limit=limit, offset=offset)
    return [CheckpointOut.model_validate(c) for c in rows]


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
    filename = safe_name(checkpoint.name, "model") + file_suffix(checkpoint.format)
    return StreamingResponse(
        store.open_stream(key),
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(size),
            "Content-Disposition": f'attachment; filename="{filename}"',
            "ETag": f'"{checkpoint.sha256}"',
        },
    )
