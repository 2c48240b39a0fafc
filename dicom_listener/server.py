"""The DICOM listener: an AE accepting verification and every storage SOP class."""

from __future__ import annotations

import contextlib
import logging
import socket
import tempfile
import threading
from dataclasses import dataclass
from tempfile import NamedTemporaryFile
from typing import IO, Any

from pydicom.uid import (
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
    RLETransferSyntaxes,
    UncompressedTransferSyntaxes,
)
from pynetdicom import AE, AllStoragePresentationContexts, dimse_messages, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy.orm import Session, sessionmaker

from core.settings import DicomSettings, Settings
from core.storage import TMP_PREFIX, DirectTempFile, Storage
from dicom_listener.admission import Gate
from dicom_listener.handlers import AssociationStudies, handle_closed, handle_echo, handle_store
from dicom_listener.reactor import QuietAssociation, QuietDUL
from dicom_listener.receivers import ReceiverPool
from dicom_listener.tls import tls_context
from dicom_listener.transport import GuardedServer, HandedServer, handed_server, start_server

log = logging.getLogger(__name__)

#: Everything pydicom can decode with pylibjpeg / pyjpegls: uncompressed (incl. deflate), JPEG baseline,
#: extended and lossless, JPEG-LS, JPEG 2000 (incl. HTJ2K) and RLE.
TRANSFER_SYNTAXES = [
    *UncompressedTransferSyntaxes,
    *JPEGTransferSyntaxes,
    *JPEGLSTransferSyntaxes,
    *JPEG2000TransferSyntaxes,
    *RLETransferSyntaxes,
]


@dataclass
class Listener:
    ae: AE
    server: GuardedServer
    #: The DICOM TLS server (GATEWAY_DICOM__TLS_PORT), sharing the AE, the gate and the association limit.
    tls_server: GuardedServer | None = None

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def tls_port(self) -> int | None:
        return None if self.tls_server is None else int(self.tls_server.server_address[1])

    def shutdown(self) -> None:
        self.server.shutdown()
        if self.tls_server is not None:
            self.tls_server.shutdown()

    def check(self, timeout: float = 2.0) -> str | None:
        """Why the listener does not answer, or None: a TCP connection to the plain port must be accepted and,
        once this side has sent nothing and shut its half, closed by the listener's connection thread (the
        kernel alone would accept it; only a live acceptor closes it). Logged at DEBUG there, not counted."""
        host, port = str(self.server.server_address[0]), self.port
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
        try:
            with socket.create_connection((host, port), timeout=timeout) as sock:
                sock.shutdown(socket.SHUT_WR)
                with contextlib.suppress(ConnectionResetError):  # closed, and less politely
                    while sock.recv(1024):
                        pass
        except TimeoutError:
            return f"DICOM listener on port {port} took a connection but did not close it in {timeout:g} s"
        except OSError as exc:
            return f"DICOM listener on port {port} does not answer: {exc.strerror or exc}"
        return None


def build_ae(settings: DicomSettings) -> AE:
    ae = AE(ae_title=settings.ae_title)
    ae.acse_timeout = settings.acse_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.network_timeout
    ae.maximum_associations = settings.maximum_associations
    ae.maximum_pdu_size = settings.maximum_pdu_size
    ae.require_called_aet = False
    if settings.allowed_calling_aes:
        ae.require_calling_aet = list(settings.allowed_calling_aes)
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        assert context.abstract_syntax is not None
        ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
    return ae


def receive_into(storage: Storage) -> None:
    """Make the temp files pynetdicom receives C-STORE datasets into (see :func:`serve`) in the storage
    volume's ``tmp/``, named as its other temp files: accepting an instance is then a rename, and what an
    abort or a crash leaves there is removed by ``Storage.prepare``. Sets tempfile's process-wide folder and
    prefix: only for the process that runs the listener (``gateway serve``); elsewhere (tests) the files go
    to the system temp folder and are copied."""
    tempfile.tempdir = str(storage.tmp_dir)
    tempfile.template = TMP_PREFIX


#: Whether this process's listener receives C-STOREs with direct writes (GATEWAY_STORAGE__DIRECT_WRITES).
_direct_writes = False


def _received_into(delete: bool = False, mode: str = "wb", suffix: str = "") -> DirectTempFile | IO[bytes]:
    """The temp file pynetdicom receives a C-STORE dataset into: a DirectTempFile for our listener's
    associations (their handler completes it before reading it), pynetdicom's own for any other SCP running
    in the process (a test's PACS), whose handlers read the file as pynetdicom left it."""
    if _direct_writes and isinstance(threading.current_thread(), (QuietDUL, QuietAssociation)):
        return DirectTempFile(None, tempfile.template, suffix)
    return NamedTemporaryFile(delete=delete, mode=mode, suffix=suffix)


def _handlers(config: Settings, storage: Storage, factory: sessionmaker[Session]) -> list[Any]:
    """The association event handlers; each C-STORE's dataset is written to a temp file as its P-DATA arrive
    (pynetdicom's STORE_RECV_CHUNKED_DATASET, process-wide), never held in memory: a 7.5 MB CR costs no
    buffer copies, eight senders at once no 60 MB of them, and accepting it is an fsync and a rename
    (:func:`receive_into`)."""
    pynetdicom_config.STORE_RECV_CHUNKED_DATASET = True
    # pynetdicom makes that temp file with the NamedTemporaryFile it imported (process-wide, as the mode is)
    global _direct_writes
    _direct_writes = config.storage.direct_writes
    dimse_messages.NamedTemporaryFile = _received_into  # type: ignore[assignment]
    studies = AssociationStudies()
    return [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [storage, factory, studies, config.ingest]),
        (evt.EVT_CONN_CLOSE, handle_closed, [factory, studies]),
    ]


def serve(
    config: Settings, storage: Storage, factory: sessionmaker[Session], pool: ReceiverPool | None = None
) -> Listener:
    """Start listening in background threads; returns a handle whose ``shutdown()`` stops it. With a
    ``pool``, admitted plain-TCP associations run in its receiver processes
    (:mod:`dicom_listener.receivers`)."""
    settings = config.dicom
    handlers = _handlers(config, storage, factory)
    ae = build_ae(settings)
    gate = Gate(settings)
    server = start_server(ae, (settings.host, settings.port), gate, handlers, pool=pool)
    tls_server = None
    if settings.tls_port is not None:
        try:
            # Same gate: both ports share the per-address, pending-connection and association limits; the
            # handshake runs in the connection's thread under the association-request deadline.
            tls_server = start_server(
                ae, (settings.host, settings.tls_port), gate, handlers, ssl_context=tls_context(settings)
            )
        except Exception:
            server.shutdown()
            raise
        log.info("DICOM TLS listener on %s:%d (TLS 1.2+)", settings.host, tls_server.server_address[1])
    log.info(
        "DICOM listener %s on %s:%d (%s)",
        settings.ae_title,
        settings.host,
        server.server_address[1],
        "calling AEs: " + ", ".join(settings.allowed_calling_aes)
        if settings.allowed_calling_aes
        else "any AE",
    )
    return Listener(ae, server, tls_server)


def receiver(config: Settings, storage: Storage, factory: sessionmaker[Session]) -> HandedServer:
    """What a receiver process (``gateway receiver``) runs the associations handed to it with: the same AE,
    handlers and guards as :func:`serve`'s."""
    settings = config.dicom
    handlers = _handlers(config, storage, factory)
    return handed_server(build_ae(settings), (settings.host, settings.port), Gate(settings), handlers)
