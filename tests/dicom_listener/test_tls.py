"""DICOM TLS on the listener's second port: dcmtk echoscu/storescu +tls and pynetdicom with an SSLContext as
clients, certificates made at test time; plain DICOM, TLS 1.1 and unknown clients are refused."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from core.settings import DicomSettings, Settings, SettingsError
from core.storage import Storage
from core.tables import Instance
from dicom_listener.server import Listener, serve
from dicom_listener.tls import tls_context
from tests import factories as f
from tests.certificates import Pki, make_pki
from tests.peers import SHARED_DICOM, free_port, require_tool

#: dcmtk's tools, not the pynetdicom apps of the same names that a virtualenv puts first on PATH.
ECHOSCU, STORESCU = "/usr/bin/echoscu", "/usr/bin/storescu"
HANDSHAKE_TIMEOUT = 3.0  # the listener's ACSE timeout, which bounds a TLS handshake


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """SQLite only: TLS sits in front of the same handlers that tests/dicom_listener/test_store.py covers."""
    return f"sqlite:///{tmp_path / 'gateway.sqlite3'}"


def _settings(pki: Pki, **tls: object) -> DicomSettings:
    return DicomSettings(
        host="127.0.0.1",
        port=0,
        acse_timeout=HANDSHAKE_TIMEOUT,
        dimse_timeout=10,
        network_timeout=10,
        tls_port=0,
        tls_certificate=pki.server.certificate,
        tls_private_key=pki.server.key,
        **tls,
    )


@pytest.fixture
def listener(pki: Pki, storage: Storage, factory: sessionmaker[Session]) -> Iterator[Listener]:
    """TLS without a client-certificate requirement; presented client certificates are verified."""
    server = serve(Settings(dicom=_settings(pki, tls_ca_certificates=pki.ca)), storage, factory)
    yield server
    server.shutdown()


@pytest.fixture
def strict_listener(pki: Pki, storage: Storage, factory: sessionmaker[Session]) -> Iterator[Listener]:
    """TLS that requires a client certificate signed by our CA."""
    dicom = _settings(pki, tls_ca_certificates=pki.ca, tls_require_client_certificate=True)
    server = serve(Settings(dicom=dicom), storage, factory)
    yield server
    server.shutdown()


def _dcmtk(
    tool: str, port: int, *options: str, files: tuple[Path, ...] = ()
) -> subprocess.CompletedProcess[str]:
    require_tool(tool, "dcmtk")
    command = [tool, "-to", "10", "-ta", "10", "-aet", "MODALITY", "-aec", "GATEWAY", *options, "127.0.0.1"]
    return subprocess.run([*command, str(port), *map(str, files)], capture_output=True, text=True, timeout=60)


def _with_client_certificate(pki: Pki) -> list[str]:
    return ["+tls", str(pki.client.key), str(pki.client.certificate), "+cf", str(pki.ca)]


def _count(factory: sessionmaker[Session]) -> int:
    with factory() as s:
        return int(s.scalar(select(func.count(Instance.id))) or 0)


def _client_context(pki: Pki, *, certificate: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki.ca)
    if certificate:
        context.load_cert_chain(pki.client.certificate, pki.client.key)
    return context


def _tls_echo(port: int, context: ssl.SSLContext, timeout: float = 10.0) -> int | None:
    """C-ECHO with pynetdicom over TLS; the status, or None without an association."""
    ae = AE(ae_title="PYNETDICOM")
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="GATEWAY", tls_args=(context, "localhost"))
    if not assoc.is_established:
        return None
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


# --- dcmtk clients ---------------------------------------------------------------------------------------


def test_echoscu_over_tls_with_and_without_client_certificate(listener: Listener, pki: Pki) -> None:
    assert listener.tls_port not in (None, listener.port)
    assert listener.tls_port is not None
    with_cert = _dcmtk(ECHOSCU, listener.tls_port, *_with_client_certificate(pki))
    assert with_cert.returncode == 0, with_cert.stderr
    anonymous = _dcmtk(ECHOSCU, listener.tls_port, "+tla", "+cf", str(pki.ca))
    assert anonymous.returncode == 0, anonymous.stderr
    plain = _dcmtk(ECHOSCU, listener.port)  # the plain port is still there, unchanged
    assert plain.returncode == 0, plain.stderr


def test_echoscu_refuses_a_listener_signed_by_another_ca(listener: Listener, pki: Pki) -> None:
    """The client side: dcmtk verifies our certificate and must not trust one from another CA."""
    assert listener.tls_port is not None
    result = _dcmtk(ECHOSCU, listener.tls_port, "+tla", "+cf", str(pki.other_ca))
    assert result.returncode != 0
    assert "certificate" in result.stderr.lower()


def test_storescu_over_tls_stores(
    listener: Listener, pki: Pki, factory: sessionmaker[Session], storage: Storage
) -> None:
    assert listener.tls_port is not None
    path = SHARED_DICOM / "dx_chest_small.dcm"
    result = _dcmtk(STORESCU, listener.tls_port, *_with_client_certificate(pki), files=(path,))
    assert result.returncode == 0, result.stderr
    sop = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
    with factory() as s:
        inst = s.scalars(select(Instance).where(Instance.sop_instance_uid == sop)).one()
        assert inst.calling_ae == "MODALITY"
        assert pydicom.dcmread(storage.absolute(inst.path)).SOPInstanceUID == sop


@pytest.mark.parametrize("client", ["anonymous", "stranger"])
def test_required_client_certificate_refuses_others(
    strict_listener: Listener, pki: Pki, factory: sessionmaker[Session], client: str
) -> None:
    port = strict_listener.tls_port
    assert port is not None
    files = (SHARED_DICOM / "dx_chest_small.dcm",)
    if client == "anonymous":
        refused = _dcmtk(STORESCU, port, "+tla", "+cf", str(pki.ca), files=files)
    else:
        stranger = ["+tls", str(pki.stranger.key), str(pki.stranger.certificate), "+cf", str(pki.ca)]
        refused = _dcmtk(STORESCU, port, *stranger, files=files)
    assert refused.returncode != 0
    assert _count(factory) == 0
    accepted = _dcmtk(STORESCU, port, *_with_client_certificate(pki), files=files)
    assert accepted.returncode == 0, accepted.stderr
    assert _count(factory) == 1


# --- pynetdicom clients ----------------------------------------------------------------------------------


def test_pynetdicom_client_with_ssl_context(strict_listener: Listener, pki: Pki, tmp_path: Path) -> None:
    port = strict_listener.tls_port
    assert port is not None
    assert _tls_echo(port, _client_context(pki)) == 0
    assert _tls_echo(port, _client_context(pki, certificate=False), timeout=5) is None

    ds = f.chest_radiograph()
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="GATEWAY", tls_args=(_client_context(pki), "localhost"))
    assert assoc.is_established
    try:
        tls_socket = assoc.dul.socket.socket  # type: ignore[union-attr]
        assert isinstance(tls_socket, ssl.SSLSocket)
        assert tls_socket.version() in ("TLSv1.2", "TLSv1.3")
        assert int(assoc.send_c_store(ds).Status) == 0x0000
    finally:
        assoc.release()


def test_plain_association_on_the_tls_port_is_refused(listener: Listener, pki: Pki) -> None:
    port = listener.tls_port
    assert port is not None
    ae = AE(ae_title="PYNETDICOM")
    ae.connection_timeout = ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="GATEWAY")
    assert not assoc.is_established
    assert _tls_echo(port, _client_context(pki)) == 0


def test_silent_and_stalled_connections_do_not_block_the_tls_port(listener: Listener, pki: Pki) -> None:
    """pynetdicom alone does the handshake on its accept thread: one silent client locked the port out."""
    port = listener.tls_port
    assert port is not None
    silent = socket.create_connection(("127.0.0.1", port))
    stalled = socket.create_connection(("127.0.0.1", port))
    stalled.sendall(b"\x16\x03\x01")  # the start of a TLS record header, then nothing
    try:
        assert _tls_echo(port, _client_context(pki)) == 0
        for sock in (silent, stalled):  # the listener hangs up once the handshake timeout passed
            sock.settimeout(HANDSHAKE_TIMEOUT + 20)
            assert sock.recv(1024) == b""
    finally:
        silent.close()
        stalled.close()


def test_tls_1_1_client_is_refused(listener: Listener, pki: Pki) -> None:
    port = listener.tls_port
    assert port is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSVersion.TLSv1_1 itself is deprecated
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    old.load_verify_locations(pki.ca)
    assert _handshake(old, _tls_1_1_server(pki)) == "TLSv1.1"  # the client can speak TLS 1.1 here ...
    with pytest.raises(ssl.SSLError):  # ... but not to us
        _handshake(old, port)


def _tls_1_1_server(pki: Pki) -> int:
    """A bare TLS server that still accepts TLS 1.1, for one connection: shows the client really works."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    context.load_cert_chain(pki.server.certificate, pki.server.key)
    listening = socket.create_server(("127.0.0.1", 0))
    listening.settimeout(30)

    def accept_one() -> None:
        with listening:
            connection, _ = listening.accept()
            try:
                with context.wrap_socket(connection, server_side=True):
                    pass
            except OSError:
                connection.close()

    threading.Thread(target=accept_one, daemon=True).start()
    return int(listening.getsockname()[1])


