"""Runs fuzz cases in a forked child process, so that a segfault, a memory blow-up or a hang is caught too.

The parent draws each recipe (tests.fuzz.mutate), sends it to the child, and waits at most ``timeout`` seconds
while watching the child's resident memory. A case is a crash when the target raises ``CaseCrash`` (any
exception other than a refusal, BaseExceptions such as pyo3's PanicException included), when the child dies
(signal, abort), when its resident memory passes ``memory_mb`` or it asks for more than ``memory_mb`` of
address space beyond its size at start (RLIMIT_AS: MemoryError), or when it takes longer than ``timeout``
(a hang). After a death, a memory crash or a hang the child is replaced; so is a child whose address space has
grown by half the bound over its cases (fragmentation would fail later cases for its own reasons), and a case
whose input could not even be built is run once more in a fresh child.

A crash's signature (kind, stage, exception type, innermost frame) groups it with others of its class
(tests.fuzz.campaign).
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import logging
import multiprocessing
import os
import re
import resource
import signal
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from tests.fuzz.recipe import PIXEL_DATA, Op, build_case, scan
from tests.fuzz.seeds import Seed
from tests.fuzz.target import CaseCrash, Outcome, run_case

Target = Callable[[str, bytes, Path, bool, Callable[[str], None]], Outcome]
_REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Crash:
    kind: str  # "exception", "death", "memory", "hang"
    stage: str  # "decode", "validate", "store", "pixels", "report", or "" when the child died
    error: str  # exception type, signal name, or the limit passed
    where: str  # innermost frame "file:line function" ("" when unknown)
    message: str = ""
    traceback: str = ""

    @property
    def signature(self) -> str:
        return f"{self.kind}:{self.stage}:{self.error}:{self.where}"


@dataclass(frozen=True)
class Case:
    index: int
    seed: str
    ops: list[Op]


class Runner:
    """One child process running cases; ``run(case)`` returns an Outcome or a Crash."""

    def __init__(
        self,
        seeds: Sequence[Seed],
        *,
        timeout: float = 10.0,
        memory_mb: int = 2048,
        target: Target | None = None,
    ) -> None:
        self.seeds = {s.name: s for s in seeds}
        self.timeout = timeout
        self.memory_mb = memory_mb
        self.target: Target = target or _default_target
        self._workdir = Path(tempfile.mkdtemp(prefix="fuzz-work-"))
        self._fault_log = self._workdir / "faults.txt"
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._base_mb = 0
        # the stage the child is in, readable when it hangs or dies (shared memory, written by the child)
        self._current = multiprocessing.get_context("fork").Array("c", 16, lock=False)

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop()
        for path in self._workdir.glob("*"):
            path.unlink()
        self._workdir.rmdir()

    def run(self, case: Case) -> Outcome | Crash:
        result = self._run_once(case)
        if isinstance(result, Crash) and result.stage == "build":
            # Building the input failed in the child (its address space, fragmented by earlier cases, say):
            # that is the harness's state, not the gateway's; a fresh child tries once more.
            self._stop()
            result = self._run_once(case)
        return result

    def _run_once(self, case: Case) -> Outcome | Crash:
        if self._process is None or not self._process.is_alive():
            self._start()
        assert self._conn is not None and self._process is not None
        self._conn.send((case.seed, case.ops))
        deadline = time.monotonic() + self.timeout
        while True:
            if self._conn.poll(0.05):
                try:
                    reply = self._conn.recv()
                except (EOFError, OSError):
                    return self._died()
                if reply[0] != "built":
                    break
                deadline = time.monotonic() + self.timeout  # building a bomb is not the gateway's time
                continue
            if not self._process.is_alive():
                return self._died()
            if _rss_mb(self._process.pid) > self._base_mb + self.memory_mb:
                stage = self._stage()  # before it moves on
                assert self._process.pid is not None
                os.kill(self._process.pid, signal.SIGUSR1)  # faulthandler: where is it allocating?
                time.sleep(0.2)
                self._stop()
                where, stack = self._fault_stack()
                return Crash("memory", stage, f"RSS>{self.memory_mb}MB", where, "", stack)
            if time.monotonic() > deadline:
                stage = self._stage()
                self._stop()
                where, stack = self._fault_stack()
                return Crash("hang", stage, f">{self.timeout:g}s", where, "", stack)
        kind, result, peak_mb, worn = reply
        if worn:
            self._stop()  # address space grown by earlier cases: the next case gets a fresh child
        if kind == "ok" and peak_mb > self._base_mb + self.memory_mb:
            self._stop()  # its peak stays high: the next case would be blamed
            peak = f"peak {peak_mb} MB after the case"
            return Crash("memory", self._stage(), f"RSS>{self.memory_mb}MB", "", peak)
        assert isinstance(result, (Outcome, Crash))
        return result

    def _start(self) -> None:
        context = multiprocessing.get_context("fork")
        parent, child = context.Pipe()
        self._process = context.Process(target=self._serve, args=(child,), daemon=True)
        # A forked child starts with the parent's resident pages (a test process with TensorFlow loaded holds
        # hundreds of MB): the bound is on what a case adds to them.
        self._base_mb = _rss_mb(os.getpid())
        self._process.start()
        child.close()
        self._conn = parent

    def _stop(self) -> None:
        if self._process is not None:
            if self._process.is_alive():
                assert self._process.pid is not None
                os.kill(self._process.pid, signal.SIGKILL)
            self._process.join()
        if self._conn is not None:
            self._conn.close()
        self._process = self._conn = None

    def _died(self) -> Crash:
        assert self._process is not None
        self._process.join()
        code = self._process.exitcode or 0
        self._stop()
        name = signal.Signals(-code).name if code < 0 else f"exit {code}"
        where, stack = self._fault_stack()
        return Crash("death", self._stage(), name, where, "", stack)

    def _stage(self) -> str:
        return bytes(self._current.value).decode()

    def _enter(self, stage: str) -> None:
        self._current.value = stage.encode()

    def _fault_stack(self) -> tuple[str, str]:
        """The innermost frame and the stack faulthandler wrote for the last case (a segfault or a hang)."""
        try:
            text = self._fault_log.read_text(errors="replace")
        except OSError:
            return "", ""
        # faulthandler lists the loaded extension modules after the stack (164 with TensorFlow imported)
        stack = text.split("\nExtension modules:")[0].strip()
        frames = re.findall(r'File "([^"]+)", line (\d+) in (\S+)', stack)
        # innermost frame outside the standard library (copy.deepcopy says little about who called it)
        library = [f for f in frames if "site-packages" in f[0] or "/python3." not in f[0]]
        name, line, function = (library or frames or [("", "", "")])[0]
        where = f"{_short_path(name)}:{line} {function}" if name else ""
        return where, stack[:8000]  # most recent call first

    def _serve(self, conn: Connection) -> None:
        """Child: cap the address space, then run cases until the parent goes away."""
        _die_with_parent()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        warnings.simplefilter("ignore")
        logging.disable(logging.CRITICAL)
        os.environ["RUST_BACKTRACE"] = "0"
        # Codecs write to stderr; the Python stack of a segfault or a hang goes to a file the parent reads.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        faults = self._fault_log.open("w")
        faulthandler.enable(faults)
        faulthandler.register(signal.SIGUSR1, faults, all_threads=False)
        start_mb = _vm_mb(os.getpid())
        limit = (start_mb + self.memory_mb) << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        clean_headers: dict[str, bool] = {}
        while True:
            try:
                name, ops = conn.recv()
            except EOFError:
                return
            seed = self.seeds[name]
            faults.seek(0)
            faults.truncate()  # the log holds this case's stack only
            self._enter("build")
            try:
                transfer_syntax, stream = build_case(seed, ops)
                conn.send(("built",))
                faulthandler.dump_traceback_later(max(self.timeout - 0.5, 0.1), file=faults)
                # The SR stage reads only the header: a seed's header once reported cleanly need not be again.
                same = _same_header(seed, transfer_syntax, stream)
                report = not (same and clean_headers.get(seed.name))
                outcome = self.target(transfer_syntax, stream, self._workdir, report, self._enter)
                if same and report and self._stage() == "report":
                    clean_headers[seed.name] = True
                reply: tuple[Any, ...] = ("ok", outcome)
            except CaseCrash as crash:
                reply = ("crash", describe(crash.error, crash.stage))
            except BaseException as exc:
                reply = ("crash", describe(exc, self._stage()))  # a target of a test, or the harness
            faulthandler.cancel_dump_traceback_later()
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
            worn = _vm_mb(os.getpid()) > start_mb + self.memory_mb // 2
            conn.send((*reply, peak_mb, worn))


def _die_with_parent() -> None:
    """Linux prctl(PR_SET_PDEATHSIG, SIGKILL): a killed run leaves no child decoding on."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def _default_target(
    transfer_syntax: str, stream: bytes, workdir: Path, report: bool, entering: Callable[[str], None]
) -> Outcome:
    return run_case(transfer_syntax, stream, workdir, report=report, entering=entering)


