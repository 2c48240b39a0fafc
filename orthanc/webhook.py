"""POST /api/orthanc/webhook: Orthanc's plugin says a study became stable; we queue a pull of it."""

from __future__ import annotations

import hmac
import logging
import re
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Request
from pydantic import BaseModel, ValidationError
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

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


#: A stable-study notification is a few dozen bytes of JSON; anything larger is refused unread.
MAX_BODY_BYTES = 4096


@router.post(
    "/webhook",
    status_code=202,
    openapi_extra={
        "requestBody": {"content": {"application/json": {"schema": StableStudy.model_json_schema()}}}
    },
)
async def stable_study(
    request: Request, x_gateway_secret: Annotated[str | None, Header()] = None
) -> dict[str, Any]:
    """Orthanc's plugin: a study is stable. The shared secret (X-Gateway-Secret) is checked before the body
    is read: a wrong or missing one gets 401 whatever was sent."""
    settings = request.app.state.settings
    expected = settings.orthanc.webhook_secret
    if (
        not expected
        or x_gateway_secret is None
        or not hmac.compare_digest(x_gateway_secret.encode(), expected.encode())
    ):
        raise HTTPException(status_code=401, detail="missing or wrong X-Gateway-Secret")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise HTTPException(status_code=413, detail=f"body over {MAX_BODY_BYTES} bytes")
    try:
        study = StableStudy.model_validate_json(body).study
    except ValidationError:
        raise HTTPException(status_code=422, detail='expected JSON {"study": "<Orthanc study id>"}') from None
    if not _ORTHANC_ID.match(study):
        raise HTTPException(status_code=422, detail=f"not an Orthanc study id: {study[:60]!r}")
    job_id = await run_in_threadpool(
        queue_pull,
        request.app.state.session_factory,
        study,
        actor="orthanc:webhook",
        max_attempts=settings.worker.max_attempts,
    )
    log.info("Orthanc study %s stable: pull job %d", study, job_id)
    return {"queued": True, "job_id": job_id}
