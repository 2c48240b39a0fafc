"""Store-and-record: the one durable path every input (C-STORE, upload, Orthanc, STOW) goes through.

An instance counts as accepted only once its file is on disk (fsync + atomic rename) and its row is committed.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydicom import Dataset
from pydicom.uid import UID
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from core.activity import record_ingest
from core.db import read_session, transaction
from core.encoding import EncodingError, EncodingLimitExceeded, decode_dataset, read_part10, walk
from core.pixels import PIXEL_KEYWORDS, CodestreamMismatch, PixelDataError, check_decodable
from core.settings import IngestSettings
from core.storage import Storage, check_uid
from core.tables import Instance, Series, Study, utcnow

log = logging.getLogger(__name__)


class IngestError(Exception):
    """Base of the reasons an instance is refused; ``kind`` maps to a DICOM status / HTTP code at the edge."""

    kind = "invalid"


class InvalidDataset(IngestError):
    kind = "invalid"  # DICOM 0xC000, HTTP 400


class MismatchedDataset(IngestError):
    kind = "mismatch"  # DICOM 0xA900, HTTP 409


class OutOfResources(IngestError):
    kind = "resources"  # DICOM 0xA700, HTTP 503


class InsufficientStorage(OutOfResources):
    """The storage volume is at its free-space reserve (or full): nothing was written; retry later."""

    kind = "storage"  # DICOM 0xA700, HTTP 507


@dataclass(frozen=True)
class InstanceMeta:
    """What we index about an instance; read from its dataset once, before it is stored."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str | None
    body_part_examined: str | None
    series_description: str | None
    manufacturer: str | None
    accession_number: str | None
    study_date: str | None
    study_description: str | None
    patient_id: str | None = None

    @classmethod
    def from_dataset(cls, ds: Dataset, transfer_syntax_uid: str) -> InstanceMeta:
        def text(keyword: str, limit: int) -> str | None:
            value = ds.get(keyword)
            value = str(value).strip() if value not in (None, "") else None
            return value[:limit] if value else None

        try:
            return cls(
                study_instance_uid=check_uid(ds.get("StudyInstanceUID"), "Study Instance UID"),
                series_instance_uid=check_uid(ds.get("SeriesInstanceUID"), "Series Instance UID"),
                sop_instance_uid=check_uid(ds.get("SOPInstanceUID"), "SOP Instance UID"),
                sop_class_uid=check_uid(ds.get("SOPClassUID"), "SOP Class UID"),
                transfer_syntax_uid=check_uid(transfer_syntax_uid, "Transfer Syntax UID"),
                modality=text("Modality", 16),
                body_part_examined=text("BodyPartExamined", 64),
                series_description=text("SeriesDescription", 128),
                manufacturer=text("Manufacturer", 64),
                accession_number=text("AccessionNumber", 64),
                study_date=text("StudyDate", 8),
                study_description=text("StudyDescription", 128),
                patient_id=text("PatientID", 64),
            )
        except ValueError as exc:  # InvalidUID and pydicom value errors
            raise InvalidDataset(str(exc)) from exc
        except Exception as exc:  # a malformed element raises on access
            raise InvalidDataset(f"unreadable dataset: {exc}") from exc


def decode_instance(data: bytes, transfer_syntax_uid: str, limits: IngestSettings) -> Dataset:
    """The dataset of a C-STORE request (no file meta), read within ``limits``: a deflated one is inflated to
    at most ``limits.max_inflated_bytes`` (OutOfResources beyond), the encoding is walked once before
    pydicom parses it (InvalidDataset for nesting deeper than ``limits.max_sequence_depth`` or a broken
    structure). Validate the result with :func:`validate_instance`."""
    _check_size(len(data), limits)
    try:
        return decode_dataset(data, transfer_syntax_uid, limits)
    except EncodingLimitExceeded as exc:
        raise OutOfResources(str(exc)) from None
    except EncodingError as exc:
        raise InvalidDataset(str(exc)) from None


