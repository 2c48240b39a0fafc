"""The model registry over HTTP (admin): the versions and their status; retiring and (forced) promotion.
What `gateway models` does; every change is audited."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from api.deps import ReadSessionDep, SessionDep
from api.pages import page
from api.security import require
from core.accounts import Principal
from core.agreement import DriftBand, performance
from core.model_versions import RegistryError, set_status, versions

AdminDep = Annotated[Principal, Depends(require("admin"))]
ReaderDep = Annotated[Principal, Depends(require("studies:read"))]

router = APIRouter(tags=["models"])


class ModelVersionOut(BaseModel):
    name: str
    version: str
    status: str
    source: str
    digest: str
    created_at: datetime
    changed_at: datetime
    changed_by: str
    data_summary: dict[str, Any]
    metrics: dict[str, Any]


class StatusChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: str = Field(description="active, shadow or retired")
    #: active without the evaluation gate (which runs in `gateway models promote`): needs a reason
    force: bool = False
    reason: str | None = Field(None, max_length=500)


@router.get("/api/models", response_model=list[ModelVersionOut])
def list_models(principal: AdminDep, session: ReadSessionDep) -> list[ModelVersionOut]:
    return [ModelVersionOut.model_validate(r, from_attributes=True) for r in versions(session)]


@router.post("/api/models/{name}/versions/{version}", response_model=ModelVersionOut)
def change_status(
    name: str, version: str, change: StatusChange, request: Request, principal: AdminDep, session: SessionDep
) -> ModelVersionOut:
    """Retire a version, or make it active: the workers use it from their next study. The promotion gate
    (both models on the evaluation set: minutes of CPU) runs in `gateway models promote`; here a promotion
    needs ``force`` and a ``reason`` (409 otherwise)."""
    if change.status not in ("active", "shadow", "retired"):
        raise HTTPException(422, "status must be active, shadow or retired")
    reason = (change.reason or "").strip()
    if change.status == "active":
        if not change.force:
            raise HTTPException(
                409, "the promotion gate runs in `gateway models promote`; here send force with a reason"
            )
        if not reason:
            raise HTTPException(422, "a forced promotion needs a reason")
        reason = f"forced: {reason}"
    try:
        row = set_status(session, name, version, change.status, actor=principal.actor, reason=reason or None)
    except RegistryError as exc:
        raise HTTPException(409 if "active version" in str(exc) else 404, str(exc)) from None
    session.commit()
    return ModelVersionOut.model_validate(row, from_attributes=True)


@router.get("/api/models/{name}/performance")
def model_performance(
    request: Request, name: str, principal: ReaderDep, session: ReadSessionDep
) -> dict[str, Any]:
    """Live agreement with the radiologists, per version, from the latest review of every report: Cohen's
    kappa; sensitivity, specificity, PPV, NPV ("any finding" positive) with Wilson 95 % intervals and
    counts; confirmation and override rates; a weekly trend; each shadow version against the active answers
    on the same images; drift of each version's live answers from its reference figures (core.agreement)."""
    _known(session, name)
    return performance(session, name, drift_band(request))


def drift_band(request: Request) -> DriftBand:
    inference = request.app.state.settings.inference
    return DriftBand(
        not_assessable=inference.drift_not_assessable_band,
        probability=inference.drift_probability_band,
        min_images=inference.drift_min_images,
    )


#: What the weekly trend draws: (key in core.agreement.weekly, legend, CSS class of its line).
TREND_SERIES = (
    ("kappa", "agreement (Cohen's κ)", "kappa"),
    ("sensitivity", "sensitivity", "sens"),
    ("specificity", "specificity", "spec"),
)
TREND_WIDTH, TREND_HEIGHT, TREND_PAD = 640, 200, 32


@router.get("/models/{name}/performance", response_class=HTMLResponse, include_in_schema=False)
def performance_page(request: Request, name: str, principal: ReaderDep, session: ReadSessionDep) -> Response:
    """The performance endpoint as a page: per version the figures with their 95 % intervals and counts, the
    weekly trend as a chart (inline SVG, drawn on the server), each shadow version against the active
    answers on the same images, drift warnings."""
    _known(session, name)
    data = performance(session, name, drift_band(request))
    trends = {v["version"]: trend_lines(v["weekly"]) for v in data["versions"]}
    return page(
        request,
        "model_performance.html",
        model=name,
        data=data,
        trends=trends,
        series=TREND_SERIES,
        width=TREND_WIDTH,
        height=TREND_HEIGHT,
        pad=TREND_PAD,
    )


def trend_lines(weekly: list[dict[str, Any]]) -> dict[str, Any]:
    """SVG polyline points per series (a week without a value breaks the line; kappa below 0 is drawn at
    0), and the x positions and labels of the weeks."""
    n = len(weekly)
    inner_w, inner_h = TREND_WIDTH - 2 * TREND_PAD, TREND_HEIGHT - 2 * TREND_PAD

    def x(i: int) -> float:
        return TREND_PAD + (inner_w * i / (n - 1) if n > 1 else inner_w / 2)

    def y(value: float) -> float:
        return TREND_PAD + inner_h * (1.0 - min(1.0, max(0.0, value)))

    lines: dict[str, list[str]] = {}
    for key, _, _ in TREND_SERIES:
        segments: list[str] = []
        current: list[str] = []
        for i, week in enumerate(weekly):
            value = week[key]
            if value is None:
                if current:
                    segments.append(" ".join(current))
                current = []
                continue
            current.append(f"{x(i):.1f},{y(float(value)):.1f}")
        if current:
            segments.append(" ".join(current))
        lines[key] = segments
    weeks = [{"x": round(x(i), 1), "label": w["week"], "images": w["images"]} for i, w in enumerate(weekly)]
    return {
        "lines": lines,
        "weeks": weeks,
        "grid": [{"y": round(y(v), 1), "label": f"{v:.1f}"} for v in (0, 0.5, 1)],
    }


def _known(session: Any, name: str) -> None:
    if name not in {v.name for v in versions(session)} and name not in ("glaucoma", "pneumonia", "covid19"):
        raise HTTPException(404, f"no model {name}")
