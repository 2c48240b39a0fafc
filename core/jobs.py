"""The durable job queue (table ``job``), shared by the listener, the API and any number of workers.

States: ``pending`` -> ``running`` (claimed under a lease) -> ``done``; a failure puts the job back to
``pending`` with a later ``next_attempt_at`` until ``max_attempts``, then ``failed``. A job whose worker
died is claimed again once its lease has expired, at most ``max_takeovers`` times: a job that keeps killing
its workers (out of memory, a crash inside a codec) is then quarantined, failed with the reason, so that no
restart loop ever takes it again. On PostgreSQL a claim is
``SELECT ... FOR UPDATE SKIP LOCKED``, so
concurrent workers never take the same job; on SQLite the write lock taken at BEGIN serialises claims.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from core.db import read_session, transaction, when_available
from core.tables import AuditEvent, Job, utcnow

log = logging.getLogger(__name__)

#: Job kinds. A complete study is processed (route, infer, report); a report is delivered to one
#: destination; a stable Orthanc study is pulled through the ingest path.
PROCESS_STUDY = "process_study"
DELIVER = "deliver"
PULL_ORTHANC_STUDY = "pull_orthanc_study"
#: A radiologist's saved review becomes a verified SR (then delivered like any report).
VERIFY_REVIEW = "verify_review"
#: The images, heatmaps and optic-disc positions the case page shows, drawn once per study.
RENDER_STUDY = "render_study"
#: Delete the studies older than GATEWAY_STORAGE__RETENTION_DAYS (queued by the workers on a schedule).
PURGE_EXPIRED = "purge_expired"
#: The kinds that hold a worker for long (decoding, inference, drawing; deleting many files): run by a
#: worker's main loop, never by a delivery lane, and held back while the host receives at full speed
#: (GATEWAY_WORKER__INGEST_FIRST_*); the others always run.
COMPUTE_KINDS = (PROCESS_STUDY, RENDER_STUDY, PURGE_EXPIRED)
LIGHT_KINDS = (DELIVER, PULL_ORTHANC_STUDY, VERIFY_REVIEW)


#: How long recording a job's outcome waits out a database outage before giving up (the job is then taken
#: over when its lease expires, and done again).
OUTCOME_PATIENCE_SECONDS = 60.0


class PermanentError(Exception):
    """A job failure that retrying cannot fix: the job fails at once, with this message as its reason."""


@dataclass(frozen=True)
class Retry(Exception):
    """Ask the worker to retry the job after ``delay`` seconds."""

    message: str
    delay: float


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    kind: str
    payload: dict[str, Any]
    study_id: int | None
    attempts: int
    max_attempts: int


def enqueue(
    session: Session,
    *,
    kind: str,
    payload: dict[str, Any],
    study_id: int | None = None,
    max_attempts: int = 8,
    run_at: datetime | None = None,
    priority: int = 100,
    dedupe_key: str | None = None,
) -> Job:
    """Queue a job. With ``dedupe_key``, a pending job of the same kind and key is returned instead (webhook
    replays and overlapping reconcilers queue one job, not many). A running one does not count: it may have
    read its input before the event that queues this one."""
    if dedupe_key is not None:
        existing = session.scalars(
            select(Job).where(Job.kind == kind, Job.dedupe_key == dedupe_key, Job.status == "pending")
        ).first()
        if existing is not None:
            return existing
    job = Job(
        kind=kind,
        priority=priority,
        dedupe_key=dedupe_key,
        payload=payload,
        study_id=study_id,
        max_attempts=max_attempts,
        next_attempt_at=run_at or utcnow(),
        status="pending",
    )
    session.add(job)
    session.flush()
    return job


def enqueue_audited(
    session: Session,
    *,
    actor: str,
    action: str,
    study_instance_uid: str | None = None,
    detail: dict[str, Any] | None = None,
    **job: Any,
) -> Job:
    """:func:`enqueue` (``job``: its arguments) and an audit row naming the job, in one transaction."""
    queued = enqueue(session, **job)
    session.add(
        AuditEvent(
            actor=actor,
            action=action,
            study_instance_uid=study_instance_uid,
            detail={**(detail or {}), "job_id": queued.id},
        )
    )
    return queued


def claim(
    factory: sessionmaker[Session],
    *,
    worker_id: str,
    lease_seconds: float,
    kinds: tuple[str, ...] | None = None,
    max_takeovers: int = 2,
) -> ClaimedJob | None:
    """Take the oldest due job (or one whose lease expired) for ``worker_id``; None when idle.

    Taking over an expired lease counts in ``job.takeovers``; past ``max_takeovers`` the job is failed
    ("quarantined") instead, and None is returned for this round.
    """
    now = utcnow()
    due = or_(
        and_(Job.status == "pending", Job.next_attempt_at <= now),
        and_(Job.status == "running", Job.lease_expires_at < now),
    )
    # An idle poll only reads: on SQLite a write transaction takes the database's one write lock, and a
    # C-STORE's commit that finds it taken sleeps in SQLite's busy handler (1, 2, 5, 10 … ms).
    with read_session(factory) as session:
        probe = select(Job.id).where(due).limit(1)
        if kinds:
            probe = probe.where(Job.kind.in_(kinds))
        if session.scalar(probe) is None:
            return None
    with transaction(factory) as session:
        query = select(Job).where(due).order_by(Job.priority, Job.next_attempt_at, Job.id).limit(1)
        if kinds:
            query = query.where(Job.kind.in_(kinds))
        if session.get_bind().dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        job = session.scalars(query).first()
        if job is None:
            return None
        if job.status == "running":
            deaths = (job.takeovers or 0) + 1
            if deaths > max_takeovers:
                job.status = "failed"
                job.last_error = (
                    f"quarantined: its worker died {deaths} times while running it (lease expired; last "
                    f"{job.locked_by}); not taken over again"
                )
                job.finished_at = now
                job.lease_expires_at = None
                log.error("job %s quarantined: its worker died %d times while running it", job.id, deaths)
                return None
            log.warning("job %s: lease of %s expired, taking it over", job.id, job.locked_by)
            if job.attempts >= job.max_attempts:
                job.status = "failed"
                job.last_error = (job.last_error or "") + f"\nworker {job.locked_by} lost the job"
                job.finished_at = now
                return None
            job.takeovers = deaths
        job.status = "running"
        job.attempts += 1
        job.locked_by = worker_id
        job.lease_expires_at = now + timedelta(seconds=lease_seconds)
        return ClaimedJob(job.id, job.kind, dict(job.payload), job.study_id, job.attempts, job.max_attempts)


def complete(
    factory: sessionmaker[Session], job_id: int, *, worker_id: str, patience: float = OUTCOME_PATIENCE_SECONDS
) -> bool:
    """Mark done; False if the job was taken over meanwhile (the other worker's result wins). A database
    outage is waited out for up to ``patience`` seconds: the work is done, losing that would redo it."""

    def record() -> bool:
        with transaction(factory) as session:
            result = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.locked_by == worker_id, Job.status == "running")
                .values(status="done", finished_at=utcnow(), lease_expires_at=None, last_error=None)
            )
            return result.rowcount == 1  # type: ignore[attr-defined]

    return when_available(record, patience=patience)


def fail(
    factory: sessionmaker[Session],
    job_id: int,
    *,
    worker_id: str,
    error: str,
    retry_in: float | None,
    patience: float = OUTCOME_PATIENCE_SECONDS,
) -> str:
    """Record a failure. ``retry_in`` None means permanent. Returns the new status. A database outage is
    waited out for up to ``patience`` seconds (else the job would wait for its lease to expire)."""

    def record() -> str:
        with transaction(factory) as session:
            job = session.get(Job, job_id, with_for_update=session.get_bind().dialect.name == "postgresql")
            if job is None or job.locked_by != worker_id or job.status != "running":
                return "lost"
            job.last_error = error[:4000]
            job.lease_expires_at = None
            if retry_in is None or job.attempts >= job.max_attempts:
                job.status = "failed"
                job.finished_at = utcnow()
            else:
                job.status = "pending"
                job.next_attempt_at = utcnow() + timedelta(seconds=retry_in)
            return job.status

    return when_available(record, patience=patience)


def renew_lease(factory: sessionmaker[Session], job_id: int, *, worker_id: str, lease_seconds: float) -> bool:
    with transaction(factory) as session:
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.locked_by == worker_id, Job.status == "running")
            .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
        )
        return result.rowcount == 1  # type: ignore[attr-defined]


def refund_attempt(session: Session, job_id: int) -> None:
    """Take back the attempt that claiming this running job counted: a probe must not use up its retries."""
    session.execute(
        update(Job).where(Job.id == job_id, Job.status == "running").values(attempts=Job.attempts - 1)
    )


def run_now(session: Session, *, kind: str, payload_key: str, values: Collection[Any]) -> int:
    """Make the pending ``kind`` jobs whose ``payload[payload_key]`` is one of ``values`` due now (they were
    waiting out a backoff that is over); returns how many."""
    now = utcnow()
    waiting = session.execute(
        select(Job.id, Job.payload).where(
            Job.kind == kind, Job.status == "pending", Job.next_attempt_at > now
        )
    ).all()
    ids = [row.id for row in waiting if row.payload.get(payload_key) in values]
    if ids:
        session.execute(update(Job).where(Job.id.in_(ids)).values(next_attempt_at=now))
    return len(ids)
