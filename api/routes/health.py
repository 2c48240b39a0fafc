"""Readiness: can the gateway take and work studies now? The database answers, a worker is alive, no due job
waits too long, the storage volume takes files above its reserve, and whatever the composition root adds (the
DICOM listener answers, the models load). ``/healthz``, in main, says only that the process answers."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from core.encoding import describe
from core.heartbeat import live_workers
from core.settings import WorkerSettings
from core.storage import Storage
from core.tables import Job, utcnow

#: A check the composition root adds to /readyz (``create_app(checks=...)``): None when it passes, else why
#: not, in a sentence that names what failed.
ReadinessCheck = Callable[[], str | None]

#: Public like /healthz: orchestrators and load balancers probe it without credentials, and it must answer
#: (503) when the database that holds the credentials is down. It carries no patient data.
router = APIRouter(tags=["health"])


class WorkerState(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    worker_id: str
    host: str
    pid: int
    started_at: datetime
    beat_at: datetime
    current_job_id: int | None


class QueueState(BaseModel):
    #: Pending jobs, due or waiting for a retry.
    pending: int
    #: Jobs a worker should be running now: pending and due, or running under an expired lease.
    due: int
    running: int
    #: How long the oldest due job has waited for a worker (None: none is due).
    oldest_due_seconds: float | None


class Readiness(BaseModel):
    status: str  # ready | not ready
    #: Why not ready; empty when ready.
    reasons: list[str]
    database: str  # ok | unreachable
    workers_alive: int
    workers: list[WorkerState]
    queue: QueueState | None
    #: Each further check ("storage", and those of the composition root: "listener", "models"): "ok" or why
    #: not (that sentence is among ``reasons`` too).
    checks: dict[str, str]


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={
        503: {
            "model": Readiness,
            "description": "no database, no live worker, a job waiting too long, or a failed check",
        }
    },
)
def readyz(request: Request) -> JSONResponse:
    """200 when a worker has beaten within GATEWAY_WORKER__HEARTBEAT_TIMEOUT_SECONDS, no due job has waited
    longer than GATEWAY_WORKER__MAX_QUEUE_WAIT_SECONDS, the database answers, a file can be made in the
    storage volume's temp folder with its free space above GATEWAY_STORAGE__RESERVE_BYTES, and every check
    the composition root added passes; 503 with the reasons else."""
    wcfg: WorkerSettings = request.app.state.settings.worker
    try:
        with request.app.state.session_factory() as session:
            readiness = _readiness(session, wcfg)
    except SQLAlchemyError as exc:
        cause = str(getattr(exc, "orig", None) or exc).strip().partition("\n")[0]  # the driver's words
        reason = f"database unreachable: {type(exc).__name__}: {cause[:200]}"
        readiness = Readiness(
            status="not ready",
            reasons=[reason],
            database="unreachable",
            workers_alive=0,
            workers=[],
            queue=None,
            checks={},
        )
    checks: dict[str, ReadinessCheck] = {
        "storage": lambda: storage_problem(request.app.state.storage),
        **request.app.state.readiness_checks,
    }
    for name, check in checks.items():
        problem = _run(name, check)
        readiness.checks[name] = problem or "ok"
        if problem:
            readiness.reasons.append(problem)
    readiness.status = "not ready" if readiness.reasons else "ready"
    code = 200 if not readiness.reasons else 503
    return JSONResponse(readiness.model_dump(mode="json"), status_code=code)


def _readiness(session: Session, wcfg: WorkerSettings) -> Readiness:
    now = utcnow()
    workers = [
        WorkerState.model_validate(w)
        for w in live_workers(session, fresher_than=wcfg.heartbeat_timeout_seconds)
    ]
    queue = _queue(session, now)
    reasons = []
    if not workers:
        reasons.append(f"no worker heartbeat in the last {wcfg.heartbeat_timeout_seconds:g} s")
    wait = queue.oldest_due_seconds
    if wcfg.max_queue_wait_seconds and wait is not None and wait > wcfg.max_queue_wait_seconds:
        reasons.append(
            f"the oldest due job has waited {wait:.0f} s for a worker "
            f"(bound {wcfg.max_queue_wait_seconds:g} s)"
        )
    return Readiness(
        status="not ready" if reasons else "ready",
        reasons=reasons,
        database="ok",
        workers_alive=len(workers),
        workers=workers,
        queue=queue,
        checks={},
    )


def storage_problem(storage: Storage) -> str | None:
    """Why the storage volume cannot take instances now, or None."""
    try:
        handle, path = storage.open_temp()
        handle.close()
        path.unlink()
    except OSError as exc:
        return f"storage folder {storage.tmp_dir} is not writable: {exc.strerror or describe(exc)}"
    try:
        free = storage.free_bytes()
    except OSError as exc:
        return f"storage volume {storage.root} unreadable: {exc.strerror or describe(exc)}"
    if free < storage.reserve_bytes:
        return (
            f"storage volume at its free-space reserve: {free} bytes free, "
            f"GATEWAY_STORAGE__RESERVE_BYTES {storage.reserve_bytes}"
        )
    return None


def _run(name: str, check: ReadinessCheck) -> str | None:
    try:
        return check()
    except Exception as exc:  # a check that breaks is a failed check, never a 500
        return f"{name} check failed: {describe(exc)}"


def _queue(session: Session, now: datetime) -> QueueState:
    pending_due, pending_since = session.execute(
        select(func.count(Job.id), func.min(Job.next_attempt_at)).where(
            Job.status == "pending", Job.next_attempt_at <= now
        )
    ).one()
    orphaned, orphaned_since = session.execute(
        select(func.count(Job.id), func.min(Job.lease_expires_at)).where(
            Job.status == "running", Job.lease_expires_at < now
        )
    ).one()
    counts = dict(
        session.execute(
            select(Job.status, func.count(Job.id))
            .where(Job.status.in_(("pending", "running")))
            .group_by(Job.status)
        ).all()
    )
    since = min((t for t in (pending_since, orphaned_since) if t is not None), default=None)
    return QueueState(
        pending=counts.get("pending", 0),
        due=pending_due + orphaned,
        running=counts.get("running", 0),
        oldest_due_seconds=None if since is None else max(0.0, (now - since) / timedelta(seconds=1)),
    )
