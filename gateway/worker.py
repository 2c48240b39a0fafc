"""The worker loop: sweep for complete studies, claim a job, run it, record the outcome.

A failure is retried only when it can be transient (database, network, Orthanc, a full disk); any
other exception, whatever its class (a codec's ``PanicException`` is a BaseException), fails the job at once
with its reason, and the worker goes on with the next job.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType

from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from core import jobs
from core.activity import IngestRate
from core.archive import purge_expired
from core.db import transaction
from core.encoding import describe
from core.heartbeat import record_heartbeat, remove_heartbeats
from core.jobs import (
    DELIVER,
    LIGHT_KINDS,
    PROCESS_STUDY,
    PULL_ORTHANC_STUDY,
    PURGE_EXPIRED,
    RENDER_STUDY,
    VERIFY_REVIEW,
    ClaimedJob,
    PermanentError,
    Retry,
)
from core.tables import utcnow
from dicom_listener.completion import complete_studies
from gateway.delivery import deliver
from gateway.orthanc_pull import pull_orthanc_study
from gateway.review import render_study, verify_review
from gateway.runtime import Runtime
from gateway.study import process_study
from orthanc.client import OrthancUnavailable
from orthanc.reconcile import reconcile_once
from reporting.delivery import backoff_delay, send_as_stored

log = logging.getLogger(__name__)


def purge(rt: Runtime, job: ClaimedJob) -> None:
    """The retention job: delete the studies past GATEWAY_STORAGE__RETENTION_DAYS (0 now: nothing)."""
    days = rt.settings.storage.retention_days
    if days:
        deleted = purge_expired(rt.factory, rt.storage, days)
        if deleted:
            log.info("retention: %d studies older than %d days deleted", len(deleted), days)


HANDLERS: dict[str, Callable[[Runtime, ClaimedJob], None]] = {
    PROCESS_STUDY: process_study,
    DELIVER: deliver,
    PULL_ORTHANC_STUDY: pull_orthanc_study,
    VERIFY_REVIEW: verify_review,
    RENDER_STUDY: render_study,
    PURGE_EXPIRED: purge,
}

#: How often a worker that holds back for the ingest looks again (and for a delivery to make).
HOLDING_POLL_SECONDS = 0.5

#: The heartbeat renews a lease every third of GATEWAY_WORKER__LEASE_SECONDS, but never more often than this.
MIN_RENEW_SECONDS = 0.05

#: A worker's heartbeat row shows a job once it has been running (or the worker idle) this long.
JOB_SHOWN_AFTER = 0.5

#: OSErrors that another attempt may not meet (resources of the machine, not the job's data).
_TRANSIENT_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EIO,
    errno.EAGAIN,
    errno.EMFILE,
    errno.ENFILE,
}


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the job later may succeed: the database, the network, Orthanc or disk space failed.
    Everything else (pydicom, a codec, a model, a bug) fails the same way on every attempt; so does running
    out of memory under the worker's address-space limit, on the same input."""
    if isinstance(exc, DBAPIError):
        return exc.connection_invalidated or isinstance(exc, OperationalError | InterfaceError)
    if isinstance(
        exc, DisconnectionError | PoolTimeout | OrthancUnavailable | ConnectionError | TimeoutError
    ):
        return True
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS


def job_error(exc: BaseException) -> str:
    """A job's recorded reason: the exception, printable and short, and the frames it came through (source
    lines only: never a value, so no dataset bytes)."""
    frames = "".join(traceback.format_tb(exc.__traceback__, limit=-8))
    return f"{describe(exc, 500)}\n{frames}"


class _LeaseKeeper:
    """While a handler runs (``with``), a daemon thread renews the job's lease every lease/3 seconds, so
    no other worker takes over a job that is still being worked on. A lost lease (the job was taken over)
    is logged and ends the renewals; a failed renewal (database briefly down) is logged and retried."""

    def __init__(
        self, factory: sessionmaker[Session], job_id: int, *, worker_id: str, lease_seconds: float
    ) -> None:
        self._factory = factory
        self._job_id = job_id
        self._worker_id = worker_id
        self._lease_seconds = lease_seconds
        self._interval = max(lease_seconds / 3, MIN_RENEW_SECONDS)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-job-{job_id}", daemon=True)

    def __enter__(self) -> _LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._done.set()
        # A renewal stuck on the database must not hold up the worker; one finishing late is harmless
        # (renew_lease only touches a job this worker still holds as running).
        self._thread.join(timeout=self._interval)

    def _beat(self) -> None:
        while not self._done.wait(self._interval):
            try:
                renewed = jobs.renew_lease(
                    self._factory, self._job_id, worker_id=self._worker_id, lease_seconds=self._lease_seconds
                )
            except Exception:
                log.exception("job %d: renewing the lease failed; retrying", self._job_id)
                continue
            if not renewed:
                if not self._done.is_set():
                    log.warning(
                        "job %d: lease lost (taken over by another worker), %s stops renewing it",
                        self._job_id,
                        self._worker_id,
                    )
                return


