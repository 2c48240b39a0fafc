"""DICOMweb STOW-RS (PS3.18 10.5): POST /dicomweb/studies stores instances through the durable ingest path.

The request body streams part by part to temp files on the storage volume (api.multipart); parsing, checking
and storing run in worker threads of their own pool (GATEWAY_HTTP__STOW_THREADS), never on the event loop, so
the other routes keep answering during a large or slow upload.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import pydicom
from fastapi import APIRouter, Depends, HTTPException, Request, Response
from pydicom import Dataset
from sqlalchemy.orm import Session, sessionmaker
from starlette.requests import ClientDisconnect

from api.multipart import BodyRefused, PartSpool, SpoolLimits
from api.security import require
from core.ingest import (
    IngestError,
    InstanceMeta,
    InvalidDataset,
    mark_released,
    read_instance,
    store_instance,
    validate_instance,
)
from core.metrics import STOW, STOW_REQUESTS, count, count_instance
from core.settings import IngestSettings, Settings
from core.storage import Storage

log = logging.getLogger(__name__)

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"], dependencies=[Depends(require("stow"))])

# Failure Reason (0008,1197) values, PS3.18 Table I.2-1 / PS3.4 C-STORE statuses.
PROCESSING_FAILURE = 0x0110
CANNOT_UNDERSTAND = 0xC000
DOES_NOT_MATCH_STUDY = 0xA900
OUT_OF_RESOURCES = 0xA700
_REASON = {
    "invalid": CANNOT_UNDERSTAND,
    "mismatch": DOES_NOT_MATCH_STUDY,
    "resources": OUT_OF_RESOURCES,
    "storage": OUT_OF_RESOURCES,
}
#: Body bytes handed to the multipart parser per worker-thread call.
_BATCH = 256 << 10
_EXECUTABLE = (b"MZ", b"\x7fELF")

T = TypeVar("T")


@dataclass(frozen=True)
class PartOutcome:
    """One part's line of the response: a Referenced SOP or a Failed SOP Sequence item (DICOM JSON)."""

    item: dict[str, Any]
    study_uid: str | None = None  # set when stored
    storage_full: bool = False


@router.post("/studies", response_class=Response)
async def stow(request: Request) -> Response:
    """Store every part; answer 200 (all stored), 202 (some failed), 409 (none stored) or 507 (a part was
    refused at the storage volume's free-space reserve: retry later) with the Referenced SOP Sequence and the
    Failed SOP Sequence (Failure Reason per part) as application/dicom+json.

    The request as a whole, with nothing stored: 400 malformed body, 408 no body bytes for stow_idle_seconds,
    413 over a limit (body bytes, parts, bytes of one part: Content-Length is checked first, then the body as
    it arrives), 415 not multipart/related of application/dicom, 507 free-space reserve met while receiving.
    """
    settings: Settings = request.app.state.settings
    storage: Storage = request.app.state.storage
    factory: sessionmaker[Session] = request.app.state.session_factory
    limiter: anyio.CapacityLimiter = request.app.state.stow_limiter

    async def run(func: Callable[..., T], *args: object) -> T:
        return await anyio.to_thread.run_sync(func, *args, limiter=limiter)

    limits = SpoolLimits(
        max_body_bytes=settings.http.stow_max_body_bytes,
        max_parts=settings.http.stow_max_parts,
        max_part_bytes=settings.ingest.max_instance_bytes,
    )
    spool: PartSpool | None = None
    status = 500  # what an unexpected exception becomes
    try:
        spool = PartSpool(request.headers.get("content-type", ""), storage, limits)
        await run(_check_declared_length, request.headers.get("content-length"), storage, limits)
        await _receive_body(request, spool, limiter, settings.http.stow_idle_seconds)
        outcomes = [
            await run(_store_part, path, storage, factory, settings.ingest)
            for path in await run(spool.finish)
        ]
        await run(_released, factory, {o.study_uid for o in outcomes if o.study_uid})
        content, status = await run(_response, outcomes)
    except BodyRefused as exc:
        status = exc.status
        log.warning("STOW-RS request refused with %d: %s", exc.status, exc)
        raise HTTPException(exc.status, detail=str(exc)) from None
    except ClientDisconnect:
        status = 400
        log.info("STOW-RS client went away before the end of its request body")
        return Response(status_code=400)
    finally:
        count(STOW_REQUESTS, str(status))
        if spool is not None:
            with anyio.CancelScope(shield=True):
                await run(spool.discard)
    return Response(content, status_code=status, media_type="application/dicom+json")


def _check_declared_length(value: str | None, storage: Storage, limits: SpoolLimits) -> None:
    if value is None or not value.isdigit():
        return  # chunked: the spool counts as the body arrives
    size = int(value)
    if size > limits.max_body_bytes:
        raise BodyRefused(413, f"request body of {size} bytes exceeds {limits.max_body_bytes} bytes")
    if not storage.has_room(size):
        raise BodyRefused(507, "storage volume at its free-space reserve; retry later")


async def _receive_body(
    request: Request, spool: PartSpool, limiter: anyio.CapacityLimiter, idle: float
) -> None:
    """Feed the body to ``spool`` in batches, in worker threads; at most one batch is held in memory."""
    pending = bytearray()
    more = True
    while more:
        with anyio.move_on_after(idle) as wait:
            message = await request.receive()
        if wait.cancelled_caught:
            raise BodyRefused(408, f"no request body bytes for {idle:g} seconds")
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        pending += message.get("body", b"")
        more = bool(message.get("more_body", False))
        if len(pending) >= _BATCH or not more:
            chunk = bytes(pending)
            pending.clear()
            await anyio.to_thread.run_sync(spool.write, chunk, limiter=limiter)