def _same_header(seed: Seed, transfer_syntax: str, stream: bytes) -> bool:
    """True when everything up to the Pixel Data header equals the seed's, declared the same way."""
    if transfer_syntax != seed.encoding:
        return False
    end = _header_end(seed)
    return end is not None and len(stream) >= end and stream[:end] == seed.stream[:end]


_HEADER_ENDS: dict[str, int | None] = {}


def _header_end(seed: Seed) -> int | None:
    if seed.name not in _HEADER_ENDS:
        pixels = [e for e in scan(seed.stream, seed.encoding) if e.tag == PIXEL_DATA and e.depth == 0]
        _HEADER_ENDS[seed.name] = pixels[0].value_at if pixels else None
    return _HEADER_ENDS[seed.name]


def describe(error: BaseException, stage: str) -> Crash:
    """A crash from an exception: its type and the innermost frame that raised it."""
    frames = traceback.extract_tb(error.__traceback__)
    where = ""
    if frames:
        last = frames[-1]
        where = f"{_short_path(last.filename)}:{last.lineno} {last.name}"
    if isinstance(error, MemoryError):
        return Crash("memory", stage, "MemoryError", where, str(error)[:300], _format(error))
    name = type(error).__module__ + "." + type(error).__qualname__
    name = name.removeprefix("builtins.")
    return Crash("exception", stage, name, where, str(error)[:300], _format(error))


def _format(error: BaseException) -> str:
    text = "".join(traceback.format_exception(error))
    return text[-8000:]


def _short_path(filename: str) -> str:
    """``pydicom/filereader.py`` for a library, ``inference/preprocess.py`` for ours."""
    if "site-packages/" in filename:
        return filename.split("site-packages/", 1)[1]
    path = Path(filename)
    return str(path.relative_to(_REPO)) if path.is_relative_to(_REPO) else path.name


def _rss_mb(pid: int | None) -> int:
    return _status_mb(pid, "VmRSS")


def _vm_mb(pid: int | None) -> int:
    return _status_mb(pid, "VmSize")


def _status_mb(pid: int | None, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as fp:
            for line in fp:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) >> 10
    except OSError:
        pass
    return 0
