"""Users, their passwords (Argon2id), API tokens, browser sessions and sign-in throttling.

Who may do what is one table, :data:`ROLE_SCOPES`: a browser session carries every scope of its user's role;
an API token carries the scopes it was created with, and only while its user's role still allows them.
Secrets are stored as hashes only: passwords with Argon2id (argon2-cffi), tokens and session cookies (random,
256 bits) with SHA-256.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, joinedload

from core.audit import record
from core.settings import AuthSettings
from core.tables import ApiToken, LoginAttempt, User, WebSession, utcnow

ROLES = ("radiologist", "data", "admin")

#: What each role may do. studies:read — study lists and details; review — worklist, cases, decisions;
#: export — de-identified label exports; stow — DICOMweb STOW-RS; upload — JPEG/PNG/DICOM upload from the
#: browser; admin — users, tokens, audit; metrics — GET /metrics (a scraper's token: `gateway tokens create
#: --user USER --scope metrics`).
ROLE_SCOPES: dict[str, frozenset[str]] = {
    "radiologist": frozenset({"studies:read", "review", "upload"}),
    "data": frozenset({"export"}),
    "admin": frozenset({"studies:read", "stow", "upload", "admin", "metrics"}),
}
SCOPES = frozenset().union(*ROLE_SCOPES.values())

MIN_PASSWORD_LENGTH = 10
TOKEN_PREFIX = "sgw"
_USERNAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_TOKEN = re.compile(rf"{TOKEN_PREFIX}_([0-9a-f]{{12}})_([A-Za-z0-9_-]{{43}})")
#: A session's or token's "last used" time is written at most this often (not on every request).
_TOUCH_EVERY = timedelta(seconds=60)

_hasher = PasswordHasher()  # Argon2id, argon2-cffi's RFC 9106 low-memory profile


@cache
def _dummy_hash() -> str:
    """Verified for unknown users, the same time either way (made on first use: importing stays cheap)."""
    return _hasher.hash(secrets.token_urlsafe(16))


class AccountError(ValueError):
    """A request about accounts that cannot be done (bad name, weak password, unknown user...)."""


@dataclass(frozen=True)
class Principal:
    """Who a request acts for, and with which scopes."""

    user_id: int
    username: str
    role: str
    scopes: frozenset[str]
    via: str  # "session" | "token"
    csrf_token: str | None = None  # sessions only

    @property
    def actor(self) -> str:
        return f"{'user' if self.via == 'session' else 'token'}:{self.username}"


def sha256(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


# -- users -------------------------------------------------------------------------------------------------


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")
    return _hasher.hash(password)


def create_user(
    session: Session,
    *,
    username: str,
    role: str,
    password: str,
    full_name: str | None = None,
    actor: str,
    client: str | None = None,
) -> User:
    if not _USERNAME.fullmatch(username):
        raise AccountError("a user name is 1-64 of a-z, 0-9, '.', '_', '-' (starting with a letter or digit)")
    if role not in ROLES:
        raise AccountError(f"role must be one of {', '.join(ROLES)}")
    if get_user(session, username) is not None:
        raise AccountError(f"user {username!r} exists")
    user = User(username=username, role=role, password_hash=hash_password(password), full_name=full_name)
    session.add(user)
    session.flush()
    record(session, actor=actor, client=client, action="user.create", detail={"user": username, "role": role})
    return user


def get_user(session: Session, username: str) -> User | None:
    return session.scalars(select(User).where(User.username == username)).first()


def require_user(session: Session, username: str) -> User:
    user = get_user(session, username)
    if user is None:
        raise AccountError(f"no user {username!r}")
    return user


def set_password(
    session: Session, user: User, password: str, *, actor: str, client: str | None = None
) -> None:
    """A new password; every browser session of the user ends."""
    user.password_hash = hash_password(password)
    user.password_changed_at = utcnow()
    session.execute(delete(WebSession).where(WebSession.user_id == user.id))
    record(session, actor=actor, client=client, action="user.reset_password", detail={"user": user.username})


def set_disabled(
    session: Session, user: User, disabled: bool, *, actor: str, client: str | None = None
) -> None:
    """A disabled user cannot sign in, their sessions end and their tokens stop working."""
    user.disabled = disabled
    if disabled:
        session.execute(delete(WebSession).where(WebSession.user_id == user.id))
    record(
        session,
        actor=actor,
        client=client,
        action="user.disable" if disabled else "user.enable",
        detail={"user": user.username},
    )


def count_admins(session: Session) -> int:
    return int(
        session.scalar(select(func.count(User.id)).where(User.role == "admin", User.disabled.is_(False))) or 0
    )


# -- sign-in -----------------------------------------------------------------------------------------------


def login_throttled(session: Session, username: str, client: str | None, auth: AuthSettings) -> bool:
    """Too many failed sign-ins for this user name, or from this address, within the window."""
    since = utcnow() - timedelta(seconds=auth.login_window_seconds)
    failures = select(func.count(LoginAttempt.id)).where(
        LoginAttempt.at >= since, LoginAttempt.success.is_(False)
    )
    by_user = session.scalar(failures.where(LoginAttempt.username == username[:64])) or 0
    by_client = (session.scalar(failures.where(LoginAttempt.client == client)) or 0) if client else 0
    return by_user >= auth.login_max_failures or by_client >= auth.login_max_failures_per_address


def authenticate(session: Session, username: str, password: str, client: str | None) -> User | None:
    """The user whose name and password these are, or None; the attempt is recorded either way (and audited).
    An unknown name costs the same Argon2 verification as a wrong password."""
    user = get_user(session, username)
    try:
        ok = _hasher.verify(user.password_hash if user else _dummy_hash(), password) and user is not None
    except (VerificationError, InvalidHashError):
        ok = False
    if ok and user is not None and user.disabled:
        ok = False
    session.add(LoginAttempt(username=username[:64], client=client, success=ok))
    record(
        session,
        actor=f"user:{user.username}" if ok and user else "anonymous",
        action="login.success" if ok else "login.failure",
        client=client,
        detail={"user": username[:64]},
    )
    if not ok or user is None:
        return None
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = _hasher.hash(password)
    user.last_login_at = utcnow()
    return user


# -- browser sessions --------------------------------------------------------------------------------------


def start_session(session: Session, user: User, client: str | None, auth: AuthSettings) -> str:
    """A new session for ``user``; returns the cookie value (shown once, stored hashed)."""
    token = secrets.token_urlsafe(32)
    now = utcnow()
    session.add(
        WebSession(
            token_hash=sha256(token),
            user_id=user.id,
            csrf_token=secrets.token_urlsafe(32),
            created_at=now,
            last_seen_at=now,
            expires_at=now + timedelta(hours=auth.session_absolute_hours),
            client=client,
        )
    )
    return token


def resolve_session(session: Session, cookie: str, auth: AuthSettings) -> Principal | None:
    """The principal of a live session cookie; None (and the row removed) once idle or past its end."""
    row = session.scalars(select(WebSession).where(WebSession.token_hash == sha256(cookie))).first()
    if row is None:
        return None
    now = utcnow()
    idle = timedelta(minutes=auth.session_idle_minutes)
    if now >= row.expires_at or now - row.last_seen_at >= idle or row.user.disabled:
        session.delete(row)
        return None
    if now - row.last_seen_at >= _TOUCH_EVERY:
        row.last_seen_at = now
    user = row.user
    return Principal(user.id, user.username, user.role, ROLE_SCOPES[user.role], "session", row.csrf_token)


def end_session(session: Session, cookie: str) -> bool:
    result = session.execute(delete(WebSession).where(WebSession.token_hash == sha256(cookie)))
    return bool(getattr(result, "rowcount", 0))


# -- API tokens --------------------------------------------------------------------------------------------


def create_token(
    session: Session,
    user: User,
    scopes: list[str],
    *,
    days: int | None,
    name: str | None = None,
    actor: str,
    client: str | None = None,
) -> tuple[ApiToken, str]:
    """A token for ``user`` with ``scopes`` (a subset of its role's), valid ``days`` (None or 0: no expiry).
    Returns the row and the token itself, which is never stored and shown only now."""
    if user.disabled:
        raise AccountError(f"user {user.username!r} is disabled")
    if days is not None and days < 0:
        raise AccountError("days must be 0 (no expiry) or more")
    wanted = set(scopes) or set(ROLE_SCOPES[user.role])
    unknown = wanted - SCOPES
    if unknown:
        raise AccountError(
            f"unknown scopes: {', '.join(sorted(unknown))} (known: {', '.join(sorted(SCOPES))})"
        )
    beyond = wanted - ROLE_SCOPES[user.role]
    if beyond:
        raise AccountError(f"role {user.role} does not allow {', '.join(sorted(beyond))}")
    prefix = secrets.token_hex(6)
    token = f"{TOKEN_PREFIX}_{prefix}_{secrets.token_urlsafe(32)}"
    row = ApiToken(
        user_id=user.id,
        prefix=prefix,
        token_hash=sha256(token),
        name=name,
        scopes=sorted(wanted),
        expires_at=utcnow() + timedelta(days=days) if days else None,
    )
    session.add(row)
    session.flush()
    record(
        session,
        actor=actor,
        client=client,
        action="token.create",
        detail={"user": user.username, "prefix": prefix, "scopes": sorted(wanted), "days": days},
    )
    return row, token


def resolve_token(session: Session, token: str) -> Principal | None:
    """The principal of a live bearer token, or None (malformed, unknown, revoked, expired, user disabled)."""
    match = _TOKEN.fullmatch(token)
    if match is None:
        return None
    row = session.scalars(select(ApiToken).where(ApiToken.prefix == match.group(1))).first()
    if row is None or not hmac.compare_digest(row.token_hash, sha256(token)):
        return None
    now = utcnow()
    if token_state(row, now) != "active":
        return None
    if row.last_used_at is None or now - row.last_used_at >= _TOUCH_EVERY:
        row.last_used_at = now
    scopes = frozenset(row.scopes) & ROLE_SCOPES[row.user.role]
    return Principal(row.user.id, row.user.username, row.user.role, scopes, "token")


def token_state(row: ApiToken, now: datetime | None = None) -> str:
    """``active`` (it works), ``revoked``, ``expired`` or ``user disabled``, in that order of precedence."""
    if row.revoked_at is not None:
        return "revoked"
    if row.expires_at is not None and (now or utcnow()) >= row.expires_at:
        return "expired"
    if row.user.disabled:
        return "user disabled"
    return "active"


def list_tokens(session: Session) -> list[ApiToken]:
    """Every token, newest first, with its user."""
    query = select(ApiToken).options(joinedload(ApiToken.user)).order_by(ApiToken.id.desc())
    return list(session.scalars(query))


def require_token(session: Session, prefix: str) -> ApiToken:
    row = session.scalars(select(ApiToken).where(ApiToken.prefix == prefix)).first()
    if row is None:
        raise AccountError(f"no token {prefix!r}")
    return row


def revoke_token(session: Session, prefix: str, *, actor: str, client: str | None = None) -> ApiToken:
    """Revoke at once (audited); revoking a revoked token changes and records nothing."""
    row = require_token(session, prefix)
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        record(
            session,
            actor=actor,
            client=client,
            action="token.revoke",
            detail={"user": row.user.username, "prefix": prefix},
        )
    return row
