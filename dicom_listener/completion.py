"""When is a study complete: released and quiet, or silent for the maximum wait.

Any number of processes may run the sweep; the conditional update lets exactly one of them queue the job.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from core.db import read_session, transaction
from core.jobs import PROCESS_STUDY, enqueue_audited
from core.settings import CompletionSettings
from core.tables import Study, utcnow

log = logging.getLogger(__name__)


def complete_studies(
    factory: sessionmaker[Session], rules: CompletionSettings, *, max_attempts: int = 8
) -> list[int]:
    """Queue a ``process_study`` job for every study that became complete; returns the job ids."""
    now = utcnow()
    quiet_before = now - timedelta(seconds=rules.quiet_seconds)
    wait_before = now - timedelta(seconds=rules.max_wait_seconds)
    with read_session(factory) as session:  # no write lock while nothing is complete (see jobs.claim)
        candidates = session.execute(
            select(Study.id, Study.study_instance_uid, Study.last_received_at).where(
                Study.status == "receiving",
                or_(
                    and_(Study.released_at.is_not(None), Study.last_received_at <= quiet_before),
                    Study.last_received_at <= wait_before,
                ),
            )
        ).all()
    job_ids = []
    for study_id, study_uid, seen in candidates:
        with transaction(factory) as session:
            claimed = session.execute(
                update(Study)
                .where(Study.id == study_id, Study.status == "receiving", Study.last_received_at == seen)
                .values(status="complete", completed_at=now)
            )
            if claimed.rowcount != 1:  # type: ignore[attr-defined]
                continue  # another sweeper won, or an instance just arrived
            job = enqueue_audited(
                session,
                actor="completion",
                action="study_complete",
                study_instance_uid=study_uid,
                kind=PROCESS_STUDY,
                payload={"study_instance_uid": study_uid},
                study_id=study_id,
                max_attempts=max_attempts,
            )
            job_ids.append(job.id)
            log.info("study %s complete: job %d queued", study_uid, job.id)
    return job_ids
