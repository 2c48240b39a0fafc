import sqlite3
import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core import jobs
from core.db import transaction
from core.settings import CompletionSettings
from core.tables import Job, utcnow
from dicom_listener.completion import complete_studies


def _enqueue(factory: sessionmaker[Session], n: int, **kw: object) -> list[int]:
    with transaction(factory) as s:
        return [jobs.enqueue(s, kind="test", payload={"i": i}, **kw).id for i in range(n)]  # type: ignore[arg-type]


def test_each_job_is_claimed_by_exactly_one_of_many_workers(factory: sessionmaker[Session]) -> None:
    ids = _enqueue(factory, 40)
    claimed: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def work(name: str) -> None:
        mine = claimed.setdefault(name, [])
        try:
            while (job := jobs.claim(factory, worker_id=name, lease_seconds=60)) is not None:
                mine.append(job.id)
                assert jobs.complete(factory, job.id, worker_id=name)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    every = [j for got in claimed.values() for j in got]
    assert sorted(every) == sorted(ids)  # nothing twice, nothing missed
    with factory() as s:
        assert {j.status for j in s.scalars(select(Job))} == {"done"}


def test_expired_lease_is_taken_over_and_the_old_worker_cannot_finish(factory: sessionmaker[Session]) -> None:
    [job_id] = _enqueue(factory, 1)
    first = jobs.claim(factory, worker_id="dead", lease_seconds=60)
    assert first is not None and first.id == job_id
    assert jobs.claim(factory, worker_id="other", lease_seconds=60) is None  # lease still valid
    with transaction(factory) as s:  # the dead worker's lease runs out (no wall-clock race on a slow CI)
        s.get_one(Job, job_id).lease_expires_at = utcnow() - timedelta(seconds=1)
    second = jobs.claim(factory, worker_id="alive", lease_seconds=60)
    assert second is not None and second.id == job_id and second.attempts == 2
    assert not jobs.complete(factory, job_id, worker_id="dead")
    assert jobs.complete(factory, job_id, worker_id="alive")


def test_retry_then_fail_after_max_attempts(factory: sessionmaker[Session]) -> None:
    [job_id] = _enqueue(factory, 1, max_attempts=2)
    job = jobs.claim(factory, worker_id="w", lease_seconds=60)
    assert job is not None
    assert jobs.fail(factory, job_id, worker_id="w", error="peer down", retry_in=30) == "pending"
    assert jobs.claim(factory, worker_id="w", lease_seconds=60) is None  # not due yet
    assert jobs.fail(factory, job_id, worker_id="w", error="x", retry_in=0) == "lost"  # not running
    with transaction(factory) as s:
        due = s.get_one(Job, job_id)
        due.next_attempt_at = due.created_at  # make it due now
    job = jobs.claim(factory, worker_id="w", lease_seconds=60)
    assert job is not None and job.attempts == 2
    assert jobs.fail(factory, job_id, worker_id="w", error="peer down", retry_in=1) == "failed"
    with factory() as s:
        row = s.get_one(Job, job_id)
        assert row.status == "failed" and row.last_error == "peer down" and row.finished_at is not None


def test_permanent_failure_does_not_retry(factory: sessionmaker[Session]) -> None:
    [job_id] = _enqueue(factory, 1)
    assert jobs.claim(factory, worker_id="w", lease_seconds=60) is not None
    assert jobs.fail(factory, job_id, worker_id="w", error="rejected", retry_in=None) == "failed"
    assert jobs.claim(factory, worker_id="w", lease_seconds=60) is None


def test_lower_priority_value_runs_first(factory: sessionmaker[Session]) -> None:
    with transaction(factory) as s:
        late = jobs.enqueue(s, kind="process", payload={}, priority=100).id
        urgent = jobs.enqueue(s, kind="deliver", payload={}, priority=10).id
    first = jobs.claim(factory, worker_id="w", lease_seconds=60)
    second = jobs.claim(factory, worker_id="w", lease_seconds=60)
    assert first is not None and second is not None
    assert (first.id, second.id) == (urgent, late)


@pytest.mark.parametrize("max_takeovers", [0, 2])
def test_job_whose_workers_keep_dying_is_quarantined(
    factory: sessionmaker[Session], max_takeovers: int
) -> None:
    [job_id] = _enqueue(factory, 1)
    for death in range(max_takeovers + 1):  # claimed, then taken over max_takeovers times; each worker dies
        job = jobs.claim(factory, worker_id=f"w{death}", lease_seconds=0.05, max_takeovers=max_takeovers)
        assert job is not None and (job.id, job.attempts) == (job_id, death + 1)
        time.sleep(0.1)
    assert jobs.claim(factory, worker_id="next", lease_seconds=60, max_takeovers=max_takeovers) is None
    with factory() as s:
        row = s.get_one(Job, job_id)
    assert (row.status, row.takeovers, row.finished_at is not None) == ("failed", max_takeovers, True)
    assert row.last_error == (
        f"quarantined: its worker died {max_takeovers + 1} times while running it (lease expired; last "
        f"w{max_takeovers}); not taken over again"
    )
    assert jobs.claim(factory, worker_id="later", lease_seconds=60, max_takeovers=max_takeovers) is None


def test_idle_polls_leave_the_sqlite_write_lock_alone(
    database_url: str, factory: sessionmaker[Session]
) -> None:
    """While another connection holds SQLite's write lock (a C-STORE committing), a worker's poll that finds
    nothing to do — no due job, no complete study — returns at once instead of queueing for the lock."""
    if not database_url.startswith("sqlite"):
        pytest.skip("PostgreSQL has no database-wide write lock")
    _enqueue(factory, 1, run_at=utcnow() + timedelta(hours=1))  # pending, but not due
    holder = sqlite3.connect(database_url.split("///", 1)[1], isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        start = time.monotonic()
        assert jobs.claim(factory, worker_id="w", lease_seconds=60) is None
        assert complete_studies(factory, CompletionSettings()) == []
        assert time.monotonic() - start < 5  # the busy timeout is 30 s
    finally:
        holder.execute("ROLLBACK")
        holder.close()
