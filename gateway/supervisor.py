"""`gateway serve`'s child processes (workers, DICOM receivers): started, watched, restarted when they die,
stopped with serve.

A worker killed by the OOM killer, by its own memory limit or by a crash inside a codec takes only itself
down: the DICOM listener and the HTTP API live in the parent. The child side (:func:`die_with_parent`,
:func:`limit_memory`) runs in ``gateway worker``.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: A child that lived this long before it died is restarted at once; one that died younger waits.
STABLE_SECONDS = 60.0
#: The wait before restarting a child that died young doubles with each such death, up to the cap.
RESTART_BASE_SECONDS = 1.0
RESTART_CAP_SECONDS = 60.0
#: On stop, children get SIGTERM (a worker finishes the job in hand) and SIGKILL after this long.
STOP_GRACE_SECONDS = 10.0
_POLL_SECONDS = 0.1
_PR_SET_PDEATHSIG = 1


def worker_command(parent_pid: int) -> list[str]:
    """The command line of one supervised worker: this interpreter running ``gateway worker``."""
    return [sys.executable, "-m", "gateway", "worker", "--parent-pid", str(parent_pid)]


def receiver_command(parent_pid: int) -> list[str]:
    """The command line of one supervised DICOM receiver (``gateway receiver``; the supervisor adds its
    ``--control-fd``)."""
    return [sys.executable, "-m", "gateway", "receiver", "--parent-pid", str(parent_pid)]


def restart_delay(failures: int, *, base: float, cap: float) -> float:
    """Seconds to wait before the restart that follows ``failures`` young deaths in a row."""
    return 0.0 if failures <= 0 else min(cap, base * 2 ** (failures - 1))


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


@dataclass
class _Child:
    slot: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    failures: int = 0
    restart_at: float = 0.0


class Supervisor:
    """Keeps ``count`` copies of ``command`` running. A child that exits is logged (exit code or signal),
    ``on_exit(pid)`` is called (to clear what it left behind), and it is restarted: at once if it had
    lived ``stable_seconds``, else after a delay doubling from ``base_delay`` to ``cap_delay``.
    :meth:`stop` sends SIGTERM, then SIGKILL after ``grace`` seconds. ``channel(slot)``, when given, makes a
    socket for each process started in ``slot``: the child inherits it as ``--control-fd N`` (the parent keeps
    the other end; see :class:`dicom_listener.receivers.ReceiverPool`). ``kind`` names the children in logs.

    One thread starts, watches and stops the children, and lives until they are gone: a child's
    PR_SET_PDEATHSIG fires when the thread that started it ends, not only the process.
    """

    def __init__(
        self,
        command: Sequence[str],
        count: int,
        *,
        on_exit: Callable[[int], None] | None = None,
        channel: Callable[[int], socket.socket] | None = None,
        kind: str = "worker",
        stable_seconds: float = STABLE_SECONDS,
        base_delay: float = RESTART_BASE_SECONDS,
        cap_delay: float = RESTART_CAP_SECONDS,
        grace: float = STOP_GRACE_SECONDS,
    ) -> None:
        self._command = list(command)
        self._channel = channel
        self._kind = kind
        self._children = [_Child(slot) for slot in range(count)]
        self._on_exit = on_exit
        self._stable = stable_seconds
        self._base, self._cap = base_delay, cap_delay
        self._grace = grace
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"{kind}-supervisor", daemon=True)
        self._lock = threading.Lock()

    def start(self) -> None:
        if self._children:
            self._thread.start()

    def stop(self) -> None:
        """Stop every child and wait for them (at most ``grace`` seconds plus the kill)."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()

    def pids(self) -> list[int]:
        """Process ids of the children running now."""
        with self._lock:
            return [c.proc.pid for c in self._children if c.proc is not None and c.proc.poll() is None]

    def _watch(self) -> None:
        try:
            while True:
                now = time.monotonic()
                for child in self._children:
                    if child.proc is not None and child.proc.poll() is not None:
                        self._exited(child, now)
                    if child.proc is None and now >= child.restart_at:
                        self._spawn(child)
                if self._stopping.wait(_POLL_SECONDS):
                    return
        finally:
            self._stop_children()

    def _spawn(self, child: _Child) -> None:
        theirs: socket.socket | None = None
        try:
            command, fds = self._command, tuple[int, ...]()
            if self._channel is not None:
                theirs = self._channel(child.slot)
                command, fds = [*command, "--control-fd", str(theirs.fileno())], (theirs.fileno(),)
            # Own session: a Ctrl-C at the terminal reaches serve, which stops the children in order.
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True, pass_fds=fds)
        except OSError as exc:  # fork or exec failed (out of memory, interpreter gone)
            child.failures += 1
            delay = restart_delay(child.failures, base=self._base, cap=self._cap)
            child.restart_at = time.monotonic() + delay
            log.error(
                "%s slot %d: cannot start a process (%s); trying again in %.1f s",
                self._kind,
                child.slot,
                exc,
                delay,
            )
            return
        finally:
            if theirs is not None:
                theirs.close()  # the child has its own copy
        with self._lock:
            child.proc, child.started = proc, time.monotonic()
        log.info("%s slot %d: process %d started", self._kind, child.slot, proc.pid)

    def _exited(self, child: _Child, now: float) -> None:
        assert child.proc is not None
        pid, code, lived = child.proc.pid, child.proc.returncode, now - child.started
        with self._lock:
            child.proc = None
        child.failures = 0 if lived >= self._stable else child.failures + 1
        delay = restart_delay(child.failures, base=self._base, cap=self._cap)
        child.restart_at = now + delay
        log.error(
            "%s slot %d: process %d %s after %.1f s; restarting it in %.1f s",
            self._kind,
            child.slot,
            pid,
            describe_exit(code),
            lived,
            delay,
        )
        self._cleanup(pid)

    def _stop_children(self) -> None:
        procs = [c.proc for c in self._children if c.proc is not None]
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        deadline = time.monotonic() + self._grace
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning(
                    "%s process %d ignored SIGTERM for %g s: killing it", self._kind, proc.pid, self._grace
                )
                proc.kill()
                proc.wait()
            log.info("%s process %d stopped (%s)", self._kind, proc.pid, describe_exit(proc.returncode))
            self._cleanup(proc.pid)
        with self._lock:
            for child in self._children:
                child.proc = None

    def _cleanup(self, pid: int) -> None:
        if self._on_exit is None:
            return
        try:
            self._on_exit(pid)
        except Exception:
            log.warning("cleaning up after %s process %d failed", self._kind, pid, exc_info=True)


