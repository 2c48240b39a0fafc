"""The dead letters (page and JSON): failed and dead deliveries with the peer's status, failed jobs, and
retrying them. Admin scope only; every retry is audited (core.deadletter)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from api.deps import ReadSessionDep, SessionDep
from api.pages import page
from api.routes.admin import AdminDep
from api.security import client_address
from core.accounts import Principal
from core.deadletter import (
    DEAD_LETTER,
    DeadLetterError,
    NotFound,
    get_delivery,
    get_job,
    list_deliveries,
    list_jobs,
    retry_delivery,
    retry_failed_deliveries,
    retry_job,
)

router = APIRouter(tags=["admin"])

#: Rows per table on the page (newest first; the JSON routes page through the rest).
PAGE_ROWS = 200

DeliveryStatus = Literal["pending", "sent", "failed", "dead"]
JobStatus = Literal["pending", "running", "done", "failed"]


class DeliveryOut(BaseModel):
    id: int
    status: str
    destination: str
    study_instance_uid: str
    report_sop_instance_uid: str
    model_name: str
    model_version: str
    attempts: int
    last_status: int | None = Field(description="the peer's last DICOM status (C-STORE response)")
    last_status_hex: str | None = Field(description="the same as the standard writes it: 0xA700")
    last_error: str | None
    next_attempt_at: datetime | None
    delivered_at: datetime | None
    job_id: int | None = Field(description="its deliver job, queued or failed")
    failed_at: datetime | None = Field(description="when its deliver job gave up")


class DeliveryPage(BaseModel):
    total: int
    deliveries: list[DeliveryOut]


class JobOut(BaseModel):
    id: int
    kind: str
    status: str
    study_instance_uid: str | None
    attempts: int
    max_attempts: int
    last_error: str | None
    created_at: datetime
    finished_at: datetime | None
    delivery_id: int | None


class JobPage(BaseModel):
    total: int
    jobs: list[JobOut]


class RetriedOut(BaseModel):
    retried: list[int] = Field(description="ids of the deliveries queued again")


def _retry_delivery(request: Request, session: Session, principal: Principal, delivery_id: int) -> None:
    """Retry and commit (DeadLetterError when refused: nothing stored)."""
    attempts = request.app.state.settings.worker.delivery_max_attempts
    client = client_address(request)
    retry_delivery(session, delivery_id, actor=principal.actor, client=client, max_attempts=attempts)
    session.commit()


def _retry_all(request: Request, session: Session, principal: Principal) -> list[int]:
    attempts = request.app.state.settings.worker.delivery_max_attempts
    client = client_address(request)
    ids = retry_failed_deliveries(session, actor=principal.actor, client=client, max_attempts=attempts)
    session.commit()
    return ids


def _retry_job(request: Request, session: Session, principal: Principal, job_id: int) -> None:
    retry_job(session, job_id, actor=principal.actor, client=client_address(request))
    session.commit()


def _refused(exc: DeadLetterError) -> HTTPException:
    return HTTPException(status_code=404 if isinstance(exc, NotFound) else 409, detail=str(exc))


# -- page --------------------------------------------------------------------------------------------------


def _page(
    request: Request,
    session: Session,
    status_code: int = 200,
    *,
    message: str | None = None,
    error: str | None = None,
) -> Response:
    delivery_total, deliveries = list_deliveries(session, statuses=DEAD_LETTER, limit=PAGE_ROWS)
    job_total, jobs = list_jobs(session, statuses=("failed",), with_dead_letters=False, limit=PAGE_ROWS)
    return page(
        request,
        "admin_deliveries.html",
        status_code,
        deliveries=deliveries,
        delivery_total=delivery_total,
        jobs=jobs,
        job_total=job_total,
        message=message,
        error=error,
    )


@router.get("/admin/deliveries", response_class=HTMLResponse, include_in_schema=False)
def deliveries_page(
    request: Request, session: ReadSessionDep, principal: AdminDep, message: str | None = None
) -> Response:
    return _page(request, session, message=message)


@router.post("/admin/deliveries/retry-failed", include_in_schema=False)
def retry_failed_form(request: Request, session: SessionDep, principal: AdminDep) -> Response:
    ids = _retry_all(request, session, principal)
    if not ids:
        return _done("no failed or dead delivery to retry")
    return _done(f"{len(ids)} {'delivery' if len(ids) == 1 else 'deliveries'} queued again")


@router.post("/admin/deliveries/{delivery_id}/retry", include_in_schema=False)
def retry_delivery_form(
    request: Request, session: SessionDep, principal: AdminDep, delivery_id: int
) -> Response:
    try:
        _retry_delivery(request, session, principal, delivery_id)
    except DeadLetterError as exc:
        return _refused_page(request, session, exc)
    return _done(f"delivery {delivery_id} queued again")


@router.post("/admin/jobs/{job_id}/retry", include_in_schema=False)
def retry_job_form(request: Request, session: SessionDep, principal: AdminDep, job_id: int) -> Response:
    try:
        _retry_job(request, session, principal, job_id)
    except DeadLetterError as exc:
        return _refused_page(request, session, exc)
    return _done(f"job {job_id} queued again")


def _refused_page(request: Request, session: Session, exc: DeadLetterError) -> Response:
    """The page again, saying why the retry was refused (nothing of it was stored)."""
    session.rollback()
    return _page(request, session, _refused(exc).status_code, error=str(exc))


def _done(message: str) -> Response:
    return RedirectResponse(f"/admin/deliveries?{urlencode({'message': message})}", status_code=303)


# -- JSON --------------------------------------------------------------------------------------------------


@router.get("/api/deliveries", response_model=DeliveryPage)
def deliveries_json(
    session: ReadSessionDep,
    principal: AdminDep,
    status: Annotated[list[DeliveryStatus] | None, Query(description="default: failed and dead")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> DeliveryPage:
    """Deliveries of reports to destinations, newest first: by default the dead letters (``failed``:
    retries exhausted, ``dead``: rejected by the peer), with the peer's last status and reason."""
    total, rows = list_deliveries(session, statuses=status or DEAD_LETTER, limit=limit, offset=offset)
    return DeliveryPage(
        total=total, deliveries=[DeliveryOut.model_validate(r, from_attributes=True) for r in rows]
    )


