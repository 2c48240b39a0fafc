"""Leases of running jobs: a live worker renews the lease of a job that runs longer than the lease, so no
other worker takes it over; a worker killed mid-job stops renewing, and its job is taken over after the
lease expires."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from core import jobs
from core.db import transaction
from core.jobs import ClaimedJob
from core.settings import Settings, WorkerSettings
from core.storage import Storage
from core.tables import Job, utcnow
from gateway import worker as worker_module
from gateway.runtime import Runtime
from gateway.worker import Worker
from tests.peers import REPO, wait_for

SLOW = "test_lease_slow"
LEASE = 0.5


def _runtime(factory: sessionmaker[Session], tmp_path: Path, lease_seconds: float) -> Runtime:
    settings = Settings(
        data_dir=tmp_path / "var",
        worker=WorkerSettings(lease_seconds=lease_seconds, poll_seconds=0.05),
    )
    storage = Storage(settings.storage_dir)
    storage.prepare()
    engine = factory.kw["bind"]
    return Runtime(settings, engine, factory, storage)


def _enqueue(factory: sessionmaker[Session], kind: str) -> int:
    with transaction(factory) as session:
        return jobs.enqueue(session, kind=kind, payload={}).id


def _job(factory: sessionmaker[Session], job_id: int) -> Job:
    with factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def test_job_running_three_leases_runs_once(
    factory: sessionmaker[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs: list[int] = []
    claims: list[tuple[str, int]] = []

    def slow(_rt: Runtime, job: ClaimedJob) -> None:
        runs.append(job.id)
        time.sleep(3 * LEASE)

    real_claim = jobs.claim

    def recording_claim(*args: object, worker_id: str, **kw: object) -> ClaimedJob | None:
        job = real_claim(*args, worker_id=worker_id, **kw)  # type: ignore[arg-type]
        if job is not None:
            claims.append((worker_id, job.id))
        return job

    monkeypatch.setitem(worker_module.HANDLERS, SLOW, slow)
    monkeypatch.setattr(jobs, "claim", recording_claim)
    rt = _runtime(factory, tmp_path, LEASE)
    job_id = _enqueue(factory, SLOW)
    workers = [Worker(rt, name=f"w{i}") for i in range(2)]
    threads = [threading.Thread(target=w.run_forever, daemon=True) for w in workers]
    for t in threads:
        t.start()
    try:
        wait_for(
            "the job to finish or run twice",
            lambda: _job(factory, job_id).status in ("done", "failed") or len(runs) > 1,
            timeout=15,
        )
        time.sleep(LEASE)  # a late takeover would show up by now
    finally:
        for w in workers:
            w.stop.set()
        for t in threads:
            t.join(10)
    job = _job(factory, job_id)
    assert runs == [job_id]
    assert (job.status, job.attempts) == ("done", 1)
    assert len(claims) == 1 and claims[0][1] == job_id
    assert job.locked_by == claims[0][0]  # the worker that claimed it also finished it


def test_heartbeat_retries_after_an_error_and_reports_a_lost_lease(
    factory: sessionmaker[Session],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    renewals: list[bool | str] = []
    real_renew = jobs.renew_lease

    def flaky_renew(*args: object, **kw: object) -> bool:
        if not renewals:
            renewals.append("error")
            raise ConnectionError("database briefly down")
        renewed = real_renew(*args, **kw)  # type: ignore[arg-type]
        renewals.append(renewed)
        return renewed

    def taken_over(_rt: Runtime, job: ClaimedJob) -> None:
        wait_for("a renewal after the error", lambda: True in renewals, timeout=5)
        with transaction(factory) as session:  # as if another worker had claimed it
            row = session.get(Job, job.id)
            assert row is not None
            row.locked_by = "thief"
        wait_for("the lost lease", lambda: False in renewals, timeout=5)
        time.sleep(3 * LEASE)  # room for renewals that must not happen

    monkeypatch.setitem(worker_module.HANDLERS, SLOW, taken_over)
    monkeypatch.setattr(jobs, "renew_lease", flaky_renew)
    job_id = _enqueue(factory, SLOW)
    assert Worker(_runtime(factory, tmp_path, LEASE), name="w").run_once()
    assert renewals[0] == "error" and renewals[-1] is False and renewals.count(False) == 1
    assert "renewing the lease failed" in caplog.text
    assert f"job {job_id}: lease lost" in caplog.text
    assert "another worker had taken it over" in caplog.text
    job = _job(factory, job_id)
    assert (job.status, job.locked_by) == ("running", "thief")  # the thief's to finish


_DOOMED_WORKER = """
import time

from core.settings import load_settings
from gateway import worker
from gateway.runtime import build_runtime


def slow(rt, job):
    time.sleep(120)  # killed long before this returns


worker.HANDLERS[{kind!r}] = slow
rt = build_runtime(load_settings(), migrate=False)
worker.Worker(rt, name="doomed").run_forever()
"""


def test_killed_worker_is_taken_over_after_its_lease(
    factory: sessionmaker[Session],
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lease = 1.0
    script = tmp_path / "doomed_worker.py"
    script.write_text(_DOOMED_WORKER.format(kind=SLOW))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
        "GATEWAY_DATABASE_URL": database_url,
        "GATEWAY_DATA_DIR": str(tmp_path / "var"),
        "GATEWAY_WORKER__LEASE_SECONDS": str(lease),
        "GATEWAY_WORKER__POLL_SECONDS": "0.05",
        "GATEWAY_ORTHANC__URL": "",
        "GATEWAY_LOG_LEVEL": "WARNING",
    }
    job_id = _enqueue(factory, SLOW)
    rescued: list[int] = []
    monkeypatch.setitem(worker_module.HANDLERS, SLOW, lambda _rt, job: rescued.append(job.attempts))
    rescuer = Worker(_runtime(factory, tmp_path, lease), name="rescuer")

    with open(tmp_path / "doomed.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(
                "the subprocess to claim the job",
                lambda: _job(factory, job_id).status == "running" or proc.poll() is not None,
                timeout=60,
            )
            assert proc.poll() is None, (tmp_path / "doomed.log").read_text()[-2000:]
            time.sleep(1.5 * lease)  # alive and renewing: nobody else may take the job
            assert not rescuer.run_once()
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    killed = _job(factory, job_id)
    assert (killed.status, killed.locked_by, killed.attempts) == ("running", "doomed", 1)
    expires = killed.lease_expires_at
    assert expires is not None and expires > utcnow()  # renewed by the heartbeat: claimed over 1.5 leases ago

    deadline = time.monotonic() + 10 * lease
    while not rescuer.run_once():
        assert time.monotonic() < deadline, "the job was never taken over"
        time.sleep(0.05)
    assert utcnow() >= expires  # taken over only once the dead worker's lease ran out
    job = _job(factory, job_id)
    assert rescued == [2]
    assert (job.status, job.attempts, job.locked_by) == ("done", 2, "rescuer")
