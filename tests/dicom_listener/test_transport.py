"""Connection limits on a real listener: raw sockets as hostile peers, pynetdicom and dcmtk as modalities."""

from __future__ import annotations

import copy
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy.orm import Session, sessionmaker

from core.db import make_engine, make_sessionmaker
from core.migrate import upgrade
from core.settings import DicomSettings, Settings, SettingsError, load_settings
from core.storage import Storage
from dicom_listener.admission import Gate, is_trusted
from dicom_listener.server import Listener, serve
from dicom_listener.transport import start_server
from tests.dicom_listener.sockets import (
    LOOPBACK,
    associate_rq,
    closed_by_server,
    connect,
    echo,
    echoscu,
    pdu_header,
)
from tests.peers import SHARED_DICOM, send_file, storescu, wait_for

ALLOWED = ["MODALITY", "PYNETDICOM"]


@pytest.fixture
def factory(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    """SQLite only: these tests are about sockets, not the database."""
    engine = make_engine(f"sqlite:///{tmp_path / 'gateway.sqlite3'}")
    upgrade(engine)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def make_listener(storage: Storage, factory: sessionmaker[Session]) -> Iterator[Callable[..., Listener]]:
    started: list[Listener] = []

    def make(**overrides: Any) -> Listener:
        dicom = DicomSettings(
            host=LOOPBACK,
            port=0,
            allowed_calling_aes=ALLOWED,
            acse_timeout=10,
            dimse_timeout=10,
            network_timeout=10,
            **overrides,
        )
        started.append(serve(Settings(dicom=dicom), storage, factory))
        return started[-1]

    yield make
    for listener in started:
        listener.shutdown()


def settled(listener: Listener, counts: tuple[int, int, int] = (0, 0, 0)) -> None:
    wait_for(f"gate counts {counts}", lambda: listener.server.gate.counts() == counts, timeout=15)


# --- PDU length caps ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "reason"),
    [
        (pdu_header(0x01, 0xFFFFFFF0) + bytes(4096), 0x06),  # giant A-ASSOCIATE-RQ: invalid parameter value
        (pdu_header(0x01, 64 * 1024 + 1) + bytes(4096), 0x06),  # one byte over the cap
        (pdu_header(0x04, 100) + bytes(100), 0x02),  # P-DATA before associating: unexpected PDU
        (pdu_header(0x55, 100) + bytes(100), 0x01),  # no such PDU type: unrecognised PDU
        (pdu_header(0x01, 60) + bytes(60), 0x06),  # an A-ASSOCIATE-RQ that does not decode
    ],
    ids=["giant-rq", "rq-over-cap", "p-data-first", "unknown-type", "undecodable-rq"],
)
def test_bad_first_pdu_is_aborted_at_once(
    make_listener: Callable[..., Listener], first: bytes, reason: int
) -> None:
    listener = make_listener()
    with connect(listener.port) as sock:
        sock.sendall(first)
        reply = closed_by_server(sock, within=5)
    assert reply == b"\x07\x00" + struct.pack(">L", 4) + bytes([0, 0, 0x02, reason])  # A-ABORT, provider
    assert echo(listener.port) == 0x0000
    settled(listener)


def test_p_data_longer_than_the_announced_maximum_aborts(make_listener: Callable[..., Listener]) -> None:
    listener = make_listener(maximum_pdu_size=65536)
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(Verification)
    assoc = ae.associate(LOOPBACK, listener.port, ae_title="GATEWAY")
    assert assoc.is_established
    assert assoc.acceptor.maximum_length == 65536
    raw = assoc.dul.socket.socket  # type: ignore[union-attr]
    assert raw is not None
    raw.sendall(pdu_header(0x04, 65537) + bytes(65537))
    wait_for("the gateway to abort", lambda: assoc.is_aborted, timeout=10)
    assert echo(listener.port) == 0x0000
    settled(listener)


def test_instances_larger_than_one_pdu_arrive_in_pdus_of_the_announced_maximum(
    make_listener: Callable[..., Listener],
) -> None:
    listener = make_listener(maximum_pdu_size=65536)
    path = SHARED_DICOM / "cr_hip_rle.dcm"  # 2.8 MB: pynetdicom sends 42 PDUs of exactly the maximum
    assert path.stat().st_size > 40 * 65536
    assert send_file(listener.port, path) == 0x0000  # pynetdicom
    result = storescu(listener.port, path)  # dcmtk
    assert result.returncode == 0, result.stderr


