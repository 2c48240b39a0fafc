"""Decisions on a case (the form of the case page and its JSON twin), the case's images, and model cards."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, cast
from urllib.parse import parse_qsl

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, Field, ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.cases import image_meta
from api.pages import page
from api.routes.review import ReviewerDep, WorklistQuery, _case_or_404, _render_case, worklist_query
from api.security import client_address, require
from core import audit
from core.accounts import Principal
from core.decisions import Answer, ClinicalData, DecisionError, ReviewConflict, save_review
from core.settings import ReviewSettings
from core.tables import Instance, Series, Study, User
from core.worklist import current_reports
from reporting.verified import verified_report_uid

router = APIRouter(tags=["review"])

_UID = re.compile(r"^[0-9][0-9.]{0,63}$")
_MODEL = re.compile(r"^[a-z0-9_][a-z0-9_-]{0,31}$")
SHIPPED_MODELS = Path(__file__).resolve().parents[2] / "inference" / "weights"


class ReviewIn(BaseModel):
    """A decision on one model's result for the case: a label for each of its images."""

    model: str = Field(max_length=32, description="the model whose result is decided, e.g. pneumonia")
    base_version: int = Field(
        ge=0,
        description="the version you decided on (the case's base_version; 0 for none); "
        "409 when another was saved since",
    )
    answers: list[Answer] = Field(min_length=1, max_length=1000)
    comment: str | None = Field(None, max_length=2000)
    flagged: bool = Field(False, description="for a second reader")
    clinical: ClinicalData | None = None


class ReviewOut(BaseModel):
    model: str
    version: int
    created: bool = Field(description="false: this very decision was saved before (a retried request)")
    at: datetime
    verified_report: str = Field(description="SOP Instance UID the verified SR will have")


def _save(
    session: Session,
    principal: Principal,
    study_uid: str,
    decisions: list[ReviewIn],
    client: str | None,
    *,
    settings: ReviewSettings,
) -> list[ReviewOut]:
    """Save the decisions in one transaction (all or none); DecisionError/ReviewConflict as given."""
    study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).first()
    if study is None:
        raise HTTPException(status_code=404, detail="no such case")
    reports = {r.model_name: r for r in current_reports(session, study.id)}
    user = session.get(User, principal.user_id)
    assert user is not None
    out = []
    try:
        for decision in decisions:
            report = reports.get(decision.model)
            if report is None:
                raise DecisionError(f"the study has no {decision.model} result to decide on")
            review, created = save_review(
                session,
                report=report,
                user=user,
                answers=decision.answers,
                base_version=decision.base_version,
                comment=decision.comment,
                flagged=decision.flagged,
                clinical=decision.clinical,
                actor=principal.actor,
                client=client,
                band=settings.uncertain_band,
                sample_share=settings.negative_sample_share,
            )
            out.append(
                ReviewOut(
                    model=decision.model,
                    version=review.version,
                    created=created,
                    at=review.at,
                    verified_report=verified_report_uid(report.sop_instance_uid, review.version),
                )
            )
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return out


@router.post("/api/cases/{study_uid}/reviews", status_code=201)
def review_json(
    request: Request, response: Response, principal: ReviewerDep, study_uid: str, decision: ReviewIn
) -> ReviewOut:
    """Record a decision on one model's result: confirm (the AI's label), correct (another label) or
    ``not_assessable`` (with a reason) for every image; 409 when someone saved another version meanwhile,
    422 for a label the model does not have. A retried request returns the saved decision (200)."""
    with request.app.state.session_factory() as session:
        try:
            (saved,) = _save(
                session, principal, study_uid, [decision], client_address(request), settings=_review(request)
            )
        except ReviewConflict as exc:
            raise HTTPException(status_code=409, detail=str(exc)) from None
        except DecisionError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from None
    if not saved.created:
        response.status_code = 200
    return saved


def _review(request: Request) -> ReviewSettings:
    return cast(ReviewSettings, request.app.state.settings.review)


def decisions_from_form(form: dict[str, str], models: list[dict[str, Any]]) -> list[ReviewIn]:
    """The case page's form as decisions: one per model whose images all have a label, and only those
    that change something against the latest review."""
    out = []
    comment = form.get("comment", "").strip() or None
    flagged = form.get("flagged") == "on"
    for m in models:
        name = m["name"]
        chosen = {
            i["sop_instance_uid"]: form.get(f"label.{name}.{i['sop_instance_uid']}", "") for i in m["images"]
        }
        given = {k: v for k, v in chosen.items() if v}
        if not given:
            continue
        if len(given) != len(chosen):
            raise DecisionError(f"{name}: choose a label for every image, or for none")
        clinical = None
        if name == "glaucoma":
            values = {
                k.split(".", 1)[1]: v for k, v in form.items() if k.startswith("clinical.") and v.strip()
            }
            try:
                clinical = ClinicalData.model_validate(values)
            except ValidationError as exc:
                problems = "; ".join(f"{e['loc'][0]}: {e['msg']}" for e in exc.errors())
                raise DecisionError(f"clinical data: {problems}") from None
        answers = [
            Answer(sop_instance_uid=sop, label=label, reason=form.get(f"reason.{name}.{sop}") or None)
            for sop, label in given.items()
        ]
        unchanged = (
            m["base_version"] > 0
            and all(i["label"] == chosen[i["sop_instance_uid"]] for i in m["images"])
            and all(
                (i.get("label_reason") or None)
                == (form.get(f"reason.{name}.{i['sop_instance_uid']}") or None)
                for i in m["images"]
                if chosen[i["sop_instance_uid"]] == "not_assessable"
            )
            and m["comment"] == comment
            and m["flagged"] == flagged
            and (clinical is None or m["clinical"] == clinical.model_dump(exclude_none=True))
        )
        if unchanged:
            continue
        try:
            base = int(form.get(f"base.{name}", "0"))
        except ValueError:
            raise DecisionError("the form is damaged: reload the case") from None
        out.append(
            ReviewIn(
                model=name,
                base_version=base,
                answers=answers,
                comment=comment,
                flagged=flagged,
                clinical=clinical,
            )
        )
    return out


