"""Worker heartbeats (table ``worker_heartbeat``): each live worker's row, what ``/readyz`` reads."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from core.db import transaction
from core.tables import WorkerHeartbeat, utcnow

#: A row nobody refreshed for this long belongs to a worker long gone (killed, its host lost): deleted.
FORGET_AFTER = timedelta(hours=1)


def record_heartbeat(
    factory: sessionmaker[Session], *, worker_id: str, started_at: datetime, current_job_id: int | None
) -> None:
    """Insert or refresh this process's row for ``worker_id``."""
    now = utcnow()
    with transaction(factory) as session:
        row = session.get(WorkerHeartbeat, worker_id)
        if row is None:
            session.add(
                WorkerHeartbeat(
                    worker_id=worker_id,
                    host=socket.gethostname()[:255],
                    pid=os.getpid(),
                    started_at=started_at,
                    beat_at=now,
                    current_job_id=current_job_id,
                )
            )
        else:
            row.beat_at, row.current_job_id = now, current_job_id


def remove_heartbeats(
    factory: sessionmaker[Session],
    *,
    worker_id: str | None = None,
    host: str | None = None,
    pid: int | None = None,
) -> int:
    """Delete the rows of one worker (``worker_id``), or of one process (``host`` and ``pid``); also rows
    older than :data:`FORGET_AFTER`. Returns how many rows went."""
    with transaction(factory) as session:
        query = delete(WorkerHeartbeat).where(WorkerHeartbeat.beat_at < utcnow() - FORGET_AFTER)
        gone = int(session.execute(query).rowcount or 0)  # type: ignore[attr-defined]
        if worker_id is not None:
            query = delete(WorkerHeartbeat).where(WorkerHeartbeat.worker_id == worker_id)
        elif host is not None and pid is not None:
            query = delete(WorkerHeartbeat).where(WorkerHeartbeat.host == host, WorkerHeartbeat.pid == pid)
        else:
            return gone
        return gone + int(session.execute(query).rowcount or 0)  # type: ignore[attr-defined]


def live_workers(session: Session, *, fresher_than: float) -> Sequence[WorkerHeartbeat]:
    """Workers whose last beat is less than ``fresher_than`` seconds old."""
    since = utcnow() - timedelta(seconds=fresher_than)
    query = (
        select(WorkerHeartbeat).where(WorkerHeartbeat.beat_at >= since).order_by(WorkerHeartbeat.worker_id)
    )
    return session.scalars(query).all()
