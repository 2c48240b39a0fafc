"""Stored studies (core.archive) on both databases: search by each criterion and state, the ZIP read back,
deletion of rows (every table that hangs off a study) and files with its audit row, refusal while a worker
runs a job of the study, put back when the transaction fails, retention, patient IDs of earlier studies."""

from __future__ import annotations

import io
import zipfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import delete, event, func, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from core import archive
from core.archive import StudyBusy, StudyFilter, StudyNotFound
from core.db import transaction
from core.ingest import InstanceMeta, store_instance
from core.jobs import enqueue
from core.storage import Storage
from core.tables import (
    AuditEvent,
    Delivery,
    Instance,
    Job,
    Prediction,
    Report,
    Review,
    Series,
    Study,
    utcnow,
)
from tests import factories as f


def _store(storage: Storage, factory: sessionmaker[Session], ds: pydicom.Dataset, tmp: Path) -> None:
    path = f.save(ds, tmp / f"{ds.SOPInstanceUID}.dcm")
    meta = InstanceMeta.from_dataset(ds, str(ds.file_meta.TransferSyntaxUID))
    store_instance(storage, factory, meta, path.read_bytes(), source="test")


def _study(
    storage: Storage,
    factory: sessionmaker[Session],
    tmp: Path,
    *,
    patient_id: str,
    accession: str,
    date: str,
    images: int = 1,
    fundus: bool = False,
) -> str:
    uid, series = generate_uid(), generate_uid()
    for _ in range(images):
        if fundus:
            ds = f.ophthalmic_photo()
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PatientID = uid, series, patient_id
        else:
            ds = f.chest_radiograph(study_uid=uid, series_uid=series, patient_id=patient_id)
        ds.AccessionNumber, ds.StudyDate = accession, date
        _store(storage, factory, ds, tmp)
    with transaction(factory) as session:
        session.execute(update(Study).where(Study.study_instance_uid == uid).values(status="complete"))
    return uid


def _report(storage: Storage, factory: sessionmaker[Session], uid: str) -> str:
    """An SR file and the rows a processed study has: report, prediction, delivery, a done job."""
    sop = generate_uid()
    relative = storage.report_path(uid, sop)
    storage.write_bytes(relative, b"SR bytes")
    storage.write_bytes(storage.heatmap_path(uid, sop, "pneumonia", "1.0.0"), b"png", durable=False)
    with transaction(factory) as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
        instance = session.scalars(
            select(Instance).join(Series).where(Series.study_id == study.id).limit(1)
        ).one()
        job = enqueue(session, kind="process_study", payload={}, study_id=study.id)
        job.status = "done"
        report = Report(
            study_id=study.id,
            model_name="pneumonia",
            model_version="1.0.0",
            sop_instance_uid=sop,
            series_instance_uid=generate_uid(),
            sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
            input_hash="x" * 64,
            path=relative,
            job_id=job.id,
        )
        session.add(report)
        session.flush()
        session.add(Delivery(report_id=report.id, destination="pacs", status="sent"))
        review = Review(
            study_id=study.id,
            report_id=report.id,
            model_name="pneumonia",
            model_version="1.0.0",
            version=1,
            username="reader",
        )
        session.add(review)
        session.flush()
        report.review_id = review.id
        session.add(
            Prediction(
                study_id=study.id,
                instance_id=instance.id,
                report_id=report.id,
                model_name="pneumonia",
                model_version="1.0.0",
                finding="pneumonia",
                probability=0.9,
                threshold=0.5,
                label="present",
                assessable=True,
            )
        )
    return sop


@pytest.fixture
def studies(storage: Storage, factory: sessionmaker[Session], tmp_path: Path) -> dict[str, str]:
    out = {
        "chest": _study(storage, factory, tmp_path, patient_id="PAT-1", accession="ACC-100", date="20240105"),
        "chest2": _study(
            storage, factory, tmp_path, patient_id="PAT-2", accession="ACC-200", date="20240301", images=2
        ),
        "eye": _study(
            storage, factory, tmp_path, patient_id="EYE-9", accession="X-1", date="20231231", fundus=True
        ),
    }
    _report(storage, factory, out["chest"])
    return out


def _uids(factory: sessionmaker[Session], **criteria: str) -> set[str]:
    with factory() as session:
        _, found = archive.search_studies(session, StudyFilter(**criteria))
        return {s.study.study_instance_uid for s in found}


