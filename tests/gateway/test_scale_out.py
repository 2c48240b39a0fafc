"""Scale-out on PostgreSQL: 3 `gateway worker` processes share the job table over 200 studies; one of them is
killed mid-run. Every study gets exactly one SR, and no job is claimed by two live workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select, update

from core.db import make_engine, make_sessionmaker, transaction
from core.ingest import InstanceMeta, store_instance
from core.jobs import PROCESS_STUDY, RENDER_STUDY
from core.storage import Storage
from core.tables import Instance, Job, Report, Series, Study, utcnow
from tests.inference.tiny_models import make_tiny_bundles
from tests.peers import REPO, SHARED_DICOM, create_database, stop

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

STUDIES = 200


def test_three_workers_200_studies_one_report_each(pg_admin_url: str, tmp_path: Path) -> None:
    url = create_database(pg_admin_url)
    env = {
        **os.environ,
        "GATEWAY_DATABASE_URL": url,
        "GATEWAY_DATA_DIR": str(tmp_path / "var"),
        "GATEWAY_INFERENCE__MODEL_DIRS": str(make_tiny_bundles(tmp_path / "models")),
        "GATEWAY_ROUTING__CHEST_MODELS": "pneumonia",
        "GATEWAY_COMPLETION__QUIET_SECONDS": "0",
        "GATEWAY_WORKER__LEASE_SECONDS": "5",
        "GATEWAY_LOG_LEVEL": "WARNING",
    }
    subprocess.run(
        [sys.executable, "-m", "gateway", "db", "upgrade"], env=env, check=True, cwd=REPO, capture_output=True
    )
    engine = make_engine(url)
    factory = make_sessionmaker(engine)
    storage = Storage(tmp_path / "var" / "storage")
    storage.prepare()
    source = pydicom.dcmread(SHARED_DICOM / "dx_chest_small.dcm")
    for _ in range(STUDIES):
        source.StudyInstanceUID, source.SeriesInstanceUID = generate_uid(), generate_uid()
        source.SOPInstanceUID = source.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = tmp_path / "in.dcm"
        source.save_as(path, enforce_file_format=True)
        meta = InstanceMeta.from_dataset(source, str(source.file_meta.TransferSyntaxUID))
        store_instance(storage, factory, meta, path.read_bytes(), source="test")
    with transaction(factory) as session:  # as if every association had just been released
        session.execute(update(Study).values(released_at=utcnow()))

    logs = [open(tmp_path / f"worker{i}.log", "wb") for i in range(3)]  # noqa: SIM115 - closed below
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "gateway", "worker"],
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        for log in logs
    ]

    def reports() -> int:
        with factory() as session:
            return int(session.scalar(select(func.count(Report.id))) or 0)

    try:
        deadline = time.monotonic() + 120
        while reports() < STUDIES // 4 and time.monotonic() < deadline:
            time.sleep(0.2)
        workers[0].send_signal(signal.SIGKILL)  # dies holding a claimed job (its lease expires in 5 s)
        deadline = time.monotonic() + 400
        while reports() < STUDIES and time.monotonic() < deadline:
            assert all(w.poll() is None for w in workers[1:]), "a surviving worker exited"
            time.sleep(0.5)
        time.sleep(6)  # past the dead worker's lease: anything it held has been redone by now
    finally:
        for w in workers:
            stop(w)
        for log in logs:
            log.close()

    with factory() as session:
        per_study = session.execute(
            select(Report.study_id, func.count(Report.id)).group_by(Report.study_id)
        ).all()
        jobs = list(session.scalars(select(Job)))
    assert len(per_study) == STUDIES, (tmp_path / "worker1.log").read_text()[-2000:]
    assert {n for _, n in per_study} == {1}
    processed = [j for j in jobs if j.kind == PROCESS_STUDY]
    assert len(processed) == STUDIES and {j.status for j in processed} == {"done"}  # one per study, all done
    assert len({j.study_id for j in processed}) == STUDIES
    # and what each case page shows was drawn within its study's job, none left to a job of its own
    assert [j for j in jobs if j.kind == RENDER_STUDY] == []
    with factory() as session:
        drawn = [
            storage.absolute(storage.rendition_path(study_uid, sop_uid, ".json")).is_file()
            for study_uid, sop_uid in session.execute(
                select(Study.study_instance_uid, Instance.sop_instance_uid)
                .join(Series, Series.study_id == Study.id)
                .join(Instance, Instance.series_id == Series.id)
            )
        ]
    assert len(drawn) == STUDIES and all(drawn)
    engine.dispose()
