"""The dead letters (core.deadletter) on SQLite and PostgreSQL: what is listed, what a retry puts back on the
queue (claimable by a worker like any job), what it refuses, and its audit row."""

from __future__ import annotations

import threading
import time

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from core import jobs
from core.db import transaction
from core.deadletter import (
    NotFound,
    RetryRefused,
    get_delivery,
    list_deliveries,
    list_jobs,
    retry_delivery,
    retry_failed_deliveries,
    retry_job,
)
from core.jobs import DELIVER, PROCESS_STUDY, PULL_ORTHANC_STUDY
from core.tables import AuditEvent, Delivery, Job, Report, Study, utcnow

#: What the peer answered, as gateway.delivery records it.
REFUSED = (0xA700, "C-STORE 1.2.3 to PACS@127.0.0.1:104: status 0xA700 (archive full)")
REJECTED = (0xC000, "C-STORE 1.2.3 to PACS@127.0.0.1:104: status 0xC000")


def _delivery(session: Session, *, model: str = "pneumonia") -> tuple[Delivery, Job]:
    """A report of a new study, a pending delivery of it to "pacs" and its deliver job."""
    study = Study(study_instance_uid=generate_uid())
    session.add(study)
    session.flush()
    report = Report(
        study_id=study.id,
        model_name=model,
        model_version="1.0.1",
        sop_instance_uid=generate_uid(),
        series_instance_uid=generate_uid(),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
        input_hash="x",
        path="reports/x.dcm",
    )
    session.add(report)
    session.flush()
    delivery = Delivery(report_id=report.id, destination="pacs", next_attempt_at=utcnow())
    session.add(delivery)
    session.flush()
    job = jobs.enqueue(
        session,
        kind=DELIVER,
        priority=10,
        payload={"delivery_id": delivery.id},
        study_id=study.id,
        max_attempts=3,
    )
    return delivery, job


def _run(factory: sessionmaker[Session], outcome: str, answer: tuple[int | None, str] = REFUSED) -> int:
    """A worker takes the due job and ends it as a deliver job does: ``sent``, ``dead`` (rejected, failed at
    once) or ``failed`` (its last attempt); returns the job id."""
    claimed = jobs.claim(factory, worker_id="w", lease_seconds=60)
    assert claimed is not None
    with transaction(factory) as s:
        delivery = s.get(Delivery, claimed.payload["delivery_id"])
        if delivery is not None:
            delivery.attempts = claimed.attempts
            delivery.status = outcome
            delivery.last_status, delivery.last_error = answer if outcome != "sent" else (0, None)
    if outcome == "sent":
        assert jobs.complete(factory, claimed.id, worker_id="w")
    else:
        assert jobs.fail(factory, claimed.id, worker_id="w", error=answer[1], retry_in=None) == "failed"
    return claimed.id


def _make(factory: sessionmaker[Session], outcome: str, answer: tuple[int | None, str] = REFUSED) -> int:
    """A delivery that ended ``outcome`` (``pending``: not tried yet); returns its id."""
    with transaction(factory) as s:
        delivery, _ = _delivery(s)
    if outcome != "pending":
        _run(factory, outcome, answer)
    return delivery.id


def _audit(factory: sessionmaker[Session], action: str) -> list[AuditEvent]:
    with factory() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id)))


def test_the_dead_letters_are_listed_with_the_peers_answer(factory: sessionmaker[Session]) -> None:
    failed = _make(factory, "failed", REFUSED)
    dead = _make(factory, "dead", REJECTED)
    sent = _make(factory, "sent")
    pending = _make(factory, "pending")
    with factory() as s:
        total, rows = list_deliveries(s)
        assert total == 2 and [r.id for r in rows] == [dead, failed]  # newest first
        row = rows[1]
        delivery = s.get(Delivery, failed)
        assert delivery is not None
        assert (row.status, row.destination, row.model_name, row.model_version) == (
            "failed",
            "pacs",
            "pneumonia",
            "1.0.1",
        )
        assert (row.last_status, row.last_status_hex, row.last_error) == (0xA700, "0xA700", REFUSED[1])
        assert row.report_sop_instance_uid == delivery.report.sop_instance_uid
        study = s.scalar(select(Study.study_instance_uid).where(Study.id == delivery.report.study_id))
        assert row.study_instance_uid == study
        job = s.get(Job, row.job_id)
        assert job is not None and job.status == "failed" and row.failed_at == job.finished_at
        assert rows[0].last_status_hex == "0xC000" and rows[0].status == "dead"

        total, rows = list_deliveries(s, statuses=("sent", "pending"))
        assert total == 2 and [r.id for r in rows] == [pending, sent]
        assert rows[0].job_id is not None and rows[0].failed_at is None  # its job is queued
        assert rows[1].job_id is None and rows[1].delivered_at is None
        assert list_deliveries(s, limit=1, offset=1)[1][0].id == failed
        assert get_delivery(s, 10**6) is None


