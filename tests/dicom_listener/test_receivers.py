"""Receiver processes (`dicom_listener.receivers`): `gateway serve` admits connections and hands each admitted
association to a receiver process; a killed receiver gives its association slots back and is replaced, and
with no receiver ready the listener runs associations itself."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import func, select

from core.db import make_engine, make_sessionmaker
from core.migrate import upgrade
from core.settings import DicomSettings, Settings
from core.storage import Storage
from core.tables import Instance
from dicom_listener import receivers
from dicom_listener.receivers import ReceiverPool, run_receiver
from dicom_listener.server import receiver, serve
from tests.peers import free_port, receiving_into, storescu, wait_for
from tests.pipeline import Gateway, StudyFiles, gateway_env, make_chest_study, process_tree

pytestmark = [pytest.mark.e2e]

STORED = re.compile(r"\[(\d+)\] INFO dicom_listener\.handlers: stored (\S+) ")


def receiver_pids(gateway: Gateway) -> list[int]:
    assert gateway.proc is not None
    return [p for p in process_tree(gateway.proc.pid) if "receiver" in _cmdline(p)]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def ready_lines(gateway: Gateway) -> int:
    return gateway.log_tail(10**7).count("ready") if gateway.log_path.exists() else 0


def echo(port: int, *, hold: threading.Event | None = None, held: list[int] | None = None) -> int | None:
    """C-ECHO status over a new association (None: not established); with ``hold``, keeps the association
    open until the event is set (after appending to ``held``)."""
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="GATEWAY")
    if not assoc.is_established:
        return None
    try:
        rsp = assoc.send_c_echo()
        if hold is not None:
            if held is not None:
                held.append(1)
            hold.wait(30)
        return int(rsp.Status) if "Status" in rsp else None
    finally:
        if assoc.is_established:
            assoc.release()


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    env = gateway_env(
        tmp_path,
        free_port(),
        GATEWAY_WORKER__PROCESSES="0",
        GATEWAY_DICOM__RECEIVER_PROCESSES="2",
        GATEWAY_DICOM__MAXIMUM_ASSOCIATIONS="3",
    )
    with Gateway(env, tmp_path / "logs") as gw:
        gw.start()
        wait_for("both receivers ready", lambda: ready_lines(gw) >= 2, 60)
        yield gw


def test_parallel_senders_are_received_by_the_receiver_processes(gateway: Gateway, tmp_path: Path) -> None:
    studies = [make_chest_study(tmp_path / "in", 2, index=i) for i in range(6)]

    def send(study: StudyFiles) -> subprocess.CompletedProcess[str]:
        result = storescu(gateway.dicom_port, *study.paths)
        if result.returncode and "Rejected Transient" in result.stderr:
            # Three senders on three slots: a slot is given back once the receiver has closed the
            # association, a moment after the sender saw its release; the next sender may be early.
            time.sleep(0.5)
            result = storescu(gateway.dicom_port, *study.paths)
        return result

    with ThreadPoolExecutor(3) as pool:  # dcmtk storescu, three at a time (the association limit)
        results = list(pool.map(send, studies))
    assert all(r.returncode == 0 for r in results), [r.stderr[-400:] for r in results]

    pids = set(receiver_pids(gateway))
    assert len(pids) == 2
    stored = {uid: int(pid) for pid, uid in STORED.findall(gateway.log_tail(10**7))}
    expected = {uid for s in studies for uid in s.sop_uids}
    assert set(stored) == expected
    assert set(stored.values()) <= pids, "an association ran in the listening process"
    files = list((gateway.storage_dir / "instances").rglob("*.dcm"))
    assert len(files) == len(expected)
    # Each receiver counted what it stored where the workers read the host's ingest rate (core.activity).
    counters = {
        int(p.stem): int.from_bytes(p.read_bytes(), "little")
        for p in (Path(gateway.env["GATEWAY_DATA_DIR"]) / "ingest-rate").glob("*.bytes")
    }
    assert gateway.proc is not None
    assert pids <= set(counters) <= pids | {gateway.proc.pid}
    assert sum(counters.values()) == sum(f.stat().st_size for f in files)


def test_a_killed_receiver_gives_its_slots_back_and_is_replaced(gateway: Gateway, tmp_path: Path) -> None:
    # Hold all 3 association slots open, then SIGKILL both receivers under them.
    release, established = threading.Event(), list[int]()
    with ThreadPoolExecutor(3) as pool:
        held = [pool.submit(echo, gateway.dicom_port, hold=release, held=established) for _ in range(3)]
        wait_for("3 associations held", lambda: len(established) == 3, 20)
        assert echo(gateway.dicom_port) is None, "a fourth association over the limit was accepted"
        old = receiver_pids(gateway)
        for pid in old:
            os.kill(pid, signal.SIGKILL)
        release.set()
        [h.result(30) for h in held]  # their connections dropped; nobody hangs

    # The slots came back at once (the listener runs associations itself while no receiver is ready) ...
    assert [echo(gateway.dicom_port) for _ in range(3)] == [0, 0, 0]
    # ... and new receivers take over.
    wait_for("two new receivers", lambda: len(set(receiver_pids(gateway)) - set(old)) == 2, 60)
    wait_for("them ready", lambda: ready_lines(gateway) >= 4, 60)
    study = make_chest_study(tmp_path / "in", 2)
    assert storescu(gateway.dicom_port, *study.paths).returncode == 0
    stored = {uid: int(pid) for pid, uid in STORED.findall(gateway.log_tail(10**7))}
    assert {stored[uid] for uid in study.sop_uids} <= set(receiver_pids(gateway))
    text = gateway.log_tail(10**7)
    assert re.search(r"receiver slot \d: process \d+ killed by signal SIGKILL", text)
    assert "Traceback" not in text


def test_hand_over_in_process_and_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool without processes: a receiver loop in a thread of this process (the same code a receiver
    process runs), and the listener's own fallback when no receiver is ready or a request is too long."""
    engine = make_engine(f"sqlite:///{tmp_path / 'gateway.sqlite3'}")
    upgrade(engine)
    storage = Storage(tmp_path / "storage")
    storage.prepare()
    factory = make_sessionmaker(engine)
    config = Settings(dicom=DicomSettings(host="127.0.0.1", port=0, network_timeout=10))
    pool = ReceiverPool()

    def count() -> int:
        with factory() as s:
            return int(s.scalar(select(func.count(Instance.id))) or 0)

    with receiving_into(storage):
        listener = serve(config, storage, factory, pool)
        try:
            # No receiver yet: the listener runs the association itself.
            study = make_chest_study(tmp_path / "in", 1)
            assert storescu(listener.port, *study.paths).returncode == 0
            assert count() == 1

            theirs = pool.channel(0)
            handed = receiver(config, storage, factory)
            loop = threading.Thread(
                target=run_receiver, args=(theirs, handed), kwargs={"network_timeout": 10}, daemon=True
            )
            loop.start()
            wait_for("the receiver ready", lambda: pool.ready_count() == 1, 10)
            taken: list[tuple[str, int]] = []
            original = type(handed).associate

            def spy(self: object, conn: socket.socket, address: tuple[str, int], request: bytes) -> None:
                taken.append(address)
                original(handed, conn, address, request)

            monkeypatch.setattr(type(handed), "associate", spy)
            study = make_chest_study(tmp_path / "in", 2)
            assert storescu(listener.port, *study.paths).returncode == 0
            assert count() == 3
            assert len(taken) == 1 and taken[0][0] == "127.0.0.1"

            # A request longer than a hand-over message may be: run here.
            monkeypatch.setattr(receivers, "MAX_MESSAGE", 64)
            assert echo(listener.port) == 0
            assert len(taken) == 1

            # The listener closes the channel: the receiver loop ends.
            pool._receivers[0].control.shutdown(socket.SHUT_RDWR)
            loop.join(10)
            assert not loop.is_alive()
            time.sleep(0.2)
            assert pool.ready_count() == 0
            assert echo(listener.port) == 0  # still served, by the listener
        finally:
            listener.shutdown()
    engine.dispose()
