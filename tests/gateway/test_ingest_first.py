"""Workers leave the CPU to ingest (GATEWAY_WORKER__INGEST_FIRST_*): while another process of the host
stores faster than the threshold, a worker runs deliveries but holds inference and rendering back, for at
most the configured time, and resumes them as soon as the ingest slows down."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from core import jobs
from core.activity import IngestRate
from core.db import transaction
from core.jobs import DELIVER, RENDER_STUDY, ClaimedJob
from core.settings import Settings, WorkerSettings
from core.storage import Storage
from gateway import worker as worker_module
from gateway.runtime import Runtime
from gateway.worker import Worker
from tests.peers import REPO, wait_for

MB_PER_S = 32.0


def _runtime(factory: sessionmaker[Session], tmp_path: Path, max_seconds: float, threshold: float) -> Runtime:
    settings = Settings(
        data_dir=tmp_path / "var",
        worker=WorkerSettings(
            poll_seconds=0.05, ingest_first_mb_per_s=threshold, ingest_first_max_seconds=max_seconds
        ),
    )
    storage = Storage(settings.storage_dir)
    storage.prepare()
    return Runtime(settings, factory.kw["bind"], factory, storage)


@contextmanager
def pumping(folder: Path, seconds: float) -> Iterator[subprocess.Popen[bytes]]:
    """Another process that stores 8 MB every 50 ms (160 MB/s) for ``seconds``, as receivers count it."""
    code = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from core.activity import count_ingest, record_ingest
        count_ingest(Path({str(folder)!r}))
        end = time.monotonic() + {seconds}
        while time.monotonic() < end:
            record_ingest(8_000_000)
            time.sleep(0.05)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    try:
        rate = IngestRate(folder)
        wait_for("the ingest to show", lambda: rate.bytes_per_second() > 2 * MB_PER_S * 1e6, 30)
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


@contextmanager
def worker_recording(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch, runs: dict[str, float]
) -> Iterator[Worker]:
    """A worker thread whose render and delivery jobs only note when they ran."""

    def note(_rt: Runtime, job: ClaimedJob) -> None:
        runs[job.kind] = time.monotonic()

    monkeypatch.setitem(worker_module.HANDLERS, RENDER_STUDY, note)
    monkeypatch.setitem(worker_module.HANDLERS, DELIVER, note)
    w = Worker(rt)
    for _ in range(5):  # as a worker that has been running: it has watched the rate for a while
        w.holds_back()
        time.sleep(0.1)
    for kind in (RENDER_STUDY, DELIVER):
        with transaction(rt.factory) as session:
            jobs.enqueue(session, kind=kind, payload={})
    thread = threading.Thread(target=w.run_forever, daemon=True)
    thread.start()
    try:
        yield w
    finally:
        w.stop.set()
        thread.join(10)


def test_compute_jobs_wait_for_the_ingest_at_most_the_bound(
    factory: sessionmaker[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = _runtime(factory, tmp_path, max_seconds=2.0, threshold=MB_PER_S)
    runs: dict[str, float] = {}
    with pumping(rt.settings.ingest_rate_dir, seconds=30) as pump:
        start = time.monotonic()
        with worker_recording(rt, monkeypatch, runs):
            wait_for("the delivery", lambda: DELIVER in runs, 10)
            wait_for("the render job", lambda: RENDER_STUDY in runs, 15)
        assert pump.poll() is None, "the ingest ended before the bound: nothing measured"
    assert runs[DELIVER] - start < 1.5  # deliveries never wait
    assert 1.9 <= runs[RENDER_STUDY] - start < 6.0  # held back for the bound, then run during the ingest


def test_compute_jobs_resume_when_the_ingest_slows_down(
    factory: sessionmaker[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = _runtime(factory, tmp_path, max_seconds=60.0, threshold=MB_PER_S)
    runs: dict[str, float] = {}
    with pumping(rt.settings.ingest_rate_dir, seconds=2.5) as pump, worker_recording(rt, monkeypatch, runs):
        wait_for("the delivery", lambda: DELIVER in runs, 10)
        pump.wait(30)
        ended = time.monotonic()
        assert RENDER_STUDY not in runs, "rendered while the ingest ran"
        wait_for("the render job", lambda: RENDER_STUDY in runs, 10)
    assert runs[RENDER_STUDY] - ended < 3.0  # the rate's window (1 s) and a few polls


def test_without_a_threshold_nothing_waits(
    factory: sessionmaker[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = _runtime(factory, tmp_path, max_seconds=60.0, threshold=0.0)
    runs: dict[str, float] = {}
    with pumping(rt.settings.ingest_rate_dir, seconds=30):
        start = time.monotonic()
        with worker_recording(rt, monkeypatch, runs):
            wait_for("both jobs", lambda: len(runs) == 2, 10)
    assert max(runs.values()) - start < 1.5
