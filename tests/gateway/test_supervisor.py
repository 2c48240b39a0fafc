"""The worker supervisor with real child processes: restarts with growing delays, exit codes and signals in
the log, SIGTERM then SIGKILL on stop; a child's memory limit and its death with its parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.settings import SettingsError, load_settings
from gateway.supervisor import Supervisor, restart_delay
from tests.peers import REPO, wait_for

PY = sys.executable
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_restart_delay_doubles_up_to_the_cap() -> None:
    assert [restart_delay(n, base=1, cap=10) for n in range(6)] == [0, 1, 2, 4, 8, 10]


def test_a_child_dying_young_is_restarted_with_growing_delays(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="gateway.supervisor")
    gone: list[int] = []
    sup = Supervisor(
        [PY, "-c", "import sys; sys.exit(3)"], 1, on_exit=gone.append, base_delay=0.2, cap_delay=0.4
    )
    sup.start()
    try:
        wait_for("four exits", lambda: len(gone) >= 4, timeout=60)
    finally:
        sup.stop()
    exits = [r.getMessage() for r in caplog.records if "exited with code 3" in r.getMessage()]
    assert [m.rsplit("restarting it in ", 1)[1] for m in exits[:4]] == ["0.2 s", "0.4 s", "0.4 s", "0.4 s"]
    assert all(f"process {pid} exited" in m for pid, m in zip(gone, exits, strict=False))
    assert len(set(gone)) == len(gone)  # a new process each time


def test_a_killed_child_that_had_run_a_while_is_restarted_at_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="gateway.supervisor")
    gone: list[int] = []
    sup = Supervisor([PY, "-c", "import time; time.sleep(120)"], 2, on_exit=gone.append, stable_seconds=0.3)
    sup.start()
    try:
        first = wait_for("two children", lambda: len(p := sup.pids()) == 2 and p)
        time.sleep(0.5)
        os.kill(first[0], signal.SIGKILL)
        now = wait_for("a replacement", lambda: len(p := sup.pids()) == 2 and first[0] not in p and p)
        assert first[1] in now
    finally:
        sup.stop()
    assert f"process {first[0]} killed by signal SIGKILL" in caplog.text
    assert "restarting it in 0.0 s" in caplog.text
    assert gone[0] == first[0] and sorted(gone[1:]) == sorted(now)  # the rest at stop
    assert not any(_alive(pid) for pid in [*first, *now])


def test_stop_terminates_then_kills_a_child_ignoring_sigterm(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="gateway.supervisor")
    ready = tmp_path / "ready"
    stubborn = (
        "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "open(sys.argv[1], 'w').close(); time.sleep(120)"
    )
    sup = Supervisor([PY, "-c", stubborn, str(ready)], 1, grace=0.5)
    sup.start()
    wait_for("the child to ignore SIGTERM", ready.exists)
    [pid] = sup.pids()
    started = time.monotonic()
    sup.stop()
    assert time.monotonic() - started < 10
    assert not _alive(pid)
    assert f"worker process {pid} ignored SIGTERM for 0.5 s" in caplog.text
    assert f"worker process {pid} stopped (killed by signal SIGKILL)" in caplog.text


def test_memory_limit_refuses_allocations_past_it() -> None:
    script = """
from gateway.supervisor import limit_memory
limit_memory(400)
small = bytearray(50 << 20)
try:
    bytearray(800 << 20)
except MemoryError:
    print("refused")
print([line for line in open("/proc/self/limits") if line.startswith("Max address space")][0])
"""
    proc = subprocess.run([PY, "-c", script], env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "refused"
    assert lines[1].split()[3:5] == [str(400 << 20)] * 2


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_limit_reaches_blas_opencv_and_litert(threads: int) -> None:
    """A worker process gives each numeric library its share of threads (GATEWAY_WORKER__COMPUTE_THREADS):
    what the libraries report once loaded, in a fresh process as `gateway worker` starts."""
    script = f"""
from gateway.supervisor import limit_threads
limit_threads({threads})
import cv2, numpy, threadpoolctl
from inference import runners
blas = sorted(set(p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"))
print(blas, cv2.getNumThreads(), runners.THREADS)
"""
    proc = subprocess.run([PY, "-c", script], env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[0] == f"[{threads}] {threads} {threads}"


def test_a_child_dies_with_its_parent(tmp_path: Path) -> None:
    child = (
        "import sys, time; from gateway.supervisor import die_with_parent; "
        "die_with_parent(int(sys.argv[1])); time.sleep(120)"
    )
    parent = f"""
import os, subprocess, sys, time
p = subprocess.Popen([sys.executable, "-c", {child!r}, str(os.getpid())])
print(p.pid, flush=True)
time.sleep(120)
"""
    proc = subprocess.Popen([PY, "-c", parent], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        pid = int(proc.stdout.readline())
        time.sleep(1.0)  # past the child's start-up
        assert _alive(pid)
    finally:
        proc.kill()
        proc.wait()
    wait_for("the orphan to die", lambda: not _alive(pid), timeout=10)


def test_worker_processes_setting_keeps_its_old_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_WORKER__THREADS", "3")
    assert load_settings().worker.processes == 3
    monkeypatch.setenv("GATEWAY_WORKER__PROCESSES", "4")
    assert load_settings().worker.processes == 4
    monkeypatch.setenv("GATEWAY_WORKER__HEARTBEAT_TIMEOUT_SECONDS", "5")  # not longer than the interval
    with pytest.raises(SettingsError, match="heartbeat_timeout_seconds must be longer"):
        load_settings()
