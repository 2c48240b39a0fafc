"""Signing in and out, and who am I: /login, /logout, /, /api/me."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel

from api.deps import SessionDep
from api.pages import page
from api.security import (
    SESSION_COOKIE,
    Authenticated,
    OptionalPrincipal,
    client_address,
    signed_in,
    verify_csrf,
)
from core.accounts import Principal, authenticate, end_session, login_throttled, start_session
from core.audit import record

router = APIRouter(tags=["auth"])

WRONG = "User name or password not accepted."
THROTTLED = "Too many failed sign-ins. Wait a few minutes and try again."


class Me(BaseModel):
    username: str
    role: str
    scopes: list[str]
    via: str


def _safe_next(target: str | None) -> str:
    """Only a path on this server (no //host, no scheme): never an open redirect."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


@router.get("/login", response_class=HTMLResponse, include_in_schema=False)
def login_page(request: Request, principal: OptionalPrincipal, next: str | None = None) -> Response:
    if principal is not None:
        return RedirectResponse(_safe_next(next), status_code=303)
    return page(request, "login.html", next=_safe_next(next), username="", error=None)


@router.post("/login", include_in_schema=False)
def login(
    request: Request,
    session: SessionDep,
    username: Annotated[str, Form(max_length=256)],
    password: Annotated[str, Form(max_length=1024)],
    next: Annotated[str, Form(max_length=2048)] = "/",
) -> Response:
    """Form sign-in. Failures never say which part was wrong; too many per user name or per client address
    within GATEWAY_AUTH__LOGIN_WINDOW_SECONDS get 429 without a password check."""
    settings = request.app.state.settings
    client = client_address(request)
    name = username.strip().lower()
    if login_throttled(session, name, client, settings.auth):
        record(
            session, actor="anonymous", action="login.throttled", client=client, detail={"user": name[:64]}
        )
        session.commit()
        return page(request, "login.html", 429, next=_safe_next(next), username=name, error=THROTTLED)
    user = authenticate(session, name, password, client)
    if user is None:
        session.commit()
        return page(request, "login.html", 401, next=_safe_next(next), username=name, error=WRONG)
    cookie = start_session(session, user, client, settings.auth)
    session.commit()
    response = RedirectResponse(_safe_next(next), status_code=303)
    secure = settings.auth.secure_cookies
    response.set_cookie(
        SESSION_COOKIE,
        cookie,
        max_age=int(settings.auth.session_absolute_hours * 3600),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https" if secure is None else secure,
        path="/",
    )
    return response


@router.post("/logout", include_in_schema=False)
def logout(
    request: Request,
    session: SessionDep,
    principal: Annotated[Principal, Depends(signed_in)],
    csrf_token: Annotated[str | None, Form(max_length=128)] = None,
) -> Response:
    if principal.via == "session":
        verify_csrf(principal, request.headers.get("x-csrf-token") or csrf_token)
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        end_session(session, cookie)
    record(session, actor=principal.actor, action="logout", client=client_address(request))
    session.commit()
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def home(request: Request, principal: Authenticated) -> Response:
    return page(request, "home.html")


@router.get("/api/me", response_model=Me)
def me(principal: Authenticated) -> Me:
    """The signed-in user (session or token) and what they may do."""
    return Me(
        username=principal.username, role=principal.role, scopes=sorted(principal.scopes), via=principal.via
    )
