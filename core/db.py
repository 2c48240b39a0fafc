"""Engine and sessions. SQLite (embedded default) and PostgreSQL (production) behave the same to callers."""

from __future__ import annotations

import logging
import sqlite3
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

_BUSY_TIMEOUT_MS = 30_000


def make_engine(url: str, *, pool_size: int = 10, durable_commits: bool = True) -> Engine:
    """Build an engine; SQLite gets WAL, FULL sync (durable acknowledgement) and a busy timeout.

    ``durable_commits=False`` (SQLite only; the worker processes): synchronous=NORMAL, a commit is not
    fsynced by itself. It survives the process being killed (the WAL is in the OS's cache) and becomes
    durable at the next checkpoint or at the next FULL commit of any other process, whose fsync of the WAL
    covers it; only an OS crash or power loss in between can lose it, and then the job it recorded is done
    again (reports have deterministic UIDs: the same SR is written and, at worst, sent again). What the
    workers write is all derived from what receivers and the API commit durably. Without the fsync a commit
    holds SQLite's single write lock for a fraction of the time, and every process waits less for it: at 5
    studies/s the two worker processes had waited 30 % of their time in BEGIN IMMEDIATE.
    """
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": _BUSY_TIMEOUT_MS / 1000},
            pool_size=pool_size,
            max_overflow=20,
        )
        event.listen(engine, "connect", _sqlite_pragmas if durable_commits else _sqlite_pragmas_fast_commits)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(url, pool_size=pool_size, max_overflow=20, pool_pre_ping=True)


#: Execution option of a connection that only reads (see read_session).
_READ_ONLY = "gateway_read_only"


#: How long BEGIN IMMEDIATE polls for SQLite's write lock itself (see _sqlite_begin) before it waits in
#: SQLite's busy handler for the rest of the busy timeout; and its longest pause between two tries.
_POLL_LOCK_SECONDS = 2.0
_POLL_LOCK_PAUSE = 0.002


def _sqlite_begin(conn: Connection) -> None:
    """pysqlite's own BEGIN handling defers locks; take the write lock at BEGIN so two writers never
    deadlock on a read-to-write upgrade. A read-only session needs no lock: WAL readers never wait.

    The write lock is polled for every 0.25-2 ms for up to :data:`_POLL_LOCK_SECONDS`, the busy timeout
    off meanwhile. SQLite's own busy handler sleeps 1, 2, 5, 10, 15, 20, 25 … 100 ms between tries: a lock
    held for the 1-5 ms of a commit then stood free for most of each sleep while the receivers and workers
    queued for it (at 5 studies/s the workers had waited 30 % of their time in BEGIN IMMEDIATE).
    """
    if conn.get_execution_options().get(_READ_ONLY, False):
        conn.exec_driver_sql("BEGIN DEFERRED")
        return
    raw = conn.connection.dbapi_connection
    assert raw is not None
    raw.execute("PRAGMA busy_timeout=0")
    try:
        pause, deadline = 0.00025, time.monotonic() + _POLL_LOCK_SECONDS
        while True:
            try:
                raw.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    break  # anything else, or a long wait: as SQLite does it, below
            time.sleep(pause)
            pause = min(pause * 2, _POLL_LOCK_PAUSE)
    finally:
        raw.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
    conn.exec_driver_sql("BEGIN IMMEDIATE")  # its error, if any, as SQLAlchemy raises it


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (see make_engine)
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
    cur.close()


def _sqlite_pragmas_fast_commits(dbapi_conn: Any, record: Any) -> None:
    _sqlite_pragmas(dbapi_conn, record)
    dbapi_conn.execute("PRAGMA synchronous=NORMAL")


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