class _Heartbeat:
    """The worker's ``worker_heartbeat`` row while its loop runs (``with``): refreshed by a daemon thread
    every GATEWAY_WORKER__HEARTBEAT_SECONDS and when the worker's current job (``current_job_id``) has
    changed for :data:`JOB_SHOWN_AFTER`, deleted when the loop stops cleanly. A worker that dies leaves a
    row that goes stale: /readyz reads that as dead. A failed write (database briefly down) is logged and
    tried again at the next beat."""

    def __init__(
        self, factory: sessionmaker[Session], worker_id: str, *, interval: float, enabled: bool = True
    ) -> None:
        self._enabled = enabled
        self._factory = factory
        self._worker_id = worker_id
        self._interval = interval
        self._started_at = utcnow()
        self._job_id: int | None = None
        self._wake = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _Heartbeat:
        if not self._enabled:
            return self
        self._started_at = utcnow()
        self._done.clear()
        self._beat()  # visible before its first claim
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{self._worker_id}", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._enabled:
            return
        self._done.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self._interval)
        if exc_type is not None and not issubclass(exc_type, KeyboardInterrupt):
            return  # the loop died: the row goes stale, which is the truth
        try:
            remove_heartbeats(self._factory, worker_id=self._worker_id)
        except Exception:
            log.warning("worker %s: removing its heartbeat failed", self._worker_id, exc_info=True)

    @contextmanager
    def working_on(self, job_id: int) -> Iterator[None]:
        """Report ``job_id`` as the current job until the block ends."""
        self._set_job(job_id)
        try:
            yield
        finally:
            self._set_job(None)

    def _set_job(self, job_id: int | None) -> None:
        self._job_id = job_id
        if self._enabled:
            self._wake.set()  # the heartbeat thread writes it, off the worker's path

    def _run(self) -> None:
        last = time.monotonic()
        written = self._job_id
        while True:
            woken = self._wake.wait(max(0.0, self._interval - (time.monotonic() - last)))
            self._wake.clear()
            if self._done.is_set():
                return
            if woken:
                # A job started or ended: shown once the change has lasted JOB_SHOWN_AFTER, so a stream of
                # short jobs (deliveries) costs no write per job, each a turn at the database's write lock.
                if self._done.wait(JOB_SHOWN_AFTER):
                    return
                if self._job_id == written and time.monotonic() - last < self._interval:
                    continue
            written = self._job_id
            self._beat()
            last = time.monotonic()

    def _beat(self) -> None:
        try:
            record_heartbeat(
                self._factory,
                worker_id=self._worker_id,
                started_at=self._started_at,
                current_job_id=self._job_id,
            )
        except Exception:
            log.warning("worker %s: heartbeat failed; retrying", self._worker_id, exc_info=True)