def _handshake(context: ssl.SSLContext, port: int) -> str | None:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        return tls.version()


# --- configuration ---------------------------------------------------------------------------------------


def test_server_context_is_tls_1_2_or_later_with_the_requested_client_check(pki: Pki) -> None:
    assert tls_context(_settings(pki)).minimum_version == ssl.TLSVersion.TLSv1_2
    assert tls_context(_settings(pki)).verify_mode == ssl.CERT_NONE
    optional = tls_context(_settings(pki, tls_ca_certificates=pki.ca))
    assert optional.verify_mode == ssl.CERT_OPTIONAL
    required = tls_context(_settings(pki, tls_ca_certificates=pki.ca, tls_require_client_certificate=True))
    assert required.verify_mode == ssl.CERT_REQUIRED


def test_a_key_that_does_not_match_stops_start_up(
    pki: Pki, storage: Storage, factory: sessionmaker[Session]
) -> None:
    plain_port = free_port()
    dicom = _settings(pki).model_copy(update={"port": plain_port, "tls_private_key": pki.client.key})
    with pytest.raises(SettingsError, match="GATEWAY_DICOM__TLS_PRIVATE_KEY"):
        serve(Settings(dicom=dicom), storage, factory)
    with socket.socket() as s:  # the plain server started first was closed again
        s.bind(("127.0.0.1", plain_port))
