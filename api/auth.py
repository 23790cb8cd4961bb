"""API keys, the local keys of the embedded mode, and which URIs a tenant may register.

Keys look like ``pt_<id>_<secret>``: the id finds the row, the secret (32 random bytes) is checked against the stored
sha256 with a constant-time comparison. A plain sha256 is enough, and bcrypt/argon2 would only cost CPU per request:
those slow hashes protect low-entropy passwords against guessing after a database leak, while a 256-bit random
secret cannot be guessed from its hash at any speed. The plaintext key is shown once, when it is created.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from api.db import crud
from api.db.models import DEFAULT_TENANT_ID, ID_PATTERN, Tenant
from api.db.session import get_sessionmaker
from api.settings import Settings, get_settings, refuse_weak_admin_key
from api.storage import file_uri_path, normalise_uri

log = logging.getLogger(__name__)

KEY_PREFIX = "pt"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def same_secret(given: str, expected: str) -> bool:
    """Constant-time comparison (of digests, so that the lengths never differ either)."""
    return hmac.compare_digest(hash_secret(given), hash_secret(expected))


def new_key(key_id: str) -> tuple[str, str]:
    """(the plaintext key to hand out once, the sha256 of its secret to store)."""
    secret = secrets.token_urlsafe(32)
    return f"{KEY_PREFIX}_{key_id}_{secret}", hash_secret(secret)


def split_key(key: str) -> tuple[str, str] | None:
    """(key id, secret) of a well-formed key, else None."""
    prefix, _, rest = key.partition("_")
    key_id, _, secret = rest.partition("_")
    if prefix != KEY_PREFIX or not ID_PATTERN.fullmatch(key_id) or not secret:
        return None
    return key_id, secret


def tenant_for_key(session: Session, key: str) -> Tenant | None:
    """The tenant of a valid, unrevoked key; None for anything else (unknown, revoked, wrong secret, malformed)."""
    parts = split_key(key)
    if parts is None:
        return None
    key_id, secret = parts
    row = crud.get_api_key(session, key_id=key_id)
    if row is None or row.revoked_at is not None:
        return None
    if not hmac.compare_digest(hash_secret(secret), row.secret_sha256):
        return None
    return crud.get_tenant(session, tenant_id=row.tenant_id)


# -- the embedded mode's local keys ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalKeys:
    admin_key: str
    api_key: str


def read_local_keys(path: Path) -> LocalKeys | None:
    try:
        data = json.loads(path.read_text())
        return LocalKeys(admin_key=data["admin_key"], api_key=data["api_key"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def admin_key_at_startup(settings: Settings) -> str:
    """The admin key the app accepts: the configured one; in development without one, the generated local one (and
    the local tenant key is registered). A database that cannot take the key now (down, not migrated) is logged, not
    fatal: requests then fail with the database's own error (503 for an outage)."""
    if settings.env != "development":
        refuse_weak_admin_key(settings.admin_key)  # required here: the API is the one process that needs it
        return settings.admin_key
    keys = local_keys(settings)
    try:
        with get_sessionmaker(settings.database_url)() as session:
            register_local_key(session, keys.api_key)
    except SQLAlchemyError as exc:
        log.warning("could not register the local API key in the database: %s", str(exc).splitlines()[0])
    return settings.admin_key or keys.admin_key


def local_keys(settings: Settings) -> LocalKeys:
    """Development only: the admin key and a default-tenant key, generated on first start and kept in
    ``{home}/local-keys.json`` (mode 0600) for the client, the CLI and the demo.

    Several processes may start at once on one home: the file is written under a temporary name and linked into
    place, so exactly one set of keys wins and everyone reads that one."""
    path = settings.local_keys_file
    keys = read_local_keys(path)
    if keys is None:
        key_id = crud.new_id()
        api_key, _ = new_key(key_id)
        admin_key = settings.admin_key or secrets.token_urlsafe(32)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".keys-", delete=False) as tmp:
            os.chmod(tmp.name, 0o600)
            json.dump({"admin_key": admin_key, "api_key": api_key, "tenant_id": DEFAULT_TENANT_ID}, tmp)
        try:
            with contextlib.suppress(FileExistsError):  # another process won: use its keys
                os.link(tmp.name, path)
        finally:
            os.unlink(tmp.name)
        keys = read_local_keys(path)
    if keys is None or split_key(keys.api_key) is None:
        raise RuntimeError(f"cannot read the local API keys at {path}; delete the file to generate new ones")
    return keys


def register_local_key(session: Session, api_key: str) -> None:
    """Insert the local key's row for the default tenant when missing (first start, or the database was deleted
    while the key file was kept)."""
    parts = split_key(api_key)
    assert parts is not None
    key_id, secret = parts
    if crud.get_api_key(session, key_id=key_id) is not None:
        return
    crud.create_api_key(
        session, tenant_id=DEFAULT_TENANT_ID, key_id=key_id, secret_sha256=hash_secret(secret), name="local"
    )
    try:
        session.commit()
    except IntegrityError:  # a concurrent start inserted it first
        session.rollback()


# -- which URIs a tenant may register -------------------------------------------------------------------------------


