"""The host's ingest rate (core.activity): counters written by other processes, read as bytes per second."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from core.activity import IngestCounter, IngestRate, clear_counters, record_ingest
from tests.peers import REPO

MB = 1_000_000


def _count_in_process(folder: Path, chunks: list[int]) -> int:
    """A separate Python process counts ``chunks`` bytes through core.activity and exits; its pid."""
    code = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from core.activity import count_ingest, record_ingest
        count_ingest(Path({str(folder)!r}))
        for size in {chunks!r}:
            record_ingest(size)
        print(__import__("os").getpid())
        sys.stdout.flush()
        import os; os._exit(0)  # as if killed: atexit does not remove the counter
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=True
    )
    return int(done.stdout.strip())


def test_rate_counts_what_other_processes_stored_within_the_window(tmp_path: Path) -> None:
    folder = tmp_path / "rate"
    rate = IngestRate(folder, window=1.0)
    assert rate.bytes_per_second(100.0) == 0.0  # no folder yet: nothing arrives
    pid = _count_in_process(folder, [3 * MB, 4 * MB])
    assert (folder / f"{pid}.bytes").read_bytes() == (7 * MB).to_bytes(8, "little")
    # watched for half a second: 7 MB in 0.5 s
    assert rate.bytes_per_second(100.5) == pytest.approx(14 * MB)
    _count_in_process(folder, [10 * MB])
    assert rate.bytes_per_second(100.9) == pytest.approx(17 * MB / 0.9)
    assert rate.bytes_per_second(101.6) == 10 * MB  # over the last second: the first 7 MB left it
    assert rate.bytes_per_second(102.0) == 0.0  # a dead process's file adds nothing more


def test_a_reader_starting_late_does_not_count_the_past(tmp_path: Path) -> None:
    folder = tmp_path / "rate"
    _count_in_process(folder, [50 * MB])
    rate = IngestRate(folder)
    assert rate.bytes_per_second(10.0) == 0.0
    assert rate.bytes_per_second(10.1) == 0.0


def test_a_counter_restarting_under_a_used_name_counts_from_zero(tmp_path: Path) -> None:
    folder = tmp_path / "rate"
    rate = IngestRate(folder)
    first = IngestCounter(folder)
    first.add(40 * MB)
    rate.bytes_per_second(1.0)
    first.close()
    assert not first.path.exists()
    again = IngestCounter(folder)  # same pid, same file name: truncated, from zero
    again.add(2 * MB)
    assert rate.bytes_per_second(1.2) == 8 * MB  # 2 MB in 0.2 s, counted over a quarter second at least
    again.close()


def test_clear_counters_and_recording_without_a_counter(tmp_path: Path) -> None:
    folder = tmp_path / "rate"
    _count_in_process(folder, [MB])
    assert len(list(folder.glob("*.bytes"))) == 1
    clear_counters(folder)
    assert list(folder.iterdir()) == []
    record_ingest(MB)  # this test process never called count_ingest: nothing is written anywhere
    assert list(folder.iterdir()) == []
    assert not any(p.name == f"{os.getpid()}.bytes" for p in tmp_path.rglob("*"))
