"""De-identified label exports for data teams (scope ``export``): a ZIP streamed per request, and the list of
exports made so far (from the audit trail). The export itself (files, pseudonyms, images) is the composition
root's, handed to create_app as ``exporter``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from api.deps import ReadSessionDep, SessionDep
from api.security import client_address, require
from core.accounts import Principal
from core.audit import record
from core.export import ExportFilter
from core.tables import AuditEvent

ExportDep = Annotated[Principal, Depends(require("export"))]
#: What gateway serve hands create_app: (filter, manifest format, images) -> (ZIP file to stream and remove,
#: counts).
Exporter = Callable[[ExportFilter, str, str], tuple[Path, dict[str, Any]]]
ACTION = "export.create"
CHUNK = 1 << 20

router = APIRouter(tags=["exports"])


class ExportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, max_length=32)
    since: datetime | None = None
    until: datetime | None = None
    label: str | None = Field(None, max_length=32)
    decision: Literal["confirmed", "corrected", "any"] = "confirmed"
    format: Literal["csv", "jsonl"] = "csv"
    images: Literal["png", "dicom", "none"] = "png"


class ExportOut(BaseModel):
    at: datetime
    actor: str
    detail: dict[str, Any]


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@router.post("/api/exports", response_class=StreamingResponse)
def create_export(
    body: ExportRequest, request: Request, principal: ExportDep, session: SessionDep
) -> StreamingResponse:
    """A ZIP: manifest, per-model labels.csv and images (README.txt inside says how they were made)."""
    exporter: Exporter | None = getattr(request.app.state, "exporter", None)
    if exporter is None:
        raise HTTPException(
            503, "exports are made by `gateway serve` (or `gateway export`), not this process"
        )
    selection = ExportFilter(
        model=body.model,
        since=_utc(body.since),
        until=_utc(body.until),
        label=body.label,
        decision=body.decision,
    )
    path, counts = exporter(selection, body.format, body.images)
    record(
        session,
        actor=principal.username,
        action=ACTION,
        client=client_address(request),
        detail={"via": "api", **body.model_dump(mode="json", exclude_none=True), **counts},
    )
    session.commit()

    def chunks() -> Iterator[bytes]:
        try:
            with open(path, "rb") as fh:
                while block := fh.read(CHUNK):
                    yield block
        finally:
            path.unlink(missing_ok=True)

    name = f"export-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.zip"
    return StreamingResponse(
        chunks(),
        media_type="application/zip",
        headers={
            "Content-Disposition": f'attachment; filename="{name}"',
            "X-Export-Rows": str(counts["rows"]),
        },
    )


@router.get("/api/exports", response_model=list[ExportOut])
def list_exports(principal: ExportDep, session: ReadSessionDep) -> list[ExportOut]:
    """Exports made so far, newest first: who, when, what was selected and what it held."""
    rows = session.scalars(
        select(AuditEvent).where(AuditEvent.action == ACTION).order_by(AuditEvent.id.desc()).limit(500)
    )
    return [ExportOut(at=e.at, actor=e.actor, detail=dict(e.detail or {})) for e in rows]
