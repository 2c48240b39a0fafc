"""C-STORE delivery against real peers on loopback: dcmtk storescp and pynetdicom SCPs, plus backoff."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import (
    Comprehensive3DSRStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt

from core.domain import Destination
from reporting.delivery import backoff_delay, classify_status, send_as_stored, send_cstore


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dcmtk_storescp() -> str:
    """Path of dcmtk's storescp (not pynetdicom's app of the same name, which a venv may put first)."""
    dirs = [*os.environ.get("PATH", "").split(os.pathsep), "/usr/bin", "/usr/local/bin"]
    for directory in dirs:
        exe = shutil.which("storescp", path=directory)
        if exe is None:
            continue
        proc = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10, check=False)
        if "dcmtk" in (proc.stdout + proc.stderr).lower():
            return exe
    pytest.fail("dcmtk storescp not found: install dcmtk (e.g. `apt-get install dcmtk`)")


def wait_for_port(port: int, proc: subprocess.Popen[bytes], deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"storescp exited with {proc.returncode}: {out!r} {err!r}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    pytest.fail(f"storescp did not listen on port {port} within {deadline} s")


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[Destination, Path]]:
    """A dcmtk storescp (AE title PACS) writing what it receives into a fresh directory."""
    out = tmp_path / "received"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        [dcmtk_storescp(), "-od", str(out), "-aet", "PACS", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_port(port, proc)
        yield Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=port), out
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def handle_store(event: evt.Event, status: int, delay: float) -> int:
    """C-STORE handler of the test SCPs: answer ``status`` after ``delay`` seconds."""
    time.sleep(delay)
    return status


@contextmanager
def pynetdicom_scp(
    status: int = 0x0000,
    *,
    delay: float = 0.0,
    contexts: tuple[str, ...] = (),
    ae_title: str = "PACS",
    require_called_aet: bool = False,
) -> Iterator[Destination]:
    ae = AE(ae_title=ae_title)
    ae.require_called_aet = require_called_aet
    if contexts:
        for sop_class in contexts:
            ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    else:
        ae.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle_store, [status, delay])]
    )
    assert server is not None
    try:
        yield Destination(name="test-scp", ae_title="PACS", host="127.0.0.1", port=port)
    finally:
        server.shutdown()


def test_sent_to_dcmtk_storescp(chest_report_path: Path, storescp: tuple[Destination, Path]) -> None:
    destination, received = storescp
    result = send_cstore(chest_report_path, destination, timeout=10)

    assert result.outcome == "sent", result.detail
    assert result.status == 0x0000
    (stored,) = list(received.iterdir())
    sent = pydicom.dcmread(chest_report_path)
    back = pydicom.dcmread(stored)
    assert back.SOPInstanceUID == sent.SOPInstanceUID
    assert back.SOPClassUID == Comprehensive3DSRStorage
    assert back.ContentSequence == sent.ContentSequence


def test_closed_port_is_retry_quickly(chest_report_path: Path) -> None:
    destination = Destination(name="down", ae_title="PACS", host="127.0.0.1", port=free_port())
    start = time.monotonic()
    result = send_cstore(chest_report_path, destination, timeout=5)
    assert (result.outcome, result.status) == ("retry", None)
    assert time.monotonic() - start < 5


@pytest.mark.parametrize(
    "status, outcome",
    [
        (0x0000, "sent"),
        (0xB000, "sent"),
        (0xB007, "sent"),
        (0xA700, "retry"),
        (0xA7FF, "retry"),
        (0xC000, "dead"),
        (0xA900, "dead"),
        (0x0122, "dead"),
    ],
)
def test_status_from_pynetdicom_scp(chest_report_path: Path, status: int, outcome: str) -> None:
    with pynetdicom_scp(status) as destination:
        result = send_cstore(chest_report_path, destination, timeout=10)
    assert (result.outcome, result.status) == (outcome, status), result.detail
    assert f"0x{status:04X}" in result.detail


def test_rejected_presentation_context_is_dead(chest_report_path: Path) -> None:
    with pynetdicom_scp(contexts=(CTImageStorage,)) as destination:
        result = send_cstore(chest_report_path, destination, timeout=10)
    assert (result.outcome, result.status) == ("dead", None)
    assert "presentation context" in result.detail


def test_rejected_association_is_retry(chest_report_path: Path) -> None:
    with pynetdicom_scp(ae_title="OTHER", require_called_aet=True) as destination:
        result = send_cstore(chest_report_path, destination, timeout=10)
    assert (result.outcome, result.status) == ("retry", None)
    assert "rejected" in result.detail


def test_no_response_within_timeout_is_retry(chest_report_path: Path) -> None:
    with pynetdicom_scp(0x0000, delay=2.0) as destination:
        start = time.monotonic()
        result = send_cstore(chest_report_path, destination, timeout=0.5)
        elapsed = time.monotonic() - start
    assert (result.outcome, result.status) == ("retry", None), result.detail
    assert elapsed < 2.0


def test_unreadable_file_is_dead(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    result = send_cstore(junk, Destination("x", "PACS", "127.0.0.1", free_port()))
    assert result.outcome == "dead"


def test_classify_status_categories() -> None:
    assert [classify_status(s) for s in (0x0000, 0x0001, 0xB006)] == ["sent"] * 3
    assert [classify_status(s) for s in (0xA701, 0x0213, 0xFE00)] == ["retry"] * 3
    assert [classify_status(s) for s in (0xC123, 0xA9FF, 0x0110, 0x0124)] == ["dead"] * 4


def test_backoff_bounds_grow_and_cap() -> None:
    rng = random.Random(7)
    for attempt in range(1, 15):
        ceiling = min(600.0, 2.0 * 2 ** (attempt - 1))
        draws = [backoff_delay(attempt, rng=rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in draws), attempt
        assert len(set(draws)) > 1  # jittered
    assert backoff_delay(10_000, rng=rng) <= 600.0
    assert backoff_delay(3, base=1.0, cap=3.0, rng=rng) <= 3.0


def test_backoff_never_shrinks_below_the_cap() -> None:
    rng = random.Random(11)
    for _ in range(100):
        delays = [backoff_delay(n, rng=rng) for n in range(1, 10)]  # ceilings 2 .. 512 < cap 600
        assert delays == sorted(delays)
    assert backoff_delay(1, rng=rng) <= 2.0 < backoff_delay(3, rng=rng)


def test_backoff_is_deterministic_with_seeded_rng() -> None:
    first = [backoff_delay(n, rng=random.Random(42)) for n in range(1, 8)]
    again = [backoff_delay(n, rng=random.Random(42)) for n in range(1, 8)]
    assert first == again


def test_backoff_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        backoff_delay(0)
    with pytest.raises(ValueError):
        backoff_delay(1, base=0)


def test_the_file_is_sent_as_stored_or_converted(chest_report_path: Path, tmp_path: Path) -> None:
    """A peer accepting the file's syntax gets its exact bytes; one accepting only implicit VR little endian
    gets a converted copy of the same content."""
    send_as_stored()
    received: list[bytes] = []

    def keep(event: evt.Event) -> int:
        # Meta and dataset as received, preamble dropped; the listener's tests in this process may have
        # turned on pynetdicom's chunked receive, which leaves the dataset in a file.
        path = event.dataset_path
        received.append((path.read_bytes() if path else event.encoded_dataset())[128:])
        return 0x0000

    syntax = str(pydicom.filereader.read_file_meta_info(chest_report_path).TransferSyntaxUID)
    for accepted in (syntax, ImplicitVRLittleEndian):
        ae = AE(ae_title="PACS")
        ae.add_supported_context(Comprehensive3DSRStorage, [accepted])
        port = free_port()
        server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, keep)])
        assert server is not None
        try:
            result = send_cstore(chest_report_path, Destination("t", "PACS", "127.0.0.1", port), timeout=10)
        finally:
            server.shutdown()
        assert result.outcome == "sent", result.detail
    on_disk = chest_report_path.read_bytes()
    dataset = on_disk[132 + 12 + int.from_bytes(on_disk[140:144], "little") :]
    assert received[0].endswith(dataset)  # byte for byte
    assert not received[1].endswith(dataset)
    converted = pydicom.dcmread(BytesIO(b"\0" * 128 + received[1]))
    assert converted.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert converted.ContentSequence == pydicom.dcmread(chest_report_path).ContentSequence