@router.post("/cases/{study_uid}/review", include_in_schema=False)
async def review_form(request: Request, principal: ReviewerDep, study_uid: str) -> Response:
    form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
    q = worklist_query(**_filter_args(form.get("q", "")))
    return await run_in_threadpool(_review_form, request, principal, study_uid, form, q)


def _filter_args(query: str) -> dict[str, Any]:
    allowed = {"model", "finding", "ai_label", "status", "assessable", "date_from", "date_to", "modality"}
    return {k: v for k, v in parse_qsl(query[:2000]) if k in allowed}


def _review_form(
    request: Request, principal: Principal, study_uid: str, form: dict[str, str], q: WorklistQuery
) -> Response:
    with request.app.state.session_factory() as session:
        view = _case_or_404(request, session, study_uid)
        try:
            decisions = decisions_from_form(form, view.models)
            client = client_address(request)
            _save(session, principal, study_uid, decisions, client, settings=_review(request))
        except DecisionError as exc:
            view = _case_or_404(request, session, study_uid)
            status = 409 if isinstance(exc, ReviewConflict) else 422
            return _render_case(request, view, q, status, error=str(exc), posted=form)
    suffix = f"?{q.query}" if q.query else ""
    if form.get("go") == "next":
        joiner = "&" if q.query else ""
        return RedirectResponse(f"/cases/next?{q.query}{joiner}after={study_uid}", status_code=303)
    return RedirectResponse(f"/cases/{study_uid}{suffix}", status_code=303)


# -- images and model cards ----------------------------------------------------------------------------------


@router.get("/cases/{study_uid}/images/{sop_uid}/{kind}", include_in_schema=False)
@router.get("/cases/{study_uid}/images/{sop_uid}/{kind}/{model}", include_in_schema=False)
def case_image(
    request: Request,
    principal: ReviewerDep,
    study_uid: str,
    sop_uid: str,
    kind: str,
    model: str | None = None,
) -> Response:
    """The case page's image of an instance (display, thumb) or a model's heatmap on it (heatmap/<model>)."""
    if not (_UID.match(study_uid) and _UID.match(sop_uid)) or kind not in ("display", "thumb", "heatmap"):
        raise HTTPException(status_code=404, detail="no such image")
    storage = request.app.state.storage
    with request.app.state.session_factory() as session:
        instance_study = session.execute(
            select(Study.id)
            .join(Series, Series.study_id == Study.id)
            .join(Instance, Instance.series_id == Series.id)
            .where(Instance.sop_instance_uid == sop_uid, Study.study_instance_uid == study_uid)
        ).scalar()
        if instance_study is None:
            raise HTTPException(status_code=404, detail="no such image in this study")
        if kind == "heatmap":
            report = next(
                (r for r in current_reports(session, instance_study) if r.model_name == model), None
            )
            if report is None or model is None:
                raise HTTPException(status_code=404, detail="no such model result")
            relative = storage.heatmap_path(study_uid, sop_uid, model, report.model_version)
            media = "image/png"
        else:
            meta = image_meta(storage, study_uid, sop_uid)
            if not meta or "file" not in meta:
                raise HTTPException(status_code=404, detail="the image is being prepared")
            suffix = meta["file"] if kind == "display" else ".thumb.jpg"
            relative = storage.rendition_path(study_uid, sop_uid, suffix)
            media = "image/png" if suffix == ".png" else "image/jpeg"
        if kind == "display":
            audit.record(
                session,
                actor=principal.actor,
                action="image.fetch",
                study_uid=study_uid,
                client=client_address(request),
                detail={"sop_instance_uid": sop_uid},
            )
            session.commit()
    path = storage.absolute(relative)
    if not path.is_file():
        raise HTTPException(status_code=404, detail="no such image")
    return FileResponse(path, media_type=media, headers={"Cache-Control": "private, no-store"})


@router.get("/models/{name}/card", response_class=HTMLResponse, include_in_schema=False)
def model_card(
    request: Request, principal: Annotated[Principal, Depends(require("studies:read"))], name: str
) -> Response:
    if not _MODEL.match(name):
        raise HTTPException(status_code=404, detail="no such model")
    folders = [SHIPPED_MODELS, *request.app.state.settings.inference.model_dirs]
    for folder in folders:
        card = Path(folder) / name / "card.md"
        if card.is_file():
            return page(request, "model_card.html", model=name, text=card.read_text(errors="replace"))
    raise HTTPException(status_code=404, detail=f"no model card for {name}")
