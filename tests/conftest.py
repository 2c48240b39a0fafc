"""Shared fixtures: databases (SQLite file and a real PostgreSQL), storage, settings."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from core.db import make_engine, make_sessionmaker
from core.migrate import upgrade
from core.storage import Storage
from tests.peers import create_database, postgres_server

IN_CI = os.environ.get("CI") == "true"


@pytest.fixture(scope="session")
def pg_admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PostgreSQL server for the whole session (external GATEWAY_TEST_POSTGRES_URL, or started here)."""
    external = os.environ.get("GATEWAY_TEST_POSTGRES_URL")
    if external:
        yield external
        return
    if not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        if IN_CI:
            pytest.fail("PostgreSQL is not installed but CI must test it (apt-get install postgresql)")
        pytest.skip("PostgreSQL server not installed")
    base = Path("/tmp") / f"gw-pg-{os.getpid()}"
    shutil.rmtree(base, ignore_errors=True)
    with postgres_server(base) as url:
        yield url
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of each kind (one fresh PostgreSQL database per test)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'gateway.sqlite3'}"
    return create_database(request.getfixturevalue("pg_admin_url"))


@pytest.fixture
def factory(database_url: str) -> Iterator[sessionmaker[Session]]:
    """A migrated database (both kinds)."""
    engine = make_engine(database_url)
    upgrade(engine)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    s = Storage(tmp_path / "storage")
    s.prepare()
    return s
