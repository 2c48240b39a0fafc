"""Upload from the browser: JPEG/PNG fundus photographs and chest radiographs (made into DICOM by
reporting.uploaded) and DICOM files, through the same durable ingest path as C-STORE and STOW-RS.

``POST /api/upload`` (scope ``upload``: radiologists and admins; a token, or the session cookie with its
CSRF token) takes ``multipart/form-data``: ``files`` (one or more), ``kind`` (fundus | chest, for the
JPEG/PNG files), the optional demographics the user typed (``patient_id``, ``patient_name``,
``birth_date`` YYYY-MM-DD, ``sex`` M/F/O, ``laterality`` R/L, ``accession_number``) and ``crops``: a JSON
list, one entry per file, ``null`` or ``{"x": .., "y": .., "size": ..}`` (a square optic-disc crop in the
photograph's pixels, which the model then reads). The JPEG/PNG files of one upload become one new study.
Every file is checked and converted before anything is stored: one bad file refuses the whole upload with a
4xx naming it, and nothing is stored.

``POST /api/upload/disc`` proposes the crop for one photograph from the optic-disc localiser (the
composition root's: the web layer does not load models).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import anyio.to_thread
import highdicom as hd
import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydicom import Dataset
from starlette.datastructures import FormData
from starlette.datastructures import UploadFile as StarletteUploadFile

from api.pages import page
from api.security import require
from core.accounts import Principal
from core.audit import record
from core.db import transaction
from core.ingest import IngestError, mark_released, read_instance, store_instance, validate_instance
from core.settings import Settings
from core.storage import Storage
from reporting.uploaded import KINDS, Crop, Decoded, Demographics, UploadRefused, decode_image, to_dicom

log = logging.getLogger(__name__)

UploaderDep = Annotated[Principal, Depends(require("upload"))]
#: (x, y, size) of a proposed square disc crop, from the photograph's RGB pixels (uint8 H x W x 3)
DiscProposer = Callable[[np.ndarray], tuple[int, int, int]]

router = APIRouter(tags=["upload"])
_DICM_OFFSET = 128
_FORM_SLACK = 1 << 20  # the form's text fields and multipart boundaries


@dataclass
class _Prepared:
    name: str
    dataset: Dataset
    #: an uploaded DICOM file's own bytes (stored as sent, its preamble zeroed)
    raw: bytes | None = None


@router.get("/upload", response_class=HTMLResponse, include_in_schema=False)
def upload_page(request: Request, principal: UploaderDep) -> Response:
    """Drag-and-drop or pick files, say what they are, optionally crop the optic disc; then progress and the
    result, without a reload (api/static/upload.js)."""
    limits = request.app.state.settings.upload
    return page(
        request,
        "upload.html",
        kinds=KINDS,
        max_file_mb=limits.max_file_bytes / (1 << 20),
        max_files=limits.max_files,
        can_propose=request.app.state.disc_proposer is not None,
    )


@router.post("/api/upload", status_code=201)
async def upload(request: Request, principal: UploaderDep) -> JSONResponse:
    """Store the uploaded images (201: the studies and instances, with each study's case and API links)."""
    settings: Settings = request.app.state.settings
    form = await _form(request, settings)
    files = [f for f in form.getlist("files") if isinstance(f, StarletteUploadFile)]
    if not files:
        raise HTTPException(422, "no file: choose at least one image")
    if len(files) > settings.upload.max_files:
        raise HTTPException(413, f"{len(files)} files: at most {settings.upload.max_files} per upload")
    fields = {k: str(form.get(k) or "") for k in _FIELDS}
    crops = _crops(fields.pop("crops"), len(files))
    contents = []
    for f in files:
        data = await f.read(settings.upload.max_file_bytes + 1)
        if len(data) > settings.upload.max_file_bytes:
            raise HTTPException(
                413, f"{_name(f)}: larger than {settings.upload.max_file_bytes / (1 << 20):.0f} MB"
            )
        contents.append((_name(f), data))
    limiter = request.app.state.stow_limiter
    stored = await anyio.to_thread.run_sync(
        _prepare_and_store, request.app.state, contents, fields, crops, principal, limiter=limiter
    )
    return JSONResponse(stored, status_code=201)


@router.post("/api/upload/disc")
async def propose_disc(request: Request, principal: UploaderDep, file: UploadFile) -> dict[str, Any]:
    """The optic-disc crop the localiser proposes for one photograph: x, y, size (pixels) and the image's
    width and height; 503 where no localiser is configured."""
    proposer: DiscProposer | None = request.app.state.disc_proposer
    if proposer is None:
        raise HTTPException(503, "no optic-disc localiser in this service: draw the crop by hand")
    settings: Settings = request.app.state.settings
    data = await file.read(settings.upload.max_file_bytes + 1)
    if len(data) > settings.upload.max_file_bytes:
        raise HTTPException(413, f"larger than {settings.upload.max_file_bytes / (1 << 20):.0f} MB")

    def propose() -> dict[str, Any]:
        try:
            decoded = decode_image(data, max_pixels=settings.upload.max_pixels)
        except UploadRefused as exc:
            raise HTTPException(exc.status, str(exc)) from None
        if decoded.pixels.ndim != 3:
            raise HTTPException(422, "a fundus photograph must be a colour image")
        x, y, size = proposer(decoded.pixels)
        h, w = decoded.pixels.shape[:2]
        return {"x": x, "y": y, "size": size, "width": w, "height": h}

    result: dict[str, Any] = await anyio.to_thread.run_sync(propose)
    return result


_FIELDS = (
    "kind",
    "patient_id",
    "patient_name",
    "birth_date",
    "sex",
    "laterality",
    "accession_number",
    "crops",
)


async def _form(request: Request, settings: Settings) -> FormData:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise HTTPException(415, "send multipart/form-data (a form with files)")
    declared = request.headers.get("content-length")
    if declared is None:
        raise HTTPException(411, "Content-Length is required")
    limit = settings.upload.max_files * settings.upload.max_file_bytes + _FORM_SLACK
    if not declared.isdigit() or int(declared) > limit:
        raise HTTPException(
            413, f"the upload is larger than {settings.upload.max_file_bytes / (1 << 20):.0f} MB per file"
        )
    try:
        return await request.form(max_files=settings.upload.max_files + 1, max_fields=len(_FIELDS) + 8)
    except HTTPException:
        raise
    except Exception as exc:
        raise HTTPException(400, f"malformed form: {type(exc).__name__}") from None


def _name(f: StarletteUploadFile) -> str:
    name = (f.filename or "file").replace("\\", "/").rsplit("/", 1)[-1]
    return "".join(c for c in name if c.isprintable())[:120] or "file"


def _crops(raw: str, count: int) -> list[Crop | None]:
    if not raw.strip():
        return [None] * count
    try:
        items = json.loads(raw)
        if not isinstance(items, list) or len(items) != count:
            raise ValueError
        return [None if i is None else Crop(int(i["x"]), int(i["y"]), int(i["size"])) for i in items]
    except (ValueError, TypeError, KeyError):
        raise HTTPException(422, "crops: a JSON list with one null or {x, y, size} per file") from None


def _prepare_and_store(
    state: Any,
    contents: list[tuple[str, bytes]],
    fields: dict[str, str],
    crops: list[Crop | None],
    who: Principal,
) -> dict[str, Any]:
    settings: Settings = state.settings
    prepared = _prepare(settings, contents, fields, crops)
    storage: Storage = state.storage
    studies: dict[str, list[dict[str, str]]] = {}
    for item in prepared:
        ds = item.dataset
        try:
            meta = validate_instance(ds, str(ds.file_meta.TransferSyntaxUID), settings.ingest)
            data = _encoded(ds) if item.raw is None else _zero_preamble(item.raw)
            store_instance(storage, state.session_factory, meta, data, source="upload")
        except IngestError as exc:
            status = 507 if exc.kind == "storage" else 422 if exc.kind == "invalid" else 503
            raise HTTPException(status, f"{item.name}: {exc}") from None
        studies.setdefault(meta.study_instance_uid, []).append(
            {
                "file": item.name,
                "sop_instance_uid": meta.sop_instance_uid,
                "sop_class_uid": meta.sop_class_uid,
            }
        )
    mark_released(state.session_factory, set(studies))
    with transaction(state.session_factory) as session:
        for uid, instances in studies.items():
            record(
                session,
                actor=who.actor,
                action="study.upload",
                study_uid=uid,
                detail={"instances": len(instances), "kind": fields.get("kind") or None},
            )
    for uid, instances in studies.items():
        log.info("upload: study %s, %d instances, by %s", uid, len(instances), who.actor)
    return {
        "studies": [
            {
                "study_instance_uid": uid,
                "instances": instances,
                "case_url": f"/cases/{uid}",
                "study_url": f"/api/studies/{uid}",
            }
            for uid, instances in studies.items()
        ]
    }


def _prepare(
    settings: Settings, contents: list[tuple[str, bytes]], fields: dict[str, str], crops: list[Crop | None]
) -> list[_Prepared]:
    """Every file as a dataset, or HTTPException naming the first that cannot be one (nothing stored)."""
    images = [(n, d, c) for (n, d), c in zip(contents, crops, strict=True) if not _is_dicom(d)]
    kind = fields.get("kind", "")
    if images and kind not in KINDS:
        raise HTTPException(422, f"kind: say what the images are ({' or '.join(KINDS)})")
    try:
        demographics = Demographics(
            patient_id=fields.get("patient_id", ""),
            patient_name=fields.get("patient_name", ""),
            birth_date=fields.get("birth_date", ""),
            sex=fields.get("sex", ""),
            laterality=fields.get("laterality", ""),
            accession_number=fields.get("accession_number", ""),
        ).checked()
    except UploadRefused as exc:
        raise HTTPException(exc.status, str(exc)) from None
    study_uid, series_uid = hd.UID(), hd.UID()
    out: list[_Prepared] = []
    number = 0
    for (name, data), crop in zip(contents, crops, strict=True):
        try:
            if _is_dicom(data):
                if crop is not None:
                    raise UploadRefused("a crop is for JPEG/PNG photographs")
                out.append(_Prepared(name, _dicom(data, settings), raw=data))
                continue
            decoded: Decoded = decode_image(data, max_pixels=settings.upload.max_pixels)
            number += 1
            ds = to_dicom(
                decoded,
                kind,  # type: ignore[arg-type]
                demographics,
                study_uid=study_uid,
                series_uid=series_uid,
                instance_number=number,
                crop=crop,
            )
            out.append(_Prepared(name, ds))
        except UploadRefused as exc:
            raise HTTPException(exc.status, f"{name}: {exc}") from None
    return out


def _is_dicom(data: bytes) -> bool:
    return data[_DICM_OFFSET : _DICM_OFFSET + 4] == b"DICM"


def _dicom(data: bytes, settings: Settings) -> Dataset:
    """An uploaded DICOM file, read within the ingest limits and checked as C-STORE checks it; it must be
    an image."""
    try:
        ds = read_instance(data, settings.ingest)
        if "TransferSyntaxUID" not in ds.file_meta:
            raise UploadRefused("DICOM file without file meta information")
        validate_instance(ds, str(ds.file_meta.TransferSyntaxUID), settings.ingest)
    except IngestError as exc:
        raise UploadRefused(f"unsupported DICOM: {exc}", 415) from None
    except UploadRefused:
        raise
    except Exception as exc:  # whatever a malformed dataset raises while it is read
        raise UploadRefused(f"unreadable DICOM ({type(exc).__name__})") from None
    if "PixelData" not in ds:
        raise UploadRefused("unsupported DICOM: not an image (no pixel data)", 415)
    return ds


def _encoded(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return _zero_preamble(buffer.getvalue())


def _zero_preamble(data: bytes) -> bytes:
    """A zero preamble, as every stored instance has (a sent one is free-form: it could make the file an
    executable)."""
    return bytes(_DICM_OFFSET) + data[_DICM_OFFSET:]
