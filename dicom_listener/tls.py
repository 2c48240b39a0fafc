"""DICOM TLS for the listener (PS3.15 B.1): the server's SSLContext.

The TLS port is served by :func:`dicom_listener.transport.start_server` like the plain one: pynetdicom by
itself shakes hands on its single accept thread without a timeout, so one silent client locked every sender
out of the port; there each handshake runs in the connection's own thread, within the request deadline."""

from __future__ import annotations

import logging
import ssl

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
