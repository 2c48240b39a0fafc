"""Accepted but hostile instances in the worker: one bad image never fails its study, nothing a job raises
ends the worker, data errors fail once (never retried as if transient), and what the API shows of a job's
error carries no dataset bytes."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import uvicorn
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, select, update
from sqlalchemy.orm import Session, sessionmaker

from api.main import create_app
from core import jobs
from core.db import transaction
from core.ingest import InstanceMeta, read_instance, store_instance, validate_instance
from core.jobs import ClaimedJob
from core.settings import Settings, WorkerSettings
from core.tables import Instance, Job, Prediction, Report, Study, utcnow
from gateway import worker as worker_module
from gateway.runtime import Runtime
from gateway.sources import MAX_SEQUENCE_DEPTH, report_view
from gateway.worker import Worker
from tests import factories as f
from tests import hostile as h
from tests.accounts import issue_token
from tests.peers import SHARED_DICOM, free_port, wait_for
from tests.tiny_runtime import tiny_runtime

pytestmark = [pytest.mark.slow]


@pytest.fixture
def rt(tmp_path: Path, bundles: Path) -> Iterator[Runtime]:
    with tiny_runtime(tmp_path, bundles, WorkerSettings(poll_seconds=0.05, retry_base_seconds=30)) as runtime:
        yield runtime


def _ingest(rt: Runtime, path: Path, *, validate: bool = True) -> int:
    """Store a file as C-STORE/STOW would (``validate``), or as if stored before validation existed."""
    ds = (
        read_instance(path, rt.settings.ingest)
        if validate
        else pydicom.dcmread(path, stop_before_pixels=True)
    )
    syntax = str(ds.file_meta.TransferSyntaxUID)
    meta = (
        validate_instance(ds, syntax, rt.settings.ingest)
        if validate
        else InstanceMeta.from_dataset(ds, syntax)
    )
    return store_instance(rt.storage, rt.factory, meta, path.read_bytes(), source="test").study_id


def _into_study(source: Path, study_uid: str, out: Path) -> Path:
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(out, enforce_file_format=True)
    return out


def _predictions(rt: Runtime, study_id: int) -> list[tuple[str, Prediction]]:
    with rt.factory() as session:
        rows = session.execute(
            select(Instance.sop_instance_uid, Prediction)
            .join(Instance, Prediction.instance_id == Instance.id)
            .where(Prediction.study_id == study_id)
        ).all()
    return [(uid, p) for uid, p in rows]


def _process(rt: Runtime, study_id: int) -> Job:
    """Release the study and let one worker run until its process_study job has finished."""
    with transaction(rt.factory) as session:
        session.execute(update(Study).where(Study.id == study_id).values(released_at=utcnow()))
    worker = Worker(rt, name="w")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        worker.run_once()
        with rt.factory() as session:
            job = session.scalars(
                select(Job).where(Job.study_id == study_id, Job.kind == "process_study")
            ).first()
        if job is not None and job.status in ("done", "failed"):
            return job
    raise AssertionError("the study was never processed")


def test_panicking_rle_instance_is_not_assessable_and_the_rest_reported(rt: Runtime, tmp_path: Path) -> None:
    study_uid = str(pydicom.dcmread(h.RLE_PANIC, stop_before_pixels=True).StudyInstanceUID)
    good = _into_study(SHARED_DICOM / "dx_chest_small.dcm", study_uid, tmp_path / "good.dcm")
    study_id = _ingest(rt, h.RLE_PANIC)  # accepted: nothing short of decoding it shows the damage
    assert _ingest(rt, good) == study_id
    job = _process(rt, study_id)
    assert (job.status, job.attempts, job.last_error) == ("done", 1, None)
    bad_uid = str(pydicom.dcmread(h.RLE_PANIC, stop_before_pixels=True).SOPInstanceUID)
    good_uid = str(pydicom.dcmread(good, stop_before_pixels=True).SOPInstanceUID)
    predictions = _predictions(rt, study_id)
    with rt.factory() as session:
        reports = list(session.scalars(select(Report).where(Report.study_id == study_id)))
    assert {r.model_name for r in reports} == {"pneumonia", "covid19"}
    bad = [p for uid, p in predictions if uid == bad_uid]
    assert len(bad) == 2 and all(not p.assessable and "PanicException" in (p.reason or "") for p in bad)
    assessed = [p for uid, p in predictions if uid == good_uid]
    assert {p.model_name for p in assessed} == {"pneumonia", "covid19"}
    assert all(p.assessable and p.finding is not None for p in assessed)
    for report in reports:
        sr = pydicom.dcmread(rt.storage.absolute(report.path))
        evidence = {
            str(r.ReferencedSOPInstanceUID)
            for item in sr.CurrentRequestedProcedureEvidenceSequence
            for s in item.ReferencedSeriesSequence
            for r in s.ReferencedSOPSequence
        }
        assert evidence == {bad_uid, good_uid}  # the panicking image is listed, as not assessable


def test_nest300_stored_before_validation_is_left_out_and_the_rest_reported(
    rt: Runtime, tmp_path: Path
) -> None:
    study_uid = str(pydicom.dcmread(h.NEST_300, stop_before_pixels=True).StudyInstanceUID)
    good = _into_study(SHARED_DICOM / "dx_chest_small.dcm", study_uid, tmp_path / "good.dcm")
    study_id = _ingest(rt, h.NEST_300, validate=False)
    _ingest(rt, good)
    job = _process(rt, study_id)
    assert (job.status, job.attempts) == ("done", 1)
    nested_uid = str(pydicom.dcmread(h.NEST_300, stop_before_pixels=True).SOPInstanceUID)
    predictions = _predictions(rt, study_id)
    with rt.factory() as session:
        reports = list(session.scalars(select(Report).where(Report.study_id == study_id)))
    assert len(reports) == 2
    left_out = [p for uid, p in predictions if uid == nested_uid]
    assert len(left_out) == 2
    assert all(not p.assessable and "nested deeper than 32" in (p.reason or "") for p in left_out)
    assert all(p.assessable for uid, p in predictions if uid != nested_uid)


def test_report_view_keeps_two_sequence_levels_and_no_large_values(tmp_path: Path) -> None:
    ds = f.chest_radiograph()
    body = h.splice(ds, h.PROCEDURE_CODE_SEQUENCE, h.nested_sequence(20, undefined_length=False))
    path = h.write(tmp_path / "nested.dcm", ds, body)
    view = report_view(pydicom.dcmread(path))
    depth, items = 0, view.ProcedureCodeSequence
    while items:
        depth += 1
        items = items[0].get("ProcedureCodeSequence")
    assert depth == MAX_SEQUENCE_DEPTH
    assert "PixelData" not in view and view.PatientID == ds.PatientID and view.Rows == 256
    bare = pydicom.Dataset()
    bare.SOPInstanceUID = generate_uid()
    assert report_view(bare).PatientName == "" and report_view(bare).StudyDate == ""


# --- the worker loop -------------------------------------------------------------------------------------


def _enqueue(rt: Runtime, kind: str, study_id: int | None = None) -> int:
    with transaction(rt.factory) as session:
        return jobs.enqueue(session, kind=kind, payload={}, study_id=study_id).id


def _job(rt: Runtime, job_id: int) -> Job:
    with rt.factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def test_worker_thread_survives_a_codec_panic_in_a_handler(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    done: list[int] = []

    def decode_unguarded(_rt: Runtime, _job: ClaimedJob) -> None:
        _ = pydicom.dcmread(h.RLE_PANIC).pixel_array  # the real codec, the real panic

    monkeypatch.setitem(worker_module.HANDLERS, "test_panic", decode_unguarded)
    monkeypatch.setitem(worker_module.HANDLERS, "test_after", lambda _rt, job: done.append(job.id))
    panic_id, after_id = _enqueue(rt, "test_panic"), _enqueue(rt, "test_after")
    worker = Worker(rt, name="survivor")
    thread = threading.Thread(target=worker.run_forever, daemon=True)
    thread.start()
    try:
        wait_for("the job after the panic", lambda: done == [after_id], timeout=60)
        assert thread.is_alive()
    finally:
        worker.stop.set()
        thread.join(10)
    panicked = _job(rt, panic_id)
    assert (panicked.status, panicked.attempts) == ("failed", 1)
    assert (panicked.last_error or "").startswith("PanicException: index out of bounds")


def test_data_errors_fail_once_and_transient_errors_are_retried(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"\0" * 128 + b"DIC")  # a stored file cut short

    def parse_stored(_rt: Runtime, _job: ClaimedJob) -> None:
        pydicom.dcmread(garbage)

    def database_down(_rt: Runtime, _job: ClaimedJob) -> None:
        with create_engine(f"sqlite:///{tmp_path / 'missing' / 'db.sqlite3'}").connect():
            pass

    monkeypatch.setitem(worker_module.HANDLERS, "test_data", parse_stored)
    monkeypatch.setitem(worker_module.HANDLERS, "test_database", database_down)
    data_id, db_id = _enqueue(rt, "test_data"), _enqueue(rt, "test_database")
    worker = Worker(rt, name="w")
    assert worker.run_once() and worker.run_once()
    data, db = _job(rt, data_id), _job(rt, db_id)
    assert (data.status, data.attempts) == ("failed", 1) and "InvalidDicomError" in (data.last_error or "")
    assert (db.status, db.attempts) == ("pending", 1) and "OperationalError" in (db.last_error or "")
    assert db.next_attempt_at is not None and db.next_attempt_at > utcnow()


def _serve_api(
    factory: sessionmaker[Session], settings: Settings
) -> tuple[uvicorn.Server, threading.Thread, int]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(factory, settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for("the API", lambda: server.started, timeout=30)
    return server, thread, port


def test_job_errors_shown_by_the_api_carry_no_dataset_bytes(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ds = f.chest_radiograph()
    odd = b"\x18\x00\x64\x11US\x03\x00MZ\x90"  # Detector Temperature... as 3 bytes of US: cannot be a number
    path = h.write(tmp_path / "odd.dcm", ds, h.splice(ds, 0x00181164, odd))
    study_id = _ingest(rt, SHARED_DICOM / "dx_chest_small.dcm")

    def read_element(_rt: Runtime, _job: ClaimedJob) -> None:
        _ = pydicom.dcmread(path)[0x00181164].value  # BytesLengthException quoting the raw bytes

    monkeypatch.setitem(worker_module.HANDLERS, "test_bytes", read_element)
    job_id = _enqueue(rt, "test_bytes", study_id)
    assert Worker(rt, name="w").run_once()
    stored = _job(rt, job_id)
    assert (stored.status, stored.attempts) == ("failed", 1)
    assert "BytesLengthException" in (stored.last_error or "")
    assert "MZ" not in (stored.last_error or "") and "\\x" not in (stored.last_error or "")
    server, thread, port = _serve_api(rt.factory, rt.settings)
    try:
        with rt.factory() as session:
            uid = session.get(Study, study_id).study_instance_uid  # type: ignore[union-attr]
        url = f"http://127.0.0.1:{port}/api/studies/{uid}"
        headers = {"Authorization": f"Bearer {issue_token(rt.settings.sqlalchemy_url)}"}
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as rsp:
            study: dict[str, Any] = json.loads(rsp.read())
    finally:
        server.should_exit = True
        thread.join(10)
    [shown] = [j for j in study["jobs"] if j["id"] == job_id]
    assert shown["status"] == "failed" and shown["last_error"].startswith("BytesLengthException:")
    assert "<bytes>" in shown["last_error"]
    assert all(c.isprintable() for c in shown["last_error"]) and "Traceback" not in shown["last_error"]
    assert "MZ" not in shown["last_error"] and "\\x" not in shown["last_error"]
