"""Sessions on both databases: a read-only session never queues behind a writer; on SQLite a writer takes the
write lock as soon as it is free, and the workers' commits skip the fsync."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from core import db
from core.db import make_engine, make_sessionmaker, read_session, transaction
from core.migrate import upgrade
from core.tables import Study


def test_a_read_session_does_not_wait_for_a_writer(factory: sessionmaker[Session]) -> None:
    """On SQLite every transaction took the write lock at BEGIN; a C-STORE's duplicate check (a read) then
    waited for the workers' commits."""
    with transaction(factory) as session:
        session.add(Study(study_instance_uid="1.2.3", status="receiving"))
    holding, release = threading.Event(), threading.Event()

    def write() -> None:
        with transaction(factory) as session:
            session.execute(update(Study).values(status="complete"))
            holding.set()
            release.wait(60)

    def read() -> None:
        with read_session(factory) as session:
            seen.append(session.scalars(select(Study.status)).one())

    seen: list[str] = []
    writer = threading.Thread(target=write)
    writer.start()
    reader = threading.Thread(target=read)
    try:
        assert holding.wait(10)
        reader.start()
        reader.join(5)
        assert seen == ["receiving"]  # done while the writer holds its lock; its change is not committed yet
    finally:
        release.set()
        writer.join()
        if reader.ident is not None:
            reader.join()
    with read_session(factory) as session:
        assert session.scalars(select(Study.status)).one() == "complete"


def _hold_write_lock(
    factory: sessionmaker[Session], seconds: float
) -> tuple[threading.Thread, threading.Event]:
    holding = threading.Event()

    def write() -> None:
        with transaction(factory) as session:
            session.execute(update(Study).values(status="complete"))
            holding.set()
            time.sleep(seconds)

    thread = threading.Thread(target=write)
    thread.start()
    assert holding.wait(10)
    return thread, holding


@pytest.mark.parametrize("poll_seconds", [2.0, 0.05])
def test_a_writer_gets_the_lock_as_soon_as_it_is_released(
    tmp_path: Path, poll_seconds: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second writer takes SQLite's write lock within a few ms of its release, polling for it (2.0), or,
    after a wait longer than the polling lasts (0.05), in SQLite's own busy handler: either way it waits and
    succeeds, nothing fails as "database is locked"."""
    monkeypatch.setattr(db, "_POLL_LOCK_SECONDS", poll_seconds)
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    upgrade(engine)
    factory = make_sessionmaker(engine)
    with transaction(factory) as session:
        session.add(Study(study_instance_uid="1.2.3", status="receiving"))
    waits = []
    for _ in range(5):
        holder, _held = _hold_write_lock(factory, 0.35)
        start = time.monotonic()
        with transaction(factory) as session:
            session.execute(update(Study).values(status="receiving"))
            waits.append(time.monotonic() - start)
        holder.join()
    engine.dispose()
    assert all(w >= 0.25 for w in waits), waits  # it did wait for the holder
    if poll_seconds > 1:
        # a median within 50 ms of the release (polling every 2 ms; SQLite's handler would try at 328 ms,
        # then at 428 ms)
        assert sorted(waits)[2] < 0.40, waits
    with engine.connect() as conn:  # the busy timeout is back for every later statement
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000


def test_worker_connections_commit_without_fsync_the_others_with(tmp_path: Path) -> None:
    """synchronous=NORMAL for the worker processes' connections (core.db.make_engine), FULL elsewhere."""
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    for durable, expected in ((True, 2), (False, 1)):
        engine = make_engine(url, durable_commits=durable)
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == expected
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        engine.dispose()