class UriRefused(ValueError):
    """The URI is outside what this tenant may register; the message names what is allowed."""


def normalise_s3_prefix(prefix: str) -> str:
    """``s3://bucket/prefix/`` (always ending in /, so that prefix "a" never admits "ab/")."""
    parsed = urlparse(prefix.strip())
    path = parsed.path.strip("/")
    if parsed.scheme != "s3" or not parsed.netloc or ".." in path.split("/") or "//" in path:
        raise ValueError(f"s3_prefix must look like s3://bucket/prefix/, got {prefix!r}")
    return f"s3://{parsed.netloc}/{path}/" if path else f"s3://{parsed.netloc}/"


def check_registration_uri(uri: str, tenant: Tenant, settings: Settings) -> str:
    """The URI in its normalised form (api.storage.normalise_uri), if this tenant may register it; raises UriRefused
    naming the allowed place, StorageError for a malformed URI.

    Every check reads the normalised form and callers store and use only that form: a spelling the check does
    not know (``S3://``, ``File:``, ``//``, ``..``) cannot reach what the check refused.

    - ``s3://``: only under the tenant's s3_prefix; a tenant without one may use any bucket in development only.
    - ``file://``: never the service's own files (its home, database, object store, work and scratch folders), in
      any environment. The server reads its own disk, which is nobody's data in a shared deployment: any other
      path in development (the embedded mode is one trusted user), only under file_uri_roots in production.
    Other schemes are left to the storage layer, which names the ones it supports."""
    uri = normalise_uri(uri)
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        segments = parsed.path.split("/")
        if ".." in segments or "." in segments or "//" in parsed.path:
            raise UriRefused(f"{uri!r}: '.', '..' and empty path segments are not allowed in s3:// URIs")
        if tenant.s3_prefix is None:
            if settings.env == "development":
                return uri
            raise UriRefused(
                f"tenant {tenant.name!r} has no s3_prefix configured, so it may not register s3:// URIs; "
                "ask the administrator to set one, or upload the file"
            )
        if not uri.startswith(tenant.s3_prefix):
            raise UriRefused(f"{uri!r} is outside this tenant's bucket/prefix {tenant.s3_prefix}")
        return uri
    if parsed.scheme == "file":
        path = file_uri_path(uri).resolve()  # symlinks resolved: no link leads out of a root or into the service
        owned = service_file(path, settings)
        if owned is not None:
            raise UriRefused(f"{uri!r} is {owned}; the service's own files cannot be registered")
        roots = settings.file_uri_root_list
        if not roots:
            if settings.env == "development":
                return uri
            raise UriRefused(
                "file:// URIs are not accepted by this server (PELTUNE_FILE_URI_ROOTS is empty): upload the file "
                "or register an s3:// URI"
            )
        if not any(path.is_relative_to(root) for root in roots):
            allowed = ", ".join(str(root) for root in roots)
            raise UriRefused(f"{uri!r} is outside the folders file:// URIs may come from ({allowed})")
    return uri


def service_file(path: Path, settings: Settings) -> str | None:
    """What of the service's own a resolved path is (None: nothing). Reading them through a registration would
    hand out other tenants' objects, keys and rows, and opening the SQLite file at all breaks its locking: closing
    any descriptor of a file drops every POSIX lock the process holds on it, so another connection's writes could
    be lost. The answer names the kind, never the server's folder."""
    database = sqlite_file(settings.database_url)
    if database is not None and path in {database, *(Path(f"{database}{end}") for end in SQLITE_SIDE_FILES)}:
        return "the service's database"
    folders = []
    if urlparse(settings.storage_url).scheme == "file":
        folders.append(("object store", file_uri_path(settings.storage_url)))
    # The home holds the scratch folders (uploads, unpacked archives), the broker's folders and local-keys.json.
    folders += [("work folder", settings.work_dir), ("home (PELTUNE_HOME)", settings.home)]
    for what, folder in folders:
        if folder is not None and path.is_relative_to(folder.resolve()):
            return f"inside the service's {what}"
    return None


SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


def sqlite_file(database_url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL (None for other databases and in-memory SQLite)."""
    url = make_url(database_url)
    if not url.drivername.startswith("sqlite") or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database).resolve()


# -- CORS -----------------------------------------------------------------------------------------------------------


class CorsFromSettings:
    """CORS headers only for the origins PELTUNE_CORS_ORIGINS lists; none at all by default (closed). Built on the
    first request, when the app's settings are known (the deployed app reads them at startup, after create_app)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.inner: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            # Lifespan passes untouched: settings that fail to load must fail the app's startup there, not here.
            await self.app(scope, receive, send)
            return
        if self.inner is None:
            settings = scope["app"].state.settings or get_settings()
            origins = settings.cors_origin_list
            self.inner = (
                CORSMiddleware(
                    self.app,
                    allow_origins=origins,
                    allow_methods=["GET", "POST", "DELETE"],
                    allow_headers=["Authorization", "X-API-Key", "Content-Type", "Idempotency-Key"],
                    allow_credentials=False,  # keys travel in headers, never in cookies
                )
                if origins
                else self.app
            )
        await self.inner(scope, receive, send)
