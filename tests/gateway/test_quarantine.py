"""A job that kills its worker (out of memory, a crash inside a codec) is quarantined after
GATEWAY_WORKER__MAX_TAKEOVERS takeovers: failed with the reason, never claimed again, so restarting workers
ends instead of looping."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from core import jobs
from core.db import transaction
from core.settings import Settings, WorkerSettings
from core.storage import Storage
from core.tables import Job
from gateway import worker as worker_module
from gateway.runtime import Runtime
from gateway.worker import Worker
from tests.peers import REPO, stop, wait_for

KIND = "test_killer"
LEASE = 1.0
MAX_TAKEOVERS = 2

_KILLER = """
import os, signal, sys

from core.settings import load_settings
from gateway import worker
from gateway.runtime import build_runtime


def killer(rt, job):
    with open(sys.argv[1], "a") as runs:
        runs.write(f"{{job.id}} {{job.attempts}}\\n")
    os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer would


worker.HANDLERS[{kind!r}] = killer
rt = build_runtime(load_settings(), migrate=False)
worker.Worker(rt, name=f"killer-{{os.getpid()}}").run_forever()
"""


def _job(factory: sessionmaker[Session], job_id: int) -> Job:
    with factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def test_job_killing_its_workers_is_quarantined_after_the_bound(
    factory: sessionmaker[Session], database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = tmp_path / "killer_worker.py"
    script.write_text(_KILLER.format(kind=KIND))
    runs = tmp_path / "runs.txt"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
        "GATEWAY_DATABASE_URL": database_url,
        "GATEWAY_DATA_DIR": str(tmp_path / "var"),
        "GATEWAY_WORKER__LEASE_SECONDS": str(LEASE),
        "GATEWAY_WORKER__POLL_SECONDS": "0.05",
        "GATEWAY_WORKER__MAX_TAKEOVERS": str(MAX_TAKEOVERS),
        "GATEWAY_ORTHANC__URL": "",
        "GATEWAY_LOG_LEVEL": "WARNING",
    }
    with transaction(factory) as session:
        job_id = jobs.enqueue(session, kind=KIND, payload={}).id

    def start() -> subprocess.Popen[bytes]:
        with open(tmp_path / "worker.log", "ab") as log:  # the child keeps its own descriptor
            return subprocess.Popen([sys.executable, str(script), str(runs)], env=env, stdout=log, stderr=log)

    # A supervisor restarting its worker every time it dies: the job kills 1 + MAX_TAKEOVERS of them.
    for death in range(1, MAX_TAKEOVERS + 2):
        proc = start()
        try:
            assert proc.wait(60) == -signal.SIGKILL, (tmp_path / "worker.log").read_text()[-2000:]
        finally:
            stop(proc)
        assert len(runs.read_text().splitlines()) == death
    assert _job(factory, job_id).takeovers == MAX_TAKEOVERS

    survivor = start()  # the next restart finds the lease expired once more: it quarantines, never runs it
    try:
        wait_for("the job quarantined", lambda: _job(factory, job_id).status == "failed", timeout=60)
        time.sleep(3 * LEASE)
        assert survivor.poll() is None, "the worker ran the quarantined job"
    finally:
        stop(survivor)
    job = _job(factory, job_id)
    assert job.last_error is not None
    assert job.last_error.startswith(f"quarantined: its worker died {MAX_TAKEOVERS + 1} times")
    assert (job.attempts, job.takeovers) == (MAX_TAKEOVERS + 1, MAX_TAKEOVERS)
    assert len(runs.read_text().splitlines()) == MAX_TAKEOVERS + 1

    settings = Settings(data_dir=tmp_path / "var", worker=WorkerSettings(lease_seconds=LEASE))
    rt = Runtime(settings, factory.kw["bind"], factory, Storage(settings.storage_dir))
    ran: list[int] = []
    monkeypatch.setitem(worker_module.HANDLERS, KIND, lambda _rt, claimed: ran.append(claimed.id))
    assert not Worker(rt, name="late").run_once()  # nobody claims it again
    assert ran == []
