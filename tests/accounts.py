"""Users and tokens for tests, written straight into the database a `gateway serve` under test uses (as
`gateway users create` / `gateway tokens create` would; those commands have tests of their own)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from pathlib import Path

from core.accounts import create_token, create_user
from core.db import make_engine, make_sessionmaker, transaction
from core.migrate import upgrade
from core.settings import Settings
from tests.peers import SERVED

PASSWORD = "correct-horse-battery"
_names = itertools.count(1)


def database_url(env: Mapping[str, str]) -> str:
    """The database of a gateway started with ``env`` (GATEWAY_* variables)."""
    return Settings(
        data_dir=Path(env.get("GATEWAY_DATA_DIR", "./var")), database_url=env.get("GATEWAY_DATABASE_URL")
    ).sqlalchemy_url


def add_user(
    url: str,
    role: str,
    *,
    username: str | None = None,
    password: str = PASSWORD,
    full_name: str | None = None,
) -> str:
    """A new user (name made up when not given); returns the name."""
    name = username or f"{role}{next(_names)}"
    engine = make_engine(url)
    try:
        upgrade(engine)
        with transaction(make_sessionmaker(engine)) as session:
            create_user(
                session, username=name, role=role, password=password, full_name=full_name, actor="test"
            )
    finally:
        engine.dispose()
    return name


def issue_token(url: str, role: str = "admin", scopes: list[str] | None = None) -> str:
    """A bearer token of a new user with ``role`` (all of its scopes unless ``scopes``)."""
    name = add_user(url, role)
    engine = make_engine(url)
    try:
        with transaction(make_sessionmaker(engine)) as session:
            from core.accounts import require_user

            _, token = create_token(session, require_user(session, name), scopes or [], days=1, actor="test")
    finally:
        engine.dispose()
    return token


_tokens: dict[tuple[str, str], str] = {}


def bearer(env: Mapping[str, str], role: str = "admin") -> dict[str, str]:
    """Authorization headers for requests to the gateway started with ``env`` (one token per database
    and role, made on first use)."""
    key = (database_url(env), role)
    if key not in _tokens:
        _tokens[key] = issue_token(key[0], role)
    return {"Authorization": f"Bearer {_tokens[key]}"}


def port_headers(http_port: int, role: str = "admin") -> dict[str, str]:
    """Authorization headers for the gateway that :func:`tests.peers.gateway_serve` started on this port."""
    return bearer(SERVED[http_port], role)
