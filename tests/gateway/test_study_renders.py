"""What a case page shows is drawn within the study's job, from the images decoded for the models: the same
files a ``render_study`` job draws from scratch, no job of its own; when drawing fails, the study's result
stands and a ``render_study`` job draws it later."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from core.db import transaction
from core.ingest import read_instance, store_instance, validate_instance
from core.jobs import PROCESS_STUDY, RENDER_STUDY
from core.settings import WorkerSettings
from core.tables import Job, Report, Study, utcnow
from gateway.review import render_study_images
from gateway.runtime import Runtime
from gateway.worker import Worker
from tests.peers import SHARED_DICOM
from tests.tiny_runtime import tiny_runtime

pytestmark = [pytest.mark.slow]


@pytest.fixture
def rt(tmp_path: Path, bundles: Path) -> Iterator[Runtime]:
    with tiny_runtime(
        tmp_path, bundles, WorkerSettings(poll_seconds=0.05, retry_base_seconds=0.1, ingest_first_mb_per_s=0)
    ) as runtime:
        yield runtime


def _chest_study(rt: Runtime, tmp_path: Path, images: int = 2) -> tuple[str, list[str]]:
    study_uid, sops = generate_uid(), []
    for number in range(images):
        ds = pydicom.dcmread(SHARED_DICOM / "dx_chest_small.dcm")
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = number + 1
        path = tmp_path / f"in{number}.dcm"
        ds.save_as(path, enforce_file_format=True)
        meta = validate_instance(
            read_instance(path, rt.settings.ingest), str(ds.file_meta.TransferSyntaxUID), rt.settings.ingest
        )
        store_instance(rt.storage, rt.factory, meta, path.read_bytes(), source="test")
        sops.append(str(ds.SOPInstanceUID))
    with transaction(rt.factory) as session:
        session.execute(update(Study).values(released_at=utcnow()))
    return study_uid, sops


def _jobs(rt: Runtime, kind: str) -> list[Job]:
    with rt.factory() as session:
        return list(session.scalars(select(Job).where(Job.kind == kind)))


def _run_until(rt: Runtime, done: object, timeout: float = 120) -> None:
    worker = Worker(rt, name="w")
    deadline = time.monotonic() + timeout
    while not done():  # type: ignore[operator]
        assert time.monotonic() < deadline, "the worker did not get there"
        if not worker.run_once():
            time.sleep(0.05)


def _drawn(rt: Runtime, study_uid: str) -> dict[str, bytes]:
    folder = rt.storage.absolute(f"renditions/{study_uid}")
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.is_dir() else {}


def _finished(rt: Runtime) -> bool:
    return bool(_jobs(rt, PROCESS_STUDY)) and all(j.status == "done" for j in _jobs(rt, PROCESS_STUDY))


def test_the_study_job_draws_the_case_page_as_a_render_job_would(rt: Runtime, tmp_path: Path) -> None:
    study_uid, sops = _chest_study(rt, tmp_path)
    _run_until(rt, lambda: _finished(rt))
    assert _jobs(rt, RENDER_STUDY) == []
    drawn = _drawn(rt, study_uid)
    with rt.factory() as session:
        versions = {r.model_name: r.model_version for r in session.scalars(select(Report))}
    assert set(versions) == {"pneumonia", "covid19"}
    for sop in sops:
        assert {f"{sop}.json", f"{sop}.png", f"{sop}.thumb.jpg"} <= set(drawn)
        for model, version in versions.items():
            assert f"{sop}.{model}-{version}.heatmap.png" in drawn
    # drawn from scratch (decoding the files, running the networks for the heatmaps): the same bytes
    shutil.rmtree(rt.storage.absolute(f"renditions/{study_uid}"))
    render_study_images(rt, study_uid)
    assert _drawn(rt, study_uid) == drawn


def test_when_drawing_fails_the_result_stands_and_a_render_job_draws_it_later(
    rt: Runtime, tmp_path: Path
) -> None:
    study_uid, sops = _chest_study(rt, tmp_path, images=1)
    blocker = rt.storage.absolute(f"renditions/{study_uid}")
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_bytes(b"")  # a file where the study's folder of renditions goes: every write fails
    _run_until(rt, lambda: _finished(rt))
    with rt.factory() as session:
        assert len(list(session.scalars(select(Report)))) == 2  # both reports written, the job done
    [render] = _jobs(rt, RENDER_STUDY)
    assert render.status == "pending" and render.payload == {"study_instance_uid": study_uid}
    blocker.unlink()
    _run_until(rt, lambda: all(j.status == "done" for j in _jobs(rt, RENDER_STUDY)))
    assert f"{sops[0]}.json" in _drawn(rt, study_uid)
