"""Delivery of our DICOM files to a PACS: one C-STORE per file, and the delay before retrying."""

from __future__ import annotations

import logging
import random
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.status import code_to_category

from core.dimse import reactor_held
from core.domain import Destination, DestinationTls

log = logging.getLogger(__name__)

Outcome = Literal["sent", "retry", "dead"]

_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


@dataclass(frozen=True)
class DeliveryResult:
    """What became of one C-STORE: ``sent``, worth a ``retry`` later, or ``dead`` (retrying cannot help)."""

    outcome: Outcome
    status: int | None  # DIMSE status of the C-STORE response; None when there was none
    detail: str


def classify_status(status: int) -> Outcome:
    """Outcome of a C-STORE response status (PS3.4 B.2.3, PS3.7 Annex C).

    Success 0x0000 and warnings (0x0001, 0x0107, 0x0116, 0xBxxx: coercion 0xB000, elements discarded
    0xB006, dataset does not match SOP class 0xB007) -> sent. Out of resources 0xA7xx and resource
    limitation 0x0213 -> retry, as is cancel 0xFE00. Every other failure (cannot understand 0xCxxx,
    does not match SOP class 0xA9xx, SOP class not supported 0x0122, not authorised 0x0124, ...) -> dead.
    """
    category = code_to_category(status)
    if category in ("Success", "Warning"):
        return "sent"
    if 0xA700 <= status <= 0xA7FF or status in (0x0213, 0xFE00):
        return "retry"
    return "dead"


class _TlsSocket(ssl.SSLSocket):
    """Tells its context why the handshake or a read failed; pynetdicom only logs it and reports no link."""

    def connect(self, addr: Any) -> None:
        try:
            super().connect(addr)
        except OSError as exc:
            self._remember(exc)
            raise

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        try:
            return super().recv(buflen, flags)
        except ssl.SSLError as exc:  # e.g. the peer's alert: certificate required, unknown CA
            self._remember(exc)
            raise

    def _remember(self, exc: OSError) -> None:
        context = self.context
        if isinstance(context, TlsContext) and context.failure is None:
            context.failure = str(exc) or type(exc).__name__


class TlsContext(ssl.SSLContext):
    """The client context of one association; ``failure`` says why TLS failed, if it did."""

    sslsocket_class = _TlsSocket
    failure: str | None = None


def tls_context(tls: DestinationTls) -> TlsContext:
    """A client context for DICOM TLS (PS3.15 B.1): TLS 1.2 or later, the peer's certificate verified against
    ``tls.ca_certificates`` (else the system's CAs), its host name checked unless ``tls.verify_hostname`` is
    false, our own certificate presented when given. Raises ``OSError``/``ValueError`` for unloadable files.
    """
    context = TlsContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname by default
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = tls.verify_hostname
    if tls.ca_certificates is not None:
        context.load_verify_locations(cafile=tls.ca_certificates)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if tls.certificate is not None:
        context.load_cert_chain(tls.certificate, tls.private_key)
    return context


def send_as_stored() -> None:
    """Have pynetdicom send a file given by path as the bytes it holds (``STORE_SEND_CHUNKED_DATASET``,
    process-wide) instead of parsing and re-encoding it: for the processes that deliver (the workers)."""
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True


