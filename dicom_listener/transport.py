"""What a network peer may cost the listener, before and after it associates.

pynetdicom 3.0 gives every TCP connection an Association thread at once and reads each PDU with blocking
reads and no size check: a peer can declare a 4 GiB A-ASSOCIATE-RQ and stream it into memory, and a peer that
sends one byte holds an association slot for good (the ARTIM timer is only looked at between whole PDUs, and
``Association.kill()`` waits for the reader stuck in ``recv``). So everything before the association is done
here, in the connection's own thread, before pynetdicom sees the connection:

* the A-ASSOCIATE-RQ must arrive whole within ``association_request_timeout`` of connecting (one deadline for
  the TLS handshake and the whole request, not per read) and be at most ``max_association_pdu`` bytes; another
  PDU, a longer one or one that does not decode is answered with an A-ABORT and closed, its body unread;
* connections still waiting for their A-ASSOCIATE-RQ have a budget of their own (``max_pending_connections``):
  a new connection over it displaces the oldest waiting one, so silent or dripping sockets can delay a
  modality by a round trip at most, never lock it out, and never take an association slot;
* one IP address holds at most ``max_connections_per_address`` connections (``trusted_networks`` exempt);
* an association slot (``maximum_associations``) is taken only by a request from an allowed calling AE, so
  strangers are rejected before they count; over the limit: A-ASSOCIATE-RJ transient, local limit exceeded.

Then pynetdicom gets the connection as it would have (its socket replays the request already read), with
:class:`PduGuardSocket` in place of its socket class: every PDU header is checked before its body is read
(P-DATA-TF at most the Maximum Length we announced, other PDUs at most ``max_association_pdu``) and every PDU
must arrive whole within ``network_timeout``. On a TLS server the handshake also moves out of the accept loop
(pynetdicom does it there, so one silent peer would stall every TLS connection) into the request deadline.

Extension points used: ``AE.make_server(server_class=...)``, ``AssociationServer(request_handler=...)``,
socketserver's ``get_request``/``verify_request``. Private ones, kept to two:
``RequestHandler._create_association`` (whose socket gets our subclass) and ``AE._servers`` (which
``AssociationServer.shutdown()`` expects us in).
The counting itself lives in :mod:`dicom_listener.admission`.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import logging
import os
import socket
import ssl
import struct
import threading
import time
from datetime import datetime
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer
from pynetdicom.utils import make_target

from core.metrics import ASSOCIATIONS_REFUSED, count
from core.settings import DicomSettings
from dicom_listener.admission import Gate, Ticket
from dicom_listener.reactor import make_quiet
from dicom_listener.receivers import ReceiverPool

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">BBL")  # PDU type, reserved, length of the rest
_ASSOCIATE_RQ, _P_DATA_TF, _ABORT = 0x01, 0x04, 0x07
_KNOWN_PDUS = range(0x01, 0x08)
#: A-ABORT reasons (PS3.8 9.3.8): unrecognized PDU, unexpected PDU, invalid PDU parameter value.
_UNRECOGNIZED, _UNEXPECTED, _INVALID = 0x01, 0x02, 0x06
#: After an A-ASSOCIATE-RJ, how long we wait for the peer to close (so it reads the RJ before any reset).
_REJECT_LINGER = 1.0


class _Dropped(Exception):
    """``quiet``: the peer closed without sending a byte (a TCP health check, /readyz's listener probe), which
    is logged at DEBUG and not counted as a refusal."""

    def __init__(self, reason: str, abort: int | None = None, *, quiet: bool = False) -> None:
        super().__init__(reason)
        self.abort = abort
        self.quiet = quiet


class PduGuardSocket(AssociationSocket):
    """pynetdicom's socket, checking each PDU header before its body is read (see the module docstring)."""

    _replay: bytearray
    _limit_data: int
    _limit_other: int
    _pdu_timeout: float
    _header: bytearray
    _left: int
    _deadline: float

    def guard(self, replay: bytes, settings: DicomSettings) -> None:
        self._replay = bytearray(replay)
        self._limit_data = settings.maximum_pdu_size
        self._limit_other = settings.max_association_pdu
        self._pdu_timeout = settings.network_timeout
        self._header = bytearray()
        self._left = 0
        self._deadline = 0.0

    @property
    def ready(self) -> bool:
        return bool(self._replay) or super().ready

    def recv(self, nr_bytes: int) -> bytearray:
        """Up to ``nr_bytes``; fewer means the connection is gone (pynetdicom then closes the association)."""
        data = self._replay[:nr_bytes]
        del self._replay[:nr_bytes]
        while len(data) < nr_bytes:
            in_header = self._left == 0
            if in_header and not self._header:
                self._deadline = time.monotonic() + self._pdu_timeout
            want = min(nr_bytes - len(data), 6 - len(self._header) if in_header else self._left)
            chunk = self._read(want)
            if not chunk:
                return data
            data += chunk
            if not in_header:
                self._left -= len(chunk)
                continue
            self._header += chunk
            if len(self._header) == 6:
                pdu_type, _, length = _HEADER.unpack(self._header)
                self._header.clear()
                limit = self._limit_data if pdu_type == _P_DATA_TF else self._limit_other
                if pdu_type in _KNOWN_PDUS and length > limit:
                    self._drop(f"PDU type 0x{pdu_type:02X} of {length} bytes exceeds {limit}", _INVALID)
                    return bytearray()
                self._left = length
        return data

    def _read(self, want: int) -> bytes:
        sock = self.socket
        remaining = self._deadline - time.monotonic()
        if sock is None:
            return b""
        if remaining <= 0:
            self._drop(f"PDU not complete within {self._pdu_timeout:g} s")
            return b""
        try:
            sock.settimeout(remaining)
            return sock.recv(min(want, 1 << 16))
        except TimeoutError:
            self._drop(f"PDU not complete within {self._pdu_timeout:g} s")
        except OSError:
            pass  # reset or closed: pynetdicom sees a short read
        finally:
            with contextlib.suppress(OSError):
                sock.settimeout(self._pdu_timeout)  # pynetdicom's sends share the socket
        return b""

    def _drop(self, reason: str, abort: int | None = None) -> None:
        log.warning("aborting association from %s: %s", self.assoc.requestor.address, reason)
        if self.socket is not None:
            if abort is not None:
                _send_quietly(self.socket, _abort_pdu(abort))
            _shutdown(self.socket)


class SharedSyntaxContext(PresentationContext):
    """A supported presentation context whose copy for each association shares its (immutable) UIDs.

    pynetdicom deep-copies the server's supported contexts for every connection it accepts. For every storage
    SOP class with every transfer syntax (~170 contexts, ~3,000 UIDs) that re-creates and re-validates each
    UID: ~25 ms of CPU under the interpreter lock per association, more than storing a 7.5 MB instance
    (bench/ingest_cr.py). Copying the lists that hold the UIDs keeps each association's contexts its own.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> SharedSyntaxContext:
        clone = copy.copy(self)
        clone.__dict__.update({k: list(v) for k, v in vars(self).items() if isinstance(v, list)})
        return clone

    @classmethod
    def of(cls, context: PresentationContext) -> SharedSyntaxContext:
        shared = cls()
        shared.__dict__.update(vars(context))
        return copy.deepcopy(shared)


class GuardedRequestHandler(RequestHandler):
    """Reads and vets the A-ASSOCIATE-RQ itself, then runs the association in this thread's lifetime."""

    server: GuardedServer
    _replay: bytes = b""

    def handle(self) -> None:
        ticket = self.server.take_ticket(self.request)
        try:
            self._handle(ticket)
        except Exception:
            log.exception("connection from %s failed", ticket.host)
        finally:
            self.server.gate.close(ticket)
            _shutdown(self.request)
            self.request.close()

    def _handle(self, ticket: Ticket) -> None:
        gate, settings, sock = self.server.gate, self.server.gate.settings, self.request
        try:
            request = _read_request(sock, ticket.opened_at + settings.association_request_timeout, settings)
            if not gate.settle(ticket):
                raise _Dropped("displaced by newer connections")
            pdu = A_ASSOCIATE_RQ()
            try:
                pdu.decode(request)
            except Exception as exc:
                raise _Dropped(f"undecodable A-ASSOCIATE-RQ ({exc})", _INVALID) from None
        except _Dropped as exc:
            if exc.quiet and not ticket.evicted:
                log.debug("connection from %s %s", ticket.host, exc)
                return
            count(ASSOCIATIONS_REFUSED, "bad_request")
            if ticket.evicted:
                log.warning("connection from %s dropped: displaced by newer connections", ticket.host)
            else:
                log.warning("connection from %s dropped: %s", ticket.host, exc)
            if exc.abort is not None:
                _send_quietly(sock, _abort_pdu(exc.abort))
            return
        calling = pdu.calling_ae_title.strip()
        if gate.allowed_calling_aes and calling not in gate.allowed_calling_aes:
            log.warning("association from %s refused: calling AE %r not allowed", ticket.host, calling)
            count(ASSOCIATIONS_REFUSED, "calling_ae")
            _reject(sock, result=0x01, source=0x01, reason=0x03)  # permanent, calling AE not recognised
            return
        if not gate.admit(ticket):
            log.warning(
                "association from %s (%s) refused: %d associations",
                ticket.host,
                calling,
                settings.maximum_associations,
            )
            _reject(sock, result=0x02, source=0x03, reason=0x02)  # transient, local limit exceeded
            return
        sock.settimeout(settings.network_timeout)  # pynetdicom's sends must not hang on a stalled peer
        pool = self.server.pool
        if pool is not None and self.server.ssl_context is None:  # TLS state cannot move to another process
            handed = pool.hand_over(sock, ticket.host, int(self.client_address[1]), request)
            if handed is not None:
                sock.close()  # only this process's descriptor: the receiver has its own
                handed.wait()
                return
        self.associate(request, ticket.host)

    def associate(self, request: bytes, host: str) -> None:
        """Run the association whose A-ASSOCIATE-RQ (read and admitted) is ``request``, until it ends."""
        self._replay = request
        assoc = self._create_association()
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()
        assoc.join()
        _remove_partial_dataset(assoc)
        if assoc.dul.is_alive():  # the association thread died (e.g. a handler raised BaseException)
            log.error("association from %s ended abnormally; closing its connection", host)
            assoc.dul.kill_dul()

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        sock = assoc.dul.socket
        assert sock is not None
        # pynetdicom builds its AssociationSocket itself; ours only overrides recv() and ready.
        sock.__class__ = PduGuardSocket
        assert isinstance(sock, PduGuardSocket)
        sock.guard(self._replay, self.server.gate.settings)
        make_quiet(assoc)
        return assoc


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with a :class:`Gate` in front of every connection."""

    request_queue_size = 256  # a burst of connections must not overflow the listen backlog
    daemon_threads = True  # connection threads now live as long as their association
    block_on_close = False

    def __init__(
        self,
        ae: AE,
        address: tuple[str, int],
        ae_title: str,
        contexts: list[PresentationContext],
        ssl_context: ssl.SSLContext | None = None,
        evt_handlers: list[Any] | None = None,
        *,
        gate: Gate,
        pool: ReceiverPool | None = None,
    ) -> None:
        self.gate = gate
        #: Receiver processes that run plain-TCP associations once admitted (None: all run here).
        self.pool = pool
        self._tickets: dict[socket.socket, Ticket] = {}
        self._tickets_lock = threading.Lock()
        super().__init__(
            ae, address, ae_title, contexts, ssl_context, evt_handlers, request_handler=GuardedRequestHandler
        )

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        try:
            client, address = self.socket.accept()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                log.error("cannot accept DICOM connections: %s", exc)
                time.sleep(0.1)  # the listening socket stays readable: do not spin
            raise
        if self.ssl_context:  # the handshake runs in the connection's thread, under its request deadline
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        host = str(client_address[0])
        ticket = self.gate.open(request, host)
        if ticket is None:
            log.warning(
                "connection from %s refused: %d connections from that address",
                host,
                self.gate.settings.max_connections_per_address,
            )
            return False
        with self._tickets_lock:
            self._tickets[request] = ticket
        return True

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: nobody else will give the ticket back
            with self._tickets_lock:
                ticket = self._tickets.pop(request, None)
            if ticket is not None:
                self.gate.close(ticket)
            raise

    def take_ticket(self, request: socket.socket) -> Ticket:
        with self._tickets_lock:
            return self._tickets.pop(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("DICOM connection from %s failed", client_address)


class HandedServer(GuardedServer):
    """A receiver process's stand-in for the listening server (:mod:`dicom_listener.receivers`): it never
    binds or accepts; it gives the associations the parent hands over what pynetdicom takes from a server
    (AE title, contexts, event handlers, the local address, ``shutdown_request``)."""

    def server_bind(self) -> None:
        pass

    def server_activate(self) -> None:
        pass

    def associate(self, conn: socket.socket, address: tuple[str, int], request: bytes) -> None:
        handler = GuardedRequestHandler.__new__(GuardedRequestHandler)
        handler.request, handler.client_address, handler.server = conn, address, self
        handler.associate(request, address[0])


def _make_server(ae: AE, address: tuple[str, int], server_class: type[GuardedServer], **kw: Any) -> Any:
    """``ae.make_server`` with the AE's contexts sharing their UIDs (see :class:`SharedSyntaxContext`)."""
    contexts: list[PresentationContext] = [SharedSyntaxContext.of(cx) for cx in ae.supported_contexts]
    server = ae.make_server(address, contexts=contexts, server_class=server_class, **kw)
    assert isinstance(server, server_class)
    return server


def handed_server(ae: AE, address: tuple[str, int], gate: Gate, evt_handlers: list[Any]) -> HandedServer:
    server: HandedServer = _make_server(ae, address, HandedServer, evt_handlers=evt_handlers, gate=gate)
    return server


def start_server(
    ae: AE,
    address: tuple[str, int],
    gate: Gate,
    evt_handlers: list[Any],
    ssl_context: ssl.SSLContext | None = None,
    pool: ReceiverPool | None = None,
) -> GuardedServer:
    """``ae.start_server(address, block=False, ...)`` with the gate in front; ``shutdown()`` stops it."""
    server: GuardedServer = _make_server(
        ae, address, GuardedServer, ssl_context=ssl_context, evt_handlers=evt_handlers, gate=gate, pool=pool
    )
    timestamp = datetime.now().strftime("%Y%m%d%H%M%S")
    thread = threading.Thread(
        target=make_target(server.serve_forever), name=f"AcceptorServer@{timestamp}", daemon=True
    )
    thread.start()
    ae._servers.append(server)  # AssociationServer.shutdown() removes itself from this list
    return server


def _read_request(sock: socket.socket, deadline: float, settings: DicomSettings) -> bytes:
    """The whole first PDU, which must be an A-ASSOCIATE-RQ of at most ``max_association_pdu`` bytes."""
    if isinstance(sock, ssl.SSLSocket):
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.do_handshake()
        except (OSError, ValueError) as exc:
            raise _Dropped(f"TLS handshake failed ({exc})") from None
    header = _recv_exactly(sock, 6, deadline, settings, silent_close=True)
    pdu_type, _, length = _HEADER.unpack(header)
    if pdu_type != _ASSOCIATE_RQ:
        if pdu_type == _ABORT:
            raise _Dropped("A-ABORT before associating")
        raise _Dropped(
            f"PDU type 0x{pdu_type:02X} instead of A-ASSOCIATE-RQ",
            _UNEXPECTED if pdu_type in _KNOWN_PDUS else _UNRECOGNIZED,
        )
    if length > settings.max_association_pdu:
        raise _Dropped(f"A-ASSOCIATE-RQ of {length} bytes exceeds {settings.max_association_pdu}", _INVALID)
    return header + _recv_exactly(sock, length, deadline, settings)


def _recv_exactly(
    sock: socket.socket, n: int, deadline: float, settings: DicomSettings, *, silent_close: bool = False
) -> bytes:
    """``n`` bytes by ``deadline``; ``silent_close``: a peer that closes before the first byte is quiet."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            k = sock.recv_into(view[got:], min(n - got, 1 << 16))
        except TimeoutError:
            raise _Dropped(
                f"no complete A-ASSOCIATE-RQ within {settings.association_request_timeout:g} s"
            ) from None
        except (OSError, ValueError) as exc:
            raise _Dropped(f"connection failed ({exc})") from None
        if k == 0:
            if silent_close and got == 0:
                raise _Dropped("closed without sending anything", quiet=True)
            raise _Dropped("closed before a complete A-ASSOCIATE-RQ")
        got += k
    return bytes(buf)


def _remove_partial_dataset(assoc: Association) -> None:
    """An association that ended mid-C-STORE leaves the temp file its dataset was being received into
    (chunked mode, pynetdicom removes it only after the handler ran): remove it."""
    message = assoc.dimse.message
    partial = getattr(message, "_data_set_file", None) if message is not None else None
    if partial is not None:
        with contextlib.suppress(OSError):
            partial.close()
        with contextlib.suppress(OSError):
            os.unlink(partial.name)


def _abort_pdu(reason: int) -> bytes:
    pdu = A_ABORT_RQ()
    pdu.source = 0x02  # DICOM UL service-provider
    pdu.reason_diagnostic = reason
    return pdu.encode()


def _reject(sock: socket.socket, *, result: int, source: int, reason: int) -> None:
    """Send an A-ASSOCIATE-RJ, then give the peer a moment to read it and close first."""
    pdu = A_ASSOCIATE_RJ()
    pdu.result, pdu.source, pdu.reason_diagnostic = result, source, reason
    if not _send_quietly(sock, pdu.encode()):
        return
    deadline = time.monotonic() + _REJECT_LINGER
    try:
        sock.shutdown(socket.SHUT_WR)
        while (remaining := deadline - time.monotonic()) > 0:
            sock.settimeout(remaining)
            if not sock.recv(4096):
                break
    except (OSError, ValueError):
        pass


def _send_quietly(sock: socket.socket, data: bytes) -> bool:
    try:
        sock.settimeout(_REJECT_LINGER)
        sock.sendall(data)
        return True
    except (OSError, ValueError):
        return False


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError, ValueError):
        sock.shutdown(socket.SHUT_RDWR)
