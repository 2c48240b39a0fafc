"""Stored studies for administrators: search, view, download as a ZIP of DICOM files, delete (pages and
JSON). Admin scope only; viewing, downloading and deleting are audited."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any
from urllib.parse import urlencode

import pydicom
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from pydantic import BaseModel

from api.deps import SessionDep, query_dicom_day
from api.pages import page
from api.routes.admin import AdminDep
from api.security import client_address
from core import archive
from core.archive import StoredStudy, StudyBusy, StudyFilter, StudyNotFound
from core.audit import record
from core.storage import Storage
from core.tables import Study

router = APIRouter(tags=["admin"])

PAGE_SIZE = 100


class StoredStudyOut(BaseModel):
    study_instance_uid: str
    patient_id: str | None
    accession_number: str | None
    study_date: str | None
    study_description: str | None
    modalities: list[str]
    state: str
    instances: int
    bytes: int
    first_received_at: datetime
    last_received_at: datetime


class StudySearchPage(BaseModel):
    total: int
    studies: list[StoredStudyOut]


class DeletedOut(BaseModel):
    study_instance_uid: str
    instances: int
    bytes: int
    reports: int
    files_removed: bool


def _out(found: StoredStudy) -> StoredStudyOut:
    s = found.study
    return StoredStudyOut(
        study_instance_uid=s.study_instance_uid,
        patient_id=s.patient_id or None,
        accession_number=s.accession_number,
        study_date=s.study_date,
        study_description=s.study_description,
        modalities=found.modalities,
        state=found.state,
        instances=found.instances,
        bytes=found.size,
        first_received_at=s.first_received_at,
        last_received_at=s.last_received_at,
    )


_PREFIX = "exact, or a prefix ending in *"
_PATIENT_TAGS = ["PatientName", "PatientBirthDate", "PatientSex"]


def _search_query(
    patient_id: Annotated[
        str | None, Query(max_length=64, description="exact, or a prefix ending in *")
    ] = None,
    accession_number: Annotated[
        str | None, Query(max_length=64, description="exact, or a prefix ending in *")
    ] = None,
    study_uid: Annotated[str | None, Query(max_length=64)] = None,
    date_from: Annotated[str | None, Query(max_length=10, description="Study Date from, YYYY-MM-DD")] = None,
    date_to: Annotated[str | None, Query(max_length=10, description="Study Date to, YYYY-MM-DD")] = None,
    modality: Annotated[str | None, Query(max_length=16)] = None,
    state: Annotated[str | None, Query(max_length=16, description=", ".join(archive.STATES))] = None,
) -> dict[str, str | None]:
    if state and state not in archive.STATES:
        raise HTTPException(status_code=422, detail=f"state: one of {', '.join(archive.STATES)}")
    (
        query_dicom_day(date_from, "date_from"),
        query_dicom_day(date_to, "date_to"),
    )  # refused here when malformed
    return {
        "patient_id": (patient_id or "").strip() or None,
        "accession_number": (accession_number or "").strip() or None,
        "study_uid": (study_uid or "").strip() or None,
        "date_from": date_from or None,
        "date_to": date_to or None,
        "modality": (modality or "").strip() or None,
        "state": state or None,
    }


SearchDep = Annotated[dict[str, str | None], Depends(_search_query)]


def _filter(q: dict[str, str | None]) -> StudyFilter:
    return StudyFilter(
        patient_id=q["patient_id"],
        accession_number=q["accession_number"],
        study_uid=q["study_uid"],
        date_from=query_dicom_day(q["date_from"], "date_from"),
        date_to=query_dicom_day(q["date_to"], "date_to"),
        modality=q["modality"],
        state=q["state"],
    )


def _storage(request: Request) -> Storage:
    storage: Storage = request.app.state.storage
    return storage


def _found(session: SessionDep, study_uid: str) -> StoredStudy:
    try:
        return archive.get_study(session, study_uid)
    except StudyNotFound as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from None


def _patient(storage: Storage, session: SessionDep, study: Study) -> dict[str, str]:
    """Name, birth date and sex as the study's first instance gives them (the database keeps only the ID)."""
    files = archive.study_files(session, storage, study)
    if not files:
        return {}
    try:
        ds = pydicom.dcmread(
            files[0][1],
            stop_before_pixels=True,
            specific_tags=_PATIENT_TAGS,
        )
    except Exception:  # unreadable or gone: the page shows what the database has
        return {}
    return {
        "name": str(ds.get("PatientName") or "").replace("^", " ").strip(),
        "birth_date": str(ds.get("PatientBirthDate") or ""),
        "sex": str(ds.get("PatientSex") or ""),
    }


def _delete(request: Request, principal: AdminDep, study_uid: str) -> archive.Deleted:
    try:
        return archive.delete_study(
            request.app.state.session_factory,
            _storage(request),
            study_uid,
            actor=principal.actor,
            client=client_address(request),
        )
    except StudyNotFound as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from None
    except StudyBusy as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from None


def _viewed(request: Request, session: SessionDep, principal: AdminDep, study_uid: str, where: str) -> None:
    record(
        session,
        actor=principal.actor,
        action="study.view",
        study_uid=study_uid,
        client=client_address(request),
        detail={"page": where},
    )
    session.commit()


def _zip(request: Request, session: SessionDep, principal: AdminDep, study_uid: str) -> StreamingResponse:
    found = _found(session, study_uid)
    files = archive.study_files(session, _storage(request), found.study)
    record(
        session,
        actor=principal.actor,
        action="study.download",
        study_uid=study_uid,
        client=client_address(request),
        detail={"files": len(files)},
    )
    session.commit()
    return StreamingResponse(
        archive.zip_stream(files),
        media_type="application/zip",
        headers={
            "Content-Disposition": f'attachment; filename="study-{study_uid}.zip"',
            "Cache-Control": "no-store",
        },
    )