def send_cstore(
    path: Path, destination: Destination, *, calling_ae: str = "GATEWAY", timeout: float = 30.0
) -> DeliveryResult:
    """Send the DICOM file at ``path`` to ``destination`` in one association; never raises for the network.

    Only the file meta is read before associating; a peer that accepts the file's own transfer syntax gets the
    file's bytes (see :func:`send_as_stored`), one that accepts only the other uncompressed syntax a converted
    copy.

    Requests one presentation context: the file's SOP class with its transfer syntax (plus the other
    little endian one when uncompressed, pynetdicom converts). TCP connect, ACSE, DIMSE and network
    timeouts are all ``timeout`` seconds. With ``destination.tls`` the association runs over TLS
    (:func:`tls_context`).

    - no connection, association rejected or aborted, timeout, no C-STORE response, socket error -> retry
    - TLS files that do not load, a failed handshake (certificate not trusted, wrong host name, our
      certificate refused) -> retry, the TLS error in the detail (an administrator fixes certificates)
    - presentation context not accepted -> dead (the peer will not take this SOP class/syntax)
    - a C-STORE response status -> :func:`classify_status`
    - unreadable file -> dead
    """
    peer = f"{destination.ae_title}@{destination.host}:{destination.port}"
    try:
        meta = read_file_meta_info(path)
        sop_class = UID(str(meta.MediaStorageSOPClassUID))
        sop_instance = UID(str(meta.MediaStorageSOPInstanceUID))
        transfer_syntax = UID(str(meta.TransferSyntaxUID))
    except (OSError, InvalidDicomError, AttributeError) as exc:
        return DeliveryResult("dead", None, f"cannot read {path}: {exc}")

    syntaxes = [transfer_syntax]
    if transfer_syntax in _UNCOMPRESSED:
        syntaxes += [ts for ts in _UNCOMPRESSED if ts != transfer_syntax]

    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = timeout
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.add_requested_context(sop_class, syntaxes)

    context: TlsContext | None = None
    if destination.tls is not None:
        try:
            context = tls_context(destination.tls)
        except (OSError, ValueError) as exc:
            return DeliveryResult("retry", None, f"TLS settings of destination {destination.name!r}: {exc}")
    tls_args = None if context is None else (context, destination.host)

    try:
        assoc = ae.associate(
            destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args
        )
    except OSError as exc:
        return DeliveryResult("retry", None, f"cannot associate with {peer}: {exc}")
    try:
        if assoc.rejected_contexts and not assoc.accepted_contexts:
            # the peer answered A-ASSOCIATE-AC with all contexts rejected; pynetdicom then aborts
            return DeliveryResult("dead", None, f"{peer} rejected the presentation context for {sop_class}")
        if not assoc.is_established:
            if assoc.is_rejected:
                why = "association rejected"
            elif assoc.is_aborted:
                why = "association aborted"
            else:
                why = "no association (connection refused or timed out)"
            if context is not None and context.failure:
                return DeliveryResult("retry", None, f"TLS with {peer} failed: {context.failure}")
            return DeliveryResult("retry", None, f"{why} by {peer}")
        if not any(cx.abstract_syntax == sop_class for cx in assoc.accepted_contexts):
            return DeliveryResult("dead", None, f"{peer} rejected the presentation context for {sop_class}")

        as_is = any(
            cx.abstract_syntax == sop_class and cx.transfer_syntax[0] == transfer_syntax
            for cx in assoc.accepted_contexts
        )
        try:
            # The file's bytes as they are (with pynetdicom's STORE_SEND_CHUNKED_DATASET, which the worker
            # turns on: no parse and no re-encoding of the SR); another accepted syntax needs the dataset.
            dataset: Path | Dataset = path if as_is else dcmread(path)
        except (OSError, InvalidDicomError) as exc:
            return DeliveryResult("dead", None, f"cannot read {path}: {exc}")
        with reactor_held(assoc):  # else pynetdicom's reactor may take the response (core.dimse)
            response = assoc.send_c_store(dataset)
        if "Status" not in response:
            return DeliveryResult("retry", None, f"no C-STORE response from {peer} (timeout or abort)")
        status = int(response.Status)
        outcome = classify_status(status)
        comment = response.get("ErrorComment")
        detail = f"C-STORE {sop_instance} to {peer}: status 0x{status:04X}"
        if comment:
            detail += f" ({comment})"
        log.info("%s -> %s", detail, outcome)
        return DeliveryResult(outcome, status, detail)
    except OSError as exc:
        return DeliveryResult("retry", None, f"network error with {peer}: {exc}")
    finally:
        if assoc.is_established:
            assoc.release()


def backoff_delay(
    attempt: int, *, base: float = 2.0, cap: float = 600.0, rng: random.Random | None = None
) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1 = the first try failed).

    "Equal jitter" exponential backoff: the ceiling ``c = min(cap, base * 2 ** (attempt - 1))`` doubles
    per attempt up to ``cap``, and the delay is drawn uniformly from ``[c / 2, c]``. Half is fixed, so
    below the cap delays never shrink from one attempt to the next (the next lower bound is this upper
    bound); half is random, so peers that failed together do not retry in lock-step. Pass a seeded ``rng`` for
    reproducible delays.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    if base <= 0 or cap <= 0:
        raise ValueError("base and cap must be positive")
    ceiling = min(cap, base * 2.0 ** min(attempt - 1, 60))
    draw = (rng or random).uniform(0.0, ceiling / 2.0)
    return ceiling / 2.0 + draw
