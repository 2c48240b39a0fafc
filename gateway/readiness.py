"""The readiness checks only the composition root can make (api/ sees neither the listener nor the models):
passed to ``create_app(checks=...)`` by ``gateway serve``; the DICOM listener's is ``Listener.check``."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from core import model_versions
from core.db import read_session
from core.encoding import describe
from core.settings import Settings
from gateway.models import configured_bundles
from inference.bundle import METADATA_FILE, TFLITE_FILE, BundleModel
from inference.runners import TfliteRunner

log = logging.getLogger(__name__)


class ModelCheck:
    """/readyz's ``models``: every active version in the registry (the configured bundles while none is)
    loads as a worker would load it: its bundle reads and its network builds on the LiteRT interpreter.

    A bundle is loaded once per state of its files (size and modification time of model.json and
    model.tflite) and the answer kept, so a probe costs one query and a few ``stat`` calls. Versions in
    shadow mode are not checked: they never make a report."""

    def __init__(self, factory: sessionmaker[Session], settings: Settings) -> None:
        self._factory = factory
        self._settings = settings
        self._lock = threading.Lock()
        self._known: dict[tuple[str, str, str, tuple[int, ...]], str | None] = {}

    def __call__(self) -> str | None:
        with read_session(self._factory) as session:
            wanted = [(r.name, r.version, r.path) for r in model_versions.active(session).values()]
        if not wanted:
            wanted = [(b.name, b.version, b.path) for b in configured_bundles(self._settings)]
        if not wanted:
            return "no model installed: the registry has no active version and no bundle is configured"
        problems = [p for name, version, path in sorted(wanted) if (p := self._problem(name, version, path))]
        return "; ".join(problems) or None

    def warm(self) -> None:
        """Load the models now, so the first probe finds its answers kept (``gateway serve`` at start)."""
        try:
            self()
        except Exception as exc:  # the probe will say it again
            log.warning("readiness: models not checked at start: %s", describe(exc))

    def _problem(self, name: str, version: str, path: str) -> str | None:
        folder = Path(path)
        try:
            state = (*_stamp(folder / METADATA_FILE), *_stamp(folder / TFLITE_FILE))
        except OSError as exc:
            return f"model {name} {version} does not load from {folder}: {exc.strerror or describe(exc)}"
        key = (name, version, path, state)
        with self._lock:
            if key not in self._known:
                self._known[key] = _load(name, version, folder)
                if self._known[key]:
                    log.error("readiness: %s", self._known[key])  # once per state of the files
            return self._known[key]


def _stamp(path: Path) -> tuple[int, int]:
    """Size and modification time: another file or a changed one is loaded again."""
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _load(name: str, version: str, folder: Path) -> str | None:
    try:
        model = BundleModel(folder)
        if (model.info.name, model.info.version) != (name, version):
            return f"model {name} {version}: the bundle at {folder} is {model.info.name} {model.info.version}"
        TfliteRunner(folder / TFLITE_FILE)  # built and dropped: a worker builds its own
    except Exception as exc:
        return f"model {name} {version} does not load from {folder}: {describe(exc)}"
    return None
