"""The composition root's shared objects: settings, database, storage and models, built once per process."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from core.db import make_engine, make_sessionmaker
from core.migrate import current_revision, head_revision, upgrade
from core.settings import Settings
from core.storage import Storage
from gateway.models import LiveModels
from inference.registry import ModelRegistry
from orthanc.client import OrthancSource

#: Name of the implicit destination that uploads reports into the configured Orthanc.
ORTHANC_DESTINATION = "orthanc"

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    factory: sessionmaker[Session]
    storage: Storage
    _registry: ModelRegistry | None = field(default=None, repr=False)

    @cached_property
    def models(self) -> LiveModels:
        """The registry's active versions (the configured bundles while the registry is empty)."""
        fallback = self._registry or ModelRegistry(extra_dirs=self.settings.inference.model_dirs)
        return LiveModels(self.factory, fallback)

    @property
    def registry(self) -> ModelRegistry:
        """The models to run now: read per study, so a promotion applies without a restart."""
        return self.models.current()

    @cached_property
    def orthanc(self) -> OrthancSource:
        return OrthancSource(self.settings.orthanc)

    @property
    def destination_names(self) -> list[str]:
        """Where every report goes: the DIMSE destinations, plus Orthanc when it is configured to receive."""
        names = [d.name for d in self.settings.destinations]
        if self.settings.orthanc.url and self.settings.orthanc.upload_reports:
            names.append(ORTHANC_DESTINATION)
        return names

    def close(self) -> None:
        self.engine.dispose()


def build_runtime(
    settings: Settings, *, migrate: bool, ingests: bool = True, durable_commits: bool = True
) -> Runtime:
    """Connect, prepare storage and (``migrate``) bring the schema to head; refuse an out-of-date schema.

    ``ingests``: this process receives instances, so the ingest temp files a crash left are its to remove;
    a worker (False) leaves them alone, as they may be in flight in ``gateway serve``. ``durable_commits``:
    see :func:`core.db.make_engine` (False for the worker processes).
    """
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.sqlalchemy_url, durable_commits=durable_commits)
    if migrate:
        upgrade(engine)
    elif current_revision(engine) != head_revision():
        engine.dispose()
        raise RuntimeError(
            f"database schema is at {current_revision(engine)!r}, expected {head_revision()!r}: "
            "run `gateway db upgrade`"
        )
    storage = Storage(settings.storage_dir, reserve_bytes=settings.storage.reserve_bytes)
    storage.prepare(remove_leftovers=ingests)
    return Runtime(settings, engine, make_sessionmaker(engine), storage)
