"""Administration: users and their passwords, API tokens (pages and JSON). Admin scope only; every change is
audited in its own transaction (core.accounts records it). The audit trail: api.routes.audit."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.deps import SessionDep
from api.pages import page
from api.security import client_address, require
from core.accounts import (
    MIN_PASSWORD_LENGTH,
    ROLE_SCOPES,
    ROLES,
    SCOPES,
    AccountError,
    Principal,
    count_admins,
    create_token,
    create_user,
    list_tokens,
    require_user,
    revoke_token,
    set_disabled,
    set_password,
    token_state,
)
from core.tables import ApiToken, User

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


class PasswordIn(BaseModel):
    password: str = Field(max_length=1024)


class TokenOut(BaseModel):
    prefix: str
    user: str
    name: str | None
    scopes: list[str]
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None
    #: active (it works), revoked, expired or "user disabled"
    state: str


class NewTokenOut(TokenOut):
    #: The bearer token itself: only its hash is kept, it is never shown again.
    token: str


class TokenIn(BaseModel):
    user: str = Field(max_length=64)
    scopes: list[str] | None = Field(
        None, min_length=1, max_length=len(SCOPES), description="a subset of the role's; omitted: all of them"
    )
    days: int | None = Field(
        None, ge=0, le=36500, description="0: no expiry; omitted: GATEWAY_AUTH__TOKEN_DAYS"
    )
    name: str | None = Field(None, max_length=64)


def _users(session: SessionDep) -> list[User]:
    return list(session.scalars(select(User).order_by(User.username)))


def _token_out(row: ApiToken) -> TokenOut:
    return TokenOut(
        prefix=row.prefix,
        user=row.user.username,
        name=row.name,
        scopes=row.scopes,
        created_at=row.created_at,
        expires_at=row.expires_at,
        last_used_at=row.last_used_at,
        revoked_at=row.revoked_at,
        state=token_state(row),
    )


def _token_days(request: Request, days: int | None) -> int:
    return request.app.state.settings.auth.token_days if days is None else days


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
    return page(request, "admin_users.html", **_users_context(session), message=message, error=None)


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


@router.post("/admin/users/password", include_in_schema=False)
def users_password_form(
    request: Request,
    session: SessionDep,
    principal: AdminDep,
    username: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=1024)],
    password_again: Annotated[str, Form(max_length=1024)],
) -> Response:
    """A new password for a user (an admin's own too); their browser sessions end."""
    try:
        if password != password_again:
            raise AccountError("the two passwords differ")
        user = require_user(session, username)
        set_password(session, user, password, actor=principal.actor, client=client_address(request))
        session.commit()
    except AccountError as exc:
        return _users_refused(request, session, exc)
    return _users_done(f"password of {username} reset; their sessions ended")


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
    return page(request, "admin_users.html", 400, **_users_context(session), message=None, error=str(exc))


def _users_context(session: Session) -> dict[str, Any]:
    return {"users": _users(session), "roles": ROLES, "min_password": MIN_PASSWORD_LENGTH}


def _users_done(message: str) -> Response:
    return RedirectResponse(f"/admin/users?{urlencode({'message': message})}", status_code=303)


@router.get("/admin/tokens", response_class=HTMLResponse, include_in_schema=False)
def tokens_page(
    request: Request,
    session: SessionDep,
    principal: AdminDep,
    user: Annotated[str | None, Query(max_length=64)] = None,
    message: str | None = None,
) -> Response:
    """Every token; with ``user``, the form for a new token of that user (scopes of its role)."""
    chosen = None
    if user:
        try:
            chosen = require_user(session, user)
        except AccountError as exc:
            return _tokens_page(request, session, 404, error=str(exc))
    return _tokens_page(request, session, user=chosen, message=message)


@router.post("/admin/tokens", include_in_schema=False)
def tokens_create_form(
    request: Request,
    session: SessionDep,
    principal: AdminDep,
    user: Annotated[str, Form(max_length=64)],
    days: Annotated[int, Form(ge=0, le=36500)],
    scope: Annotated[list[str] | None, Form(max_length=len(SCOPES))] = None,
    name: Annotated[str, Form(max_length=64)] = "",
) -> Response:
    """The new token is shown on this response only: never in a URL, never stored, never logged."""
    try:
        owner = require_user(session, user)
        if not scope:
            raise AccountError("choose at least one scope")
        row, token = create_token(
            session,
            owner,
            scope,
            days=days,
            name=name.strip() or None,
            actor=principal.actor,
            client=client_address(request),
        )
        session.commit()
    except AccountError as exc:
        session.rollback()
        return _tokens_page(request, session, 400, error=str(exc))
    return _tokens_page(request, session, 201, new_token=token, new_prefix=row.prefix)


@router.post("/admin/tokens/{prefix}/revoke", include_in_schema=False)
def tokens_revoke_form(request: Request, session: SessionDep, principal: AdminDep, prefix: str) -> Response:
    _revoke(session, principal, prefix, client_address(request))
    message = urlencode({"message": f"token {prefix} revoked"})
    return RedirectResponse(f"/admin/tokens?{message}", status_code=303)


def _tokens_page(
    request: Request,
    session: Session,
    status_code: int = 200,
    *,
    user: User | None = None,
    message: str | None = None,
    error: str | None = None,
    new_token: str | None = None,
    new_prefix: str | None = None,
) -> Response:
    tokens = list_tokens(session)
    return page(
        request,
        "admin_tokens.html",
        status_code,
        tokens=[_token_out(t) for t in tokens],
        owners=[u for u in _users(session) if not u.disabled],
        user=user,
        user_scopes=sorted(ROLE_SCOPES[user.role]) if user else [],
        days=_token_days(request, None),
        message=message,
        error=error,
        new_token=new_token,
        new_prefix=new_prefix,
    )


def _revoke(session: Session, principal: Principal, prefix: str, client: str | None) -> ApiToken:
    try:
        row = revoke_token(session, prefix, actor=principal.actor, client=client)
        session.commit()
    except AccountError as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from None
    return row


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


@router.post("/api/users/{username}/password", response_model=UserOut)
def user_password_json(
    username: str, body: PasswordIn, request: Request, session: SessionDep, principal: AdminDep
) -> User:
    """A new password for a user (an admin's own too); their browser sessions end, their tokens stay."""
    try:
        user = require_user(session, username)
    except AccountError as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from None
    try:
        set_password(session, user, body.password, actor=principal.actor, client=client_address(request))
        session.commit()
    except AccountError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
    return user


@router.get("/api/tokens", response_model=list[TokenOut])
def list_tokens_json(session: SessionDep, principal: AdminDep) -> list[TokenOut]:
    """Every API token, newest first (never the token itself: only its prefix)."""
    return [_token_out(t) for t in list_tokens(session)]


@router.post("/api/tokens", response_model=NewTokenOut, status_code=201)
def create_token_json(
    body: TokenIn, request: Request, response: Response, session: SessionDep, principal: AdminDep
) -> NewTokenOut:
    """A token for a user; the response is the only place the token ever appears."""
    try:
        row, token = create_token(
            session,
            require_user(session, body.user),
            body.scopes or [],
            days=_token_days(request, body.days),
            name=body.name,
            actor=principal.actor,
            client=client_address(request),
        )
        session.commit()
    except AccountError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
    response.headers["Cache-Control"] = "no-store"
    return NewTokenOut(**_token_out(row).model_dump(), token=token)


@router.post("/api/tokens/{prefix}/revoke", response_model=TokenOut)
def revoke_token_json(prefix: str, request: Request, session: SessionDep, principal: AdminDep) -> TokenOut:
    """Revoke any user's token at once (again: no change)."""
    return _token_out(_revoke(session, principal, prefix, client_address(request)))