def _store_part(
    path: Path, storage: Storage, factory: sessionmaker[Session], ingest: IngestSettings
) -> PartOutcome:
    """Read, check and store one part (worker thread); a bad part becomes a failure item, never an exception.

    The part is read within the ingest limits (a deflate bomb, absurd nesting or an element flood is refused
    before pydicom builds it) and validated as C-STORE validates. The part's temp file is removed here, so
    the spool never holds more than the parts still to store.
    """
    sop_class, sop_instance = _meta_uids(path)
    try:
        ds = read_instance(path, ingest)
        sop_class, sop_instance = _uid(ds.get("SOPClassUID")), _uid(ds.get("SOPInstanceUID"))
        meta = _validate(ds, ingest)
        data: bytes | memoryview
        if _has_preamble(path):
            del ds  # a large instance is held once, not twice
            data = _zero_preamble(path, meta)
        else:  # some clients (dicomweb-client among them) send the file meta without the 128-byte preamble
            data = _reencoded(ds)
        store_instance(storage, factory, meta, data, source="stow")
    except IngestError as exc:
        reason = _REASON.get(exc.kind, CANNOT_UNDERSTAND)
        count_instance(STOW, reason)
        log.info("STOW-RS part %s refused (0x%04X): %s", sop_instance or "<no valid UID>", reason, exc)
        return PartOutcome(_item(sop_class, sop_instance, reason), storage_full=exc.kind == "storage")
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # whatever a malformed dataset raises while it is read
        log.info("STOW-RS part %s unreadable (%s)", sop_instance or "<no valid UID>", type(exc).__name__)
        count_instance(STOW, CANNOT_UNDERSTAND)
        return PartOutcome(_item(sop_class, sop_instance, CANNOT_UNDERSTAND))
    finally:
        path.unlink(missing_ok=True)
    count_instance(STOW, 0x0000)
    return PartOutcome(_item(meta.sop_class_uid, meta.sop_instance_uid), study_uid=meta.study_instance_uid)


def _meta_uids(path: Path) -> tuple[str | None, str | None]:
    """SOP Class and Instance UID from the part's file meta: named in its failure item even when the part is
    refused before its dataset is parsed."""
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
    except Exception:
        return None, None
    return _uid(meta.get("MediaStorageSOPClassUID")), _uid(meta.get("MediaStorageSOPInstanceUID"))


def _validate(ds: Dataset, ingest: IngestSettings) -> InstanceMeta:
    """The checks a part passes before it is stored: the one place STOW-RS validates a dataset (the checks
    C-STORE makes, core.ingest.validate_instance)."""
    if "TransferSyntaxUID" not in ds.file_meta:
        raise InvalidDataset("part without DICOM file meta information")
    return validate_instance(ds, str(ds.file_meta.TransferSyntaxUID), ingest)


def _has_preamble(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(132)[128:] == b"DICM"


def _reencoded(ds: Dataset) -> bytes:
    """``ds`` as a complete PS3.10 file (zero preamble, DICM, file meta), as every stored instance is."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _zero_preamble(path: Path, meta: InstanceMeta) -> memoryview:
    """The part's bytes with its preamble zeroed, as C-STORE stores them (the preamble is free-form and
    could make the file a valid executable: ``MZ``, ``\\x7fELF``)."""
    data = bytearray(os.path.getsize(path))
    with path.open("rb") as fh:
        if fh.readinto(data) != len(data):
            raise OSError(f"temp file {path.name} changed size")
    if data.startswith(_EXECUTABLE):
        log.warning("STOW-RS: executable header in the preamble of %s zeroed", meta.sop_instance_uid)
    data[:128] = bytes(128)
    return memoryview(data)


def _released(factory: sessionmaker[Session], study_uids: set[str]) -> None:
    """The request is over: the studies' quiet period starts (the max-wait rule completes them otherwise)."""
    try:
        mark_released(factory, study_uids)
    except Exception:
        log.exception("could not mark %d studies released", len(study_uids))


def _response(outcomes: list[PartOutcome]) -> tuple[bytes, int]:
    stored = [o.item for o in outcomes if o.study_uid]
    failed = [o.item for o in outcomes if not o.study_uid]
    body: dict[str, Any] = {}
    if stored:
        body["00081199"] = {"vr": "SQ", "Value": stored}  # Referenced SOP Sequence
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}  # Failed SOP Sequence
        log.warning("STOW-RS: %d of %d parts refused", len(failed), len(outcomes))
    full = any(o.storage_full for o in outcomes)
    status = 507 if full else 200 if not failed else 202 if stored else 409
    return json.dumps(body).encode(), status


def _item(sop_class: str | None, sop_instance: str | None, reason: int | None = None) -> dict[str, Any]:
    """A Referenced SOP / Failed SOP Sequence item; UIDs only when valid, never other bytes of the part."""
    item: dict[str, Any] = {}
    if sop_class:
        item["00081150"] = {"vr": "UI", "Value": [sop_class]}
    if sop_instance:
        item["00081155"] = {"vr": "UI", "Value": [sop_instance]}
    if reason is not None:
        item["00081197"] = {"vr": "US", "Value": [reason]}
    return item


def _uid(value: object) -> str | None:
    text = str(value or "")
    return text if text and len(text) <= 64 and all(c in "0123456789." for c in text) else None
