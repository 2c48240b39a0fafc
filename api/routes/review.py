"""Radiologist review: the worklist, the case page, its images, decisions; each page with its JSON twin.

Pages and JSON need the ``review`` scope (radiologists); opening a case claims it for a while, and every view,
image fetch and decision is audited.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.cases import CaseView, load_case
from api.deps import ReadSessionDep, SessionDep, query_dicom_day
from api.pages import page
from api.security import client_address, require
from core import audit, labels, worklist
from core.accounts import Principal
from core.tables import ReviewCase, Study, User, utcnow
from core.worklist import WorklistFilter

ReviewerDep = Annotated[Principal, Depends(require("review"))]

router = APIRouter(tags=["review"])

_UID = re.compile(r"^[0-9][0-9.]{0,63}$")


# -- the worklist --------------------------------------------------------------------------------------------


class WorklistQuery(BaseModel):
    filter: WorklistFilter
    page: int
    query: str  # the filter as a query string, for links that keep it

    model_config = {"arbitrary_types_allowed": True}


def _choice(value: str | None, allowed: tuple[str, ...], name: str) -> str | None:
    if not value:
        return None
    if value not in allowed:
        raise HTTPException(status_code=422, detail=f"{name}: one of {', '.join(allowed)}")
    return value


def worklist_query(
    model: Annotated[str | None, Query(max_length=32)] = None,
    finding: Annotated[str | None, Query(max_length=32)] = None,
    ai_label: Annotated[str | None, Query(description=" | ".join(worklist.AI_LABELS))] = None,
    status: Annotated[
        str, Query(description="unreviewed (default) | in_review | reviewed | flagged | any")
    ] = "unreviewed",
    assessable: Annotated[str | None, Query(description="yes | no")] = None,
    date_from: Annotated[str | None, Query(max_length=10, description="YYYY-MM-DD")] = None,
    date_to: Annotated[str | None, Query(max_length=10, description="YYYY-MM-DD")] = None,
    modality: Annotated[str | None, Query(max_length=16)] = None,
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
) -> WorklistQuery:
    f = WorklistFilter(
        model=model or None,
        finding=finding or None,
        ai_label=_choice(ai_label, worklist.AI_LABELS, "ai_label"),
        status=None if status == "any" else _choice(status, worklist.STATUSES, "status"),
        assessable={"yes": True, "no": False}.get(_choice(assessable, ("yes", "no"), "assessable") or ""),
        date_from=query_dicom_day(date_from, "date_from"),
        date_to=query_dicom_day(date_to, "date_to"),
        modality=modality or None,
    )
    given = {
        "model": model,
        "finding": finding,
        "ai_label": ai_label,
        "status": status,
        "assessable": assessable,
        "date_from": date_from,
        "date_to": date_to,
        "modality": modality,
    }
    return WorklistQuery(filter=f, page=page, query=urlencode({k: v for k, v in given.items() if v}))


WorklistQueryDep = Annotated[WorklistQuery, Depends(worklist_query)]


class FindingOut(BaseModel):
    model: str
    finding: str | None
    label: str
    probability: float | None
    threshold: float | None
    uncertain: bool


class SummaryOut(BaseModel):
    """What one model said about one image, as a label."""

    model: str
    image: int | None = Field(description="image number when the study has several")
    label: str
    title: str
    positive: bool
    probability: float | None
    uncertain: bool


class WorklistItemOut(BaseModel):
    study_instance_uid: str
    accession_number: str | None
    study_date: str
    modality: str | None
    received_at: datetime
    status: str
    priority: int
    sampled: bool
    claimed_by: str | None
    claim_expires_at: datetime | None
    findings: list[FindingOut]
    summary: list[SummaryOut]
    url: str


class WorklistOut(BaseModel):
    total: int
    page: int
    page_size: int
    counts: dict[str, dict[str, int]]
    items: list[WorklistItemOut]


def _worklist(request: Request, session: Session, q: WorklistQuery) -> WorklistOut:
    settings = request.app.state.settings.review
    size = settings.page_size
    result = worklist.query_worklist(
        session, q.filter, band=settings.uncertain_band, offset=(q.page - 1) * size, limit=size
    )
    suffix = f"?{q.query}" if q.query else ""
    return WorklistOut(
        total=result.total,
        page=q.page,
        page_size=size,
        counts=result.counts,
        items=[
            WorklistItemOut(
                **{k: v for k, v in row.__dict__.items() if k not in ("findings", "summary")},
                findings=[FindingOut(**f) for f in row.findings],
                summary=[SummaryOut(**s) for s in row.summary],
                url=f"/cases/{row.study_instance_uid}{suffix}",
            )
            for row in result.rows
        ],
    )


@router.get("/api/worklist", response_model=WorklistOut)
def worklist_json(
    request: Request, session: ReadSessionDep, principal: ReviewerDep, q: WorklistQueryDep
) -> Response:
    """Studies with AI results, filtered, in priority order (positive, uncertain or drawn for a random
    check first, then oldest), with the number of cases per filter value."""
    # Serialized once by pydantic: returned as a model, FastAPI would validate the page again and walk it
    # with jsonable_encoder, a third of the request's time with 50 cases.
    return Response(_worklist(request, session, q).model_dump_json(), media_type="application/json")


@router.get("/worklist", response_class=HTMLResponse, include_in_schema=False)
def worklist_page(
    request: Request, session: ReadSessionDep, principal: ReviewerDep, q: WorklistQueryDep
) -> Response:
    data = _worklist(request, session, q)
    pages = max(1, -(-data.total // data.page_size))
    return page(
        request,
        "worklist.html",
        data=data,
        q=q,
        pages=pages,
        f=q.filter,
        statuses=worklist.STATUSES,
        ai_labels=worklist.AI_LABELS,
        label_title=labels.label_title,
        done=request.query_params.get("done") == "1",
    )


# -- cases ---------------------------------------------------------------------------------------------------


def _case_or_404(request: Request, session: Session, study_uid: str) -> CaseView:
    if not _UID.match(study_uid):
        raise HTTPException(status_code=404, detail="no such case")
    view = load_case(session, study_uid, request.app.state.settings, request.app.state.storage)
    if view is None:
        raise HTTPException(status_code=404, detail="no such case: the study has no AI result to review")
    return view


def _open(
    request: Request, session: Session, principal: Principal, study_uid: str, *, claim: bool
) -> CaseView:
    """The case, with the view audited; with ``claim``, claimed for ``principal`` when nobody else holds it
    (the page claims it; the JSON twin only reads, so a script polling a case keeps nobody out)."""
    view = _case_or_404(request, session, study_uid)
    minutes = request.app.state.settings.review.claim_minutes
    if claim and worklist.claim(session, view.case.id, principal.user_id, minutes=minutes):
        session.refresh(view.case)
    audit.record(
        session,
        actor=principal.actor,
        action="study.view",
        study_uid=study_uid,
        client=client_address(request),
    )
    session.commit()
    expires = view.case.claim_expires_at
    if view.case.claimed_by_id == principal.user_id or expires is None or expires <= utcnow():
        view.claimed_by = None
    else:
        holder = session.get(User, view.case.claimed_by_id) if view.case.claimed_by_id else None
        view.claimed_by = (holder.full_name or holder.username) if holder else None
    view.claim_expires_at = view.case.claim_expires_at
    return view


class ImageOut(BaseModel):
    number: int
    sop_instance_uid: str
    series_instance_uid: str
    modality: str | None
    display_url: str | None
    thumb_url: str | None
    heatmaps: dict[str, str]
    width: int | None = None
    height: int | None = None
    disc: dict[str, Any] | None = None
    note: str | None = None


class ModelImageOut(BaseModel):
    sop_instance_uid: str
    assessable: bool
    reason: str | None
    findings: list[dict[str, Any]]
    ai_label: str
    label: str | None = Field(description="the latest review's label (None: not reviewed)")


class ModelOut(BaseModel):
    name: str
    version: str
    report_uid: str
    card_url: str | None
    labels: list[dict[str, str]]
    cautions: list[str] = Field(
        default_factory=list,
        description="what a reader must know about some of its findings (e.g. unreliable)",
    )
    base_version: int = Field(description="the latest review's version: send it back with a decision")
    images: list[ModelImageOut]


class HistoryOut(BaseModel):
    model: str
    version: int
    by: str
    at: datetime
    changes: list[str]
    comment: str | None
    flagged: bool
    verified_sr: str | None


class CaseOut(BaseModel):
    study_instance_uid: str
    status: str
    header: dict[str, str]
    claimed_by: str | None = Field(description="someone else reviewing the case now")
    claim_expires_at: datetime | None
    viewer_url: str | None
    images: list[ImageOut]
    models: list[ModelOut]
    history: list[HistoryOut]


def _case_out(view: CaseView) -> CaseOut:
    return CaseOut(
        study_instance_uid=view.study.study_instance_uid,
        status=view.case.status,
        header=view.header,
        claimed_by=view.claimed_by,
        claim_expires_at=view.claim_expires_at,
        viewer_url=view.viewer_url,
        images=[
            ImageOut(
                **{k: v for k, v in i.items() if k not in ("meta", "path")},
                width=(i["meta"] or {}).get("width"),
                height=(i["meta"] or {}).get("height"),
                disc=(i["meta"] or {}).get("disc"),
                note=(i["meta"] or {}).get("error") if i["meta"] else "the image is being prepared",
            )
            for i in view.images
        ],
        models=[ModelOut(**{**m, "images": [ModelImageOut(**i) for i in m["images"]]}) for m in view.models],
        history=[HistoryOut(**h) for h in view.history],
    )


@router.get("/api/cases/{study_uid}")
def case_json(request: Request, session: SessionDep, principal: ReviewerDep, study_uid: str) -> CaseOut:
    """One case: header, images, each model's findings and labels, the decisions so far (reading it does
    not claim it: POST .../claim does)."""
    return _case_out(_open(request, session, principal, study_uid, claim=False))


@router.get("/cases/next", include_in_schema=False)
def next_case_page(
    request: Request,
    session: SessionDep,
    principal: ReviewerDep,
    q: WorklistQueryDep,
    after: str | None = None,
) -> Response:
    settings = request.app.state.settings.review
    exclude = None
    if after:
        exclude = session.scalar(select(Study.id).where(Study.study_instance_uid == after))
        if exclude is not None:
            case_id = session.scalar(select(ReviewCase.id).where(ReviewCase.study_id == exclude))
            if case_id is not None:
                worklist.release(session, case_id, principal.user_id)
    uid = worklist.next_case(
        session,
        q.filter,
        principal.user_id,
        band=settings.uncertain_band,
        minutes=settings.claim_minutes,
        exclude_study_id=exclude,
    )
    session.commit()
    suffix = f"?{q.query}" if q.query else ""
    if uid is None:
        return RedirectResponse(f"/worklist?{q.query + '&' if q.query else ''}done=1", status_code=303)
    return RedirectResponse(f"/cases/{uid}{suffix}", status_code=303)


@router.get("/cases/{study_uid}", response_class=HTMLResponse, include_in_schema=False)
def case_page(
    request: Request, session: SessionDep, principal: ReviewerDep, study_uid: str, q: WorklistQueryDep
) -> Response:
    view = _open(request, session, principal, study_uid, claim=True)
    return _render_case(request, view, q)


def _render_case(
    request: Request,
    view: CaseView,
    q: WorklistQuery,
    status: int = 200,
    error: str | None = None,
    posted: dict[str, str] | None = None,
) -> Response:
    out = _case_out(view)
    return page(
        request,
        "case.html",
        status,
        case=out,
        view=view,
        q=q,
        error=error,
        posted=posted or {},
        clinical_model="glaucoma" if any(m.name == "glaucoma" for m in out.models) else None,
        label_title=labels.label_title,
        not_assessable=labels.NOT_ASSESSABLE,
        images_json=[i.model_dump() for i in out.images],
    )


@router.post("/api/cases/{study_uid}/claim")
def claim_json(
    request: Request, session: SessionDep, principal: ReviewerDep, study_uid: str
) -> dict[str, Any]:
    """Mark the case as being reviewed by you (for GATEWAY_REVIEW__CLAIM_MINUTES); 409 when someone
    else holds it."""
    view = _case_or_404(request, session, study_uid)
    minutes = request.app.state.settings.review.claim_minutes
    if not worklist.claim(session, view.case.id, principal.user_id, minutes=minutes):
        holder = session.get(User, view.case.claimed_by_id) if view.case.claimed_by_id else None
        raise HTTPException(
            status_code=409, detail=f"being reviewed by {holder.username if holder else 'someone'}"
        )
    session.commit()
    session.refresh(view.case)
    return {"claimed": True, "expires_at": view.case.claim_expires_at}


@router.delete("/api/cases/{study_uid}/claim", status_code=204)
def release_json(request: Request, session: SessionDep, principal: ReviewerDep, study_uid: str) -> Response:
    """End your claim on the case."""
    view = _case_or_404(request, session, study_uid)
    worklist.release(session, view.case.id, principal.user_id)
    session.commit()
    return Response(status_code=204)


@router.post("/cases/{study_uid}/release", include_in_schema=False)
def release_page(
    request: Request, session: SessionDep, principal: ReviewerDep, study_uid: str, q: WorklistQueryDep
) -> Response:
    view = _case_or_404(request, session, study_uid)
    worklist.release(session, view.case.id, principal.user_id)
    session.commit()
    return RedirectResponse(f"/worklist?{q.query}", status_code=303)
