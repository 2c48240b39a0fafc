"""The audit trail for administrators: page, JSON, CSV (admin scope only)."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from pydantic import BaseModel

from api.deps import SessionDep, query_day
from api.pages import page
from api.routes.admin import AdminDep
from core.audit import AuditFilter, csv_lines, iter_events, list_events
from core.db import read_session

router = APIRouter(tags=["admin"])


class AuditEventOut(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    study_instance_uid: str | None
    client: str | None
    detail: dict[str, Any]


class AuditPage(BaseModel):
    total: int
    events: list[AuditEventOut]


def _filter(
    actor: str | None, action: str | None, study_uid: str | None, since: date | None, until: date | None
) -> AuditFilter:
    return AuditFilter(
        actor=actor or None,
        action=action or None,
        study_uid=study_uid or None,
        since=datetime.combine(since, time(), UTC) if since else None,
        until=datetime.combine(until, time(), UTC) + timedelta(days=1) if until else None,
    )


AuditQuery = dict[str, Any]


def _audit_query(
    actor: Annotated[str | None, Query(max_length=64)] = None,
    action: Annotated[str | None, Query(max_length=64)] = None,
    study_uid: Annotated[str | None, Query(max_length=64)] = None,
    since: Annotated[
        str | None, Query(max_length=10, description="first day (UTC, YYYY-MM-DD), inclusive")
    ] = None,
    until: Annotated[
        str | None, Query(max_length=10, description="last day (UTC, YYYY-MM-DD), inclusive")
    ] = None,
) -> AuditQuery:
    return {
        "actor": actor,
        "action": action,
        "study_uid": study_uid,
        "since": query_day(since, "since"),
        "until": query_day(until, "until"),
    }


AuditQueryDep = Annotated[AuditQuery, Depends(_audit_query)]


@router.get("/admin/audit", response_class=HTMLResponse, include_in_schema=False)
def audit_page(
    request: Request,
    session: SessionDep,
    principal: AdminDep,
    q: AuditQueryDep,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Response:
    where = _filter(**q)
    total, events = list_events(session, where, limit=200, offset=offset)
    query = urlencode({k: v for k, v in q.items() if v})
    next_offset = offset + len(events) if offset + len(events) < total else None
    return page(
        request,
        "admin_audit.html",
        events=events,
        total=total,
        filters=where,
        since=q["since"],
        until=q["until"],
        query=query,
        next_offset=next_offset,
    )


# -- JSON --------------------------------------------------------------------------------------------------


@router.get("/api/audit", response_model=AuditPage)
def audit_json(
    session: SessionDep,
    principal: AdminDep,
    q: AuditQueryDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> AuditPage:
    """Audit events, newest first. ``action`` matches exactly, or by prefix when it ends in '.'."""
    total, events = list_events(session, _filter(**q), limit=limit, offset=offset)
    return AuditPage(
        total=total, events=[AuditEventOut.model_validate(e, from_attributes=True) for e in events]
    )


@router.get("/api/audit.csv", response_class=StreamingResponse)
def audit_csv(request: Request, principal: AdminDep, q: AuditQueryDep) -> StreamingResponse:
    """The matching audit events as CSV, oldest first (all of them, streamed)."""
    factory = request.app.state.session_factory
    where = _filter(**q)

    def lines() -> Any:
        with read_session(factory) as session:
            yield from csv_lines(iter_events(session, where))

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return StreamingResponse(
        lines(),
        media_type="text/csv; charset=utf-8",
        headers={
            "Content-Disposition": f'attachment; filename="audit-{stamp}.csv"',
            "Cache-Control": "no-store",
        },
    )
