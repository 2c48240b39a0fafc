"""Event-driven association reactors: pynetdicom's two loops per association, waking on events, not a clock.

pynetdicom 3.0 runs two threads per association that poll: the DUL reactor sleeps 1 ms whenever it finds
nothing to do, and the association's acceptor reactor sleeps 1 ms on every turn. Each wakes a thousand times
a second for the whole association and takes the interpreter lock each time; eight idle associations cost
the listener about half a core (measured: 54 % of one core), and eight parallel senders raised the CPU per
received 7.5 MB instance from 36 to 77 ms, starving the receive itself.

Here the same loops (copied from pynetdicom 3.0, behaviour unchanged otherwise) wait instead:

* the DUL reactor in ``select()`` on its socket and a wake-up pipe that is written whenever the association
  queues a primitive for it (``to_provider_queue``) or asks it to stop;
* the acceptor reactor on an :class:`threading.Event` set whenever the DUL queues something for it (a
  decoded DIMSE message, a release or abort primitive) or ends.

Both also wake every :data:`TICK` seconds to look at the timers and flags pynetdicom sets without telling
anyone (ARTIM, network idle timeout, kill). Installed on an association before it starts, by
:func:`make_quiet`, from the listener's request handler (:mod:`dicom_listener.transport`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import threading
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationSocket
from pynetdicom.utils import make_target

LOGGER = logging.getLogger("pynetdicom.dul")  # pynetdicom's own loggers, as in the loops copied
ASSOC_LOGGER = logging.getLogger("pynetdicom.assoc")

#: Longest a reactor sleeps without an event: how late a timer (ARTIM, network timeout) or a kill is noticed.
TICK = 0.05


class _NotifyingQueue(queue.Queue[Any]):
    """A queue that calls ``notify()`` after every ``put``."""

    def __init__(self, notify: Any) -> None:
        super().__init__()
        self._notify = notify

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._notify()


class QuietDUL(DULServiceProvider):
    """pynetdicom's DUL reactor, blocking in ``select()`` until its socket or its user has something."""

    _wake_r: int
    _wake_w: int
    _assoc_wake: threading.Event

    def prepare(self, assoc_wake: threading.Event) -> None:
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._assoc_wake = assoc_wake
        self.to_provider_queue = _NotifyingQueue(self.wake)
        self.to_user_queue = _NotifyingQueue(assoc_wake.set)

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):  # full: a wake-up is pending anyway; closed: over
            os.write(self._wake_w, b"\0")

    def kill_dul(self) -> None:
        super().kill_dul()
        self.wake()

    def _wait(self) -> None:
        """Until the socket is readable, a primitive was queued, or :data:`TICK` passed."""
        sock = cast(AssociationSocket, self.socket)
        if sock.ready:  # also data an SSL socket or the replayed request holds that select() cannot see
            return
        raw = sock.socket
        waitables: list[Any] = [self._wake_r] if raw is None else [raw, self._wake_r]
        try:
            readable, _, _ = select.select(waitables, [], [], TICK)
        except (OSError, ValueError):  # the socket was closed meanwhile: the loop finds out
            return
        if self._wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._wake_r, 4096):
                    pass

    def run_reactor(self) -> None:
        try:
            self._run_reactor()
        finally:
            self._assoc_wake.set()
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _run_reactor(self) -> None:
        # pynetdicom 3.0 DULServiceProvider.run_reactor, with time.sleep(self._run_loop_delay) -> self._wait()
        self._idle_timer.start()
        self.socket = cast(AssociationSocket, self.socket)
        sleep = False

        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                sleep = True

            if sleep:
                self._wait()

            if self._kill_thread:
                break

            if self.artim_timer.expired:
                self.event_queue.put("Evt18")

            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                LOGGER.error("Exception in DUL.run(), aborting association")
                LOGGER.exception(exc)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return

            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue

            self.state_machine.do_action(event)
            sleep = False


class QuietAssociation(Association):
    """pynetdicom's acceptor reactor, waiting on an event the DUL sets instead of sleeping 1 ms a turn."""

    _wake: threading.Event

    def kill(self) -> None:
        self._wake.set()
        super().kill()

    def _run_reactor(self) -> None:
        # pynetdicom 3.0 Association._run_reactor, with time.sleep(0.001) -> self._wake.wait(TICK)
        self._is_paused = False
        while not self._kill:
            self._wake.wait(TICK)
            self._wake.clear()

            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            # Take every message already decoded, not one per wake-up.
            while True:
                context_id, msg = self.dimse.get_msg(block=False)
                if not msg:
                    break
                self._serve_request(msg, cast(int, context_id))
                if self._kill:
                    return

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                ASSOC_LOGGER.info("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                log_msg = "Association Aborted"
                if self.acse.is_aborted("a-p-abort"):
                    log_msg += " (A-P-ABORT)"
                ASSOC_LOGGER.info(log_msg)
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                ASSOC_LOGGER.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()

                self.kill()
                return


def make_quiet(assoc: Association) -> None:
    """Give an acceptor association that has not started the event-driven reactors (in place)."""
    wake = threading.Event()
    assoc.__class__ = QuietAssociation
    cast(QuietAssociation, assoc)._wake = wake
    dul = assoc.dul
    dul.__class__ = QuietDUL
    cast(QuietDUL, dul).prepare(wake)
    dul._target = make_target(dul.run_reactor)  # type: ignore[attr-defined]  # bound by Thread.__init__
    assoc.dimse.msg_queue = _NotifyingQueue(wake.set)
