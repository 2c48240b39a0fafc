"""POST /api/orthanc/webhook: Orthanc's plugin says a study became stable; we queue a pull of it."""

from __future__ import annotations

import hmac
import logging
import re
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Request
from pydantic import BaseModel
from sqlalchemy.orm import Session, sessionmaker

from core.db import transaction
from core.jobs import PULL_ORTHANC_STUDY, enqueue_audited

log = logging.getLogger(__name__)

#: Orthanc resource ids are SHA-1 based: five groups of 8 hex digits joined by dashes.
_ORTHANC_ID = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{8}){4}$")

router = APIRouter(prefix="/api/orthanc", tags=["orthanc"])


class StableStudy(BaseModel):
    study: str  # Orthanc study id


def queue_pull(
    factory: sessionmaker[Session], orthanc_study_id: str, *, actor: str, max_attempts: int
) -> int:
    """Queue (once, while one is pending) the pull of an Orthanc study; returns the job id."""
    with transaction(factory) as session:
        job = enqueue_audited(
            session,
            actor=actor,
            action="orthanc_stable_study",
            detail={"orthanc_study_id": orthanc_study_id},
            kind=PULL_ORTHANC_STUDY,
            payload={"orthanc_study_id": orthanc_study_id},
            dedupe_key=orthanc_study_id,
            max_attempts=max_attempts,
        )
        return job.id


@router.post("/webhook", status_code=202)
def stable_study(
    body: StableStudy,
    request: Request,
    x_gateway_secret: Annotated[str | None, Header()] = None,
) -> dict[str, Any]:
    settings = request.app.state.settings
    expected = settings.orthanc.webhook_secret
    if (
        not expected
        or x_gateway_secret is None
        or not hmac.compare_digest(x_gateway_secret.encode(), expected.encode())
    ):
        raise HTTPException(status_code=401, detail="missing or wrong X-Gateway-Secret")
    if not _ORTHANC_ID.match(body.study):
        raise HTTPException(status_code=422, detail=f"not an Orthanc study id: {body.study[:60]!r}")
    job_id = queue_pull(
        request.app.state.session_factory,
        body.study,
        actor="orthanc:webhook",
        max_attempts=settings.worker.max_attempts,
    )
    log.info("Orthanc study %s stable: pull job %d", body.study, job_id)
    return {"queued": True, "job_id": job_id}
