"""The PDF result of a study: ``GET /studies/{uid}/report.pdf`` (scope studies:read), rendered by
reporting.pdf from what the case page shows (api.cases.load_case); audited as ``report.pdf``."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import Response

from api.cases import CaseView, load_case
from api.security import client_address, require
from core import audit, labels
from core.accounts import Principal
from core.storage import Storage
from reporting.pdf import data_uri, render_pdf

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
    pdf = render_pdf(_context(view, storage, study_uid))
    return Response(
        pdf,
        media_type="application/pdf",
        headers={
            "Content-Disposition": f'attachment; filename="result-{study_uid}.pdf"',
            "Cache-Control": "private, no-store",
        },
    )


def _context(view: CaseView, storage: Storage, study_uid: str) -> dict[str, Any]:
    decisions = _decisions(view)
    images = []
    for image in view.images:
        sop = image["sop_instance_uid"]
        meta = image.get("meta") or {}
        display = None
        if "file" in meta:
            display = _inline(storage, storage.rendition_path(study_uid, sop, meta["file"]))
        heatmaps = {}
        results = []
        for m in view.models:
            answer = next((i for i in m["images"] if i["sop_instance_uid"] == sop), None)
            if answer is None:
                continue
            if answer["assessable"]:
                uri = _inline(storage, storage.heatmap_path(study_uid, sop, m["name"], m["version"]))
                if uri:
                    heatmaps[m["name"]] = uri
            results.append(
                {
                    "model": m["name"],
                    "version": m["version"],
                    "assessable": answer["assessable"],
                    "reason": answer["reason"],
                    "findings": answer["findings"],
                    "ai_title": answer["ai_title"],
                    "decision": decisions.get((m["name"], sop)),
                }
            )
        images.append(
            {
                "number": image["number"],
                "modality": image["modality"],
                "display": display,
                "heatmaps": heatmaps,
                "results": results,
            }
        )
    return {
        "study_uid": study_uid,
        "header": view.header,
        "images": images,
        "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _decisions(view: CaseView) -> dict[tuple[str, str], dict[str, Any]]:
    """(model, SOP Instance UID) -> the latest decision on that image: label, action, reason, who, when."""
    latest: dict[str, dict[str, Any]] = {}
    for h in view.history:  # newest first
        latest.setdefault(h["model"], h)
    out = {}
    for m in view.models:
        review = latest.get(m["name"])
        names = sorted({str(f["finding"]) for i in m["images"] for f in i["findings"]})
        for i in m["images"]:
            if review is None or not i["label"]:
                continue
            action = "confirmed" if i["label"] == i["ai_label"] else "corrected"
            if i["label"] == labels.NOT_ASSESSABLE:
                action = "not assessable"
            out[(m["name"], i["sop_instance_uid"])] = {
                "title": labels.label_title(m["name"], i["label"], names),
                "action": action,
                "reason": i["label_reason"],
                "by": review["by"],
                "at": review["at"].strftime("%Y-%m-%d %H:%M UTC"),
            }
    return out


def _inline(storage: Storage, relative: str) -> str | None:
    path = storage.absolute(relative)
    if not path.is_file():
        return None
    media = "image/png" if path.suffix == ".png" else "image/jpeg"
    return data_uri(path.read_bytes(), media)