def read_instance(source: bytes | Path, limits: IngestSettings) -> Dataset:
    """A DICOM file (STOW-RS part, upload) read within ``limits``, as :func:`decode_instance`; the 128-byte
    preamble is optional, the file meta required (``ds.file_meta``)."""
    try:
        _check_size(source.stat().st_size if isinstance(source, Path) else len(source), limits)
        return read_part10(source, limits)
    except EncodingLimitExceeded as exc:
        raise OutOfResources(str(exc)) from None
    except EncodingError as exc:
        raise InvalidDataset(str(exc)) from None
    except OSError as exc:
        raise OutOfResources(f"cannot read the instance: {exc.strerror or exc}") from None


def _check_size(size: int, limits: IngestSettings) -> None:
    if size > limits.max_instance_bytes:
        raise OutOfResources(f"instance of {size} bytes exceeds the limit of {limits.max_instance_bytes}")


def validate_instance(ds: Dataset, transfer_syntax_uid: str, limits: IngestSettings) -> InstanceMeta:
    """Everything an instance must pass before it is stored; returns what we index about it.

    The one check every input runs (C-STORE, STOW-RS, uploads), so that nothing accepted can fail later:
    every element decodes, sequences nest at most ``limits.max_sequence_depth`` deep, the UIDs are valid,
    an image has a complete Image Pixel module, pixel data as long as it promises, a decoded size within
    ``limits`` and codestreams that agree with its header. Raises InvalidDataset (0xC000 / 400) or
    MismatchedDataset (0xA900 / 409, a codestream describing another image).
    """
    try:
        walk(ds, max_depth=limits.max_sequence_depth, max_elements=limits.max_elements)
    except EncodingError as exc:
        raise InvalidDataset(str(exc)) from None
    meta = InstanceMeta.from_dataset(ds, transfer_syntax_uid)
    if "FrameOfReferenceUID" in ds:  # copied into the reports we write
        try:
            check_uid(ds.FrameOfReferenceUID, "Frame of Reference UID")
        except ValueError as exc:
            raise InvalidDataset(str(exc)) from None
    if any(keyword in ds for keyword in PIXEL_KEYWORDS):
        try:
            check_decodable(ds, meta.transfer_syntax_uid, limits)
        except CodestreamMismatch as exc:
            raise MismatchedDataset(str(exc)) from None
        except PixelDataError as exc:
            raise InvalidDataset(str(exc)) from None
    elif "Rows" in ds or "Columns" in ds or "Image Storage" in UID(meta.sop_class_uid).name:
        raise InvalidDataset("image without pixel data (truncated dataset?)")
    return meta


@dataclass(frozen=True)
class Stored:
    instance_id: int
    study_id: int
    relative_path: str
    duplicate: bool


def store_instance(
    storage: Storage,
    factory: sessionmaker[Session],
    meta: InstanceMeta,
    data: bytes | memoryview | Path,
    *,
    source: str,
    calling_ae: str | None = None,
) -> Stored:
    """Durably store ``data`` (a complete DICOM file, preamble and meta included: its bytes, or a temp file
    on the storage volume that becomes the instance file) and index it.

    The same SOP Instance UID received again is stored once: the first copy is kept and the call succeeds.
    Raises InsufficientStorage when the file would eat into the volume's free-space reserve (or the disk is
    full), OutOfResources for other disk or database failures; nothing already stored is touched then.
    """
    relative = storage.instance_path(meta.study_instance_uid, meta.series_instance_uid, meta.sop_instance_uid)
    existing = _existing(factory, meta.sop_instance_uid)
    if existing is not None and storage.exists(existing.relative_path):
        return existing
    size = data.stat().st_size if isinstance(data, Path) else len(data)
    try:
        if not storage.has_room(size):
            raise InsufficientStorage(
                f"storage volume at its free-space reserve ({storage.reserve_bytes} bytes)"
            )
        if isinstance(data, Path):
            storage.adopt(relative, data)
        else:
            storage.write_bytes(relative, data)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientStorage(f"storage volume full: {exc.strerror}") from exc
        raise OutOfResources(f"cannot write instance file: {exc.strerror or exc}") from exc
    record_ingest(size)
    for attempt in (1, 2, 3):
        try:
            return _record(factory, meta, relative, size, source=source, calling_ae=calling_ae)
        except IntegrityError:
            # A concurrent association inserted the same study/series/instance first: retry sees it.
            if attempt == 3:
                raise OutOfResources("database conflict persisted") from None
        except OperationalError as exc:
            raise OutOfResources(f"database unavailable: {exc.orig}") from exc
    raise AssertionError("unreachable")


