"""Request dependencies."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date
from typing import Annotated

from fastapi import Depends, HTTPException, Request
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


def query_day(value: str | None, name: str) -> date | None:
    """A YYYY-MM-DD query value (422 otherwise); empty (a form's blank date field) means none."""
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise HTTPException(status_code=422, detail=f"{name}: expected a date as YYYY-MM-DD") from None


def query_dicom_day(value: str | None, name: str) -> str | None:
    """:func:`query_day` as a DICOM date (YYYYMMDD), to compare with Study Date."""
    day = query_day(value, name)
    return day.strftime("%Y%m%d") if day else None
