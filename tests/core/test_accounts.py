"""core.accounts and core.audit on a real database (SQLite file and PostgreSQL): Argon2 passwords, sessions
with idle and absolute ends, tokens (scopes, expiry, revocation, disabled users), sign-in throttling, and an
audit table that refuses UPDATE and DELETE."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from sqlalchemy import delete, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from core import accounts as a
from core.audit import AuditFilter, csv_lines, iter_events, list_events, record
from core.db import transaction
from core.settings import AuthSettings
from core.tables import ApiToken, AuditEvent, User, WebSession, utcnow

PASSWORD = "correct-horse-battery"


def _user(factory: sessionmaker[Session], name: str = "alice", role: str = "radiologist") -> None:
    with transaction(factory) as s:
        a.create_user(s, username=name, role=role, password=PASSWORD, actor="test")


def test_password_is_stored_as_argon2id_and_checked(factory: sessionmaker[Session]) -> None:
    _user(factory)
    with transaction(factory) as s:
        stored = s.scalars(select(User)).one().password_hash
        assert stored.startswith("$argon2id$") and PASSWORD not in stored
        assert a.authenticate(s, "alice", PASSWORD, "10.0.0.1") is not None
        assert a.authenticate(s, "alice", PASSWORD + "x", "10.0.0.1") is None
        assert a.authenticate(s, "nobody", PASSWORD, "10.0.0.1") is None
    with factory() as s:
        actions = [e.action for e in list_events(s, AuditFilter(action="login."), limit=10)[1]]
        assert actions == ["login.failure", "login.failure", "login.success"]


@pytest.mark.parametrize(
    ("name", "role", "password", "error"),
    [
        ("Alice", "radiologist", PASSWORD, "user name"),
        ("a b", "radiologist", PASSWORD, "user name"),
        ("bob", "superuser", PASSWORD, "role"),
        ("bob", "admin", "short", "at least"),
        ("alice", "admin", PASSWORD, "exists"),
    ],
)
def test_bad_accounts_are_refused(
    factory: sessionmaker[Session], name: str, role: str, password: str, error: str
) -> None:
    _user(factory)
    with pytest.raises(a.AccountError, match=error), transaction(factory) as s:
        a.create_user(s, username=name, role=role, password=password, actor="test")


def test_disabled_user_cannot_sign_in_and_loses_sessions(factory: sessionmaker[Session]) -> None:
    _user(factory)
    auth = AuthSettings()
    with transaction(factory) as s:
        user = a.require_user(s, "alice")
        cookie = a.start_session(s, user, None, auth)
    with transaction(factory) as s:
        assert a.resolve_session(s, cookie, auth) is not None
        a.set_disabled(s, a.require_user(s, "alice"), True, actor="test")
    with transaction(factory) as s:
        assert a.resolve_session(s, cookie, auth) is None
        assert a.authenticate(s, "alice", PASSWORD, None) is None


def test_session_ends_when_idle_and_at_its_absolute_end(factory: sessionmaker[Session]) -> None:
    _user(factory)
    auth = AuthSettings(session_idle_minutes=0.02, session_absolute_hours=1)  # 1.2 s idle
    with transaction(factory) as s:
        cookie = a.start_session(s, a.require_user(s, "alice"), "10.0.0.1", auth)
    with transaction(factory) as s:
        principal = a.resolve_session(s, cookie, auth)
        assert principal is not None and principal.scopes == {"studies:read", "review", "upload"}
        assert principal.csrf_token and principal.actor == "user:alice"
    time.sleep(1.5)
    with transaction(factory) as s:
        assert a.resolve_session(s, cookie, auth) is None
        assert s.scalars(select(WebSession)).all() == []  # removed, not just ignored
    with transaction(factory) as s:
        cookie = a.start_session(s, a.require_user(s, "alice"), None, auth)
        s.flush()
        s.execute(update(WebSession).values(expires_at=utcnow() - timedelta(seconds=1)))
    with transaction(factory) as s:
        assert a.resolve_session(s, cookie, auth) is None
    with transaction(factory) as s:
        assert a.resolve_session(s, "not-a-session", auth) is None


def test_password_reset_ends_sessions(factory: sessionmaker[Session]) -> None:
    _user(factory)
    auth = AuthSettings()
    with transaction(factory) as s:
        cookie = a.start_session(s, a.require_user(s, "alice"), None, auth)
    with transaction(factory) as s:
        a.set_password(s, a.require_user(s, "alice"), "another-long-password", actor="test")
    with transaction(factory) as s:
        assert a.resolve_session(s, cookie, auth) is None
        assert a.authenticate(s, "alice", "another-long-password", None) is not None


def test_tokens_scopes_expiry_revocation(factory: sessionmaker[Session]) -> None:
    _user(factory, "admin1", "admin")
    with transaction(factory) as s:
        admin = a.require_user(s, "admin1")
        row, token = a.create_token(s, admin, ["stow"], days=30, actor="test")
        _, forever = a.create_token(s, admin, [], days=None, actor="test")
        with pytest.raises(a.AccountError, match="does not allow review"):
            a.create_token(s, admin, ["review"], days=1, actor="test")
        with pytest.raises(a.AccountError, match="unknown scopes"):
            a.create_token(s, admin, ["root"], days=1, actor="test")
    stored = row.token_hash
    assert token.startswith("sgw_") and token not in stored and row.prefix in token
    with transaction(factory) as s:
        principal = a.resolve_token(s, token)
        assert principal is not None and principal.scopes == {"stow"} and principal.via == "token"
        full = a.resolve_token(s, forever)
        assert full is not None and full.scopes == a.ROLE_SCOPES["admin"]
        assert a.resolve_token(s, token[:-1] + ("A" if token[-1] != "A" else "B")) is None  # right prefix
        assert a.resolve_token(s, "sgw_nonsense") is None
        assert s.scalars(select(ApiToken).where(ApiToken.prefix == row.prefix)).one().last_used_at is not None
    with transaction(factory) as s:
        s.execute(update(ApiToken).where(ApiToken.prefix == row.prefix).values(expires_at=utcnow()))
    with transaction(factory) as s:
        assert a.resolve_token(s, token) is None  # expired
        a.revoke_token(s, forever.split("_")[1], actor="test")
    with transaction(factory) as s:
        assert a.resolve_token(s, forever) is None


def test_disabled_users_tokens_stop_and_none_are_made_for_them(factory: sessionmaker[Session]) -> None:
    _user(factory)
    with transaction(factory) as s:
        row, token = a.create_token(s, a.require_user(s, "alice"), ["review"], days=1, actor="test")
        assert a.token_state(row) == "active"
    with transaction(factory) as s:
        a.set_disabled(s, a.require_user(s, "alice"), True, actor="test")
    with transaction(factory) as s:
        assert a.resolve_token(s, token) is None
        assert a.token_state(a.require_token(s, row.prefix)) == "user disabled"
        with pytest.raises(a.AccountError, match="is disabled"):
            a.create_token(s, a.require_user(s, "alice"), [], days=1, actor="test")
        a.set_disabled(s, a.require_user(s, "alice"), False, actor="test")
    with transaction(factory) as s:
        assert a.resolve_token(s, token) is not None  # never revoked: it works again with its user


def test_token_states_listing_and_revocation_are_audited_once(factory: sessionmaker[Session]) -> None:
    _user(factory, "ops", "admin")
    with transaction(factory) as s:
        ops = a.require_user(s, "ops")
        old, _ = a.create_token(s, ops, ["stow"], days=1, name="old", actor="test")
        new, _ = a.create_token(s, ops, ["metrics"], days=None, name="new", actor="test")
        with pytest.raises(a.AccountError, match="days"):
            a.create_token(s, ops, [], days=-1, actor="test")
    with transaction(factory) as s:
        s.execute(update(ApiToken).where(ApiToken.prefix == old.prefix).values(expires_at=utcnow()))
    with transaction(factory) as s:
        listed = a.list_tokens(s)
        assert [(t.name, a.token_state(t)) for t in listed] == [("new", "active"), ("old", "expired")]
        a.revoke_token(s, new.prefix, actor="user:root", client="10.0.0.1")
        a.revoke_token(s, new.prefix, actor="user:root")  # again: nothing changes
        with pytest.raises(a.AccountError, match="no token"):
            a.revoke_token(s, "000000000000", actor="user:root")
        assert a.token_state(a.require_token(s, new.prefix)) == "revoked"
    with factory() as s:
        total, events = list_events(s, AuditFilter(action="token.revoke"), limit=10)
        assert total == 1 and events[0].detail == {"user": "ops", "prefix": new.prefix}
        assert (events[0].actor, events[0].client) == ("user:root", "10.0.0.1")


def test_password_reset_is_audited_and_a_short_one_changes_nothing(factory: sessionmaker[Session]) -> None:
    _user(factory)
    auth = AuthSettings()
    with transaction(factory) as s:
        cookie = a.start_session(s, a.require_user(s, "alice"), None, auth)
    with pytest.raises(a.AccountError, match="at least"), transaction(factory) as s:
        a.set_password(s, a.require_user(s, "alice"), "short", actor="user:root")
    with transaction(factory) as s:
        assert a.resolve_session(s, cookie, auth) is not None
        a.set_password(
            s, a.require_user(s, "alice"), "another-long-password", actor="user:root", client="::1"
        )
    with factory() as s:
        total, events = list_events(s, AuditFilter(action="user.reset_password"), limit=10)
        assert total == 1 and (events[0].actor, events[0].client) == ("user:root", "::1")
        assert events[0].detail == {"user": "alice"}


def test_token_scopes_shrink_with_the_role(factory: sessionmaker[Session]) -> None:
    _user(factory, "ops", "admin")
    with transaction(factory) as s:
        _, token = a.create_token(s, a.require_user(s, "ops"), ["stow", "studies:read"], days=1, actor="test")
    with transaction(factory) as s:
        a.require_user(s, "ops").role = "radiologist"
    with transaction(factory) as s:
        principal = a.resolve_token(s, token)
        assert principal is not None and principal.scopes == {"studies:read"}


def test_throttle_counts_failures_per_user_and_per_address(factory: sessionmaker[Session]) -> None:
    _user(factory)
    auth = AuthSettings(login_max_failures=3, login_max_failures_per_address=3, login_window_seconds=60)
    with transaction(factory) as s:
        for _ in range(3):
            a.authenticate(s, "alice", "wrong-password", "10.0.0.1")
        assert a.login_throttled(s, "alice", "10.0.0.9", auth)  # by user name
        assert a.login_throttled(s, "bob", "10.0.0.1", auth)  # by address
        assert not a.login_throttled(s, "bob", "10.0.0.9", auth)


def test_audit_rows_cannot_be_changed_or_removed(factory: sessionmaker[Session]) -> None:
    with transaction(factory) as s:
        record(s, actor="user:alice", action="study.view", study_uid="1.2.3", client="10.0.0.1")
    for statement in (update(AuditEvent).values(actor="user:mallory"), delete(AuditEvent)):
        with pytest.raises(DBAPIError, match="append-only"), transaction(factory) as s:
            s.execute(statement)
    if factory.kw["bind"].dialect.name == "postgresql":
        with pytest.raises(DBAPIError, match="append-only"), transaction(factory) as s:
            s.execute(text("TRUNCATE audit_event"))
    with factory() as s:
        assert [(e.actor, e.action) for e in s.scalars(select(AuditEvent))] == [("user:alice", "study.view")]


def test_audit_rolls_back_with_what_it_records(factory: sessionmaker[Session]) -> None:
    _user(factory)
    with pytest.raises(RuntimeError), transaction(factory) as s:
        a.set_disabled(s, a.require_user(s, "alice"), True, actor="user:root")
        raise RuntimeError("the change fails")
    with factory() as s:
        assert list_events(s, AuditFilter(action="user.disable"), limit=10)[0] == 0


def test_audit_filter_and_csv(factory: sessionmaker[Session]) -> None:
    with transaction(factory) as s:
        record(s, actor="user:alice", action="login.success", client="10.0.0.1")
        record(
            s, actor="user:alice", action="study.view", study_uid="1.2.3", detail={"note": "=HYPERLINK(1)"}
        )
        record(s, actor="user:bob", action="study.view", study_uid="1.2.4")
        record(s, actor="=2+2", action="login.failure")
    with factory() as s:
        assert list_events(s, AuditFilter(actor="user:alice"), limit=10)[0] == 2
        assert list_events(s, AuditFilter(action="study.view", study_uid="1.2.4"), limit=10)[0] == 1
        assert list_events(s, AuditFilter(action="login."), limit=10)[0] == 2
        assert list_events(s, AuditFilter(since=utcnow() + timedelta(minutes=1)), limit=10)[0] == 0
        lines = list(csv_lines(iter_events(s, AuditFilter(), batch=2)))
    assert lines[0].strip() == "id,at,actor,action,study_instance_uid,client,detail"
    assert [line.split(",")[3] for line in lines[1:]] == [
        "login.success",
        "study.view",
        "study.view",
        "login.failure",
    ]
    assert "note==HYPERLINK(1)" in lines[2]
    assert lines[4].split(",")[2] == "'=2+2"  # a spreadsheet shows it, never runs it
