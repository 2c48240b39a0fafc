"""The stored studies, for administrators: search, what a study holds, its DICOM files as a ZIP, deletion
(by a person or by the retention job), every deletion audited.

A deletion removes the study's rows (series, instances, predictions, reports, deliveries, review; the
database cascades) and its jobs in one transaction with its audit row, and its folders (instances, reports,
renditions) from storage: they are first renamed into ``tmp/`` (atomic, so no half-deleted folder is ever
read) and removed once the transaction has committed; should it fail they are put back. A crash between the
two leaves only a renamed folder, which the next start removes (:func:`remove_trash`).
"""

from __future__ import annotations

import io
import logging
import os
import secrets
import shutil
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
from sqlalchemy import ColumnElement, and_, case, delete, exists, func, select
from sqlalchemy.orm import Session, sessionmaker

from core.audit import record
from core.db import transaction
from core.storage import Storage
from core.tables import Delivery, Instance, Job, Report, Review, Series, Study, StudyDeletion, utcnow

log = logging.getLogger(__name__)

#: A stored study's state, the first that holds: still receiving; a job of it failed; a job of it pending
#: or running; reviewed by a radiologist; reported (an SR was written); stored (nothing routed to a model).
STATES = ("receiving", "failed", "queued", "reviewed", "reported", "stored")
#: Folders of storage that hold a study's files, one sub-folder per study (core.storage).
STUDY_FOLDERS = ("instances", "reports", "renditions")
_TRASH_PREFIX = "deleted-"


class StudyNotFound(LookupError):
    pass


class StudyBusy(RuntimeError):
    """A worker is processing the study now: deleting it under the worker would leave half a result."""


@dataclass(frozen=True)
class StudyFilter:
    """What to search for; a value ending in ``*`` matches as a prefix (patient ID, accession number)."""

    patient_id: str | None = None
    accession_number: str | None = None
    study_uid: str | None = None
    #: Study Date range, YYYYMMDD, inclusive.
    date_from: str | None = None
    date_to: str | None = None
    modality: str | None = None
    state: str | None = None


@dataclass(frozen=True)
class StoredStudy:
    study: Study
    state: str
    instances: int
    size: int
    modalities: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Deleted:
    study_uid: str
    instances: int
    size: int
    reports: int
    files_removed: bool


def _has_job(*statuses: str) -> ColumnElement[bool]:
    return exists().where(Job.study_id == Study.id, Job.status.in_(statuses))


def _state() -> ColumnElement[str]:
    return case(
        (Study.status == "receiving", "receiving"),
        (_has_job("failed"), "failed"),
        (_has_job("pending", "running"), "queued"),
        (exists().where(Review.study_id == Study.id), "reviewed"),
        (exists().where(Report.study_id == Study.id), "reported"),
        else_="stored",
    )


def _matches(column: Any, value: str) -> ColumnElement[bool]:
    if value.endswith("*"):
        prefix = value[:-1].replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        return column.like(prefix + "%", escape="\\")
    return column == value


def _where(where: StudyFilter) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    if where.patient_id:
        conditions.append(_matches(Study.patient_id, where.patient_id))
    if where.accession_number:
        conditions.append(_matches(Study.accession_number, where.accession_number))
    if where.study_uid:
        conditions.append(Study.study_instance_uid == where.study_uid)
    if where.date_from:
        conditions.append(Study.study_date >= where.date_from)
    if where.date_to:
        conditions.append(Study.study_date <= where.date_to)
    if where.modality:
        conditions.append(
            exists().where(Series.study_id == Study.id, Series.modality == where.modality.upper())
        )
    if where.state:
        if where.state not in STATES:
            raise ValueError(f"unknown state {where.state!r} (known: {', '.join(STATES)})")
        conditions.append(_state() == where.state)
    return conditions


def search_studies(
    session: Session, where: StudyFilter, *, limit: int = 100, offset: int = 0
) -> tuple[int, list[StoredStudy]]:
    """The matching studies, the last received first, and how many match in all."""
    conditions = _where(where)
    total = session.scalar(select(func.count(Study.id)).where(*conditions)) or 0
    sizes = (
        select(
            Series.study_id.label("study_id"),
            func.count(Instance.id).label("n"),
            func.coalesce(func.sum(Instance.size), 0).label("size"),
        )
        .join(Instance, Instance.series_id == Series.id)
        .group_by(Series.study_id)
        .subquery()
    )
    query = (
        select(Study, _state(), func.coalesce(sizes.c.n, 0), func.coalesce(sizes.c.size, 0))
        .outerjoin(sizes, sizes.c.study_id == Study.id)
        .where(*conditions)
        .order_by(Study.last_received_at.desc(), Study.id.desc())
        .limit(limit)
        .offset(offset)
    )
    rows = session.execute(query).all()
    modalities: dict[int, set[str]] = {}
    ids = [row[0].id for row in rows]
    if ids:
        for study_id, modality in session.execute(
            select(Series.study_id, Series.modality).where(Series.study_id.in_(ids)).distinct()
        ):
            if modality:
                modalities.setdefault(study_id, set()).add(modality)
    return total, [
        StoredStudy(study, state, int(n), int(size), sorted(modalities.get(study.id, ())))
        for study, state, n, size in rows
    ]


