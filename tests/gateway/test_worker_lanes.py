"""Each worker process runs its studies on its main loop and its deliveries on a lane beside it
(GATEWAY_WORKER__DELIVERY_LANES): a report goes out while the next study is worked on, and a PACS that
hangs holds up no study. Lanes keep no heartbeat row, and short jobs cost no heartbeat write each."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core import jobs
from core.db import transaction
from core.jobs import COMPUTE_KINDS, DELIVER, LIGHT_KINDS, PROCESS_STUDY, ClaimedJob
from core.settings import Settings, WorkerSettings
from core.storage import Storage
from core.tables import WorkerHeartbeat
from gateway import worker as worker_module
from gateway.runtime import Runtime
from gateway.worker import Worker
from tests.inference.tiny_models import make_tiny_bundles
from tests.peers import free_port, wait_for
from tests.pipeline import Gateway, StallingPacs, gateway_env, make_chest_study, send_study


def _runtime(factory: sessionmaker[Session], tmp_path: Path, heartbeat_seconds: float = 5.0) -> Runtime:
    settings = Settings(
        data_dir=tmp_path / "var",
        worker=WorkerSettings(
            poll_seconds=0.02,
            heartbeat_seconds=heartbeat_seconds,
            heartbeat_timeout_seconds=heartbeat_seconds * 3,
            ingest_first_mb_per_s=0,
        ),
    )
    storage = Storage(settings.storage_dir)
    storage.prepare()
    return Runtime(settings, factory.kw["bind"], factory, storage)


@contextmanager
def running(*workers: Worker) -> Iterator[None]:
    threads = [threading.Thread(target=w.run_forever, daemon=True) for w in workers]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        for w in workers:
            w.stop.set()
        for t in threads:
            t.join(10)


def _enqueue(factory: sessionmaker[Session], kind: str, **payload: object) -> int:
    with transaction(factory) as session:
        return jobs.enqueue(session, kind=kind, payload=dict(payload)).id


def test_the_lane_delivers_while_the_main_loop_is_busy_and_neither_takes_the_others_jobs(
    factory: sessionmaker[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = _runtime(factory, tmp_path)
    ran: dict[int, str] = {}  # job id -> the worker that ran it
    release = threading.Event()

    def study(_rt: Runtime, job: ClaimedJob) -> None:
        ran[job.id] = threading.current_thread().name
        release.wait(30)

    def deliver(_rt: Runtime, job: ClaimedJob) -> None:
        ran[job.id] = threading.current_thread().name

    monkeypatch.setitem(worker_module.HANDLERS, PROCESS_STUDY, study)
    monkeypatch.setitem(worker_module.HANDLERS, DELIVER, deliver)
    main = Worker(rt, name="main", kinds=COMPUTE_KINDS)
    lane = Worker(rt, name="lane", kinds=LIGHT_KINDS, heartbeat=False)
    threads: dict[str, str] = {}

    def named(w: Worker) -> threading.Thread:
        t = threading.Thread(target=w.run_forever, name=f"thread-{w.id}", daemon=True)
        threads[w.id] = t.name
        return t

    blocked = _enqueue(factory, PROCESS_STUDY)
    started = [named(main), named(lane)]
    for t in started:
        t.start()
    try:
        wait_for("the study to start", lambda: blocked in ran, 10)
        deliveries = [_enqueue(factory, DELIVER, n=n) for n in range(3)]
        wait_for("the deliveries", lambda: all(d in ran for d in deliveries), 10)
        assert not release.is_set()  # delivered while the study was still being worked on
        assert {ran[d] for d in deliveries} == {threads["lane"]}
        assert ran[blocked] == threads["main"]
        with Session(factory.kw["bind"]) as session:
            rows = {h.worker_id for h in session.scalars(select(WorkerHeartbeat))}
        assert rows == {"main"}  # the lane keeps no row of its own
        release.set()
        lane.stop.set()
        started[1].join(10)
        late = _enqueue(factory, DELIVER, n="late")
        time.sleep(1.0)  # the main loop polls every 20 ms: it had 50 chances
        assert late not in ran
    finally:
        release.set()
        main.stop.set()
        lane.stop.set()
        for t in started:
            t.join(10)


def test_short_jobs_cost_no_heartbeat_write_each(
    factory: sessionmaker[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = _runtime(factory, tmp_path, heartbeat_seconds=30.0)
    done: list[int] = []
    monkeypatch.setitem(worker_module.HANDLERS, DELIVER, lambda _rt, job: done.append(job.id))
    for n in range(20):
        _enqueue(factory, DELIVER, n=n)
    w = Worker(rt, name="quick")

    def beat() -> tuple[object, object]:
        with Session(factory.kw["bind"]) as session:
            row = session.get(WorkerHeartbeat, "quick")
            assert row is not None
            return row.beat_at, row.current_job_id

    with running(w):
        wait_for("the first beat", lambda: _has_row(factory, "quick"), 10)
        first = beat()
        wait_for("20 jobs", lambda: len(done) == 20, 20)
        time.sleep(1.5)  # past JOB_SHOWN_AFTER: a change that lasted would be written by now
        assert beat() == first
        assert worker_module.JOB_SHOWN_AFTER < 1.5


def _has_row(factory: sessionmaker[Session], worker_id: str) -> bool:
    with Session(factory.kw["bind"]) as session:
        return session.get(WorkerHeartbeat, worker_id) is not None


@pytest.mark.e2e
def test_a_hanging_pacs_holds_up_no_study(tmp_path: Path) -> None:
    """`gateway serve` with one worker process: while the PACS holds the first study's SR unanswered, the
    second study is still processed and its report written."""
    pacs_port = free_port()
    env = gateway_env(
        tmp_path,
        pacs_port,
        GATEWAY_INFERENCE__MODEL_DIRS=str(make_tiny_bundles(tmp_path / "models")),
        GATEWAY_ROUTING__CHEST_MODELS="pneumonia",
        GATEWAY_WORKER__PROCESSES="1",
        GATEWAY_COMPLETION__QUIET_SECONDS="0.5",
    )
    db = Path(env["GATEWAY_DATA_DIR"]) / "gateway.sqlite3"

    def reports(study_uid: str) -> int:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
            row = conn.execute(
                "SELECT count(*) FROM report JOIN study ON study.id = report.study_id "
                "WHERE study.study_instance_uid = ?",
                (study_uid,),
            ).fetchone()
        return int(row[0])

    with StallingPacs(pacs_port) as pacs, Gateway(env, tmp_path / "logs") as gateway:
        gateway.start()
        first = make_chest_study(tmp_path / "a", 1)
        assert send_study(gateway.dicom_port, first.paths)
        assert pacs.stalled.wait(60), gateway.log_tail()
        second = make_chest_study(tmp_path / "b", 1)
        assert send_study(gateway.dicom_port, second.paths)
        wait_for("the second study's report", lambda: reports(second.uid) == 1, 60)
        assert pacs.requests == 1  # the first SR is still held: the lane waits, the main loop went on
        ready = requests.get(gateway.http + "/readyz", timeout=10).json()
        assert len(ready["workers"]) == 1  # one row per worker process: its lane keeps none
        pacs.release()
