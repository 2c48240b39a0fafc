"""Study completion: released + quiet, or silent for the maximum wait; exactly one job per completion."""

from __future__ import annotations

import threading
from datetime import timedelta

from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.db import transaction
from core.jobs import PROCESS_STUDY
from core.settings import CompletionSettings
from core.tables import Job, Study, utcnow
from dicom_listener.completion import complete_studies

RULES = CompletionSettings(quiet_seconds=2, max_wait_seconds=30)


def _study(factory: sessionmaker[Session], *, age: float, released: bool) -> str:
    uid = generate_uid()
    when = utcnow() - timedelta(seconds=age)
    with transaction(factory) as s:
        s.add(
            Study(
                study_instance_uid=uid,
                status="receiving",
                first_received_at=when,
                last_received_at=when,
                released_at=when if released else None,
            )
        )
    return uid


def _jobs(factory: sessionmaker[Session]) -> dict[str, str]:
    with factory() as s:
        return {j.payload["study_instance_uid"]: j.kind for j in s.scalars(select(Job))}


def test_quiet_period_after_release(factory: sessionmaker[Session]) -> None:
    done = _study(factory, age=3, released=True)
    too_recent = _study(factory, age=1, released=True)
    open_assoc = _study(factory, age=3, released=False)  # association still open: waits for max_wait
    assert len(complete_studies(factory, RULES)) == 1
    assert _jobs(factory) == {done: PROCESS_STUDY}
    with factory() as s:
        status = {st.study_instance_uid: st.status for st in s.scalars(select(Study))}
    assert status == {done: "complete", too_recent: "receiving", open_assoc: "receiving"}


def test_max_wait_completes_without_release(factory: sessionmaker[Session]) -> None:
    silent = _study(factory, age=31, released=False)
    assert len(complete_studies(factory, RULES)) == 1
    assert _jobs(factory) == {silent: PROCESS_STUDY}
    assert complete_studies(factory, RULES) == []  # never twice


def test_concurrent_sweepers_queue_one_job_per_study(factory: sessionmaker[Session]) -> None:
    uids = {_study(factory, age=5, released=True) for _ in range(10)}
    queued: list[int] = []
    barrier = threading.Barrier(4)

    def sweep() -> None:
        barrier.wait()
        queued.extend(complete_studies(factory, RULES))

    threads = [threading.Thread(target=sweep) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(queued) == 10 and set(_jobs(factory)) == uids
