"""Who is asking, may they, and is it really them: authentication, scopes, CSRF and browser hardening.

- Credentials: ``Authorization: Bearer sgw_...`` (scripts; no CSRF check, browsers cannot send it cross-site
  without a CORS preflight we never answer) or the session cookie (browsers).
- No credentials: 401 (with ``WWW-Authenticate: Bearer``) for the API, a redirect to ``/login`` for pages.
  A role without the scope: 403.
- A state-changing request with the session cookie needs the session's CSRF token (form field ``csrf_token``
  or header ``X-CSRF-Token``); any state-changing request that a browser marks cross-site
  (``Sec-Fetch-Site``) or whose ``Origin`` is not this server is refused before it reaches a route.
- Every response carries a strict Content-Security-Policy (no inline script or style) and friends.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Annotated
from urllib.parse import quote

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.accounts import Principal, resolve_session, resolve_token
from core.db import read_session, transaction

SESSION_COOKIE = "gateway_session"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; font-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_SECURITY_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),  # no-referrer would make form posts say Origin: null
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
]


class NotAuthenticated(Exception):
    """No (valid) credentials: 401 for the API, a redirect to the sign-in page for pages."""

    def __init__(self, detail: str = "sign-in required") -> None:
        super().__init__(detail)
        self.detail = detail


def client_address(request: Request) -> str | None:
    return request.client.host if request.client else None


def wants_page(request: Request) -> bool:
    """A browser navigating (not a script calling the API)."""
    path = request.url.path
    if path.startswith(("/api/", "/dicomweb/")):
        return False
    return "text/html" in request.headers.get("accept", "")


def authenticate(request: Request) -> Principal | None:
    """The principal of the request's credentials, None without any; NotAuthenticated for bad ones.

    Read in a read-only session (on SQLite it does not queue for the write lock behind the listener's
    commits); only when the row must change (last use noted at most once a minute, an expired session
    removed) is it read again in a write transaction."""
    cached: Principal | None = getattr(request.state, "principal", None)
    if cached is not None:
        return cached
    settings = request.app.state.settings
    factory = request.app.state.session_factory
    header = request.headers.get("authorization")
    resolve: Callable[[Session], Principal | None]
    if header is not None:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise NotAuthenticated("use Authorization: Bearer <token>")
        resolve = partial(resolve_token, token=value.strip())
    elif cookie := request.cookies.get(SESSION_COOKIE):
        resolve = partial(resolve_session, cookie=cookie, auth=settings.auth)
    else:
        return None
    with read_session(factory) as session:
        principal = resolve(session)
        changed = bool(session.dirty or session.deleted)
        session.rollback()
    if changed:
        with transaction(factory) as session:
            principal = resolve(session)
    if principal is None and header is not None:
        raise NotAuthenticated("invalid, expired or revoked token")
    request.state.principal = principal
    return principal


OptionalPrincipal = Annotated[Principal | None, Depends(authenticate)]


def signed_in(principal: OptionalPrincipal) -> Principal:
    if principal is None:
        raise NotAuthenticated()
    return principal


def require(scope: str) -> Callable[..., Awaitable[Principal]]:
    """A dependency: the request's principal, which must hold ``scope``; state-changing requests made with
    the session cookie must also carry the session's CSRF token."""

    async def dependency(request: Request, principal: Annotated[Principal, Depends(signed_in)]) -> Principal:
        if scope not in principal.scopes:
            raise HTTPException(status_code=403, detail=f"your role ({principal.role}) does not allow this")
        await check_csrf(request, principal)
        return principal

    dependency.__name__ = f"require_{scope.replace(':', '_')}"
    return dependency


async def check_csrf(request: Request, principal: Principal) -> None:
    if request.method in SAFE_METHODS or principal.via != "session":
        return
    sent = request.headers.get("x-csrf-token")
    if sent is None and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        sent = str((await request.form()).get("csrf_token") or "")
    verify_csrf(principal, sent)


def verify_csrf(principal: Principal, sent: str | None) -> None:
    expected = principal.csrf_token or ""
    if not sent or not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
        raise HTTPException(status_code=403, detail="missing or wrong CSRF token: reload the page")


Authenticated = Annotated[Principal, Depends(signed_in)]


async def _not_authenticated(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, NotAuthenticated)
    if wants_page(request) and request.method in SAFE_METHODS:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
    return JSONResponse({"detail": exc.detail}, status_code=401, headers={"WWW-Authenticate": "Bearer"})


class BrowserGuard:
    """Pure ASGI middleware: refuses state-changing requests a browser made from another site (by
    ``Sec-Fetch-Site``, else by ``Origin``), and adds the security headers to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        if scope["method"] not in SAFE_METHODS and "authorization" not in headers:
            refusal = _cross_site(scope, headers)
            if refusal:
                response = JSONResponse({"detail": refusal}, status_code=403)
                await response(scope, receive, self._with_headers(send))
                return
        await self.app(scope, receive, self._with_headers(send))

    @staticmethod
    def _with_headers(send: Send) -> Send:
        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in _SECURITY_HEADERS if k not in present]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        return wrapped


def _cross_site(scope: Scope, headers: dict[str, str]) -> str | None:
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return f"cross-site request refused (Sec-Fetch-Site: {site[:20]})"
    origin = headers.get("origin")
    if origin is not None:
        host = headers.get("host", "")
        scheme = scope.get("scheme", "http")
        if origin.lower() != f"{scheme}://{host}".lower():
            return "cross-origin request refused"
    return None


def install(app: FastAPI) -> None:
    app.add_exception_handler(NotAuthenticated, _not_authenticated)
    app.add_middleware(BrowserGuard)
