"""Engine and sessions. SQLite (embedded default) and PostgreSQL (production) behave the same to callers."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

T = TypeVar("T")


def make_engine(url: str, *, pool_size: int = 10) -> Engine:
    """Build an engine; SQLite gets WAL, FULL sync (durable acknowledgement) and a busy timeout."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=pool_size,
            max_overflow=20,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(url, pool_size=pool_size, max_overflow=20, pool_pre_ping=True)


#: Execution option of a connection that only reads (see read_session).
_READ_ONLY = "gateway_read_only"


def _sqlite_begin(conn: Connection) -> None:
    # pysqlite's own BEGIN handling defers locks; take the write lock at BEGIN so two writers never deadlock
    # on a read-to-write upgrade. A read-only session needs no lock: WAL readers never wait for the writer.
    read_only = conn.get_execution_options().get(_READ_ONLY, False)
    conn.exec_driver_sql("BEGIN DEFERRED" if read_only else "BEGIN IMMEDIATE")


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (see make_engine)
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any exception."""
    with factory() as session, session.begin():
        yield session


def when_available(call: Callable[[], T], *, patience: float, pause: float = 1.0) -> T:
    """``call()``; while it fails because the database is unavailable (OperationalError: server down or
    restarting, connection dropped, SQLite busy past its timeout), try again every ``pause`` seconds for up to
    ``patience`` seconds, then let the error through. For writes that record work already done."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return call()
        except OperationalError as exc:
            if time.monotonic() + pause > deadline:
                raise
            log.warning("database unavailable (%s); trying again in %.0f s", exc.orig, pause)
            time.sleep(pause)


@contextmanager
def read_session(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that only reads: on SQLite it does not queue for the write lock behind other writers (a
    C-STORE's duplicate check waited there for the workers' commits). Never write through it."""
    with factory() as session:
        session.connection(execution_options={_READ_ONLY: True})
        yield session


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"
