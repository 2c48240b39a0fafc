"""What ``GET /metrics`` exposes: the instruments of :mod:`core.metrics` (every process's, summed, when
``gateway serve`` put them in multiprocess mode) and the figures the database and the storage volume hold,
counted when scraped.

The database figures are gauges: how many rows are in each state now. They are right whichever process did
the work and across restarts, and deleting studies lowers them (a counter would read that as a reset). Each
scrape is a handful of grouped queries in one read-only session; the review table, whose answers are JSON,
is read incrementally (see :class:`DecisionTally`). When the database does not answer, the scrape still
succeeds with ``gateway_database_up 0`` and the in-process figures.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from core import jobs, metrics
from core.db import read_session
from core.encoding import describe
from core.heartbeat import live_workers
from core.settings import Settings
from core.storage import Storage
from core.tables import Delivery, Instance, Job, Prediction, Review, utcnow

log = logging.getLogger(__name__)

#: Job states counted (done jobs are history, not queue: never counted, the table keeps them all).
JOB_STATES = ("pending", "running", "failed")
DELIVERY_STATES = ("pending", "sent", "dead", "failed")
KNOWN_KINDS = (*jobs.COMPUTE_KINDS, *jobs.LIGHT_KINDS)


def metrics_registry(
    factory: sessionmaker[Session], storage: Storage, settings: Settings
) -> CollectorRegistry:
    """The registry ``GET /metrics`` renders: every process's instruments and the database figures."""
    registry = CollectorRegistry()
    folder = metrics.shared_folder()
    if folder is not None:
        MultiProcessCollector(registry, path=str(folder))
    else:
        registry.register(metrics.REGISTRY)
    registry.register(DatabaseFigures(factory, storage, settings))
    return registry


