"""DICOMweb STOW-RS (PS3.18 10.5): POST /dicomweb/studies stores instances through the durable ingest path."""

from __future__ import annotations

import io
import logging
from typing import Any

import pydicom
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from pydicom import Dataset
from pydicom.errors import InvalidDicomError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from core.ingest import IngestError, InstanceMeta, check_pixel_data, mark_released, store_instance

log = logging.getLogger(__name__)

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])

# Failure Reason (0008,1197) values, PS3.18 Table I.2-1 / PS3.4 C-STORE statuses.
PROCESSING_FAILURE = 0x0110
CANNOT_UNDERSTAND = 0xC000
DOES_NOT_MATCH_STUDY = 0xA900
OUT_OF_RESOURCES = 0xA700
_REASON = {"invalid": CANNOT_UNDERSTAND, "mismatch": DOES_NOT_MATCH_STUDY, "resources": OUT_OF_RESOURCES}


def _parts(content_type: str, body: bytes) -> list[bytes]:
    """The application/dicom parts of a multipart/related body (RFC 2387), split by python-multipart."""
    media, options = parse_options_header(content_type)
    if media != b"multipart/related":
        raise HTTPException(
            415, detail='STOW-RS needs Content-Type: multipart/related; type="application/dicom"'
        )
    boundary = options.get(b"boundary")
    if not boundary:
        raise HTTPException(400, detail="multipart/related without a boundary parameter")
    parts: list[bytearray] = []
    headers: list[tuple[bytes, bytes]] = []
    field = bytearray()

    def on_part_begin() -> None:
        parts.append(bytearray())
        headers.clear()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        field.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        headers.append((bytes(field).lower(), data[start:end]))
        field.clear()

    def on_headers_finished() -> None:
        kinds = [value.split(b";")[0].strip().lower() for name, value in headers if name == b"content-type"]
        if kinds and kinds[0] != b"application/dicom":
            raise HTTPException(
                415, detail=f"part of type {kinds[0].decode('latin-1')!r}: only application/dicom"
            )

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1].extend(data[start:end])

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
        },
    )
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise HTTPException(400, detail=f"malformed multipart body: {exc}") from None
    if not parts:
        raise HTTPException(400, detail="no application/dicom part in the request")
    return [bytes(p) for p in parts]


def _sop_item(sop_class: str | None, sop_instance: str | None) -> Dataset:
    item = Dataset()
    if sop_class:
        item.ReferencedSOPClassUID = sop_class
    if sop_instance:
        item.ReferencedSOPInstanceUID = sop_instance
    return item


@router.post("/studies", response_class=JSONResponse)
async def stow(request: Request) -> JSONResponse:
    """Store every part; answer 200 (all stored), 202 (some failed) or 409 (none stored) with the
    Referenced SOP Sequence and the Failed SOP Sequence (with Failure Reason) as application/dicom+json.
    """
    parts = _parts(request.headers.get("content-type", ""), await request.body())
    storage = request.app.state.storage
    factory = request.app.state.session_factory
    stored, failed = [], []
    studies: set[str] = set()
    for data in parts:
        sop_class = sop_instance = None
        try:
            # Some clients (dicomweb-client among them) send the file meta without the 128-byte preamble.
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
            sop_class, sop_instance = ds.get("SOPClassUID"), ds.get("SOPInstanceUID")
            if "TransferSyntaxUID" not in ds.file_meta:
                raise InvalidDicomError("part without DICOM file meta information")
            meta = InstanceMeta.from_dataset(ds, str(ds.file_meta.TransferSyntaxUID))
            if data[128:132] != b"DICM":
                data = _part10(ds)
            check_pixel_data(ds, meta.transfer_syntax_uid)
            store_instance(storage, factory, meta, data, source="stow")
        except IngestError as exc:
            item = _sop_item(_uid(sop_class), _uid(sop_instance))
            item.FailureReason = _REASON[exc.kind]
            failed.append(item)
            log.warning("STOW-RS part refused (0x%04X): %s", item.FailureReason, exc)
            continue
        except (InvalidDicomError, AttributeError, ValueError, EOFError, OSError) as exc:
            item = _sop_item(_uid(sop_class), _uid(sop_instance))
            item.FailureReason = CANNOT_UNDERSTAND
            failed.append(item)
            log.warning("STOW-RS part unreadable: %s", type(exc).__name__)
            continue
        stored.append(_sop_item(meta.sop_class_uid, meta.sop_instance_uid))
        studies.add(meta.study_instance_uid)
    mark_released(factory, studies)  # the request is over: the studies' quiet period starts
    response = Dataset()
    if stored:
        response.ReferencedSOPSequence = stored
    if failed:
        response.FailedSOPSequence = failed
    status = 200 if not failed else 202 if stored else 409
    body: dict[str, Any] = response.to_json_dict()
    return JSONResponse(body, status_code=status, media_type="application/dicom+json")


def _part10(ds: Dataset) -> bytes:
    """``ds`` as a complete PS3.10 file (preamble, DICM, file meta), as every stored instance is."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _uid(value: object) -> str | None:
    text = str(value or "")
    return text if text and len(text) <= 64 and all(c in "0123456789." for c in text) else None
