"""Worker heartbeat rows on SQLite and PostgreSQL: insert then refresh, freshness, removal by worker or by
process, and rows of long-gone workers forgotten."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.db import transaction
from core.heartbeat import FORGET_AFTER, live_workers, record_heartbeat, remove_heartbeats
from core.tables import WorkerHeartbeat, utcnow


def _rows(factory: sessionmaker[Session]) -> dict[str, WorkerHeartbeat]:
    with factory() as session:
        return {r.worker_id: r for r in session.scalars(select(WorkerHeartbeat))}


def test_record_inserts_then_refreshes(factory: sessionmaker[Session]) -> None:
    started = utcnow() - timedelta(minutes=1)
    record_heartbeat(factory, worker_id="w1", started_at=started, current_job_id=None)
    first = _rows(factory)["w1"]
    assert (first.host, first.pid, first.started_at) == (socket.gethostname(), os.getpid(), started)
    record_heartbeat(factory, worker_id="w1", started_at=utcnow(), current_job_id=7)
    again = _rows(factory)["w1"]
    assert again.current_job_id == 7 and again.beat_at >= first.beat_at
    assert again.started_at == started  # the row keeps when the worker started
    assert list(_rows(factory)) == ["w1"]


def test_live_workers_are_the_fresh_ones(factory: sessionmaker[Session]) -> None:
    for name in ("fresh", "stale"):
        record_heartbeat(factory, worker_id=name, started_at=utcnow(), current_job_id=None)
    with transaction(factory) as session:
        stale = session.get(WorkerHeartbeat, "stale")
        assert stale is not None
        stale.beat_at = utcnow() - timedelta(seconds=20)
    with factory() as session:
        assert [w.worker_id for w in live_workers(session, fresher_than=15)] == ["fresh"]
        assert [w.worker_id for w in live_workers(session, fresher_than=30)] == ["fresh", "stale"]


def test_remove_by_worker_or_process_and_forget_the_long_gone(factory: sessionmaker[Session]) -> None:
    for name in ("a", "b", "c", "old"):
        record_heartbeat(factory, worker_id=name, started_at=utcnow(), current_job_id=None)
    with transaction(factory) as session:
        other, old = session.get(WorkerHeartbeat, "c"), session.get(WorkerHeartbeat, "old")
        assert other is not None and old is not None
        other.pid = os.getpid() + 1  # another process on this host
        old.beat_at = utcnow() - FORGET_AFTER - timedelta(seconds=1)
    assert remove_heartbeats(factory, worker_id="a") == 2  # "a", and "old" forgotten
    assert set(_rows(factory)) == {"b", "c"}
    assert remove_heartbeats(factory, host=socket.gethostname(), pid=os.getpid()) == 1
    assert set(_rows(factory)) == {"c"}
