"""Request dependencies."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from core.db import read_session


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.session_factory() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def get_read_session(request: Request) -> Iterator[Session]:
    """A session for routes that only read (no write lock on SQLite; see core.db.read_session)."""
    with read_session(request.app.state.session_factory) as session:
        yield session


ReadSessionDep = Annotated[Session, Depends(get_read_session)]
