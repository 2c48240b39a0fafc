"""The dead letters: deliveries a peer rejected (``dead``) or that ran out of retries (``failed``), and failed
jobs; and putting them back on the queue, an admin's decision audited in its own transaction.

A retry takes the normal path: the delivery is ``pending`` again and its ``deliver`` job is reset (pending,
attempts from zero, due now), so a worker sends it as it sends any report; a failed job is reset the same way.
Retrying what is not failed, or what a job is already queued for, is refused (:class:`RetryRefused`): a retry
never queues the work twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, func, select
from sqlalchemy.orm import Session

from core.audit import record
from core.jobs import DELIVER, enqueue
from core.settings import WorkerSettings
from core.tables import Delivery, Job, Report, Study, utcnow

#: Delivery states that wait for a person: rejected by the peer, or retries exhausted.
DEAD_LETTER = ("failed", "dead")
DELIVERY_STATUSES = ("pending", "sent", "failed", "dead")
JOB_STATUSES = ("pending", "running", "done", "failed")
#: Jobs that hold their work: another one for the same work is not queued beside them.
QUEUED = ("pending", "running")
#: The attempts of a delivery job queued afresh (one whose failed job is gone), unless told.
DELIVERY_MAX_ATTEMPTS: int = WorkerSettings.model_fields["delivery_max_attempts"].default
#: Characters of an error kept in an audit row's detail.
_AUDITED_ERROR = 500


class DeadLetterError(Exception):
    """A retry that cannot be done; the message says why."""


class NotFound(DeadLetterError):
    """No delivery or job with that id."""


class RetryRefused(DeadLetterError):
    """The delivery or job is not failed, or its work is queued already."""


def status_hex(status: int | None) -> str | None:
    """A DICOM status as the standard writes it (``0xA700``)."""
    return None if status is None else f"0x{status:04X}"


@dataclass(frozen=True)
class DeliveryEntry:
    """A delivery of one report to one destination, with what the peer last answered."""

    id: int
    status: str
    destination: str
    study_instance_uid: str
    report_sop_instance_uid: str
    model_name: str
    model_version: str
    attempts: int
    #: The peer's last C-STORE status (None: no answer, e.g. nobody listening).
    last_status: int | None
    last_error: str | None
    next_attempt_at: datetime | None
    delivered_at: datetime | None
    #: Its ``deliver`` job (queued or failed), and when that job gave up.
    job_id: int | None
    failed_at: datetime | None

    @property
    def last_status_hex(self) -> str | None:
        return status_hex(self.last_status)


@dataclass(frozen=True)
class JobEntry:
    id: int
    kind: str
    status: str
    study_instance_uid: str | None
    attempts: int
    max_attempts: int
    last_error: str | None
    created_at: datetime
    finished_at: datetime | None
    #: For a ``deliver`` job: the delivery it sends.
    delivery_id: int | None


# -- listing -----------------------------------------------------------------------------------------------


def list_deliveries(
    session: Session, *, statuses: Sequence[str] = DEAD_LETTER, limit: int = 200, offset: int = 0
) -> tuple[int, list[DeliveryEntry]]:
    """Deliveries in ``statuses``, newest first, and how many there are in all."""
    where = Delivery.status.in_(statuses)
    total = session.scalar(select(func.count(Delivery.id)).where(where)) or 0
    return int(total), _delivery_entries(session, where, limit=limit, offset=offset)


def get_delivery(session: Session, delivery_id: int) -> DeliveryEntry | None:
    found = _delivery_entries(session, Delivery.id == delivery_id, limit=1)
    return found[0] if found else None


def list_jobs(
    session: Session,
    *,
    statuses: Sequence[str] = ("failed",),
    kind: str | None = None,
    with_dead_letters: bool = True,
    limit: int = 200,
    offset: int = 0,
) -> tuple[int, list[JobEntry]]:
    """Jobs in ``statuses`` (of ``kind``), newest first, and how many there are in all. Without
    ``with_dead_letters``, not the ``deliver`` jobs of failed and dead deliveries (listed as deliveries)."""
    where = [Job.status.in_(statuses), *([Job.kind == kind] if kind else [])]
    if not with_dead_letters:
        dead_letters = select(Delivery.id).where(Delivery.status.in_(DEAD_LETTER))
        where.append(~and_(Job.kind == DELIVER, Job.payload["delivery_id"].as_integer().in_(dead_letters)))
    total = session.scalar(select(func.count(Job.id)).where(*where)) or 0
    return int(total), _job_entries(session, *where, limit=limit, offset=offset)


def get_job(session: Session, job_id: int) -> JobEntry | None:
    found = _job_entries(session, Job.id == job_id, limit=1)
    return found[0] if found else None


def _delivery_entries(
    session: Session, *where: ColumnElement[bool], limit: int, offset: int = 0
) -> list[DeliveryEntry]:
    query = (
        select(
            Delivery,
            Study.study_instance_uid,
            Report.sop_instance_uid,
            Report.model_name,
            Report.model_version,
        )
        .join(Report, Delivery.report_id == Report.id)
        .join(Study, Report.study_id == Study.id)
        .where(*where)
        .order_by(Delivery.id.desc())
        .limit(limit)
        .offset(offset)
    )
    rows = session.execute(query).all()
    # the newest job of each delivery that waits for something (a sent one's is done: not looked up, as the
    # job table's index leads with the status)
    waiting = [row[0].id for row in rows if row[0].status != "sent"]
    jobs: dict[int, Job] = {}
    for job in _delivery_jobs(session, waiting, (*QUEUED, "failed")):
        jobs.setdefault(int(job.payload["delivery_id"]), job)
    out = []
    for delivery, study_uid, sop_uid, model, version in rows:
        latest = jobs.get(delivery.id)
        out.append(
            DeliveryEntry(
                id=delivery.id,
                status=delivery.status,
                destination=delivery.destination,
                study_instance_uid=study_uid,
                report_sop_instance_uid=sop_uid,
                model_name=model,
                model_version=version,
                attempts=delivery.attempts,
                last_status=delivery.last_status,
                last_error=delivery.last_error,
                next_attempt_at=delivery.next_attempt_at,
                delivered_at=delivery.delivered_at,
                job_id=latest.id if latest is not None else None,
                failed_at=latest.finished_at if latest is not None and latest.status == "failed" else None,
            )
        )
    return out


def _delivery_jobs(session: Session, delivery_ids: Sequence[int], statuses: Sequence[str]) -> list[Job]:
    """The ``deliver`` jobs of these deliveries in ``statuses``, newest first."""
    if not delivery_ids:
        return []
    return list(
        session.scalars(
            select(Job)
            .where(
                Job.kind == DELIVER,
                Job.status.in_(statuses),
                Job.payload["delivery_id"].as_integer().in_(delivery_ids),
            )
            .order_by(Job.id.desc())
        )
    )


def _job_entries(
    session: Session, *where: ColumnElement[bool], limit: int, offset: int = 0
) -> list[JobEntry]:
    query = (
        select(Job, Study.study_instance_uid)
        .outerjoin(Study, Job.study_id == Study.id)
        .where(*where)
        .order_by(Job.id.desc())
        .limit(limit)
        .offset(offset)
    )
    return [_job_entry(job, uid) for job, uid in session.execute(query)]


def _job_entry(job: Job, study_uid: str | None) -> JobEntry:
    payload: dict[str, Any] = job.payload or {}
    named = payload.get("study_instance_uid")
    delivery = payload.get("delivery_id") if job.kind == DELIVER else None
    return JobEntry(
        id=job.id,
        kind=job.kind,
        status=job.status,
        study_instance_uid=study_uid or (named if isinstance(named, str) else None),
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        last_error=job.last_error,
        created_at=job.created_at,
        finished_at=job.finished_at,
        delivery_id=delivery if isinstance(delivery, int) else None,
    )


# -- retrying ----------------------------------------------------------------------------------------------


def retry_delivery(
    session: Session,
    delivery_id: int,
    *,
    actor: str,
    client: str | None = None,
    max_attempts: int = DELIVERY_MAX_ATTEMPTS,
) -> int:
    """Send a failed or dead delivery again: the delivery is pending and its failed ``deliver`` job due now,
    attempts from zero (the job keeps its ``max_attempts``; one queued afresh, when none is left, gets
    ``max_attempts``). Returns the job's id. Audited as ``delivery.retry``."""
    delivery = session.get(Delivery, delivery_id, with_for_update=_locks(session))
    if delivery is None:
        raise NotFound(f"no delivery {delivery_id}")
    if delivery.status not in DEAD_LETTER:
        raise RetryRefused(f"delivery {delivery_id} is {delivery.status}, not failed or dead")
    _refuse_if_queued(session, delivery_id)
    previous = _delivery_jobs(session, [delivery_id], ("failed",))
    report = delivery.report
    if previous:
        job = previous[0]
        _reset(job)
    else:
        job = enqueue(
            session,
            kind=DELIVER,
            priority=10,
            payload={"delivery_id": delivery_id},
            study_id=report.study_id,
            max_attempts=max_attempts,
        )
    before = delivery.status
    _reopen(delivery)
    record(
        session,
        actor=actor,
        action="delivery.retry",
        study_uid=_study_uid(session, report.study_id),
        client=client,
        detail={
            "delivery_id": delivery_id,
            "job_id": job.id,
            "destination": delivery.destination,
            "report": report.sop_instance_uid,
            "was": before,
            "last_status": status_hex(delivery.last_status),
            "last_error": (delivery.last_error or "")[:_AUDITED_ERROR],
        },
    )
    session.flush()
    return job.id


