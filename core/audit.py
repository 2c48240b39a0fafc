"""The audit trail: one append-only row per thing a person or a peer did, written in the same transaction as
the thing itself (if that rolls back, so does its audit row)."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from core.tables import AuditEvent


def record(
    session: Session,
    *,
    actor: str,
    action: str,
    study_uid: str | None = None,
    client: str | None = None,
    detail: dict[str, Any] | None = None,
) -> AuditEvent:
    """Add an audit row to ``session``'s transaction: ``actor`` did ``action`` (``login.success``,
    ``study.view``, ``decision.create``, ``user.disable`` ...), from ``client`` (an address) over HTTP."""
    event = AuditEvent(
        actor=actor[:64],
        action=action[:64],
        study_instance_uid=study_uid,
        client=client[:64] if client else None,
        detail=detail or {},
    )
    session.add(event)
    return event


@dataclass(frozen=True)
class AuditFilter:
    actor: str | None = None
    action: str | None = None  # exact, or a prefix ending in "." ("login.")
    study_uid: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def apply(self, query: Select[Any]) -> Select[Any]:
        if self.actor:
            query = query.where(AuditEvent.actor == self.actor)
        if self.action:
            if self.action.endswith("."):
                query = query.where(AuditEvent.action.startswith(self.action, autoescape=True))
            else:
                query = query.where(AuditEvent.action == self.action)
        if self.study_uid:
            query = query.where(AuditEvent.study_instance_uid == self.study_uid)
        if self.since:
            query = query.where(AuditEvent.at >= self.since)
        if self.until:
            query = query.where(AuditEvent.at < self.until)
        return query


def list_events(
    session: Session, where: AuditFilter, *, limit: int, offset: int = 0
) -> tuple[int, list[AuditEvent]]:
    """The matching events, newest first, and how many match in all."""
    total = session.scalar(where.apply(select(func.count(AuditEvent.id)))) or 0
    rows = session.scalars(
        where.apply(select(AuditEvent)).order_by(AuditEvent.id.desc()).limit(limit).offset(offset)
    ).all()
    return int(total), list(rows)


CSV_COLUMNS = ("id", "at", "actor", "action", "study_instance_uid", "client", "detail")


def iter_events(session: Session, where: AuditFilter, batch: int = 1000) -> Iterator[AuditEvent]:
    """Every matching event, oldest first, read in batches (for the CSV download)."""
    last = 0
    while True:
        rows = session.scalars(
            where.apply(select(AuditEvent)).where(AuditEvent.id > last).order_by(AuditEvent.id).limit(batch)
        ).all()
        if not rows:
            return
        yield from rows
        last = rows[-1].id


def csv_lines(events: Iterable[AuditEvent]) -> Iterator[str]:
    """The events as CSV text, header first. Cells that a spreadsheet would run as a formula are prefixed
    with an apostrophe."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)

    def line(values: Iterable[object]) -> str:
        buffer.seek(0)
        buffer.truncate()
        writer.writerow([_cell(v) for v in values])
        return buffer.getvalue()

    yield line(CSV_COLUMNS)
    for e in events:
        detail = ";".join(f"{k}={v}" for k, v in sorted(e.detail.items()))
        yield line(
            (e.id, e.at.isoformat(), e.actor, e.action, e.study_instance_uid or "", e.client or "", detail)
        )


def _cell(value: object) -> str:
    text = str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text
