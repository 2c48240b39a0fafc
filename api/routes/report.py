"""The PDF result of a study: ``GET /studies/{uid}/report.pdf`` (scope studies:read), rendered by
reporting.pdf from what the case page shows (api.cases.load_case); audited as ``report.pdf``."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import Response

from api.cases import load_case, pdf_context
from api.security import client_address, require
from core import audit
from core.accounts import Principal
from core.storage import Storage
from reporting.pdf import render_pdf

router = APIRouter(tags=["report"])
ReaderDep = Annotated[Principal, Depends(require("studies:read"))]
_UID = re.compile(r"^[0-9.]{1,64}$")


@router.get("/studies/{study_uid}/report.pdf")
def report_pdf(request: Request, principal: ReaderDep, study_uid: str) -> Response:
    """The study's images and heatmaps, each model's findings (probability, threshold, name and version),
    the gate's reason for an image not assessable, the radiologist's decision when there is one, and the
    research-use notice; 404 when the study has no AI result yet."""
    if not _UID.match(study_uid):
        raise HTTPException(404, "no such study")
    storage: Storage = request.app.state.storage
    with request.app.state.session_factory() as session:
        view = load_case(session, study_uid, request.app.state.settings, storage)
        if view is None:
            raise HTTPException(404, "no AI result for this study yet")
        audit.record(
            session,
            actor=principal.actor,
            action="report.pdf",
            study_uid=study_uid,
            client=client_address(request),
        )
        session.commit()
    pdf = render_pdf(pdf_context(view, storage, study_uid))
    return Response(
        pdf,
        media_type="application/pdf",
        headers={
            "Content-Disposition": f'attachment; filename="result-{study_uid}.pdf"',
            "Cache-Control": "private, no-store",
        },
    )