def die_with_parent(parent_pid: int, *, poll_seconds: float = 1.0) -> None:
    """In a supervised child: end this process as soon as ``parent_pid`` is gone, so no orphan keeps
    working (and holding the database) after serve was SIGKILLed. Linux delivers SIGKILL through
    PR_SET_PDEATHSIG; elsewhere, and for a parent that died before this ran, a thread polls the parent id."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())

    def orphaned() -> bool:
        return os.getppid() != parent_pid

    def watch() -> None:
        while not orphaned():
            time.sleep(poll_seconds)
        log.error("parent process %d is gone: process %d exits", parent_pid, os.getpid())
        os._exit(1)

    if orphaned():
        log.error("parent process %d is gone: process %d exits", parent_pid, os.getpid())
        os._exit(1)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def lower_priority(increment: int) -> None:
    """Add ``increment`` to this process's nice value (0 leaves it): the worker yields the CPU to the
    listener and the API of the same host whenever both want it."""
    if increment > 0:
        try:
            os.nice(increment)
        except OSError as exc:  # not allowed here (some containers): run at the inherited priority
            log.warning("cannot lower the worker's CPU priority: %s", exc)


def limit_threads(n: int) -> None:
    """Give NumPy's BLAS, OpenCV and LiteRT ``n`` threads each in this process (0 leaves their defaults).
    Call before NumPy is first imported: OpenBLAS and OpenMP read their variables when they load."""
    if n <= 0:
        return
    if "numpy" in sys.modules:
        log.warning("worker threads: NumPy is loaded already, its BLAS keeps its own thread count")
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    import cv2

    from inference.runners import set_threads

    cv2.setNumThreads(n)
    set_threads(n)


def limit_memory(megabytes: int) -> None:
    """Cap this process's address space (RLIMIT_AS) at ``megabytes``; 0 leaves it unlimited. Past the cap an
    allocation fails (MemoryError, or a crash inside a C library) instead of the host running out."""
    if megabytes <= 0:
        return
    try:
        import resource
    except ImportError:  # not a POSIX system
        log.warning("no memory limit for worker process %d: not supported on %s", os.getpid(), sys.platform)
        return
    limit = megabytes << 20
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