def get_study(session: Session, study_uid: str) -> StoredStudy:
    """One stored study (StudyNotFound when there is none)."""
    _, found = search_studies(session, StudyFilter(study_uid=study_uid), limit=1)
    if not found:
        raise StudyNotFound(f"study {study_uid} not found")
    return found[0]


def study_jobs(session: Session, study: Study) -> list[Job]:
    return list(session.scalars(select(Job).where(Job.study_id == study.id).order_by(Job.id)))


def study_reports(session: Session, study: Study) -> list[tuple[Report, list[Delivery]]]:
    reports = list(session.scalars(select(Report).where(Report.study_id == study.id).order_by(Report.id)))
    deliveries: dict[int, list[Delivery]] = {}
    if reports:
        for d in session.scalars(
            select(Delivery).where(Delivery.report_id.in_([r.id for r in reports])).order_by(Delivery.id)
        ):
            deliveries.setdefault(d.report_id, []).append(d)
    return [(r, deliveries.get(r.id, [])) for r in reports]


def study_series(session: Session, study: Study) -> list[tuple[Series, list[Instance]]]:
    series = list(session.scalars(select(Series).where(Series.study_id == study.id).order_by(Series.id)))
    instances: dict[int, list[Instance]] = {}
    if series:
        for i in session.scalars(
            select(Instance).where(Instance.series_id.in_([s.id for s in series])).order_by(Instance.id)
        ):
            instances.setdefault(i.series_id, []).append(i)
    return [(s, instances.get(s.id, [])) for s in series]


def study_files(session: Session, storage: Storage, study: Study) -> list[tuple[str, Path]]:
    """(name in a ZIP, file) of every DICOM object of the study: the instances received, by series, then the
    reports we wrote (SRs, verified SRs)."""
    uid = study.study_instance_uid
    files: list[tuple[str, Path]] = []
    for series, instances in study_series(session, study):
        for i in instances:
            files.append(
                (f"{uid}/{series.series_instance_uid}/{i.sop_instance_uid}.dcm", storage.absolute(i.path))
            )
    for report, _ in study_reports(session, study):
        files.append((f"{uid}/reports/{report.sop_instance_uid}.dcm", storage.absolute(report.path)))
    return files


class _Chunks(io.RawIOBase):
    """A write-only, unseekable stream that hands what was written to the reader in pieces (a ZIP sent
    while it is written)."""

    def __init__(self) -> None:
        super().__init__()
        self._parts: list[bytes] = []
        self._written = 0

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self._parts.append(chunk)
        self._written += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self._written

    def writable(self) -> bool:
        return True

    def take(self) -> bytes:
        data, self._parts = b"".join(self._parts), []
        return data


