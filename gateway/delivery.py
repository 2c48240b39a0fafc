"""The ``deliver`` job: one report to one destination (C-STORE, or upload into Orthanc), classified into
sent / retry / dead, with the delivery row updated."""

from __future__ import annotations

import logging
import random
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core import jobs
from core.db import read_session, transaction, when_available
from core.jobs import DELIVER, ClaimedJob, PermanentError, Retry, enqueue
from core.tables import Delivery, Report, utcnow
from gateway.runtime import Runtime
from orthanc.client import OrthancRejected, OrthancUnavailable
from reporting.delivery import DeliveryResult, backoff_delay, send_cstore

log = logging.getLogger(__name__)

#: While a destination fails, one of its deliveries tries it at least this often (never more often than the
#: retry cap); the others back off as usual, and the first delivery that gets through brings them all forward.
#: So a PACS that comes back gets its backlog within about this long, however long it was down.
PROBE_SECONDS = 30.0


def deliver(rt: Runtime, job: ClaimedJob) -> None:
    """C-STORE one report to one destination; classify the outcome into sent / retry / dead."""
    with read_session(rt.factory) as session:
        delivery = session.get(Delivery, job.payload["delivery_id"])
        if delivery is None:
            raise PermanentError("delivery row is gone")
        if delivery.status == "sent":
            return
        report_path = rt.storage.absolute(delivery.report.path)
        dest_name = delivery.destination
    dest = next((d for d in rt.settings.destinations if d.name == dest_name), None)
    if dest_name not in rt.destination_names:
        result = DeliveryResult("dead", None, f"destination {dest_name!r} is no longer configured")
    elif dest is None:  # the Orthanc the study came from
        result = upload_to_orthanc(rt, report_path)
    else:
        result = send_cstore(
            report_path,
            dest,
            calling_ae=rt.settings.dicom.ae_title,
            timeout=rt.settings.dicom.network_timeout,
        )
    outcome, detail = result.outcome, result.detail
    delay = backoff_delay(
        job.attempts,
        base=rt.settings.worker.retry_base_seconds,
        cap=rt.settings.worker.retry_cap_seconds,
        rng=random.Random(),
    )
    delivery_id = job.payload["delivery_id"]
    # The peer answered (it may have stored the report): forgetting that in a database outage would send it
    # again later, so keep trying to record it while this worker surely still holds the job.
    delay, woken = when_available(
        lambda: _record(rt, job, result, delay), patience=rt.settings.worker.lease_seconds / 2
    )
    if woken:
        log.info("%s answers again: %d waiting deliveries brought forward", dest_name, woken)
    if outcome == "sent":
        log.info("delivery %d to %s sent", delivery_id, dest_name)
    elif outcome == "dead":
        raise PermanentError(f"rejected by {dest_name}: {detail}")
    else:
        raise Retry(f"{dest_name}: {detail}", delay)


def _record(rt: Runtime, job: ClaimedJob, result: DeliveryResult, delay: float) -> tuple[float, int]:
    """Write the outcome to the delivery row; returns the retry delay (shortened when this delivery probes
    the destination for the others) and how many waiting deliveries a success brought forward."""
    probe_every = min(PROBE_SECONDS, rt.settings.worker.retry_cap_seconds)
    woken = 0
    with transaction(rt.factory) as session:
        delivery = session.get(Delivery, job.payload["delivery_id"])
        assert delivery is not None
        delivery.attempts = job.attempts
        delivery.last_status = result.status
        if result.outcome == "sent":
            delivery.status = "sent"
            delivery.delivered_at = utcnow()
            delivery.last_error = None
            delivery.next_attempt_at = None
            woken = _wake_waiting(session, delivery.destination)
        else:
            delivery.last_error = result.detail[:4000]
            probing = (
                result.outcome == "retry"
                and delay > probe_every
                and _unprobed(session, delivery, probe_every)
            )
            if probing:  # this one probes for the others; the extra tries cost none of its attempts
                delay = probe_every
                jobs.refund_attempt(session, job.id)
                delivery.attempts = job.attempts - 1
            if result.outcome == "dead":
                delivery.status = "dead"
            elif not probing and job.attempts >= job.max_attempts:
                delivery.status = "failed"
            else:
                delivery.next_attempt_at = utcnow() + timedelta(seconds=delay)
    return delay, woken


def upload_to_orthanc(rt: Runtime, path: Path) -> DeliveryResult:
    """Store a report file into the configured Orthanc; the outcome as a C-STORE's would be classified."""
    try:
        ids = rt.orthanc.upload(path.read_bytes())
    except OrthancUnavailable as exc:
        return DeliveryResult("retry", None, str(exc))
    except OrthancRejected as exc:
        return DeliveryResult("dead", None, str(exc))
    return DeliveryResult("sent", None, f"stored in Orthanc as {', '.join(ids)}")


def _unprobed(session: Session, delivery: Delivery, probe_every: float) -> bool:
    """Other deliveries to this destination wait out a backoff, and none of them will try it within
    ``probe_every`` seconds. (Ones due already are running or about to, and decide for themselves when they
    fail; a delivery alone has nobody to probe for and backs off, so probing never outlives the backlog.)"""
    now = utcnow()
    soonest = session.scalar(
        select(Delivery.next_attempt_at)
        .where(
            Delivery.destination == delivery.destination,
            Delivery.status == "pending",
            Delivery.id != delivery.id,
            Delivery.next_attempt_at > now,
        )
        .order_by(Delivery.next_attempt_at)
        .limit(1)
    )
    return soonest is not None and soonest > now + timedelta(seconds=probe_every)


def _wake_waiting(session: Session, destination: str) -> int:
    """The destination took a delivery: its deliveries waiting out a backoff are due now."""
    now = utcnow()
    waiting = set(
        session.scalars(
            select(Delivery.id).where(
                Delivery.destination == destination,
                Delivery.status == "pending",
                Delivery.next_attempt_at > now,
            )
        )
    )
    if not waiting:
        return 0
    session.execute(update(Delivery).where(Delivery.id.in_(waiting)).values(next_attempt_at=now))
    return jobs.run_now(session, kind=DELIVER, payload_key="delivery_id", values=waiting)


def ensure_deliveries(rt: Runtime, session: Session, report: Report) -> None:
    """Queue a delivery of ``report`` to every destination it has none to yet (in ``session``)."""
    have = {d.destination for d in session.scalars(select(Delivery).where(Delivery.report_id == report.id))}
    for name in rt.destination_names:
        if name in have:
            continue
        delivery = Delivery(report_id=report.id, destination=name, status="pending", next_attempt_at=utcnow())
        session.add(delivery)
        session.flush()
        enqueue(
            session,
            kind=DELIVER,
            priority=10,
            payload={"delivery_id": delivery.id},
            study_id=report.study_id,
            max_attempts=rt.settings.worker.delivery_max_attempts,
        )
