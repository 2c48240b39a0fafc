"""Receiver processes: admitted associations run outside the listening process, over several cores.

One Python process receives DICOM at about one core: its associations share one interpreter lock, and with
4 and 8 parallel senders of 7.5 MB instances the listener stayed near 23 instances/s while it had CPU to
spare (`bench/ingest_cr.py`). So in ``gateway serve`` the listening process only admits connections (the
per-address, pending-connection and association limits of :mod:`dicom_listener.admission` stay in one place)
and reads each A-ASSOCIATE-RQ; then it hands the connected socket and the request over to one of
``GATEWAY_DICOM__RECEIVER_PROCESSES`` receiver processes (``gateway receiver``, supervised like the workers),
which runs the association with the same AE, handlers, PDU guard and storage as the listener would.

The hand-over (``sendmsg`` with ``SCM_RIGHTS`` over a Unix socket pair per receiver, inherited at start):
the socket of the connection, the request bytes, the peer's address, and one end of a fresh socket pair that
the receiver closes when the association is over. The listener's connection thread waits on the other end
and only then gives the association slot back: a receiver that dies (killed, out of memory) closes it too,
so slots are never lost; the modalities of its associations in flight see the connection drop and send
again (nothing they were not told 0x0000 for is lost). A connection goes to the ready receiver with the
fewest associations; with none ready (all restarting) the listener runs it itself, as it does for DICOM TLS
connections (TLS state cannot move between processes).
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger(__name__)

_READY = b"ready"
_LENGTH = struct.Struct(">I")
#: Largest hand-over message (header and A-ASSOCIATE-RQ; well within a Unix socket's default buffer). A
#: longer request (DicomSettings.max_association_pdu allows up to 16 MiB) runs in the listening process.
MAX_MESSAGE = 128 << 10


@dataclass(eq=False)
class _Receiver:
    slot: int
    control: socket.socket
    ready: bool = False
    busy: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class Handed:
    """A connection a receiver runs: :meth:`wait` returns when the receiver is done with it or is gone."""

    def __init__(self, done: socket.socket, receiver: _Receiver) -> None:
        self._done, self._receiver = done, receiver

    def wait(self) -> None:
        try:
            with contextlib.suppress(OSError):
                while self._done.recv(64):
                    pass
        finally:
            self._done.close()
            with self._receiver.lock:
                self._receiver.busy -= 1


class ReceiverPool:
    """The listening process's side: one control channel per receiver slot (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._receivers: dict[int, _Receiver] = {}

    def channel(self, slot: int) -> socket.socket:
        """A control channel for the process about to start in ``slot``; returns the end it inherits."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        receiver = _Receiver(slot, ours)
        with self._lock:
            self._receivers[slot] = receiver
        threading.Thread(target=self._watch, args=(receiver,), name=f"receiver-{slot}", daemon=True).start()
        return theirs

    def ready_count(self) -> int:
        with self._lock:
            return sum(r.ready for r in self._receivers.values())

    def _watch(self, receiver: _Receiver) -> None:
        """Marks the receiver ready when it says so, and gone when its end closes (it exited or died)."""
        try:
            while message := receiver.control.recv(64):
                if message == _READY:
                    receiver.ready = True
                    log.info("receiver slot %d ready", receiver.slot)
        except OSError:
            pass
        finally:
            receiver.ready = False
            with self._lock:
                if self._receivers.get(receiver.slot) is receiver:
                    del self._receivers[receiver.slot]
            receiver.control.close()

    def hand_over(self, conn: socket.socket, host: str, port: int, request: bytes) -> Handed | None:
        """Give ``conn`` (its A-ASSOCIATE-RQ ``request`` already read) to the least busy ready receiver;
        None when none could take it (the caller runs the association itself)."""
        header = json.dumps({"host": host, "port": port}).encode()
        message = _LENGTH.pack(len(header)) + header + request
        if len(message) > MAX_MESSAGE:
            return None
        tried: set[int] = set()
        while True:
            with self._lock:
                candidates = [r for r in self._receivers.values() if r.ready and r.slot not in tried]
            if not candidates:
                return None
            receiver = min(candidates, key=lambda r: r.busy)
            tried.add(receiver.slot)
            done, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            with receiver.lock:
                receiver.busy += 1
            try:
                socket.send_fds(receiver.control, [message], [conn.fileno(), theirs.fileno()])
            except OSError as exc:  # it died just now: the watch thread forgets it
                log.warning("receiver slot %d cannot take a connection: %s", receiver.slot, exc)
                receiver.ready = False
                done.close()
                with receiver.lock:
                    receiver.busy -= 1
                continue
            finally:
                theirs.close()
            return Handed(done, receiver)


class Associating(Protocol):
    def associate(self, conn: socket.socket, address: tuple[str, int], request: bytes) -> None: ...


def run_receiver(control: socket.socket, server: Associating, *, network_timeout: float) -> None:
    """A receiver process's loop: take connections from ``control`` and run each association in a thread of
    its own, until the listening process closes the channel (returns) or the process is stopped."""
    control.send(_READY)
    while True:
        try:
            message, fds, _flags, _address = socket.recv_fds(control, MAX_MESSAGE, 2)
        except InterruptedError:
            continue
        if not message and not fds:
            log.info("the listening process closed the channel: receiver exits")
            return
        if len(fds) != 2:
            log.error("hand-over with %d descriptors instead of 2: ignored", len(fds))
            for fd in fds:
                with contextlib.suppress(OSError):
                    socket.socket(fileno=fd).close()
            continue
        conn, done = socket.socket(fileno=fds[0]), socket.socket(fileno=fds[1])
        try:
            (size,) = _LENGTH.unpack_from(message)
            peer = json.loads(message[_LENGTH.size : _LENGTH.size + size])
            address = (str(peer["host"]), int(peer["port"]))
            request = bytes(message[_LENGTH.size + size :])
            conn.settimeout(network_timeout)
        except (ValueError, KeyError, TypeError, struct.error, OSError) as exc:
            log.error("unreadable hand-over (%s): connection closed", exc)
            _close(conn, done)
            continue
        threading.Thread(
            target=_associate, args=(server, conn, address, request, done), name="handed", daemon=True
        ).start()


def _associate(
    server: Associating, conn: socket.socket, address: tuple[str, int], request: bytes, done: socket.socket
) -> None:
    try:
        server.associate(conn, address, request)
    except Exception:
        log.exception("association from %s failed", address[0])
    finally:
        _close(conn, done)


def _close(conn: socket.socket, done: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)
    conn.close()
    done.close()  # the listening process gives the association slot back
