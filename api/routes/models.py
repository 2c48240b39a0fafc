"""The model registry over HTTP (admin): the versions and their status; retiring and (forced) promotion.
What `gateway models` does; every change is audited."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field

from api.deps import ReadSessionDep, SessionDep
from api.security import require
from core.accounts import Principal
from core.agreement import performance
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
def model_performance(name: str, principal: ReaderDep, session: ReadSessionDep) -> dict[str, Any]:
    """Live agreement with the radiologists, per version, from the latest review of every report: Cohen's
    kappa; sensitivity, specificity, PPV, NPV ("any finding" positive) with Wilson 95 % intervals and
    counts; confirmation and override rates; a weekly trend; each shadow version against the active answers
    on the same images (core.agreement)."""
    if name not in {v.name for v in versions(session)} and name not in ("glaucoma", "pneumonia", "covid19"):
        raise HTTPException(404, f"no model {name}")
    return performance(session, name)