def zip_stream(files: list[tuple[str, Path]], *, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """A ZIP (stored, not compressed: pixel data is compressed or barely compressible) of ``files``, made as
    it is read: memory stays at about ``chunk_size`` whatever the study's size. A file that is gone (deleted
    meanwhile) is left out."""
    out = _Chunks()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, path in files:
            try:
                source = open(path, "rb")  # noqa: SIM115 - closed below, around the yields
            except FileNotFoundError:
                log.warning("zip: %s is gone, left out", name)
                continue
            with source, archive.open(name, "w", force_zip64=True) as member:
                while chunk := source.read(chunk_size):
                    member.write(chunk)
                    yield out.take()
    yield out.take()  # the central directory, written on close


def delete_study(
    factory: sessionmaker[Session],
    storage: Storage,
    study_uid: str,
    *,
    actor: str,
    client: str | None = None,
    reason: str = "admin",
) -> Deleted:
    """Delete a stored study: rows, jobs and files, audited (``study.delete``, with ``reason``). StudyBusy
    while a worker runs a job of it; StudyNotFound for an unknown UID."""
    trash: Path | None = None
    try:
        with transaction(factory) as session:
            found = get_study(session, study_uid)
            study = found.study
            running = session.scalars(
                select(Job.id).where(Job.study_id == study.id, Job.status == "running").limit(1)
            ).first()
            if running is not None:
                raise StudyBusy(f"study {study_uid} is being processed (job {running}); try again shortly")
            reports = session.scalar(select(func.count(Report.id)).where(Report.study_id == study.id)) or 0
            session.execute(delete(Job).where(Job.study_id == study.id))
            session.add(StudyDeletion(study_id=study.id))  # lets its append-only reviews go (migration 0009)
            session.flush()
            session.execute(delete(Study).where(Study.id == study.id))  # the rest cascades in the database
            session.execute(delete(StudyDeletion).where(StudyDeletion.study_id == study.id))
            record(
                session,
                actor=actor,
                action="study.delete",
                study_uid=study_uid,
                client=client,
                detail={
                    "reason": reason,
                    "instances": found.instances,
                    "bytes": found.size,
                    "reports": reports,
                },
            )
            session.flush()
            trash = _move_to_trash(storage, study_uid)
    except BaseException:
        if trash is not None:
            _restore(storage, study_uid, trash)
        raise
    removed = _remove(trash)
    log.info("study %s deleted (%s, by %s): %d instances", study_uid, reason, actor, found.instances)
    return Deleted(study_uid, found.instances, found.size, reports, removed)


def _move_to_trash(storage: Storage, study_uid: str) -> Path:
    trash = storage.tmp_dir / f"{_TRASH_PREFIX}{secrets.token_hex(6)}"
    trash.mkdir()
    for folder in STUDY_FOLDERS:
        source = storage.absolute(f"{folder}/{study_uid}")
        if source.exists():
            os.replace(source, trash / folder)
    return trash


def _restore(storage: Storage, study_uid: str, trash: Path) -> None:
    for folder in STUDY_FOLDERS:
        moved = trash / folder
        if moved.exists():
            os.replace(moved, storage.absolute(f"{folder}/{study_uid}"))
    trash.rmdir()


def _remove(trash: Path | None) -> bool:
    if trash is None:
        return True
    try:
        shutil.rmtree(trash)
    except OSError as exc:
        log.error("files of a deleted study left in %s: %s (removed at the next start)", trash, exc)
        return False
    return True


def remove_trash(storage: Storage) -> int:
    """Remove the folders of deleted studies that a crash left in ``tmp/``; returns how many."""
    removed = 0
    for folder in storage.tmp_dir.glob(_TRASH_PREFIX + "*"):
        shutil.rmtree(folder, ignore_errors=True)
        removed += 1
    return removed


def expired_studies(
    session: Session, days: int, *, now: datetime | None = None, limit: int = 100
) -> list[str]:
    """UIDs of studies whose last instance arrived more than ``days`` ago and that no job is working on."""
    cutoff = (now or utcnow()) - timedelta(days=days)
    return list(
        session.scalars(
            select(Study.study_instance_uid)
            .where(
                and_(Study.last_received_at < cutoff, Study.status != "receiving"),
                ~_has_job("running"),
            )
            .order_by(Study.last_received_at)
            .limit(limit)
        )
    )


def purge_expired(
    factory: sessionmaker[Session], storage: Storage, days: int, *, now: datetime | None = None
) -> list[Deleted]:
    """Delete every study older than the retention of ``days`` (the retention job), each audited as a
    deletion by ``retention``; a study being processed is left for the next run."""
    deleted: list[Deleted] = []
    skipped: set[str] = set()
    while True:
        with transaction(factory) as session:
            batch = [u for u in expired_studies(session, days, now=now) if u not in skipped]
        if not batch:
            return deleted
        for uid in batch:
            try:
                deleted.append(
                    delete_study(factory, storage, uid, actor="retention", reason=f"retention {days} days")
                )
            except (StudyBusy, StudyNotFound) as exc:
                log.info("retention: %s", exc)
                skipped.add(uid)


def index_patient_ids(factory: sessionmaker[Session], storage: Storage, *, batch: int = 200) -> int:
    """Fill in the patient ID of studies stored before the database kept it (migration 0009), from one
    stored instance of each ("" when it has none or its file is unreadable); returns how many."""
    done = 0
    while True:
        with transaction(factory) as session:
            rows = session.execute(
                select(Study, func.min(Instance.path))
                .join(Series, Series.study_id == Study.id)
                .join(Instance, Instance.series_id == Series.id)
                .where(Study.patient_id.is_(None))
                .group_by(Study.id)
                .limit(batch)
            ).all()
            for study, path in rows:
                study.patient_id = _patient_id(storage.absolute(path))
        if not rows:
            return done
        done += len(rows)


def _patient_id(path: Path) -> str:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
        return str(ds.get("PatientID") or "").strip()[:64]
    except Exception as exc:  # unreadable or gone: searched as having none
        log.warning("patient ID of %s unreadable: %s", path.name, exc)
        return ""
