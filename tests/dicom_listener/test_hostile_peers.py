"""`gateway serve` as users run it, under the attacks the issue-9 probes found: memory and lock-out."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.dicom_listener.sockets import associate_rq, closed_by_server, connect, echo, echoscu
from tests.peers import SHARED_DICOM, free_port, gateway_serve, storescu, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

#: The deadline for a whole A-ASSOCIATE-RQ, shortened so the test can watch it expire.
REQUEST_TIMEOUT = 4.0
MB = 1 << 20


@dataclass
class Gateway:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def status(self, field: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
        raise AssertionError(f"no {field} in /proc/{self.proc.pid}/status")

    def rss(self) -> int:
        return self.status("VmRSS") * 1024

    def threads(self) -> int:
        return self.status("Threads")

    def alive(self) -> bool:
        return self.proc.poll() is None


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    root = tmp_path_factory.mktemp("hostile")
    port = free_port()
    env = {
        "GATEWAY_DATA_DIR": str(root / "var"),
        "GATEWAY_DICOM__PORT": str(port),
        "GATEWAY_HTTP__PORT": str(free_port()),
        "GATEWAY_WORKER__THREADS": "0",  # the listener is under test; no inference
        "GATEWAY_DICOM__ALLOWED_CALLING_AES": "MODALITY,PYNETDICOM",
        "GATEWAY_DICOM__ASSOCIATION_REQUEST_TIMEOUT": str(REQUEST_TIMEOUT),
    }
    with gateway_serve(env, root / "gateway.log") as proc:
        yield Gateway(proc, port, root / "gateway.log")


def test_giant_association_pdus_do_not_grow_memory(gateway: Gateway) -> None:
    """8 peers at once, again and again: a ~4 GiB A-ASSOCIATE-RQ header, then filler as fast as it goes."""
    before = gateway.rss()
    peak = before
    stop = threading.Event()
    attempts: list[tuple[float, int]] = []  # (seconds until the gateway closed, bytes we got to send)

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, gateway.rss())
            time.sleep(0.01)

    def attack() -> None:
        filler = os.urandom(64 * 1024)
        while not stop.is_set():
            started, sent = time.monotonic(), 0
            with connect(gateway.port) as sock:
                sock.settimeout(10)
                try:
                    sock.sendall(struct.pack(">BBL", 0x01, 0, 0xFFFFFFF0))
                    while time.monotonic() - started < 10:
                        sock.sendall(filler)
                        sent += len(filler)
                except OSError:
                    pass  # reset by the gateway
            attempts.append((time.monotonic() - started, sent))

    sampler = threading.Thread(target=sample)
    attackers = [threading.Thread(target=attack) for _ in range(8)]
    sampler.start()
    for t in attackers:
        t.start()
    try:
        time.sleep(1.0)
        assert echo(gateway.port) == 0x0000  # during the attack
        result = echoscu(gateway.port)
        assert result.returncode == 0, result.stderr
        time.sleep(1.0)
    finally:
        stop.set()
        for t in [*attackers, sampler]:
            t.join()
    assert gateway.alive()
    assert len(attempts) >= 16
    assert max(seconds for seconds, _ in attempts) < 5
    # What a peer can push before the reset is socket buffers, never the declared 4 GiB.
    assert max(sent for _, sent in attempts) < 64 * MB
    assert peak - before < 50 * MB, f"RSS grew {(peak - before) / MB:.0f} MB"


def test_floods_do_not_lock_modalities_out(gateway: Gateway, tmp_path: Path) -> None:
    """200 garbage, silent and dripping connections opened and held: every echo and store within 2 s.

    All peers here are on 127.0.0.1, which the default GATEWAY_DICOM__TRUSTED_NETWORKS exempts from the
    per-address limit, so what keeps the modality in is the pending budget, the request deadline and slots
    taken only by associations (the per-address limit has its own test in test_transport.py).
    """
    threads_before = gateway.threads()
    rq = associate_rq()
    kinds = ["garbage", "truncated", "silent", "dripping"]
    attack: list[tuple[str, socket.socket]] = []
    stop = threading.Event()
    lock = threading.Lock()

    def open_flood() -> None:
        for i in range(200):
            kind = kinds[i % len(kinds)]
            sock = connect(gateway.port)
            if kind == "garbage":
                sock.sendall(os.urandom(64))
            elif kind == "truncated":  # a plausible header, then only part of the body
                sock.sendall(rq[:100])
            with lock:
                attack.append((kind, sock))
            time.sleep(0.01)

    def drip() -> None:
        position = 0
        while not stop.wait(1.0):
            with lock:
                dripping = [s for kind, s in attack if kind == "dripping"]
            for sock in dripping:
                with contextlib.suppress(OSError):
                    sock.sendall(rq[position : position + 1])
            position += 1

    opener, dripper = threading.Thread(target=open_flood), threading.Thread(target=drip)
    opener.start()
    dripper.start()
    sample = SHARED_DICOM / "dx_chest_small.dcm"
    timings: list[tuple[str, float, int]] = []
    try:
        while opener.is_alive() or len(timings) < 8:
            started = time.monotonic()
            if len(timings) % 2:
                result = storescu(gateway.port, sample)
                what = "C-STORE"
            else:
                result = echoscu(gateway.port)
                what = "C-ECHO"
            timings.append((what, time.monotonic() - started, result.returncode))
        opener.join()
        # Held: well past the request deadline, every flood connection has been closed by the gateway.
        time.sleep(REQUEST_TIMEOUT + 1)
        still_open = [kind for kind, s in attack if closed_by_server(s, within=0.01) is None]
    finally:
        stop.set()
        opener.join()
        dripper.join()
        for _, s in attack:
            s.close()
    assert len(attack) == 200
    assert all(code == 0 for _, _, code in timings), timings
    assert max(seconds for _, seconds, _ in timings) < 2.0, timings
    assert still_open == []
    # Nothing is left behind: no reader thread stuck on a connection that is gone.
    wait_for("the gateway's threads to end", lambda: gateway.threads() <= threads_before, timeout=30)
    log = gateway.log.read_text()
    assert "displaced by newer connections" in log  # the pending budget was full
    assert f"no complete A-ASSOCIATE-RQ within {REQUEST_TIMEOUT:g} s" in log
    assert gateway.alive()