def test_search_by_each_criterion(factory: sessionmaker[Session], studies: dict[str, str]) -> None:
    assert _uids(factory) == set(studies.values())
    assert _uids(factory, patient_id="PAT-1") == {studies["chest"]}
    assert _uids(factory, patient_id="PAT-*") == {studies["chest"], studies["chest2"]}
    assert _uids(factory, patient_id="PAT") == set()  # exact unless it ends in *
    assert _uids(factory, patient_id="%*") == set()  # LIKE wildcards are literal
    assert _uids(factory, accession_number="ACC-200") == {studies["chest2"]}
    assert _uids(factory, study_uid=studies["eye"]) == {studies["eye"]}
    assert _uids(factory, date_from="20240101") == {studies["chest"], studies["chest2"]}
    assert _uids(factory, date_from="20240101", date_to="20240201") == {studies["chest"]}
    assert _uids(factory, modality="op") == {studies["eye"]}
    assert _uids(factory, modality="DX", patient_id="PAT-2") == {studies["chest2"]}
    with factory() as session:
        total, page = archive.search_studies(session, StudyFilter(), limit=2)
        assert total == 3 and len(page) == 2
        two = archive.get_study(session, studies["chest2"])
        assert two.instances == 2 and two.size > 0 and two.modalities == ["DX"]
        with pytest.raises(StudyNotFound):
            archive.get_study(session, generate_uid())
        with pytest.raises(ValueError, match="unknown state"):
            archive.search_studies(session, StudyFilter(state="bogus"))


def test_states(factory: sessionmaker[Session], studies: dict[str, str]) -> None:
    assert _uids(factory, state="reviewed") == {studies["chest"]}
    assert _uids(factory, state="reported") == set()
    assert _uids(factory, state="stored") == {studies["chest2"], studies["eye"]}
    with transaction(factory) as session:
        eye = session.scalars(select(Study).where(Study.study_instance_uid == studies["eye"])).one()
        enqueue(session, kind="process_study", payload={}, study_id=eye.id)
        two = session.scalars(select(Study).where(Study.study_instance_uid == studies["chest2"])).one()
        job = enqueue(session, kind="process_study", payload={}, study_id=two.id)
        job.status = "failed"
    assert _uids(factory, state="queued") == {studies["eye"]}
    assert _uids(factory, state="failed") == {studies["chest2"]}
    assert _uids(factory, state="stored") == set()


def _count(session: Session, table: Any, study_id: int) -> int:
    return session.scalar(select(func.count()).select_from(table).where(table.study_id == study_id)) or 0


def test_delete_removes_rows_files_and_is_audited(
    factory: sessionmaker[Session], storage: Storage, studies: dict[str, str]
) -> None:
    uid = studies["chest"]
    folders = [storage.root / folder / uid for folder in archive.STUDY_FOLDERS]
    assert all(folder.is_dir() for folder in folders)
    with factory() as session:
        study_id = session.scalars(select(Study.id).where(Study.study_instance_uid == uid)).one()
    with pytest.raises(DBAPIError, match="append-only"), transaction(factory) as session:
        session.execute(delete(Review).where(Review.study_id == study_id))  # reviews stay append-only
    deleted = archive.delete_study(factory, storage, uid, actor="user:admin1", client="127.0.0.1")
    assert (deleted.instances, deleted.reports, deleted.files_removed) == (1, 1, True)
    assert not any(folder.exists() for folder in folders)
    assert list(storage.tmp_dir.iterdir()) == []
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(Study).where(Study.id == study_id)) == 0
        for table in (Series, Report, Prediction, Job, Review):
            assert _count(session, table, study_id) == 0, table
        assert session.scalar(select(func.count()).select_from(Instance)) == 3  # the other studies'
        assert session.scalar(select(func.count()).select_from(Delivery)) == 0
        event = session.scalars(select(AuditEvent).where(AuditEvent.action == "study.delete")).one()
        assert (event.actor, event.study_instance_uid, event.client) == ("user:admin1", uid, "127.0.0.1")
        assert event.detail["instances"] == 1 and event.detail["reason"] == "admin"
    assert _uids(factory) == {studies["chest2"], studies["eye"]}
    for other in (studies["chest2"], studies["eye"]):
        assert (storage.root / "instances" / other).is_dir()
    with pytest.raises(StudyNotFound):
        archive.delete_study(factory, storage, uid, actor="user:admin1")


