"""What the processes count as they work, for ``GET /metrics`` (Prometheus text format, prometheus-client).

Only figures that exist in the memory of the process that sees them live here: the C-STORE statuses answered
(the listening process and its receiver processes), associations accepted, refused and open (the listening
process), STOW-RS requests and their parts (the API) and inference times (the worker processes). What the
database holds (jobs, deliveries, decisions, predictions, stored instances) is counted from the database when
scraped (:mod:`api.metrics`), so it is right whichever process did the work and across restarts.

``gateway serve`` sets prometheus-client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, a folder under the
data dir emptied at start) before anything imports prometheus-client, and the receivers and workers it starts
inherit it: each process writes its values to memory-mapped files of its own, and the API sums every
process's files when scraped (a counter of a process that has exited still counts). Elsewhere (tests, one
process) the values stay in memory, in :data:`REGISTRY`.

An increment is a dictionary lookup and a store into memory (a memory map in multiprocess mode) under a lock:
no system call and no database query, so the C-STORE path can afford one per instance. The paths that count
do so through :func:`count` and :func:`timed`, which never raise: a figure must not fail what it counts.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values

log = logging.getLogger(__name__)

#: Where the instruments of this process live when it is not in multiprocess mode (never the library's
#: global registry, whose default collectors would be mixed in).
REGISTRY = CollectorRegistry()

INSTANCES_RECEIVED = Counter(
    "gateway_instances_received",
    "Instances received, by protocol (dimse: C-STORE, stow: a STOW-RS part) and the DICOM status answered "
    "(0x0000 stored or already stored, 0xA700 out of resources, 0xA900 does not match the command or the "
    "study, 0xC000 cannot understand)",
    ["protocol", "status"],
    registry=REGISTRY,
)
ASSOCIATIONS_ACCEPTED = Counter(
    "gateway_dicom_associations_accepted",
    "DICOM associations admitted (an association slot taken)",
    registry=REGISTRY,
)
ASSOCIATIONS_REFUSED = Counter(
    "gateway_dicom_associations_refused",
    "DICOM connections refused before or at association, by reason (calling_ae: calling AE not allowed; "
    "association_limit: every association slot taken; address_limit: too many connections from the "
    "address; bad_request: no valid A-ASSOCIATE-RQ in time)",
    ["reason"],
    registry=REGISTRY,
)
ASSOCIATIONS_OPEN = Gauge(
    "gateway_dicom_associations_open",
    "DICOM associations holding a slot now",
    multiprocess_mode="livesum",
    registry=REGISTRY,
)
STOW_REQUESTS = Counter(
    "gateway_stow_requests",
    "STOW-RS requests (POST /dicomweb/studies, signed in), by the HTTP status answered",
    ["status"],
    registry=REGISTRY,
)
INFERENCE_SECONDS = Histogram(
    "gateway_inference_seconds",
    "Time to run one model version on a study's input set (decoding the images it is first to read, the "
    "gate and the network), by model and version",
    ["model", "version"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0),
    registry=REGISTRY,
)

#: Protocol labels of :data:`INSTANCES_RECEIVED`.
DIMSE, STOW = "dimse", "stow"


def count(metric: Counter | Gauge, *labels: str, amount: float = 1.0) -> None:
    """Move ``metric`` (its child of ``labels``) by ``amount`` (a gauge also down); never raises."""
    try:
        (metric.labels(*labels) if labels else metric).inc(amount)
    except Exception:
        _failed()


def count_instance(protocol: str, status: int) -> None:
    """One instance received over ``protocol`` was answered with DICOM ``status``."""
    count(INSTANCES_RECEIVED, protocol, f"0x{status:04X}")


@contextmanager
def timed(histogram: Histogram, *labels: str) -> Iterator[None]:
    """Observe how long the block took (also when it raises) in ``histogram``'s child of ``labels``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        try:
            histogram.labels(*labels).observe(time.perf_counter() - start)
        except Exception:
            _failed()


_complained = False


def _failed() -> None:
    global _complained
    if not _complained:  # once per process: the figures are advice, the log is for what they count
        _complained = True
        log.exception("metrics: a figure could not be recorded (later failures are not logged)")


def shared_folder() -> Path | None:
    """The multiprocess folder this process's instruments write to, or None when they stay in memory."""
    if values.ValueClass is values.MutexValue:
        return None
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return Path(folder) if folder else None
