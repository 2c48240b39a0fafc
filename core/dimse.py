"""pynetdicom as a requestor (SCU): keeping its reactor off the responses we wait for.

pynetdicom runs a reactor thread on every association, the requestor's too, that takes any complete DIMSE
message off the queue and serves it as a request. Each ``send_c_store`` pauses it first: clear a checkpoint,
then wait until the reactor says it is paused. The flag is raised just before the reactor waits on the
checkpoint and lowered just after, so a reactor that passed the still-open checkpoint a moment earlier still
reads "paused": the C-STORE goes out, the reactor wakes, finds the response in the queue, logs "Received
unexpected C-STORE service message" and drops it, and ``send_c_store`` waits out the DIMSE timeout for an
answer that came long ago. It happens under load (a busy 2-core host, 20 senders at once); for delivery it
means a retry and a second copy of an SR the PACS already has.

A requestor that only sends requests never needs its reactor: :func:`reactor_held` parks it for good at its
checkpoint, and waits until it has provably arrived there before anything is sent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from pynetdicom.association import Association


class _Gate:
    """Stands in for the association's reactor checkpoint: the reactor that reaches it stays there until
    :meth:`open`; pynetdicom's own ``set()``/``clear()`` around each message do nothing."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self._open = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.reached.set()
        return self._open.wait(timeout)

    def set(self) -> None:
        pass

    def clear(self) -> None:
        pass

    def is_set(self) -> bool:
        return self._open.is_set()

    def open(self) -> None:
        self._open.set()


@contextmanager
def reactor_held(assoc: Association, timeout: float = 10.0) -> Iterator[None]:
    """Within the block, ``assoc`` (an established requestor association) sends requests and reads their
    responses with no reactor in the way. On leaving, the reactor runs again so that it can end with the
    association (release, abort, or a peer that went away). Raises TimeoutError when the reactor does not
    reach its checkpoint within ``timeout`` seconds (nothing was sent then)."""
    gate = _Gate()
    assoc._reactor_checkpoint = gate  # type: ignore[assignment]  # read afresh on each pass of the loop
    try:
        deadline = time.monotonic() + timeout
        while not gate.reached.wait(0.005) and assoc.is_alive():  # a dead reactor needs no holding
            if time.monotonic() > deadline:
                raise TimeoutError("the association's reactor did not pause")
        yield
    finally:
        released = threading.Event()
        released.set()
        assoc._reactor_checkpoint = released
        gate.open()