@router.post("/api/deliveries/retry-failed", response_model=RetriedOut)
def retry_failed_json(request: Request, session: SessionDep, principal: AdminDep) -> RetriedOut:
    """Queue every failed and dead delivery again."""
    return RetriedOut(retried=_retry_all(request, session, principal))


@router.post("/api/deliveries/{delivery_id}/retry", response_model=DeliveryOut)
def retry_delivery_json(
    delivery_id: int, request: Request, session: SessionDep, principal: AdminDep
) -> DeliveryOut:
    """Queue a failed or dead delivery again (404: no such delivery; 409: it is not failed or dead)."""
    try:
        _retry_delivery(request, session, principal, delivery_id)
    except DeadLetterError as exc:
        raise _refused(exc) from None
    return DeliveryOut.model_validate(get_delivery(session, delivery_id), from_attributes=True)


@router.get("/api/jobs", response_model=JobPage)
def jobs_json(
    session: ReadSessionDep,
    principal: AdminDep,
    status: Annotated[list[JobStatus] | None, Query(description="default: failed")] = None,
    kind: Annotated[str | None, Query(max_length=32)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> JobPage:
    """Jobs of the queue, newest first (by default the failed ones, with their last error)."""
    total, rows = list_jobs(session, statuses=status or ("failed",), kind=kind, limit=limit, offset=offset)
    return JobPage(total=total, jobs=[JobOut.model_validate(r, from_attributes=True) for r in rows])


@router.post("/api/jobs/{job_id}/retry", response_model=JobOut)
def retry_job_json(job_id: int, request: Request, session: SessionDep, principal: AdminDep) -> JobOut:
    """Run a failed job again (404: no such job; 409: it is not failed, or its work is queued already)."""
    try:
        _retry_job(request, session, principal, job_id)
    except DeadLetterError as exc:
        raise _refused(exc) from None
    return JobOut.model_validate(get_job(session, job_id), from_attributes=True)
