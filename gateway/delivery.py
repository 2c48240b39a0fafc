"""The ``deliver`` job: one report to one destination (C-STORE, or upload into Orthanc), classified into
sent / retry / dead, with the delivery row updated."""

from __future__ import annotations

import logging
import random
from datetime import timedelta
from pathlib import Path

from core.db import transaction
from core.jobs import ClaimedJob, PermanentError, Retry
from core.tables import Delivery, utcnow
from gateway.runtime import Runtime
from orthanc.client import OrthancRejected, OrthancUnavailable
from reporting.delivery import DeliveryResult, backoff_delay, send_cstore

log = logging.getLogger(__name__)


def deliver(rt: Runtime, job: ClaimedJob) -> None:
    """C-STORE one report to one destination; classify the outcome into sent / retry / dead."""
    with rt.factory() as session:
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
    outcome, status, detail = result.outcome, result.status, result.detail
    exhausted = job.attempts >= job.max_attempts
    delay = backoff_delay(
        job.attempts,
        base=rt.settings.worker.retry_base_seconds,
        cap=rt.settings.worker.retry_cap_seconds,
        rng=random.Random(),
    )
    with transaction(rt.factory) as session:
        delivery = session.get(Delivery, job.payload["delivery_id"])
        assert delivery is not None
        delivery.attempts = job.attempts
        delivery.last_status = status
        if outcome == "sent":
            delivery.status = "sent"
            delivery.delivered_at = utcnow()
            delivery.last_error = None
            delivery.next_attempt_at = None
        else:
            delivery.last_error = detail[:4000]
            if outcome == "dead":
                delivery.status = "dead"
            elif exhausted:
                delivery.status = "failed"
            else:
                delivery.next_attempt_at = utcnow() + timedelta(seconds=delay)
    if outcome == "sent":
        log.info("delivery %d to %s sent", job.payload["delivery_id"], dest_name)
    elif outcome == "dead":
        raise PermanentError(f"rejected by {dest_name}: {detail}")
    else:
        raise Retry(f"{dest_name}: {detail}", delay)


def upload_to_orthanc(rt: Runtime, path: Path) -> DeliveryResult:
    """Store a report file into the configured Orthanc; the outcome as a C-STORE's would be classified."""
    try:
        ids = rt.orthanc.upload(path.read_bytes())
    except OrthancUnavailable as exc:
        return DeliveryResult("retry", None, str(exc))
    except OrthancRejected as exc:
        return DeliveryResult("dead", None, str(exc))
    return DeliveryResult("sent", None, f"stored in Orthanc as {', '.join(ids)}")
