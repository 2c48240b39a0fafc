"""A worker runtime in the test's process: SQLite in a temp folder, the tiny model bundles, no quiet time."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from core.db import make_engine, make_sessionmaker
from core.migrate import upgrade
from core.settings import CompletionSettings, Settings, WorkerSettings
from core.storage import Storage
from gateway.runtime import Runtime
from inference.registry import ModelRegistry


@contextmanager
def tiny_runtime(folder: Path, bundles: Path, worker: WorkerSettings) -> Iterator[Runtime]:
    """A migrated database and storage under ``folder``, only the models in ``bundles``."""
    settings = Settings(
        data_dir=folder / "var", completion=CompletionSettings(quiet_seconds=0), worker=worker
    )
    engine = make_engine(settings.sqlalchemy_url)
    upgrade(engine)
    storage = Storage(settings.storage_dir)
    storage.prepare()
    registry = ModelRegistry([bundles], include_shipped=False)
    try:
        yield Runtime(settings, engine, make_sessionmaker(engine), storage, _registry=registry)
    finally:
        engine.dispose()
