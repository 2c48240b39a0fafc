"""DIMSE event handlers. Each returns a DICOM status and never raises; inference never runs here."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import cast

from pydicom import Dataset
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from sqlalchemy.orm import Session, sessionmaker

from core.encoding import describe
from core.ingest import (
    IngestError,
    MismatchedDataset,
    decode_instance,
    mark_released,
    read_instance,
    store_instance,
    validate_instance,
)
from core.metrics import DIMSE, count_instance
from core.settings import IngestSettings
from core.storage import DirectTempFile, Storage

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000

_STATUS = {
    "invalid": CANNOT_UNDERSTAND,
    "mismatch": DATASET_DOES_NOT_MATCH_SOP_CLASS,
    "resources": OUT_OF_RESOURCES,
    "storage": OUT_OF_RESOURCES,  # at the storage volume's free-space reserve
}


@dataclass
class AssociationStudies:
    """Which studies each open association delivered, so their quiet period starts at release."""

    _by_assoc: dict[int, set[str]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, assoc_id: int, study_uid: str) -> None:
        with self._lock:
            self._by_assoc.setdefault(assoc_id, set()).add(study_uid)

    def pop(self, assoc_id: int) -> set[str]:
        with self._lock:
            return self._by_assoc.pop(assoc_id, set())


def handle_echo(event: Event) -> int:
    return SUCCESS


def handle_store(
    event: Event,
    storage: Storage,
    factory: sessionmaker[Session],
    studies: AssociationStudies,
    limits: IngestSettings,
) -> int | Dataset:
    """Store one instance durably, then acknowledge.

    pynetdicom has written the dataset to a temp file as it arrived (:func:`dicom_listener.server.serve`
    turns its STORE_RECV_CHUNKED_DATASET mode on): that file, with its zero preamble and pynetdicom's file
    meta, is read within ``limits`` and, once valid, becomes the instance file by an fsync and a rename;
    anything else about it pynetdicom removes after we return. A request held in memory instead (chunked
    mode off) is stored as ``event.encoded_dataset()``.

    Returns 0x0000 once the file is fsynced and renamed and its row committed (also for a duplicate);
    0xC000 for a dataset the pipeline could not read (malformed or undecodable elements, invalid UIDs,
    sequences nested deeper than allowed, an image without a complete pixel module, pixel data beyond the
    decoding budget); 0xA900 when the dataset's SOP Class/Instance UID differs from the command's or a
    codestream header describes another image; 0xA700 when the disk or the database fails, or a deflated
    dataset inflates beyond its limit. Nothing is decoded beyond the header of each codestream.
    """
    calling_ae = event.assoc.requestor.ae_title.strip()
    request = cast(C_STORE, event.request)
    try:
        syntax = str(event.context.transfer_syntax)
        received = _received_file(request)
        if received is not None:
            ds = read_instance(received, limits)
        else:
            ds = decode_instance(cast(BytesIO, request.DataSet).getvalue(), syntax, limits)
        meta = validate_instance(ds, syntax, limits)
        if meta.sop_class_uid != str(request.AffectedSOPClassUID):
            raise MismatchedDataset(
                f"SOP Class UID {meta.sop_class_uid} differs from the command's {request.AffectedSOPClassUID}"
            )
        if meta.sop_instance_uid != str(request.AffectedSOPInstanceUID):
            raise MismatchedDataset("SOP Instance UID differs from the command's Affected SOP Instance UID")
        # The file gets a zero preamble and our own file meta (pynetdicom's encoded_dataset).
        stored = store_instance(
            storage,
            factory,
            meta,
            received if received is not None else event.encoded_dataset(),
            source="dimse",
            calling_ae=calling_ae,
        )
    except IngestError as exc:
        status = _STATUS[exc.kind]
        log.warning(
            "C-STORE from %s refused with 0x%04X: %s (SOP Instance UID %s)",
            calling_ae,
            status,
            exc,
            _safe_uid(request),
        )
        count_instance(DIMSE, status)
        return _status(status, str(exc))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # nothing a sender's bytes cause may escape into pynetdicom's thread
        log.warning("C-STORE from %s: unreadable dataset (%s)", calling_ae, describe(exc, 120))
        count_instance(DIMSE, CANNOT_UNDERSTAND)
        return _status(CANNOT_UNDERSTAND, f"unreadable dataset: {describe(exc)}")
    studies.add(id(event.assoc), meta.study_instance_uid)
    log.info(
        "stored %s of study %s from %s%s",
        meta.sop_instance_uid,
        meta.study_instance_uid,
        calling_ae,
        " (duplicate)" if stored.duplicate else "",
    )
    count_instance(DIMSE, SUCCESS)
    return SUCCESS


def handle_closed(event: Event, factory: sessionmaker[Session], studies: AssociationStudies) -> None:
    """Association released, aborted or dropped: the studies it delivered start their quiet period."""
    uids = studies.pop(id(event.assoc))
    try:
        mark_released(factory, uids)
    except Exception:  # never raise into pynetdicom; the max-wait rule still completes these studies
        log.exception("could not mark %d studies released", len(uids))


def _received_file(request: C_STORE) -> Path | None:
    """The temp file pynetdicom wrote the request's dataset to (chunked mode), else None."""
    path = request._dataset_path  # what Event.dataset_path reads; it raises when chunked mode is off
    if not isinstance(path, Path):
        return None
    received = getattr(request, "_dataset_file", None)
    if isinstance(received, DirectTempFile):
        received.finish()
    return path


def _status(code: int, comment: str) -> Dataset:
    """A failure status with an Error Comment (LO: 64 characters) the sender can log."""
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]
    return status


def _safe_uid(request: object) -> str:
    uid = str(getattr(request, "AffectedSOPInstanceUID", "") or "")
    return uid[:64] if all(c in "0123456789." for c in uid) else "<invalid>"
