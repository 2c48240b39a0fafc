"""Administration: users (pages and JSON) and the audit trail (page, JSON, CSV). Admin scope only."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.deps import SessionDep
from api.pages import page
from api.security import client_address, require
from core.accounts import (
    ROLES,
    AccountError,
    Principal,
    count_admins,
    create_user,
    require_user,
    set_disabled,
)
from core.audit import AuditFilter, csv_lines, iter_events, list_events
from core.db import read_session
from core.tables import User

AdminDep = Annotated[Principal, Depends(require("admin"))]

router = APIRouter(tags=["admin"])


class UserOut(BaseModel):
    username: str
    full_name: str | None
    role: str
    disabled: bool
    created_at: datetime
    last_login_at: datetime | None


class UserIn(BaseModel):
    username: str = Field(max_length=64)
    role: str
    password: str = Field(max_length=1024)
    full_name: str | None = Field(None, max_length=128)


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


def _users(session: SessionDep) -> list[User]:
    return list(session.scalars(select(User).order_by(User.username)))


def _change_disabled(
    session: SessionDep, principal: Principal, username: str, disabled: bool, client: str | None
) -> None:
    user = require_user(session, username)
    if disabled and user.role == "admin" and not user.disabled and count_admins(session) <= 1:
        raise AccountError("the last active admin cannot be disabled")
    set_disabled(session, user, disabled, actor=principal.actor, client=client)


# -- pages -------------------------------------------------------------------------------------------------


@router.get("/admin/users", response_class=HTMLResponse, include_in_schema=False)
def users_page(
    request: Request, session: SessionDep, principal: AdminDep, message: str | None = None
) -> Response:
    return page(request, "admin_users.html", users=_users(session), roles=ROLES, message=message, error=None)


@router.post("/admin/users", include_in_schema=False)
def users_create_form(
    request: Request,
    session: SessionDep,
    principal: AdminDep,
    username: Annotated[str, Form(max_length=64)],
    role: Annotated[str, Form(max_length=16)],
    password: Annotated[str, Form(max_length=1024)],
    full_name: Annotated[str, Form(max_length=128)] = "",
) -> Response:
    try:
        create_user(
            session,
            username=username.strip().lower(),
            role=role,
            password=password,
            full_name=full_name.strip() or None,
            actor=principal.actor,
            client=client_address(request),
        )
        session.commit()
    except AccountError as exc:
        return _users_refused(request, session, exc)
    return _users_done(f"user {username} created")


@router.post("/admin/users/{username}/{change}", include_in_schema=False)
def users_disable_form(
    request: Request, session: SessionDep, principal: AdminDep, username: str, change: str
) -> Response:
    if change not in ("disable", "enable"):
        raise HTTPException(status_code=404, detail="no such action")
    try:
        _change_disabled(session, principal, username, change == "disable", client_address(request))
        session.commit()
    except AccountError as exc:
        return _users_refused(request, session, exc)
    return _users_done(f"user {username} {change}d")


def _users_refused(request: Request, session: Session, exc: AccountError) -> Response:
    """The users page again, with why the change was refused (nothing of it was stored)."""
    session.rollback()
    return page(
        request, "admin_users.html", 400, users=_users(session), roles=ROLES, message=None, error=str(exc)
    )


def _users_done(message: str) -> Response:
    return RedirectResponse(f"/admin/users?{urlencode({'message': message})}", status_code=303)


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


def _day(value: str | None, name: str) -> date | None:
    """A YYYY-MM-DD query value; empty (a form's blank date field) means none."""
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise HTTPException(status_code=422, detail=f"{name}: expected a date as YYYY-MM-DD") from None


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
        "since": _day(since, "since"),
        "until": _day(until, "until"),
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


@router.get("/api/users", response_model=list[UserOut])
def list_users(session: SessionDep, principal: AdminDep) -> list[User]:
    return _users(session)


@router.post("/api/users", response_model=UserOut, status_code=201)
def create_user_json(body: UserIn, request: Request, session: SessionDep, principal: AdminDep) -> User:
    try:
        user = create_user(
            session,
            username=body.username,
            role=body.role,
            password=body.password,
            full_name=body.full_name,
            actor=principal.actor,
            client=client_address(request),
        )
        session.commit()
    except AccountError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
    return user


@router.post("/api/users/{username}/disable", response_model=UserOut)
@router.post("/api/users/{username}/enable", response_model=UserOut)
def change_user_json(username: str, request: Request, session: SessionDep, principal: AdminDep) -> User:
    disabled = request.url.path.endswith("/disable")
    try:
        _change_disabled(session, principal, username, disabled, client_address(request))
        session.commit()
    except AccountError as exc:
        raise HTTPException(status_code=404 if "no user" in str(exc) else 409, detail=str(exc)) from None
    return require_user(session, username)


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
