"""Presigned download links: a client fetches a checkpoint straight from the object store, not through the API.

``GET /v1/checkpoints/{id}/download`` streams through the API and works everywhere; ``GET /v1/checkpoints/{id}/link``
hands out a time-limited S3 URL instead (big files, no API process in the data path). The URL is signed for
``PELTUNE_S3_PUBLIC_ENDPOINT_URL``, the endpoint as the *client* reaches it: an S3 signature covers the Host header,
so a URL signed for the in-network name (``http://minio:9000``) would neither resolve nor verify on the host.
Checkpoints in a local-folder store have no such link (409: use /download).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any
from urllib.parse import urlparse

from fastapi import APIRouter
from pydantic import BaseModel

from api.deps import CheckpointDep, SettingsDep
from api.errors import Conflict
from api.settings import Settings
from pel.models.intake import file_suffix

router = APIRouter(prefix="/v1/checkpoints", tags=["checkpoints"])


class DownloadLink(BaseModel):
    url: str
    expires_at: datetime


@router.get("/{checkpoint_id}/link", responses={409: {"description": "not in an S3 store: use /download"}})
def checkpoint_link(checkpoint: CheckpointDep, settings: SettingsDep) -> DownloadLink:
    """A presigned URL that downloads the checkpoint from the object store, valid PELTUNE_DOWNLOAD_LINK_EXPIRY_S."""
    parsed = urlparse(checkpoint.uri)
    if parsed.scheme != "s3":
        raise Conflict(f"checkpoint {checkpoint.id} is not in an S3 store; download it from its /download route")
    filename = checkpoint.id + file_suffix(checkpoint.format)
    url = presigned_get_url(parsed.netloc, parsed.path.lstrip("/"), settings, filename=filename)
    return DownloadLink(url=url, expires_at=datetime.now(UTC) + timedelta(seconds=settings.download_link_expiry_s))


def presigned_get_url(bucket: str, key: str, settings: Settings, *, filename: str) -> str:
    """GET URL for s3://bucket/key, signed for the public endpoint (no request is made: signing is local)."""
    client = _signing_client(settings.s3_public_endpoint_url or settings.s3_endpoint_url)
    return client.generate_presigned_url(
        "get_object",
        Params={
            "Bucket": bucket,
            "Key": key,
            "ResponseContentDisposition": f'attachment; filename="{filename}"',
        },
        ExpiresIn=settings.download_link_expiry_s,
    )


@lru_cache(maxsize=8)
def _signing_client(endpoint_url: str | None) -> Any:
    import boto3
    from botocore.config import Config

    # Path-style (http://host:9000/bucket/key): MinIO and other self-hosted endpoints need no wildcard DNS for it.
    style = "path" if endpoint_url else "auto"
    config = Config(signature_version="s3v4", s3={"addressing_style": style})
    return boto3.client("s3", endpoint_url=endpoint_url, config=config)