class Worker:
    """One loop claiming jobs. ``kinds`` limits it to those job kinds (None: any), e.g. a worker process's
    delivery lane that takes only :data:`LIGHT_KINDS`, so a C-STORE waiting on a PACS never holds up
    inference and a long study never holds up a finished report."""

    def __init__(
        self,
        rt: Runtime,
        *,
        name: str | None = None,
        kinds: tuple[str, ...] | None = None,
        heartbeat: bool = True,
    ) -> None:
        self.rt = rt
        self.id = name or f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"
        self.kinds = kinds
        self.stop = threading.Event()
        self._next_reconcile = 0.0
        self._next_retention = 0.0
        # A lane beside a process's main loop keeps no row: the process is alive or not as its main loop is.
        self._heartbeat = _Heartbeat(
            rt.factory, self.id, interval=rt.settings.worker.heartbeat_seconds, enabled=heartbeat
        )
        self._ingest = IngestRate(rt.settings.ingest_rate_dir)
        self._holding_since: float | None = None
        self._holding = False
        send_as_stored()  # reports go out as the bytes on disk, never parsed and re-encoded

    def run_once(self) -> bool:
        """One sweep and at most one job; True if a job ran."""
        settings = self.rt.settings
        light_only = self.kinds is not None and set(self.kinds) <= set(LIGHT_KINDS)
        holding = self._holding = not light_only and self.holds_back()
        # The sweep and the reconciler queue study jobs: a lane that cannot run them leaves them to one that
        # can. While holding back, the jobs the sweep would queue could not run (no write to compete).
        if self.kinds is None or PROCESS_STUDY in self.kinds:
            if not holding:
                complete_studies(
                    self.rt.factory, settings.completion, max_attempts=settings.worker.max_attempts
                )
            self._reconcile()
            self._schedule_retention()
        kinds = self._claimable(holding)
        if kinds == ():
            return False
        job = jobs.claim(
            self.rt.factory,
            worker_id=self.id,
            lease_seconds=settings.worker.lease_seconds,
            kinds=kinds,
            max_takeovers=settings.worker.max_takeovers,
        )
        if job is None:
            return False
        with self._heartbeat.working_on(job.id):
            self._run(job)
        return True

    def _claimable(self, holding: bool) -> tuple[str, ...] | None:
        """The kinds this worker may claim now (None: any; empty: none)."""
        if not holding:
            return self.kinds
        return tuple(k for k in self.kinds or LIGHT_KINDS if k in LIGHT_KINDS)

    def holds_back(self) -> bool:
        """True while this host stores faster than GATEWAY_WORKER__INGEST_FIRST_MB_PER_S and this worker has
        held back its compute jobs for less than GATEWAY_WORKER__INGEST_FIRST_MAX_SECONDS.

        On a small host every CPU cycle a worker takes is one the receivers lack, whatever its nice value
        (the cores are shared below the kernel's scheduler too): a burst of modalities is acknowledged
        faster when inference waits for it, and the wait is bounded so results never starve.
        """
        cfg = self.rt.settings.worker
        if cfg.ingest_first_mb_per_s <= 0 or cfg.ingest_first_max_seconds <= 0:
            return False
        now = time.monotonic()
        rate = self._ingest.bytes_per_second(now)
        if rate < cfg.ingest_first_mb_per_s * 1e6:
            if self._holding_since is not None:
                log.info("worker %s: ingest slowed down, compute jobs resume", self.id)
            self._holding_since = None
            return False
        if self._holding_since is None:
            self._holding_since = now
            log.info("worker %s: ingest at %.0f MB/s, compute jobs wait for it", self.id, rate / 1e6)
        return now - self._holding_since < cfg.ingest_first_max_seconds

    def _reconcile(self) -> None:
        """Every GATEWAY_ORTHANC__RECONCILE_SECONDS, queue the stable studies Orthanc's /changes lists."""
        cfg = self.rt.settings.orthanc
        if not cfg.url or not cfg.reconcile_seconds or time.monotonic() < self._next_reconcile:
            return
        self._next_reconcile = time.monotonic() + cfg.reconcile_seconds
        try:
            reconcile_once(
                self.rt.factory, self.rt.orthanc, max_attempts=self.rt.settings.worker.max_attempts
            )
        except OrthancUnavailable as exc:
            log.warning("reconciler: %s", exc)

    def _schedule_retention(self) -> None:
        """Every GATEWAY_STORAGE__RETENTION_CHECK_SECONDS, queue the retention job (once: a pending one
        counts for all workers)."""
        cfg = self.rt.settings.storage
        if not cfg.retention_days or time.monotonic() < self._next_retention:
            return
        self._next_retention = time.monotonic() + cfg.retention_check_seconds
        with transaction(self.rt.factory) as session:
            jobs.enqueue(session, kind=PURGE_EXPIRED, payload={}, dedupe_key="retention", max_attempts=3)

    def run_forever(self) -> None:
        """Work until ``stop`` is set, keeping this worker's heartbeat row fresh meanwhile."""
        with self._heartbeat:
            self._loop()

    def _loop(self) -> None:
        log.info("worker %s started", self.id)
        while not self.stop.is_set():
            try:
                busy = self.run_once()
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:
                # A database outage (or anything else) must not kill the worker: wait and try again.
                log.error("worker %s: sweep or claim failed: %s", self.id, describe(exc))
                busy = False
            if not busy:
                poll = self.rt.settings.worker.poll_seconds
                # holding back for the ingest: every poll is CPU the receivers lack, and nothing but a
                # delivery could run meanwhile
                self.stop.wait(max(poll, HOLDING_POLL_SECONDS) if self._holding else poll)
        log.info("worker %s stopped", self.id)

    def _run(self, job: ClaimedJob) -> None:
        handler = HANDLERS.get(job.kind)
        wcfg = self.rt.settings.worker
        try:
            if handler is None:
                raise PermanentError(f"unknown job kind {job.kind!r}")
            with _LeaseKeeper(self.rt.factory, job.id, worker_id=self.id, lease_seconds=wcfg.lease_seconds):
                handler(self.rt, job)
        except Retry as exc:
            status = jobs.fail(
                self.rt.factory, job.id, worker_id=self.id, error=exc.message, retry_in=exc.delay
            )
            log.warning(
                "job %d (%s) attempt %d: %s -> %s", job.id, job.kind, job.attempts, exc.message, status
            )
        except PermanentError as exc:
            jobs.fail(self.rt.factory, job.id, worker_id=self.id, error=str(exc), retry_in=None)
            log.error("job %d (%s) failed permanently: %s", job.id, job.kind, exc)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # nothing a job raises may end the worker thread
            delay = None
            if is_transient(exc):
                delay = backoff_delay(
                    job.attempts,
                    base=wcfg.retry_base_seconds,
                    cap=wcfg.retry_cap_seconds,
                    rng=random.Random(),
                )
            error = job_error(exc)
            status = jobs.fail(self.rt.factory, job.id, worker_id=self.id, error=error, retry_in=delay)
            log.error("job %d (%s) attempt %d -> %s: %s", job.id, job.kind, job.attempts, status, error)
        else:
            if not jobs.complete(self.rt.factory, job.id, worker_id=self.id):
                log.warning("job %d (%s) finished, but another worker had taken it over", job.id, job.kind)
