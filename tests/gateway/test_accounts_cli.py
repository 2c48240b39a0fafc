"""`gateway users ...` and `gateway tokens ...` as an administrator runs them (subprocesses, real SQLite)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy import select

from core.accounts import resolve_token
from core.db import make_engine, make_sessionmaker, transaction
from core.tables import AuditEvent, User
from tests.peers import REPO


def _gateway(tmp_path: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(GATEWAY_DATA_DIR=str(tmp_path / "var"), GATEWAY_LOG_LEVEL="WARNING")
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )


def test_first_admin_users_and_tokens_from_the_command_line(tmp_path: Path) -> None:
    created = _gateway(tmp_path, "users", "create", "root", "--role", "admin", stdin="a-long-password\n")
    assert created.returncode == 0, created.stderr
    weak = _gateway(tmp_path, "users", "create", "weak", "--role", "radiologist", stdin="short\n")
    assert weak.returncode == 1 and "at least 10 characters" in weak.stderr
    bad_role = _gateway(tmp_path, "users", "create", "x", "--role", "owner", stdin="a-long-password\n")
    assert bad_role.returncode == 1 and "role must be one of" in bad_role.stderr
    assert (
        _gateway(
            tmp_path, "users", "create", "rad", "--role", "radiologist", stdin="another-password\n"
        ).returncode
        == 0
    )

    token = _gateway(tmp_path, "tokens", "create", "--user", "root", "--scope", "stow", "--days", "7")
    assert token.returncode == 0, token.stderr
    secret = token.stdout.strip()
    assert secret.startswith("sgw_") and "scopes: stow" in token.stderr
    assert _gateway(tmp_path, "tokens", "create", "--user", "rad", "--scope", "stow").returncode == 1
    listed = _gateway(tmp_path, "tokens", "list").stdout
    prefix = secret.split("_")[1]
    assert prefix in listed and "active" in listed and secret not in listed

    engine = make_engine(f"sqlite:///{tmp_path / 'var' / 'gateway.sqlite3'}")
    factory = make_sessionmaker(engine)
    with transaction(factory) as s:
        principal = resolve_token(s, secret)
        assert principal is not None and principal.scopes == {"stow"}
    assert _gateway(tmp_path, "tokens", "revoke", prefix).returncode == 0
    with transaction(factory) as s:
        assert resolve_token(s, secret) is None

    assert _gateway(tmp_path, "users", "disable", "rad").returncode == 0
    assert _gateway(tmp_path, "users", "reset", "rad", stdin="a-new-long-password\n").returncode == 0
    assert "rad\tradiologist\tdisabled" in _gateway(tmp_path, "users", "list").stdout
    assert _gateway(tmp_path, "users", "disable", "ghost").returncode == 1
    with factory() as s:
        assert s.scalars(select(User.username).order_by(User.username)).all() == ["rad", "root"]
        actions = s.scalars(
            select(AuditEvent.action).where(AuditEvent.actor == "cli").order_by(AuditEvent.id)
        ).all()
    assert actions == [
        "user.create",
        "user.create",
        "token.create",
        "token.revoke",
        "user.disable",
        "user.reset_password",
    ]
    engine.dispose()
