"""Delivery faults with a real worker, real databases and real peers.

A PACS that was down a long time gets its backlog soon after it returns: while it fails, one delivery probes
it every PROBE_SECONDS (without using up its attempts) and the others back off; the first delivery that gets
through brings the others forward. And a report the PACS stored just before the database went away is
recorded as sent once the database is back, not sent a second time.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, AllStoragePresentationContexts, evt
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from core import jobs
from core.db import make_engine, make_sessionmaker, transaction
from core.jobs import DELIVER
from core.migrate import upgrade
from core.settings import Settings
from core.storage import Storage
from core.tables import Delivery, Job, Report, Study, utcnow
from gateway.delivery import PROBE_SECONDS
from gateway.runtime import Runtime
from gateway.worker import Worker
from tests import factories as f
from tests.peers import create_database, free_port, postgres_server, storescp
from tests.pipeline import postgres_down

#: Deliveries made this many attempts already: their next backoff (about 2 ** 8 s) is far beyond a probe.
EARLIER_ATTEMPTS = 8


def _runtime(factory: sessionmaker[Session], tmp_path: Path, port: int) -> Runtime:
    settings = Settings.model_validate(
        {
            "data_dir": tmp_path / "var",
            "destinations": json.dumps(
                [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port}]
            ),
            "dicom": {"network_timeout": 5},
        }
    )
    storage = Storage(settings.storage_dir)
    storage.prepare()
    return Runtime(settings, factory.kw["bind"], factory, storage)


def _backlog(
    factory: sessionmaker[Session], storage: Storage, n: int, *, attempts: int = EARLIER_ATTEMPTS
) -> None:
    """A study with ``n`` reports (any DICOM file will do for the PACS), each with a pending delivery that
    has failed ``attempts`` times and is due now."""
    with transaction(factory) as session:
        study = Study(study_instance_uid=pydicom.uid.generate_uid())
        session.add(study)
        session.flush()
        for i in range(n):
            ds = f.chest_radiograph(study_uid=study.study_instance_uid)
            relative = storage.report_path(study.study_instance_uid, str(ds.SOPInstanceUID))
            f.save(ds, storage.absolute(relative))
            report = Report(
                study_id=study.id,
                model_name=f"m{i}",
                model_version="1",
                sop_instance_uid=str(ds.SOPInstanceUID),
                series_instance_uid=str(ds.SeriesInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                input_hash="x",
                path=relative,
            )
            session.add(report)
            session.flush()
            delivery = Delivery(report_id=report.id, destination="pacs", next_attempt_at=utcnow())
            session.add(delivery)
            session.flush()
            job = jobs.enqueue(session, kind=DELIVER, payload={"delivery_id": delivery.id}, max_attempts=30)
            job.attempts = attempts


def _drain(worker: Worker) -> int:
    runs = 0
    while worker.run_once():
        runs += 1
    return runs


def test_backlog_is_probed_while_down_and_delivered_at_once_when_back(
    factory: sessionmaker[Session], tmp_path: Path
) -> None:
    port = free_port()
    rt = _runtime(factory, tmp_path, port)
    _backlog(factory, rt.storage, 4)
    worker = Worker(rt, name="w")

    assert _drain(worker) == 4  # the PACS is down: every delivery fails once
    now = utcnow()
    with factory() as session:
        rows = {j.payload["delivery_id"]: j for j in session.scalars(select(Job).where(Job.kind == DELIVER))}
        deliveries = list(session.scalars(select(Delivery)))
    due = {d.id: d.next_attempt_at or now for d in deliveries}
    probe = [d for d in deliveries if due[d.id] <= now + timedelta(seconds=PROBE_SECONDS + 1)]
    assert len(probe) == 1, due  # one probes, the others back off
    assert all(d.status == "pending" and d.attempts >= EARLIER_ATTEMPTS for d in deliveries)
    assert rows[probe[0].id].attempts == EARLIER_ATTEMPTS  # the probe cost no attempt
    assert {rows[d.id].attempts for d in deliveries if d is not probe[0]} == {EARLIER_ATTEMPTS + 1}
    waiting = [d for d in deliveries if d is not probe[0]]
    assert all(due[d.id] > now + timedelta(seconds=100) for d in waiting)

    with storescp(tmp_path / "pacs", port):
        with transaction(factory) as session:  # as if PROBE_SECONDS had passed
            session.execute(
                update(Job).where(Job.id == rows[probe[0].id].id).values(next_attempt_at=utcnow())
            )
        assert _drain(worker) == 4  # the probe gets through and brings the other three forward
    with factory() as session:
        assert {d.status for d in session.scalars(select(Delivery))} == {"sent"}
    assert len(list((tmp_path / "pacs").iterdir())) == 4


@pytest.mark.postgres
def test_report_stored_just_before_the_database_went_away_is_not_sent_twice(
    pg_admin_url: str, tmp_path: Path
) -> None:
    """The PACS stops PostgreSQL while it holds the C-STORE, then answers success: the worker cannot record
    the delivery until PostgreSQL is back (3 s later), and must then record it, not send it again."""
    del pg_admin_url  # this test restarts a server of its own
    base = Path("/tmp") / f"gw-pg-delivery-{os.getpid()}"  # the postgres user must reach it
    shutil.rmtree(base, ignore_errors=True)
    received: list[str] = []
    stopped, restarted = threading.Event(), threading.Event()

    try:
        with postgres_server(base) as admin_url:
            url = create_database(admin_url)
            engine = make_engine(url)
            upgrade(engine)
            factory = make_sessionmaker(engine)

            def outage() -> None:
                with postgres_down(base, admin_url):
                    stopped.set()
                    time.sleep(3)
                restarted.set()

            def handle_store(event: evt.Event) -> int:
                received.append(str(event.dataset.SOPInstanceUID))
                if len(received) == 1:  # stored; the database goes away before the answer reaches the gateway
                    threading.Thread(target=outage).start()
                    stopped.wait(60)
                return 0x0000

            port = free_port()
            ae = AE(ae_title="PACS")
            ae.supported_contexts = AllStoragePresentationContexts
            server = ae.start_server(
                ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle_store)]
            )
            assert server is not None
            try:
                rt = _runtime(factory, tmp_path, port)
                _backlog(factory, rt.storage, 1, attempts=0)
                worker = Worker(rt, name="w")
                assert worker.run_once()
                assert restarted.wait(30)
                while worker.run_once():
                    pass
                with factory() as session:
                    delivery = session.scalars(select(Delivery)).one()
                    job = session.scalars(select(Job)).one()
                assert (delivery.status, job.status, delivery.attempts) == ("sent", "done", 1)
                assert len(received) == 1, received
            finally:
                server.shutdown()
                engine.dispose()
    finally:
        shutil.rmtree(base, ignore_errors=True)
