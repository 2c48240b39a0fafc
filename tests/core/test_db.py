"""Sessions on both databases: a read-only session never queues behind a writer."""

from __future__ import annotations

import threading

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from core.db import read_session, transaction
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