def test_each_association_copies_the_contexts_but_shares_their_uids(
    make_listener: Callable[..., Listener],
) -> None:
    """pynetdicom deep-copies the supported contexts for every connection; re-creating their ~3,000 UIDs cost
    ~25 ms of CPU per association, so the copies share the UIDs but hold lists of their own."""
    listener = make_listener()
    contexts = listener.server.contexts
    assert len(contexts) == len(listener.ae.supported_contexts) > 100
    copies = copy.deepcopy(contexts)  # what pynetdicom's RequestHandler does for each connection
    for original, clone in zip(contexts, copies, strict=True):
        assert clone == original and clone is not original
        assert clone.transfer_syntax is not original.transfer_syntax
        assert all(a is b for a, b in zip(clone.transfer_syntax, original.transfer_syntax, strict=True))
    copies[0].add_transfer_syntax("1.2.3.4")  # one association's copy is its own
    assert "1.2.3.4" not in contexts[0].transfer_syntax
    result = storescu(listener.port, SHARED_DICOM / "dx_chest_small.dcm")  # still negotiates and stores
    assert result.returncode == 0, result.stderr


# --- slots and budgets --------------------------------------------------------------------------------


def test_maximum_associations_all_work_and_one_more_is_rejected_transient(
    make_listener: Callable[..., Listener],
) -> None:
    listener = make_listener(association_request_timeout=120)  # maximum_associations: the default, 16
    maximum = DicomSettings().maximum_associations
    waiting = [connect(listener.port) for _ in range(20)]  # silent: they must not take a slot
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(Verification)
    associations = [ae.associate(LOOPBACK, listener.port, ae_title="GATEWAY") for _ in range(maximum)]
    try:
        assert all(a.is_established for a in associations)
        assert [int(a.send_c_echo().Status) for a in associations] == [0x0000] * maximum
        extra = ae.associate(LOOPBACK, listener.port, ae_title="GATEWAY")
        assert extra.is_rejected
        rj = extra.acceptor.primitive
        assert rj is not None
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)  # transient, local limit
        result = echoscu(listener.port)
        assert result.returncode != 0
        assert "local limit exceeded" in result.stderr.lower()
        associations.pop().release()
        settled(listener, (maximum - 1 + len(waiting), len(waiting), maximum - 1))
        assert echoscu(listener.port).returncode == 0
    finally:
        for a in associations:
            a.release()
        for s in waiting:
            s.close()
    settled(listener)