def test_a_retry_puts_the_delivery_back_on_the_queue_once(factory: sessionmaker[Session]) -> None:
    delivery_id = _make(factory, "failed")
    with factory() as s:
        [old_job] = s.scalars(select(Job)).all()
    with transaction(factory) as s:
        job_id = retry_delivery(s, delivery_id, actor="user:admin", client="10.0.0.9")
    assert job_id == old_job.id  # the same job, reset: no second job for one delivery
    with factory() as s:
        delivery = s.get(Delivery, delivery_id)
        job = s.get(Job, job_id)
        assert delivery is not None and job is not None
        assert (delivery.status, delivery.attempts) == ("pending", 0)
        assert delivery.last_status == 0xA700  # what the peer said, until it is asked again
        assert (job.status, job.attempts, job.finished_at, job.max_attempts) == ("pending", 0, None, 3)
        assert job.next_attempt_at <= utcnow()
        assert s.scalar(select(func.count(Job.id))) == 1
        entry = get_delivery(s, delivery_id)
        assert entry is not None and entry.status == "pending" and entry.job_id == job_id
    [event] = _audit(factory, "delivery.retry")
    assert (event.actor, event.client, event.study_instance_uid) == (
        "user:admin",
        "10.0.0.9",
        entry.study_instance_uid,
    )
    assert event.detail["delivery_id"] == delivery_id and event.detail["job_id"] == job_id
    assert (event.detail["was"], event.detail["last_status"]) == ("failed", "0xA700")

    with transaction(factory) as s, pytest.raises(RetryRefused, match="is pending, not failed or dead"):
        retry_delivery(s, delivery_id, actor="user:admin")
    # a worker takes it up as any due job: with its attempts from the start
    claimed = jobs.claim(factory, worker_id="w", lease_seconds=60)
    assert claimed is not None and (claimed.id, claimed.attempts) == (job_id, 1)
    with transaction(factory) as s, pytest.raises(RetryRefused):
        retry_delivery(s, delivery_id, actor="user:admin")
    assert len(_audit(factory, "delivery.retry")) == 1  # refusals are not recorded as retries


def test_unknown_ids_are_not_found(factory: sessionmaker[Session]) -> None:
    with transaction(factory) as s:
        with pytest.raises(NotFound, match="no delivery 4242"):
            retry_delivery(s, 4242, actor="cli")
        with pytest.raises(NotFound, match="no job 4242"):
            retry_job(s, 4242, actor="cli")


def test_a_dead_delivery_without_a_failed_job_gets_a_new_one(factory: sessionmaker[Session]) -> None:
    delivery_id = _make(factory, "dead", REJECTED)
    with transaction(factory) as s:  # as if its job were gone (a deliver job lost to a takeover)
        for old in s.scalars(select(Job)):
            old.status = "done"
    with transaction(factory) as s:
        job_id = retry_delivery(s, delivery_id, actor="cli", max_attempts=7)
    with factory() as s:
        job = s.get(Job, job_id)
        assert job is not None
        assert (job.kind, job.status, job.payload, job.max_attempts) == (
            DELIVER,
            "pending",
            {"delivery_id": delivery_id},
            7,
        )
        assert s.scalar(select(func.count(Job.id))) == 2


def test_retry_all_takes_failed_and_dead_only(factory: sessionmaker[Session]) -> None:
    failed = _make(factory, "failed")
    dead = _make(factory, "dead", REJECTED)
    _make(factory, "sent")
    _make(factory, "pending")
    with transaction(factory) as s:
        assert retry_failed_deliveries(s, actor="cli") == [failed, dead]
    with transaction(factory) as s:
        assert retry_failed_deliveries(s, actor="cli") == []  # nothing left: nothing queued twice
    with factory() as s:
        assert list_deliveries(s)[0] == 0
        assert s.scalar(select(func.count(Job.id)).where(Job.status == "pending")) == 3
    assert [e.detail["delivery_id"] for e in _audit(factory, "delivery.retry")] == [failed, dead]
    assert {e.actor for e in _audit(factory, "delivery.retry")} == {"cli"}


