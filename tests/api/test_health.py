"""/readyz against the real app on a real port, over SQLite and PostgreSQL: 503 without a live worker, with a
due job waiting past the bound, without a database, with a read-only or full storage volume, or with the DICOM
listener stopped; 200 with the workers and the queue otherwise. The workers are real (their heartbeat rows
come from a running worker loop), the read-only volume a real file system and the listener a real one."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from api.main import create_app
from api.routes.health import ReadinessCheck
from core import jobs
from core.db import make_engine, make_sessionmaker, transaction
from core.heartbeat import record_heartbeat
from core.settings import DicomSettings, Settings, StorageSettings, WorkerSettings
from core.storage import Storage
from core.tables import Job, WorkerHeartbeat, utcnow
from gateway import worker as worker_module
from gateway.runtime import Runtime
from gateway.worker import Worker
from tests.mounts import tmpfs
from tests.peers import free_port, receiving_into, serving, wait_for

HELD = "test_health_held"


def _settings(tmp_path: Path, **worker: Any) -> Settings:
    options: dict[str, Any] = {
        "heartbeat_seconds": 0.2,
        "heartbeat_timeout_seconds": 1.0,
        "max_queue_wait_seconds": 30,
        "poll_seconds": 0.05,
        **worker,
    }
    return Settings(data_dir=tmp_path / "var", worker=WorkerSettings(**options))


@contextmanager
def _api(
    factory: sessionmaker[Session], settings: Settings, checks: dict[str, ReadinessCheck] | None = None
) -> Iterator[str]:
    """The HTTP API served by uvicorn on a free loopback port, in a thread of this process, its storage
    prepared as `gateway serve` prepares it."""
    Storage(settings.storage_dir).prepare()
    with serving(create_app(factory, settings, checks=checks)) as url:
        yield url


def _ready(url: str) -> tuple[int, dict[str, Any]]:
    rsp = requests.get(f"{url}/readyz", timeout=10)
    return rsp.status_code, rsp.json()


def _heartbeats(factory: sessionmaker[Session]) -> int:
    with factory() as session:
        return int(session.scalar(select(func.count()).select_from(WorkerHeartbeat)) or 0)


def test_ready_while_a_worker_runs_and_not_once_it_stopped(
    factory: sessionmaker[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(tmp_path)
    release = threading.Event()
    monkeypatch.setitem(worker_module.HANDLERS, HELD, lambda _rt, _job: release.wait(30) or None)
    storage = Storage(settings.storage_dir)
    storage.prepare()
    worker = Worker(Runtime(settings, factory.kw["bind"], factory, storage), name="health-worker")
    with _api(factory, settings) as url:
        code, body = _ready(url)
        assert code == 503 and body["status"] == "not ready" and body["workers_alive"] == 0
        assert body["reasons"] == ["no worker heartbeat in the last 1 s"]

        thread = threading.Thread(target=worker.run_forever, daemon=True)
        thread.start()
        try:
            code, body = wait_for("ready", lambda: (r := _ready(url))[0] == 200 and r)
            assert body["reasons"] == [] and body["database"] == "ok" and body["workers_alive"] == 1
            [seen] = body["workers"]
            assert seen["worker_id"] == "health-worker" and seen["current_job_id"] is None
            assert body["queue"] == {"pending": 0, "due": 0, "running": 0, "oldest_due_seconds": None}

            with transaction(factory) as session:
                job_id = jobs.enqueue(session, kind=HELD, payload={}).id
            body = wait_for(
                "the job in the worker's heartbeat",
                lambda: (
                    (r := _ready(url)[1])["workers"] and r["workers"][0]["current_job_id"] == job_id and r
                ),
            )
            assert body["queue"]["running"] == 1 and body["queue"]["due"] == 0
            release.set()
            wait_for(
                "the finished job out of the heartbeat",
                lambda: (r := _ready(url)[1])["workers"] and r["workers"][0]["current_job_id"] is None,
            )
        finally:
            release.set()
            worker.stop.set()
            thread.join(10)
        assert _heartbeats(factory) == 0  # a clean stop removes the row
        code, body = _ready(url)
        assert code == 503 and body["workers_alive"] == 0


def test_a_stale_heartbeat_is_a_dead_worker(factory: sessionmaker[Session], tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    record_heartbeat(factory, worker_id="gone", started_at=utcnow(), current_job_id=None)
    with _api(factory, settings) as url:
        assert _ready(url)[0] == 200
        with transaction(factory) as session:
            row = session.get(WorkerHeartbeat, "gone")
            assert row is not None
            row.beat_at = utcnow() - timedelta(seconds=1.5)  # past the 1 s timeout
        code, body = _ready(url)
        assert code == 503 and body["reasons"] == ["no worker heartbeat in the last 1 s"]


def test_a_due_job_waiting_past_the_bound_is_not_ready(
    factory: sessionmaker[Session], tmp_path: Path
) -> None:
    settings = _settings(tmp_path, max_queue_wait_seconds=60)
    now = utcnow()
    with transaction(factory) as session:
        # A retry scheduled for later is not due; a job whose worker's lease expired is.
        jobs.enqueue(session, kind="process_study", payload={}, run_at=now + timedelta(hours=1))
        taken = jobs.enqueue(session, kind="process_study", payload={}, run_at=now - timedelta(seconds=20))
        taken.status, taken.lease_expires_at = "running", now - timedelta(seconds=30)
    with _api(factory, settings) as url:

        def beat() -> None:
            record_heartbeat(factory, worker_id="alive", started_at=now, current_job_id=None)

        beat()
        code, body = _ready(url)
        assert code == 200, body
        assert body["queue"]["pending"] == 1 and body["queue"]["due"] == 1 and body["queue"]["running"] == 1
        assert 30 <= body["queue"]["oldest_due_seconds"] < 50

        with transaction(factory) as session:
            jobs.enqueue(session, kind="process_study", payload={}, run_at=now - timedelta(seconds=90))
        beat()
        code, body = _ready(url)
        assert code == 503 and body["workers_alive"] == 1
        [reason] = body["reasons"]
        assert reason.startswith("the oldest due job has waited 9") and reason.endswith("(bound 60 s)")
        assert body["queue"]["due"] == 2 and 90 <= body["queue"]["oldest_due_seconds"] < 110

        with transaction(factory) as session:  # a worker took it: ready again
            session.execute(
                update(Job).where(Job.next_attempt_at < now - timedelta(seconds=60)).values(status="done")
            )
        beat()
        assert _ready(url)[0] == 200


def test_no_database_is_not_ready(tmp_path: Path) -> None:
    engine = make_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/gateway")
    try:
        with _api(make_sessionmaker(engine), _settings(tmp_path)) as url:
            started = time.monotonic()
            code, body = _ready(url)
            assert time.monotonic() - started < 10
    finally:
        engine.dispose()
    assert code == 503 and body["database"] == "unreachable" and body["queue"] is None
    [reason] = body["reasons"]
    assert reason.startswith("database unreachable: OperationalError: ")


def test_no_database_signed_in_routes_answer_503(tmp_path: Path) -> None:
    # credentials cannot be checked without the database: a retryable 503, never a 500
    engine = make_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/gateway")
    token = "sgw_0123456789ab_" + "A" * 43
    try:
        with _api(make_sessionmaker(engine), _settings(tmp_path)) as url:
            for headers in ({"Authorization": f"Bearer {token}"}, {"Cookie": "gateway_session=abc"}):
                rsp = requests.get(f"{url}/api/studies", headers=headers, timeout=30)
                assert rsp.status_code == 503 and rsp.json()["detail"].startswith("database unavailable")
    finally:
        engine.dispose()


def _alive(factory: sessionmaker[Session]) -> None:
    record_heartbeat(factory, worker_id="alive", started_at=utcnow(), current_job_id=None)


def test_a_read_only_storage_volume_is_not_ready(factory: sessionmaker[Session], tmp_path: Path) -> None:
    with tmpfs(tmp_path / "var", 8 << 20):
        settings = _settings(tmp_path).model_copy(update={"storage": StorageSettings(reserve_bytes=0)})
        with _api(factory, settings) as url:
            _alive(factory)
            code, body = _ready(url)
            assert code == 200 and body["checks"] == {"storage": "ok"}, body
            remount = ["mount", "-o", "remount,ro", str(tmp_path / "var")]
            subprocess.run(remount, check=True, capture_output=True)
            try:
                code, body = _ready(url)
            finally:
                subprocess.run([*remount[:2], "remount,rw", remount[3]], check=True, capture_output=True)
            tmp_dir = settings.storage_dir.resolve() / "tmp"
            reason = f"storage folder {tmp_dir} is not writable: Read-only file system"
            assert code == 503 and body["status"] == "not ready", body
            assert body["reasons"] == [reason] and body["checks"] == {"storage": reason}
            assert body["database"] == "ok" and body["workers_alive"] == 1
            assert _ready(url)[0] == 200  # writable again


def test_storage_at_its_reserve_is_not_ready(factory: sessionmaker[Session], tmp_path: Path) -> None:
    settings = _settings(tmp_path).model_copy(update={"storage": StorageSettings(reserve_bytes=1 << 60)})
    with _api(factory, settings) as url:
        _alive(factory)
        code, body = _ready(url)
        [reason] = body["reasons"]
        assert code == 503 and reason.startswith("storage volume at its free-space reserve: ")
        assert reason.endswith(f"bytes free, GATEWAY_STORAGE__RESERVE_BYTES {1 << 60}")


def test_the_listener_check_follows_a_real_listener(factory: sessionmaker[Session], tmp_path: Path) -> None:
    from dicom_listener.server import serve

    settings = _settings(tmp_path).model_copy(update={"dicom": DicomSettings(host="127.0.0.1", port=0)})
    storage = Storage(settings.storage_dir)
    storage.prepare()
    with receiving_into(storage):
        listener = serve(settings, storage, factory)
        running = True
        try:
            checks: dict[str, ReadinessCheck] = {"listener": listener.check}
            with _api(factory, settings, checks) as url:
                _alive(factory)
                code, body = _ready(url)
                assert code == 200 and body["checks"] == {"storage": "ok", "listener": "ok"}, body
                listener.shutdown()
                running = False
                code, body = _ready(url)
        finally:
            if running:
                listener.shutdown()
    reason = f"DICOM listener on port {listener.port} does not answer: Connection refused"
    assert code == 503 and body["reasons"] == [reason] and body["checks"]["listener"] == reason


def test_a_check_that_raises_is_a_failed_check(factory: sessionmaker[Session], tmp_path: Path) -> None:
    def broken() -> str | None:
        raise OSError("no such thing")

    with _api(factory, _settings(tmp_path), {"models": broken}) as url:
        _alive(factory)
        code, body = _ready(url)
    assert code == 503 and body["reasons"] == ["models check failed: OSError: no such thing"]
