"""Engines and sessions: one engine per database URL per process, sessions that the caller commits.

SQLite (the embedded default) is shared by the API and worker processes, so it runs in WAL mode with a busy
timeout: readers never block the worker's metric writes and short write bursts wait instead of failing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker

from api.settings import get_settings

_lock = threading.Lock()
_engines: dict[str, Engine] = {}
_sessionmakers: dict[str, sessionmaker[Session]] = {}


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).parent.mkdir(parents=True, exist_ok=True)  # a fresh PELTUNE_HOME just works
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _configure_sqlite)
        return engine
    settings = get_settings()
    # pre_ping: pooled connections may be dead (the worker holds them across hour-long jobs; the server may have
    # restarted): each checkout tests its connection and reconnects, so service resumes by itself once the
    # database is back. connect_timeout and pool_timeout bound how long a request waits on a database that is
    # down (it then gets 503, see api/errors.py); TCP keepalives notice a server that vanished mid-connection.
    connect_args: dict[str, Any] = {}
    if make_url(url).get_backend_name() == "postgresql":
        connect_args = {
            "connect_timeout": settings.db_connect_timeout_s,
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
        }
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=5,
        max_overflow=10,
        pool_timeout=settings.db_pool_timeout_s,
        connect_args=connect_args,
    )


def get_engine(url: str | None = None) -> Engine:
    url = url or get_settings().database_url
    with _lock:
        if url not in _engines:
            _engines[url] = make_engine(url)
        return _engines[url]


def get_sessionmaker(url: str | None = None) -> sessionmaker[Session]:
    url = url or get_settings().database_url
    engine = get_engine(url)
    with _lock:
        if url not in _sessionmakers:
            # expire_on_commit=False: objects stay readable after commit (responses are built after the commit).
            _sessionmakers[url] = sessionmaker(engine, expire_on_commit=False)
        return _sessionmakers[url]


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A session that commits on success and rolls back on error: for workers and scripts (routes commit)."""
    with get_sessionmaker(url)() as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def dispose_engines() -> None:
    """Drop pooled connections; called in forked children so they never share their parent's sockets."""
    with _lock:
        for engine in _engines.values():
            # close=False: leave the parent's connections alone, just forget them in this process.
            engine.dispose(close=False)
