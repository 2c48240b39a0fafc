"""The fuzzing harness itself (seeds, mutations, crash detection) and a short fuzz run.

The long run is ``python bench/fuzz.py --cases 100000``; this one is its first cases of another seed.
"""

from __future__ import annotations

import ctypes
import io
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pydicom.filereader
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from tests.fuzz.campaign import draw, fuzz
from tests.fuzz.recipe import PIXEL_DATA, build_case, nested_sequence, scan
from tests.fuzz.runner import Case, Crash, Runner
from tests.fuzz.seeds import Seed, all_seeds, seeds_by_name
from tests.fuzz.target import Outcome, run_case
from tests.peers import REPO

SHORT_RUN_CASES = 1000
SHORT_RUN_SEED = 20260101


@pytest.fixture(scope="module")
def seeds() -> tuple[Seed, ...]:
    return all_seeds()


def test_every_seed_is_accepted_and_read(seeds: tuple[Seed, ...], tmp_path: Path) -> None:
    """Unmutated, each seed passes validation and the pixel path: the mutations start from good inputs."""
    assert {s.name.split("/")[0] for s in seeds} == {"vendor", "mini", "factory"}
    for seed in seeds:
        transfer_syntax, stream = build_case(seed, [["deflate"]] if seed.deflated else [])
        if seed.deflated:
            transfer_syntax = seed.transfer_syntax
        outcome = run_case(transfer_syntax, stream, tmp_path)
        assert outcome.status in ("reported", "stored"), (seed.name, outcome)


def test_seeds_are_the_same_on_every_build(seeds: tuple[Seed, ...]) -> None:
    """Recipes name a seed and byte offsets in it: the seed bytes must not depend on the build."""
    all_seeds.cache_clear()
    try:
        again = {s.name: s.digest for s in all_seeds()}
    finally:
        all_seeds.cache_clear()
    assert again == {s.name: s.digest for s in seeds}


def test_scan_finds_elements_items_and_fragments(seeds: tuple[Seed, ...]) -> None:
    by_name = {s.name: s for s in seeds}
    native = by_name["factory/dx12.explicit"]
    elements = scan(native.stream, native.encoding)
    rows = next(e for e in elements if e.tag == 0x00280010)
    assert int.from_bytes(native.stream[rows.value_at : rows.value_at + 2], "little") == 256
    pixels = next(e for e in elements if e.tag == PIXEL_DATA)
    assert pixels.depth == 0 and pixels.end == len(native.stream)

    rle = by_name["factory/dx12.rle"]
    fragments = [e for e in scan(rle.stream, rle.encoding) if e.kind == "fragment"]
    assert len(fragments) == 2  # basic offset table and one frame
    # RLE header: the segment count, 2 for 16-bit samples
    assert rle.stream[fragments[1].value_at : fragments[1].value_at + 4] == (2).to_bytes(4, "little")


@pytest.mark.parametrize("encoding", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("defined", [True, False])
def test_nested_sequence_is_valid_dicom_of_that_depth(encoding: str, defined: bool) -> None:
    stream = nested_sequence(0x00081032, 40, encoding, defined=defined)
    ds = pydicom.filereader.read_dataset(io.BytesIO(stream), encoding == ImplicitVRLittleEndian, True)
    depth, level = 0, ds
    while "ProcedureCodeSequence" in level:
        level = level.ProcedureCodeSequence[0]
        depth += 1
    assert depth == 40
    assert level.CodeValue == "1"


def test_recipes_replay_the_same_input(seeds: tuple[Seed, ...]) -> None:
    by_name = seeds_by_name()
    for index in range(40):
        first, second = draw(seeds, 7, index), draw(seeds, 7, index)
        assert first == second
        assert build_case(by_name[first.seed], first.ops) == build_case(by_name[second.seed], second.ops)
    assert len({str(draw(seeds, 7, i).ops) for i in range(40)}) > 30


class _Panic(BaseException):
    """Like pyo3's PanicException: not an Exception, so ``except Exception`` lets it through."""


def _crashing_target(
    transfer_syntax: str, stream: bytes, workdir: Path, report: bool, entering: Callable[[str], None]
) -> Outcome:
    entering("pixels")
    kind = stream[:1]
    if kind == b"p":
        raise _Panic("index out of bounds")
    if kind == b"s":
        ctypes.string_at(0)  # segfault
    if kind == b"h":
        time.sleep(60)
    if kind == b"m":
        hog = bytearray(512 << 20)  # zero-filled: resident
        return Outcome("stored", str(len(hog)))
    return Outcome("stored")


def test_runner_reports_exceptions_deaths_hangs_and_memory() -> None:
    seeds = [Seed(f"t/{k}", ExplicitVRLittleEndian, ExplicitVRLittleEndian, k.encode()) for k in "pshm"]
    seeds.append(Seed("t/ok", ExplicitVRLittleEndian, ExplicitVRLittleEndian, b"o"))
    with Runner(seeds, timeout=3, memory_mb=256, target=_crashing_target) as runner:
        results = {s.name: runner.run(Case(0, s.name, [])) for s in seeds}
        again = runner.run(Case(0, "t/ok", []))  # a fresh child after the last crash
    panic, death, hang, memory = (results[f"t/{k}"] for k in "pshm")
    assert isinstance(panic, Crash) and panic.kind == "exception" and panic.error.endswith("_Panic")
    assert isinstance(death, Crash) and death.kind == "death" and death.error == "SIGSEGV"
    assert "_crashing_target" in death.where and "string_at" in death.traceback  # faulthandler's stack
    assert isinstance(hang, Crash) and hang.kind == "hang" and "_crashing_target" in hang.where
    assert isinstance(memory, Crash) and memory.kind == "memory"
    assert panic.stage == death.stage == hang.stage == memory.stage == "pixels"
    assert results["t/ok"] == again == Outcome("stored")


def test_atheris_engine_runs_the_target(tmp_path: Path) -> None:
    """``bench/fuzz.py --engine atheris`` runs the same target coverage-guided; a crash it writes replays."""
    pytest.importorskip("atheris", reason="atheris wheels exist for Linux x86_64 only")
    crashes = tmp_path / "crashes"
    command = [sys.executable, str(REPO / "bench" / "fuzz.py"), "--engine", "atheris", "--cases", "20"]
    run = subprocess.run(
        [*command, "--seed", "5", "--crash-dir", str(crashes)], capture_output=True, text=True, timeout=600
    )
    output = run.stdout + run.stderr
    written = sorted(crashes.glob("crash-*"))
    if run.returncode == 0:
        assert re.search(r"Done \d+ runs", output) and not written, output[-3000:]
        return
    assert written and "Traceback" in output, output[-3000:]  # a Python exception, not a harness failure
    replay = subprocess.run(
        [sys.executable, str(REPO / "bench" / "fuzz.py"), "--replay-input", str(written[0])],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert replay.returncode == 1 and replay.stdout.startswith(("exception:", "memory:", "death:", "hang:"))


def test_short_fuzz_run_has_no_crash_and_no_hang(seeds: tuple[Seed, ...]) -> None:
    report = fuzz(seeds, cases=SHORT_RUN_CASES, seed=SHORT_RUN_SEED, minimise=False, stop_on_crash=True)
    found = {sig: report.first[sig][0] for sig in report.crashes}
    assert not found, f"after {report.cases} cases: {found}"
    assert report.cases == SHORT_RUN_CASES
