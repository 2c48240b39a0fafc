"""How fast instances are arriving on this host, shared between its processes: the processes that receive
(``gateway serve`` and its receivers) count the bytes they store, and the workers read the rate to leave the
CPU to ingest while it is high (``GATEWAY_WORKER__INGEST_FIRST_*``).

Each receiving process owns one 8-byte file in the folder, ``<pid>.bytes``: a running total that only it
writes, through a shared memory map, so no lock is shared between processes; a reader sums the changes of
every file. A file left by a killed process stops changing and adds nothing.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import mmap
import os
import struct
import threading
import time
from collections import deque
from pathlib import Path

log = logging.getLogger(__name__)

_TOTAL = struct.Struct("<Q")
_SUFFIX = ".bytes"


class IngestCounter:
    """This process's running total of stored bytes, readable by the other processes of the host."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{os.getpid()}{_SUFFIX}"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, _TOTAL.size)
            self._map = mmap.mmap(fd, _TOTAL.size)
        finally:
            os.close(fd)
        self._total = 0
        self._lock = threading.Lock()  # associations store from several threads

    def add(self, size: int) -> None:
        with self._lock:
            self._total += size
            _TOTAL.pack_into(self._map, 0, self._total)

    def close(self) -> None:
        with self._lock:
            self._map.close()
        self.path.unlink(missing_ok=True)


_counter: IngestCounter | None = None


def count_ingest(folder: Path) -> None:
    """From now on, :func:`record_ingest` in this process counts into ``folder`` (once per process)."""
    global _counter
    if _counter is not None:
        return
    try:
        _counter = IngestCounter(folder)
    except OSError as exc:  # the rate is advice to the workers: ingest never depends on it
        log.warning("cannot count ingest in %s: %s", folder, exc)
        return
    atexit.register(_counter.close)


def record_ingest(size: int) -> None:
    """``size`` bytes were stored; nothing unless :func:`count_ingest` was called in this process."""
    counter = _counter
    if counter is not None:
        with contextlib.suppress(ValueError):  # closed at exit while an association was still storing
            counter.add(size)


def clear_counters(folder: Path) -> None:
    """Remove the files of processes that are gone (``gateway serve`` does before it starts receiving)."""
    for path in folder.glob(f"*{_SUFFIX}"):
        path.unlink(missing_ok=True)


class IngestRate:
    """Bytes per second stored on this host over the last ``window`` seconds, from the counter files."""

    def __init__(self, folder: Path, window: float = 1.0) -> None:
        self.folder = folder
        self.window = window
        self._last: dict[str, int] | None = None
        self._first = 0.0
        self._samples: deque[tuple[float, int]] = deque()

    def bytes_per_second(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        totals = self._read()
        if self._last is not None:
            added = 0
            for name, total in totals.items():
                before = self._last.get(name, 0)
                # smaller than before: the file is new (a pid used again) and counts from zero
                added += total - before if total >= before else total
            self._samples.append((now, added))
        else:
            self._first = now
        self._last = totals
        while self._samples and self._samples[0][0] <= now - self.window:
            self._samples.popleft()
        # a reader that started less than a window ago divides by the time it has watched (a quarter
        # window at least, so one instance just stored does not read as a torrent)
        watched = min(self.window, max(now - self._first, self.window / 4))
        return sum(added for _, added in self._samples) / watched

    def _read(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        try:
            paths = list(self.folder.glob(f"*{_SUFFIX}"))
        except OSError:
            return totals
        for path in paths:
            try:
                data = path.read_bytes()
            except OSError:  # removed meanwhile
                continue
            if len(data) == _TOTAL.size:
                totals[path.name] = _TOTAL.unpack(data)[0]
        return totals