class DecisionTally:
    """Decisions by (model, action), one per image of every saved decision version, from the review table.

    The table is append-only (database triggers refuse UPDATE and DELETE), so a scrape reads only the rows
    with an id above the last one read; when the row count disagrees with what was read (rows committed out
    of id order on PostgreSQL, or removed with their study) the whole table is read again.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_id = 0
        self._rows = 0
        self._counts: Counter[tuple[str, str]] = Counter()

    def read(self, session: Session) -> dict[tuple[str, str], int]:
        with self._lock:
            total, top = session.execute(select(func.count(Review.id), func.max(Review.id))).one()
            top = int(top or 0)
            rows, counts = self._tally(session, self._last_id, top)
            if self._rows + rows != total:
                self._rows, self._counts = 0, Counter()
                rows, counts = self._tally(session, 0, top)
            self._rows += rows
            self._counts.update(counts)
            self._last_id = top
            return dict(self._counts)

    @staticmethod
    def _tally(session: Session, after: int, upto: int) -> tuple[int, Counter[tuple[str, str]]]:
        counts: Counter[tuple[str, str]] = Counter()
        rows = 0
        if upto <= after:
            return rows, counts
        query = select(Review.model_name, Review.answers).where(Review.id > after, Review.id <= upto)
        for model, answers in session.execute(query.execution_options(yield_per=1000)):
            rows += 1
            for answer in answers or ():
                counts[(model, str(answer.get("action", "unknown")).replace(" ", "_"))] += 1
        return rows, counts


class DatabaseFigures(Collector):
    """The figures of the database and of the storage volume, read at each scrape."""

    def __init__(self, factory: sessionmaker[Session], storage: Storage, settings: Settings) -> None:
        self.factory = factory
        self.storage = storage
        self.settings = settings
        self.decisions = DecisionTally()

    def collect(self) -> Iterator[Metric]:
        try:
            with read_session(self.factory) as session:
                families = list(self._database(session, utcnow()))
            up = 1.0
        except SQLAlchemyError as exc:
            log.warning("metrics: database figures left out: %s", describe(exc))
            families, up = [], 0.0
        yield GaugeMetricFamily(
            "gateway_database_up", "Whether the database answered this scrape (1) or not (0)", value=up
        )
        yield from families
        yield from self._volume()

    def _database(self, session: Session, now: datetime) -> Iterable[Metric]:
        yield from _jobs(session, now)
        yield from _deliveries(session)
        yield from _predictions(session)
        yield from _instances(session)
        decisions = GaugeMetricFamily(
            "gateway_decisions",
            "Decisions radiologists saved, one per image and saved version (a revision counts again), by "
            "model and action (confirmed, corrected, not_assessable)",
            labels=["model", "action"],
        )
        for (model, action), n in sorted(self.decisions.read(session).items()):
            decisions.add_metric([model, action], n)
        yield decisions
        timeout = self.settings.worker.heartbeat_timeout_seconds
        yield GaugeMetricFamily(
            "gateway_workers_alive",
            f"Workers whose heartbeat is younger than {timeout:g} s",
            value=len(live_workers(session, fresher_than=timeout)),
        )

    def _volume(self) -> Iterable[Metric]:
        try:
            stat = os.statvfs(self.storage.root)
        except OSError as exc:
            log.warning("metrics: storage volume figures left out: %s", describe(exc))
            return
        yield GaugeMetricFamily(
            "gateway_storage_free_bytes",
            "Bytes an unprivileged writer may still use on the storage volume",
            value=stat.f_bavail * stat.f_frsize,
        )
        yield GaugeMetricFamily(
            "gateway_storage_size_bytes", "Size of the storage volume", value=stat.f_blocks * stat.f_frsize
        )
        yield GaugeMetricFamily(
            "gateway_storage_reserve_bytes",
            "Free space kept on the storage volume: below it C-STORE answers 0xA700 and STOW-RS 507",
            value=self.storage.reserve_bytes,
        )


def _jobs(session: Session, now: datetime) -> Iterable[Metric]:
    counts = {(k, s): 0 for k in KNOWN_KINDS for s in JOB_STATES}
    query = select(Job.kind, Job.status, func.count(Job.id)).where(Job.status.in_(JOB_STATES))
    for kind, status, n in session.execute(query.group_by(Job.kind, Job.status)):
        counts[(kind, status)] = n
    family = GaugeMetricFamily(
        "gateway_jobs",
        "Jobs in the queue (pending: waiting, due or retrying later; running) and failed ones, by kind",
        labels=["kind", "status"],
    )
    for (kind, status), n in sorted(counts.items()):
        family.add_metric([kind, status], n)
    yield family

    oldest = {k: 0.0 for k in KNOWN_KINDS}
    since = select(Job.kind, func.min(Job.created_at)).where(Job.status == "pending").group_by(Job.kind)
    for kind, created in session.execute(since):
        oldest[kind] = max(0.0, (now - created) / timedelta(seconds=1))
    family = GaugeMetricFamily(
        "gateway_job_oldest_pending_seconds",
        "Age of the oldest pending job (since it was queued; 0: none pending), by kind",
        labels=["kind"],
    )
    for kind, seconds in sorted(oldest.items()):
        family.add_metric([kind], seconds)
    yield family


def _deliveries(session: Session) -> Iterable[Metric]:
    query = select(Delivery.destination, Delivery.status, func.count(Delivery.id))
    found = {(d, s): n for d, s, n in session.execute(query.group_by(Delivery.destination, Delivery.status))}
    counts = {(d, s): 0 for d, _ in found for s in DELIVERY_STATES} | found
    family = GaugeMetricFamily(
        "gateway_deliveries",
        "Reports to send, by destination and outcome (pending; sent; dead: rejected by the peer; failed: "
        "retries exhausted)",
        labels=["destination", "status"],
    )
    for (destination, status), n in sorted(counts.items()):
        family.add_metric([destination, status], n)
    yield family


def _predictions(session: Session) -> Iterable[Metric]:
    assessed = GaugeMetricFamily(
        "gateway_assessed_images",
        "Images a model version assessed (its gate let them through), by model and version",
        labels=["model", "version"],
    )
    rejected = GaugeMetricFamily(
        "gateway_gate_rejections",
        "Images a model version found not assessable (its gate rejected them, or they could not be read), "
        "by model and version",
        labels=["model", "version"],
    )
    keys = (Prediction.model_name, Prediction.model_version, Prediction.assessable)
    query = select(*keys, func.count(func.distinct(Prediction.instance_id))).group_by(*keys).order_by(*keys)
    for model, version, assessable, n in session.execute(query):
        (assessed if assessable else rejected).add_metric([model, version], n)
    yield assessed
    yield rejected


def _instances(session: Session) -> Iterable[Metric]:
    count = GaugeMetricFamily("gateway_stored_instances", "Instances stored, by source", labels=["source"])
    size = GaugeMetricFamily(
        "gateway_stored_instance_bytes", "Bytes of the instances stored, by source", labels=["source"]
    )
    query = select(Instance.source, func.count(Instance.id), func.coalesce(func.sum(Instance.size), 0))
    for source, n, total in session.execute(query.group_by(Instance.source).order_by(Instance.source)):
        count.add_metric([source], n)
        size.add_metric([source], total)
    yield count
    yield size