def test_a_running_job_keeps_the_study(
    factory: sessionmaker[Session], storage: Storage, studies: dict[str, str]
) -> None:
    uid = studies["chest2"]
    with transaction(factory) as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
        job = enqueue(session, kind="process_study", payload={}, study_id=study.id)
        job.status = "running"
    with pytest.raises(StudyBusy, match="being processed"):
        archive.delete_study(factory, storage, uid, actor="user:a")
    assert uid in _uids(factory) and (storage.root / "instances" / uid).is_dir()
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(AuditEvent)) == 0


def test_files_come_back_when_the_transaction_fails(
    factory: sessionmaker[Session], storage: Storage, studies: dict[str, str]
) -> None:
    uid = studies["chest"]
    before = sorted(p.relative_to(storage.root) for p in storage.root.rglob("*") if p.is_file())

    def refuse(session: Session) -> None:
        raise RuntimeError("commit refused")

    event.listen(factory, "before_commit", refuse)  # the files were moved aside by then
    try:
        with pytest.raises(RuntimeError, match="commit refused"):
            archive.delete_study(factory, storage, uid, actor="user:a")
    finally:
        event.remove(factory, "before_commit", refuse)
    assert list(storage.tmp_dir.iterdir()) == []
    after = sorted(p.relative_to(storage.root) for p in storage.root.rglob("*") if p.is_file())
    assert after == before
    assert uid in _uids(factory)


def test_zip_holds_every_dicom_file(
    factory: sessionmaker[Session], storage: Storage, studies: dict[str, str]
) -> None:
    with factory() as session:
        study = archive.get_study(session, studies["chest"]).study
        files = archive.study_files(session, storage, study)
    data = b"".join(archive.zip_stream(files, chunk_size=4096))
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert z.testzip() is None
        names = z.namelist()
        assert len(names) == 2 and names[1].startswith(f"{studies['chest']}/reports/")
        ds = pydicom.dcmread(io.BytesIO(z.read(names[0])))
        assert ds.StudyInstanceUID == studies["chest"] and ds.PatientID == "PAT-1"
        assert z.read(names[1]) == b"SR bytes"
        assert z.read(names[0]) == files[0][1].read_bytes()


def test_retention_deletes_only_old_idle_studies(
    factory: sessionmaker[Session], storage: Storage, studies: dict[str, str]
) -> None:
    old = utcnow() - timedelta(days=40)
    with transaction(factory) as session:
        session.execute(
            update(Study)
            .where(Study.study_instance_uid.in_([studies["chest"], studies["eye"]]))
            .values(last_received_at=old)
        )
        eye = session.scalars(select(Study).where(Study.study_instance_uid == studies["eye"])).one()
        job = enqueue(session, kind="process_study", payload={}, study_id=eye.id)
        job.status = "running"
    deleted = archive.purge_expired(factory, storage, 30)
    assert [d.study_uid for d in deleted] == [studies["chest"]]
    assert _uids(factory) == {studies["chest2"], studies["eye"]}
    assert archive.purge_expired(factory, storage, 50) == []
    with factory() as session:
        event = session.scalars(select(AuditEvent).where(AuditEvent.action == "study.delete")).one()
        assert event.actor == "retention" and event.detail["reason"] == "retention 30 days"


def test_patient_ids_of_earlier_studies_are_read_from_their_files(
    factory: sessionmaker[Session], storage: Storage, studies: dict[str, str]
) -> None:
    with transaction(factory) as session:
        session.execute(update(Study).values(patient_id=None))
    (storage.root / "instances" / studies["eye"]).rename(storage.tmp_dir / "gone")  # unreadable: ""
    assert archive.index_patient_ids(factory, storage, batch=2) == 3
    assert _uids(factory, patient_id="PAT-2") == {studies["chest2"]}
    with factory() as session:
        assert archive.get_study(session, studies["eye"]).study.patient_id == ""
    assert archive.index_patient_ids(factory, storage) == 0


def test_trash_left_by_a_crash_is_removed(storage: Storage) -> None:
    (storage.tmp_dir / "deleted-abc" / "instances").mkdir(parents=True)
    (storage.tmp_dir / "deleted-abc" / "instances" / "x.dcm").write_bytes(b"x")
    assert archive.remove_trash(storage) == 1
    assert not (storage.tmp_dir / "deleted-abc").exists()
