"""Read Orthanc's /changes feed from the last sequence number seen, so no stable study is ever missed
(gateway down, webhook lost). The cursor lives in the database and moves in the same transaction as the
jobs it queues."""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.db import transaction
from core.tables import OrthancCursor
from orthanc.client import OrthancSource
from orthanc.webhook import queue_pull

log = logging.getLogger(__name__)


def reconcile_once(factory: sessionmaker[Session], source: OrthancSource, *, max_attempts: int = 8) -> int:
    """Queue a pull for every StableStudy change after the cursor; returns how many were queued."""
    queued = 0
    while True:
        with factory() as session:
            cursor = session.scalars(
                select(OrthancCursor).where(OrthancCursor.orthanc_url == source.url)
            ).first()
            since = cursor.last_seq if cursor else 0
        changes, last, done = source.stable_studies_since(since)
        for change in changes:
            queue_pull(factory, change.orthanc_study_id, actor="orthanc:reconcile", max_attempts=max_attempts)
            queued += 1
        with transaction(factory) as session:
            cursor = session.scalars(
                select(OrthancCursor).where(OrthancCursor.orthanc_url == source.url)
            ).first()
            if cursor is None:
                session.add(OrthancCursor(orthanc_url=source.url, last_seq=last))
            elif last > cursor.last_seq:
                cursor.last_seq = last
        if done or last <= since:
            break
    if queued:
        log.info("reconciler queued %d stable studies from %s", queued, source.url)
    return queued
