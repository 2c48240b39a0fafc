"""DICOM TLS for the listener (PS3.15 B.1): the server's SSLContext, and a server that does each TLS
handshake in the connection's own thread, within a deadline."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from typing import Any

from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer

from core.settings import DicomSettings, SettingsError

log = logging.getLogger(__name__)


def tls_context(settings: DicomSettings) -> ssl.SSLContext:
    """The listener's context: TLS 1.2 or later, our certificate; client certificates verified against
    ``tls_ca_certificates`` when presented, and required with ``tls_require_client_certificate``.

    Raises :class:`SettingsError` naming the settings when a file cannot be loaded (wrong key, not PEM).
    """
    assert settings.tls_certificate is not None and settings.tls_private_key is not None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_certificate, settings.tls_private_key)
    except (OSError, ValueError) as exc:
        raise SettingsError(
            "GATEWAY_DICOM__TLS_CERTIFICATE / GATEWAY_DICOM__TLS_PRIVATE_KEY: cannot load "
            f"{settings.tls_certificate} with {settings.tls_private_key}: {exc}"
        ) from None
    if settings.tls_ca_certificates is not None:
        try:
            context.load_verify_locations(cafile=settings.tls_ca_certificates)
        except (OSError, ValueError) as exc:
            raise SettingsError(
                f"GATEWAY_DICOM__TLS_CA_CERTIFICATES: cannot load {settings.tls_ca_certificates}: {exc}"
            ) from None
        context.verify_mode = ssl.CERT_OPTIONAL
    if settings.tls_require_client_certificate:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class TlsAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with TLS, the handshake moved off the accept loop.

    Given an ``ssl_context``, pynetdicom wraps each accepted socket inside ``get_request``, on the one thread
    that accepts connections, with no timeout: a single client that connects and sends nothing holds up
    every later connection to the port (measured: a dcmtk ``echoscu +tls`` waited 60 s and failed). Here
    the accept loop only accepts; each connection's thread does its handshake within ``handshake_timeout``
    and then runs the association as usual. A failed handshake (plain DICOM, wrong or missing client
    certificate, TLS older than 1.2) closes that connection only.
    """

    def __init__(
        self, *args: Any, tls_context: ssl.SSLContext, handshake_timeout: float, **kwargs: Any
    ) -> None:
        self.tls_context = tls_context
        self.handshake_timeout = handshake_timeout
        super().__init__(*args, **kwargs)

    def process_request_thread(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: tuple[str, int] | str
    ) -> None:
        assert isinstance(request, socket.socket)
        previous = request.gettimeout()
        try:
            request.settimeout(self.handshake_timeout)
            wrapped = self.tls_context.wrap_socket(request, server_side=True)
            wrapped.settimeout(previous)
        except (OSError, ValueError) as exc:
            peer = client_address[0] if isinstance(client_address, tuple) else client_address
            log.warning("TLS handshake with %s refused: %s", peer, exc)
            self.shutdown_request(request)
            return
        super().process_request_thread(wrapped, client_address)


def start_tls_server(ae: AE, settings: DicomSettings, evt_handlers: list[Any]) -> TlsAssociationServer:
    """Listen for DICOM TLS on ``settings.tls_port`` in a background thread, like ``ae.start_server``."""
    assert settings.tls_port is not None
    server = ae.make_server(
        (settings.host, settings.tls_port),
        evt_handlers=evt_handlers,
        server_class=TlsAssociationServer,
        tls_context=tls_context(settings),
        handshake_timeout=settings.acse_timeout,
    )
    assert isinstance(server, TlsAssociationServer)
    thread = threading.Thread(target=server.serve_forever, name="AcceptorServer-TLS", daemon=True)
    thread.start()
    # as ae.start_server does: AE.shutdown() stops it, and server.shutdown() removes it from this list
    ae._servers.append(server)
    if settings.tls_require_client_certificate:
        clients = "client certificate required"
    elif settings.tls_ca_certificates is not None:
        clients = "client certificate verified when presented"
    else:
        clients = "no client certificate asked"
    log.info("DICOM TLS listener on %s:%d (TLS 1.2+, %s)", settings.host, server.server_address[1], clients)
    return server