# -- pages -------------------------------------------------------------------------------------------------


@router.get("/admin/studies", response_class=HTMLResponse, include_in_schema=False)
def studies_page(
    request: Request,
    session: SessionDep,
    principal: AdminDep,
    q: SearchDep,
    offset: Annotated[int, Query(ge=0)] = 0,
    message: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    total, found = archive.search_studies(session, _filter(q), limit=PAGE_SIZE, offset=offset)
    query = urlencode({k: v for k, v in q.items() if v})
    return page(
        request,
        "admin_studies.html",
        studies=found,
        total=total,
        q=q,
        states=archive.STATES,
        query=query,
        offset=offset,
        next_offset=offset + len(found) if offset + len(found) < total else None,
        message=message,
    )


@router.get("/admin/studies/{study_uid}", response_class=HTMLResponse, include_in_schema=False)
def study_page(request: Request, session: SessionDep, principal: AdminDep, study_uid: str) -> Response:
    found = _found(session, study_uid)
    storage = _storage(request)
    _viewed(request, session, principal, study_uid, "admin")
    return page(
        request,
        "admin_study.html",
        found=found,
        patient=_patient(storage, session, found.study),
        series=archive.study_series(session, found.study),
        reports=archive.study_reports(session, found.study),
        jobs=archive.study_jobs(session, found.study),
    )


@router.get("/admin/studies/{study_uid}/delete", response_class=HTMLResponse, include_in_schema=False)
def delete_page(request: Request, session: SessionDep, principal: AdminDep, study_uid: str) -> Response:
    """The confirmation: what deleting the study removes."""
    found = _found(session, study_uid)
    return page(
        request,
        "admin_study_delete.html",
        found=found,
        patient=_patient(_storage(request), session, found.study),
        reports=len(archive.study_reports(session, found.study)),
    )


@router.post("/admin/studies/{study_uid}/delete", include_in_schema=False)
def delete_form(request: Request, principal: AdminDep, study_uid: str) -> Response:
    deleted = _delete(request, principal, study_uid)
    message = f"study {study_uid} deleted: {deleted.instances} instances, {deleted.reports} reports"
    return RedirectResponse(f"/admin/studies?{urlencode({'message': message})}", status_code=303)


@router.get("/admin/studies/{study_uid}/dicom.zip", include_in_schema=False)
def zip_page(request: Request, session: SessionDep, principal: AdminDep, study_uid: str) -> Response:
    return _zip(request, session, principal, study_uid)


# -- JSON --------------------------------------------------------------------------------------------------


@router.get("/api/admin/studies", response_model=StudySearchPage)
def search_json(
    session: SessionDep,
    principal: AdminDep,
    q: SearchDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = PAGE_SIZE,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> StudySearchPage:
    """Stored studies matching every given criterion, the last received first."""
    total, found = archive.search_studies(session, _filter(q), limit=limit, offset=offset)
    return StudySearchPage(total=total, studies=[_out(f) for f in found])


@router.get("/api/admin/studies/{study_uid}/dicom.zip", response_class=StreamingResponse)
def zip_json(request: Request, session: SessionDep, principal: AdminDep, study_uid: str) -> Response:
    """The study's DICOM files (instances received, then our reports) as a ZIP, streamed."""
    return _zip(request, session, principal, study_uid)


@router.get("/api/admin/studies/{study_uid}", response_model=dict[str, Any])
def study_json(request: Request, session: SessionDep, principal: AdminDep, study_uid: str) -> dict[str, Any]:
    """One stored study: its series and instances, reports with their deliveries, jobs (audited)."""
    found = _found(session, study_uid)
    _viewed(request, session, principal, study_uid, "api")
    return {
        **_out(found).model_dump(mode="json"),
        "series": [
            {
                "series_instance_uid": s.series_instance_uid,
                "modality": s.modality,
                "body_part_examined": s.body_part_examined,
                "manufacturer": s.manufacturer,
                "instances": [
                    {
                        "sop_instance_uid": i.sop_instance_uid,
                        "sop_class_uid": i.sop_class_uid,
                        "bytes": i.size,
                        "source": i.source,
                        "calling_ae": i.calling_ae,
                        "received_at": i.received_at.isoformat(),
                    }
                    for i in instances
                ],
            }
            for s, instances in archive.study_series(session, found.study)
        ],
        "reports": [
            {
                "sop_instance_uid": r.sop_instance_uid,
                "model": r.model_name,
                "version": r.model_version,
                "verification": r.verification,
                "deliveries": [
                    {"destination": d.destination, "status": d.status, "last_status": d.last_status}
                    for d in deliveries
                ],
            }
            for r, deliveries in archive.study_reports(session, found.study)
        ],
        "jobs": [
            {"id": j.id, "kind": j.kind, "status": j.status, "attempts": j.attempts, "error": j.last_error}
            for j in archive.study_jobs(session, found.study)
        ],
    }


@router.delete("/api/admin/studies/{study_uid}", response_model=DeletedOut)
def delete_json(request: Request, principal: AdminDep, study_uid: str) -> DeletedOut:
    """Delete the study: its files, rows, predictions, reports and review (audited). 409 while a worker is
    processing it."""
    d = _delete(request, principal, study_uid)
    return DeletedOut(
        study_instance_uid=d.study_uid,
        instances=d.instances,
        bytes=d.size,
        reports=d.reports,
        files_removed=d.files_removed,
    )