def _existing(factory: sessionmaker[Session], sop_uid: str) -> Stored | None:
    try:
        with read_session(factory) as session:
            row = session.execute(
                select(Instance.id, Instance.path, Series.study_id)
                .join(Series, Instance.series_id == Series.id)
                .where(Instance.sop_instance_uid == sop_uid)
            ).first()
    except OperationalError as exc:
        raise OutOfResources(f"database unavailable: {exc.orig}") from exc
    return Stored(row.id, row.study_id, row.path, True) if row else None


def _record(
    factory: sessionmaker[Session],
    meta: InstanceMeta,
    relative: str,
    size: int,
    *,
    source: str,
    calling_ae: str | None,
) -> Stored:
    now = utcnow()
    with transaction(factory) as session:
        instance = session.scalars(
            select(Instance).where(Instance.sop_instance_uid == meta.sop_instance_uid)
        ).first()
        if instance is not None:
            return Stored(instance.id, instance.series.study_id, instance.path, True)
        study = _study(session, meta, now)
        series = session.scalars(
            select(Series).where(Series.series_instance_uid == meta.series_instance_uid)
        ).first()
        if series is None:
            series = Series(
                study_id=study.id,
                series_instance_uid=meta.series_instance_uid,
                modality=meta.modality,
                body_part_examined=meta.body_part_examined,
                series_description=meta.series_description,
                manufacturer=meta.manufacturer,
            )
            session.add(series)
            session.flush()
        instance = Instance(
            series_id=series.id,
            sop_instance_uid=meta.sop_instance_uid,
            sop_class_uid=meta.sop_class_uid,
            transfer_syntax_uid=meta.transfer_syntax_uid,
            path=relative,
            size=size,
            source=source,
            calling_ae=calling_ae,
            received_at=now,
        )
        session.add(instance)
        session.flush()
        return Stored(instance.id, study.id, relative, False)


def _study(session: Session, meta: InstanceMeta, now: datetime) -> Study:
    study = session.scalars(select(Study).where(Study.study_instance_uid == meta.study_instance_uid)).first()
    if study is None:
        study = Study(
            study_instance_uid=meta.study_instance_uid,
            accession_number=meta.accession_number,
            study_date=meta.study_date,
            study_description=meta.study_description,
            patient_id=meta.patient_id,
            status="receiving",
            first_received_at=now,
            last_received_at=now,
        )
        session.add(study)
        session.flush()
        return study
    if study.status != "receiving":
        log.info("study %s: new instance after completion, reopening", meta.study_instance_uid)
    if study.patient_id is None:
        study.patient_id = meta.patient_id
    study.status = "receiving"
    study.last_received_at = now
    study.released_at = None
    return study


def mark_released(factory: sessionmaker[Session], study_uids: set[str]) -> None:
    """The association that delivered these studies was released (or aborted): start their quiet period."""
    if not study_uids:
        return
    now = utcnow()
    with transaction(factory) as session:
        for study in session.scalars(select(Study).where(Study.study_instance_uid.in_(sorted(study_uids)))):
            if study.status == "receiving":
                study.released_at = now