def test_a_failed_job_is_listed_and_retried(factory: sessionmaker[Session]) -> None:
    with transaction(factory) as s:
        study = Study(study_instance_uid=generate_uid())
        s.add(study)
        s.flush()
        jobs.enqueue(s, kind=PROCESS_STUDY, payload={}, study_id=study.id, max_attempts=1)
        uid = study.study_instance_uid
    claimed = jobs.claim(factory, worker_id="w", lease_seconds=60)
    assert claimed is not None
    jobs.fail(factory, claimed.id, worker_id="w", error="ValueError: bad pixels", retry_in=None)
    delivery_id = _make(factory, "failed")
    with factory() as s:
        total, rows = list_jobs(s)
        assert total == 2 and [r.kind for r in rows] == [DELIVER, PROCESS_STUDY]
        assert rows[0].delivery_id == delivery_id
        row = rows[1]
        assert (row.id, row.study_instance_uid, row.attempts, row.max_attempts) == (claimed.id, uid, 1, 1)
        assert row.last_error == "ValueError: bad pixels" and row.finished_at is not None
        assert list_jobs(s, kind=PROCESS_STUDY)[0] == 1
        assert [r.id for r in list_jobs(s, with_dead_letters=False)[1]] == [
            claimed.id
        ]  # listed as a delivery
        assert list_jobs(s, statuses=("pending",)) == (0, [])

    with transaction(factory) as s:
        assert retry_job(s, claimed.id, actor="token:admin", client="10.0.0.9") == claimed.id
    with transaction(factory) as s, pytest.raises(RetryRefused, match="is pending, not failed"):
        retry_job(s, claimed.id, actor="token:admin")
    again = jobs.claim(factory, worker_id="w", lease_seconds=60)
    assert again is not None and (again.id, again.attempts) == (claimed.id, 1)
    [event] = _audit(factory, "job.retry")
    assert (event.actor, event.study_instance_uid, event.detail["kind"]) == (
        "token:admin",
        uid,
        PROCESS_STUDY,
    )
    assert event.detail["last_error"] == "ValueError: bad pixels"


def test_a_quarantined_deliver_job_is_what_to_retry(factory: sessionmaker[Session]) -> None:
    """A deliver job whose worker died while running it is quarantined; its delivery stays pending, so it is
    not a dead letter: the failed jobs list it, and retrying the job sends it."""
    delivery_id = _make(factory, "pending")
    assert jobs.claim(factory, worker_id="dying", lease_seconds=0.01) is not None
    time.sleep(0.05)
    assert jobs.claim(factory, worker_id="w", lease_seconds=60, max_takeovers=0) is None  # quarantined
    with factory() as s:
        [row] = list_jobs(s, with_dead_letters=False)[1]
        assert row.delivery_id == delivery_id
        assert row.last_error is not None and row.last_error.startswith("quarantined")
        assert list_deliveries(s)[0] == 0
    with transaction(factory) as s, pytest.raises(RetryRefused, match="is pending"):
        retry_delivery(s, delivery_id, actor="cli")
    with transaction(factory) as s:
        retry_job(s, row.id, actor="cli")
    claimed = jobs.claim(factory, worker_id="w", lease_seconds=60)
    assert claimed is not None and (claimed.id, claimed.attempts) == (row.id, 1)
    assert _audit(factory, "job.retry")[0].detail["delivery_id"] == delivery_id


def test_retrying_the_job_of_a_dead_letter_reopens_its_delivery(factory: sessionmaker[Session]) -> None:
    delivery_id = _make(factory, "failed")
    with factory() as s:
        job_id = s.scalars(select(Job.id)).one()
    with transaction(factory) as s:
        retry_job(s, job_id, actor="cli")
    with factory() as s:
        delivery = s.get(Delivery, delivery_id)
        assert delivery is not None and (delivery.status, delivery.attempts) == ("pending", 0)
        assert list_deliveries(s)[0] == 0


def test_a_job_whose_work_is_queued_again_is_not_retried(factory: sessionmaker[Session]) -> None:
    with transaction(factory) as s:
        jobs.enqueue(s, kind=PULL_ORTHANC_STUDY, payload={"id": "a"}, dedupe_key="orthanc:a", max_attempts=1)
    claimed = jobs.claim(factory, worker_id="w", lease_seconds=60)
    assert claimed is not None
    jobs.fail(factory, claimed.id, worker_id="w", error="Orthanc down", retry_in=None)
    with transaction(factory) as s:  # the webhook fires again meanwhile
        twin = jobs.enqueue(s, kind=PULL_ORTHANC_STUDY, payload={"id": "a"}, dedupe_key="orthanc:a").id
    with transaction(factory) as s, pytest.raises(RetryRefused, match=f"job {twin} does the work"):
        retry_job(s, claimed.id, actor="cli")


def test_two_admins_retrying_at_once_queue_it_once(factory: sessionmaker[Session]) -> None:
    delivery_id = _make(factory, "failed")
    outcome: list[object] = []

    def second() -> None:
        try:
            with transaction(factory) as s:
                outcome.append(retry_delivery(s, delivery_id, actor="user:b"))
        except RetryRefused as exc:
            outcome.append(exc)

    with transaction(factory) as s:
        retry_delivery(s, delivery_id, actor="user:a")
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.3)
        assert thread.is_alive()  # waits for the first one's row lock (SQLite: its write lock)
    thread.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], RetryRefused)
    assert [e.actor for e in _audit(factory, "delivery.retry")] == ["user:a"]
