"""Who may hold a connection or an association slot of the listener: the bookkeeping behind its limits.

Pure counting under one lock (and into the metrics of :mod:`core.metrics`); :mod:`dicom_listener.transport`
applies it to sockets and pynetdicom.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Address, IPv6Network, ip_address

from core.metrics import ASSOCIATIONS_ACCEPTED, ASSOCIATIONS_OPEN, ASSOCIATIONS_REFUSED, count
from core.settings import DicomSettings


def is_trusted(host: str, networks: list[IPv4Network | IPv6Network]) -> bool:
    """Whether ``host`` (an IP address, IPv4-mapped IPv6 included) lies in one of ``networks``."""
    try:
        addr = ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in networks)


@dataclass(eq=False)
class Ticket:
    """One accepted connection's claims on the gate."""

    sock: socket.socket
    host: str
    opened_at: float = field(default_factory=time.monotonic)
    evicted: bool = False
    associated: bool = False
    closed: bool = False


class Gate:
    """Counts connections (per address, waiting for their request) and association slots; thread-safe.

    One gate serves every server of a listener (plain and TLS ports share the same limits).
    """

    def __init__(self, settings: DicomSettings) -> None:
        self.settings = settings
        #: Calling AE titles that may take an association slot (empty: any).
        self.allowed_calling_aes = frozenset(ae.strip() for ae in settings.allowed_calling_aes)
        self._lock = threading.Lock()
        self._pending: OrderedDict[int, Ticket] = OrderedDict()
        self._per_host: defaultdict[str, int] = defaultdict(int)
        self._associations = 0

    def open(self, sock: socket.socket, host: str) -> Ticket | None:
        """Admit a new connection (None: refused); over the pending budget, the oldest waiting one goes."""
        limit = self.settings.max_connections_per_address
        with self._lock:
            if (
                limit
                and self._per_host[host] >= limit
                and not is_trusted(host, self.settings.trusted_networks)
            ):
                count(ASSOCIATIONS_REFUSED, "address_limit")
                return None
            if len(self._pending) >= self.settings.max_pending_connections:
                _, victim = self._pending.popitem(last=False)
                victim.evicted = True
                # Wakes the victim's thread out of recv(). Under the lock: the victim cannot have closed
                # its socket yet (close() comes first), so the descriptor is still its own.
                with contextlib.suppress(OSError, ValueError):
                    victim.sock.shutdown(socket.SHUT_RDWR)
            ticket = Ticket(sock, host)
            self._pending[id(ticket)] = ticket
            self._per_host[host] += 1
        return ticket

    def settle(self, ticket: Ticket) -> bool:
        """The request has been read: the connection stops counting as pending (False: it was evicted)."""
        with self._lock:
            if ticket.evicted:
                return False
            self._pending.pop(id(ticket), None)
            return True

    def admit(self, ticket: Ticket) -> bool:
        """Take an association slot (False: all taken)."""
        with self._lock:
            if self._associations >= self.settings.maximum_associations:
                count(ASSOCIATIONS_REFUSED, "association_limit")
                return False
            self._associations += 1
            ticket.associated = True
        count(ASSOCIATIONS_ACCEPTED)
        count(ASSOCIATIONS_OPEN)
        return True

    def close(self, ticket: Ticket) -> None:
        """Give back everything ``ticket`` holds; call it before closing the socket."""
        with self._lock:
            if ticket.closed:
                return
            ticket.closed = True
            self._pending.pop(id(ticket), None)
            self._per_host[ticket.host] -= 1
            if self._per_host[ticket.host] <= 0:
                del self._per_host[ticket.host]
            if not ticket.associated:
                return
            self._associations -= 1
            ticket.associated = False
        count(ASSOCIATIONS_OPEN, amount=-1)

    def counts(self) -> tuple[int, int, int]:
        """(connections, pending connections, associations) right now."""
        with self._lock:
            return sum(self._per_host.values()), len(self._pending), self._associations