def retry_failed_deliveries(
    session: Session, *, actor: str, client: str | None = None, max_attempts: int = DELIVERY_MAX_ATTEMPTS
) -> list[int]:
    """:func:`retry_delivery` for every failed or dead delivery (one audit row each); their ids."""
    ids = list(
        session.scalars(select(Delivery.id).where(Delivery.status.in_(DEAD_LETTER)).order_by(Delivery.id))
    )
    for delivery_id in ids:
        retry_delivery(session, delivery_id, actor=actor, client=client, max_attempts=max_attempts)
    return ids


def retry_job(session: Session, job_id: int, *, actor: str, client: str | None = None) -> int:
    """Run a failed job again through the queue: pending, attempts from zero, due now (a ``deliver`` job's
    delivery is pending again too). Returns the job's id. Audited as ``job.retry``."""
    job = session.get(Job, job_id, with_for_update=_locks(session))
    if job is None:
        raise NotFound(f"no job {job_id}")
    if job.status != "failed":
        raise RetryRefused(f"job {job_id} is {job.status}, not failed")
    if job.dedupe_key is not None:
        twin = session.scalars(
            select(Job.id).where(
                Job.kind == job.kind,
                Job.dedupe_key == job.dedupe_key,
                Job.status.in_(QUEUED),
                Job.id != job.id,
            )
        ).first()
        if twin is not None:
            raise RetryRefused(f"job {twin} does the work of job {job_id} and is queued already")
    detail: dict[str, Any] = {
        "job_id": job_id,
        "kind": job.kind,
        "attempts": job.attempts,
        "last_error": (job.last_error or "")[:_AUDITED_ERROR],
    }
    delivery_id = job.payload.get("delivery_id") if job.kind == DELIVER else None
    if isinstance(delivery_id, int):
        _refuse_if_queued(session, delivery_id)
        delivery = session.get(Delivery, delivery_id, with_for_update=_locks(session))
        if delivery is not None and delivery.status != "sent":
            _reopen(delivery)
        detail["delivery_id"] = delivery_id
    _reset(job)
    record(
        session,
        actor=actor,
        action="job.retry",
        study_uid=_study_uid(session, job.study_id),
        client=client,
        detail=detail,
    )
    session.flush()
    return job.id


def _locks(session: Session) -> bool:
    """Lock the row being retried (PostgreSQL; SQLite's write lock taken at BEGIN serialises already): two
    admins retrying the same thing at once queue it once, the second is refused."""
    return session.get_bind().dialect.name == "postgresql"


def _refuse_if_queued(session: Session, delivery_id: int) -> None:
    queued = _delivery_jobs(session, [delivery_id], QUEUED)
    if queued:
        raise RetryRefused(f"delivery {delivery_id} is queued already (job {queued[0].id})")


def _reset(job: Job) -> None:
    """Pending and due now with all its attempts; its last error stays until it runs again."""
    job.status = "pending"
    job.attempts = 0
    job.takeovers = 0
    job.next_attempt_at = utcnow()
    job.finished_at = None
    job.locked_by = None
    job.lease_expires_at = None


def _reopen(delivery: Delivery) -> None:
    """Pending again; what the peer last answered stays until the next attempt."""
    delivery.status = "pending"
    delivery.attempts = 0
    delivery.next_attempt_at = utcnow()


def _study_uid(session: Session, study_id: int | None) -> str | None:
    if study_id is None:
        return None
    return session.scalar(select(Study.study_instance_uid).where(Study.id == study_id))