def test_strangers_never_take_a_slot(make_listener: Callable[..., Listener]) -> None:
    listener = make_listener(maximum_associations=1)
    stop = threading.Event()
    replies: list[bytes | None] = []

    def stranger() -> None:
        while not stop.is_set():
            with connect(listener.port) as sock:
                sock.sendall(associate_rq(calling="STRANGER"))
                replies.append(closed_by_server(sock, within=5))

    threads = [threading.Thread(target=stranger) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        for _ in range(5):
            assert echo(listener.port) == 0x0000
            # The slot is free again once the association's thread has ended (a few ms after release).
            wait_for("the slot to be free", lambda: listener.server.gate.counts()[2] == 0, timeout=10)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert len(replies) >= 8
    # A-ASSOCIATE-RJ: rejected permanent, by the service user, calling AE title not recognised.
    assert {r[:10] if r else None for r in replies} == {
        b"\x03\x00" + struct.pack(">L", 4) + b"\x00\x01\x01\x03"
    }


def test_per_address_limit(make_listener: Callable[..., Listener]) -> None:
    listener = make_listener(max_connections_per_address=3, trusted_networks=[])
    held = [connect(listener.port) for _ in range(3)]
    settled(listener, (3, 3, 0))
    with connect(listener.port) as fourth:
        assert closed_by_server(fourth, within=5) == b""  # closed at once, nothing said
    assert echo(listener.port) is None
    for s in held:
        s.close()
    settled(listener)
    assert echo(listener.port) == 0x0000


def test_trusted_networks_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_DICOM__TRUSTED_NETWORKS", "10.1.0.0/16, 2001:db8::/32")
    networks = load_settings().dicom.trusted_networks
    assert is_trusted("10.1.2.3", networks) and is_trusted("::ffff:10.1.2.3", networks)
    assert is_trusted("2001:db8::7", networks)
    assert not is_trusted("10.2.0.1", networks) and not is_trusted("127.0.0.1", networks)
    monkeypatch.setenv("GATEWAY_DICOM__TRUSTED_NETWORKS", "10.1.2.3/16")  # host bits set: a typo
    with pytest.raises(SettingsError, match="GATEWAY_DICOM__TRUSTED_NETWORKS"):
        load_settings()


def test_trusted_networks_are_exempt_from_the_per_address_limit(
    make_listener: Callable[..., Listener],
) -> None:
    listener = make_listener(max_connections_per_address=3, trusted_networks=["127.0.0.0/8"])
    held = [connect(listener.port) for _ in range(6)]
    try:
        assert echo(listener.port) == 0x0000
    finally:
        for s in held:
            s.close()


def test_pending_budget_displaces_the_oldest(make_listener: Callable[..., Listener]) -> None:
    listener = make_listener(max_pending_connections=4)
    held = [connect(listener.port) for _ in range(4)]
    settled(listener, (4, 4, 0))
    newcomer = connect(listener.port)
    assert closed_by_server(held[0], within=5) == b""  # the oldest went
    assert all(closed_by_server(s, within=0.2) is None for s in held[1:])
    newcomer.sendall(associate_rq())
    assert closed_by_server(newcomer, within=1) is None  # associated
    for s in [*held, newcomer]:
        s.close()
    settled(listener)


def test_the_whole_request_must_arrive_within_the_deadline(make_listener: Callable[..., Listener]) -> None:
    listener = make_listener(association_request_timeout=2)
    rq = associate_rq()
    started = time.monotonic()
    with connect(listener.port) as silent, connect(listener.port) as dripping:
        for byte in rq:  # one byte every 0.25 s: each read is quick, the request never completes in time
            dripping.sendall(bytes([byte]))
            if closed_by_server(dripping, within=0.25) is not None:
                break
        assert time.monotonic() - started < 4
        assert closed_by_server(silent, within=1) == b""
    settled(listener)


# --- the listener survives whatever an association does -----------------------------------------------


class Panic(BaseException):
    """Like pyo3's PanicException: passes every ``except Exception``."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_handler_raising_base_exception_frees_its_slot_and_thread() -> None:
    def handle_echo(event: evt.Event) -> int:
        if event.assoc.requestor.ae_title == "CRASH":
            raise Panic("codec panic")
        return 0x0000

    ae = AE(ae_title="GATEWAY")
    ae.add_supported_context(Verification)
    gate = Gate(DicomSettings(maximum_associations=1, network_timeout=5))
    server = start_server(ae, (LOOPBACK, 0), gate, [(evt.EVT_C_ECHO, handle_echo)])
    port = int(server.server_address[1])
    baseline = threading.active_count()
    try:
        for _ in range(3):
            crasher = AE(ae_title="CRASH")
            crasher.dimse_timeout = 2
            crasher.add_requested_context(Verification)
            assoc = crasher.associate(LOOPBACK, port, ae_title="GATEWAY")
            assert assoc.is_established  # the single slot was freed after the previous crash
            assert "Status" not in assoc.send_c_echo()  # no answer: the association thread died
            assoc.abort()
            wait_for("the slot to be freed", lambda: gate.counts() == (0, 0, 0), timeout=15)
        assert echo(port, calling="MODALITY") == 0x0000
        wait_for("threads to end", lambda: threading.active_count() <= baseline, timeout=15)
    finally:
        server.shutdown()


def test_a_silent_peer_on_a_tls_port_blocks_nobody(tmp_path: Path) -> None:
    """The TLS handshake runs in the connection's thread under its deadline, not in the accept loop."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    self_signed = ["-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"]
    subprocess.run(
        ["openssl", "req", *self_signed, "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(cert))
    ae = AE(ae_title="GATEWAY")
    ae.add_supported_context(Verification)
    gate = Gate(DicomSettings(association_request_timeout=3))
    server = start_server(ae, (LOOPBACK, 0), gate, [], ssl_context=server_context)
    port = int(server.server_address[1])
    try:
        with connect(port) as silent, connect(port) as plain:
            plain.sendall(associate_rq())  # plain DICOM on the TLS port: not a handshake
            assert closed_by_server(plain, within=5) is not None
            client = AE(ae_title="MODALITY")
            client.add_requested_context(Verification)
            assoc = client.associate(
                LOOPBACK, port, ae_title="GATEWAY", tls_args=(client_context, "localhost")
            )
            assert assoc.is_established
            assert int(assoc.send_c_echo().Status) == 0x0000
            assoc.release()
            assert closed_by_server(silent, within=5) == b""  # its deadline, 3 s
    finally:
        server.shutdown()
