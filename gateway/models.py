"""The registry's active versions as loaded models: what a worker runs on each study.

`gateway serve` registers the bundles it is configured with (core.model_versions.sync_configured); a worker
asks :class:`LiveModels` for the current models before each job, which reads the active versions (one small
query) and loads a bundle only when the version changes, so a promotion takes effect with the next study,
without a restart. Without registry rows (a database no `serve` has started on), the configured bundles
serve, as before the registry existed.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
from pathlib import Path

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from core import model_versions
from core.db import read_session
from core.model_versions import Bundle
from core.settings import Settings
from inference.bundle import METADATA_FILE, TFLITE_FILE, BundleError, BundleModel
from inference.model import Model
from inference.registry import SHIPPED_DIR, ModelRegistry, bundle_dirs

log = logging.getLogger(__name__)


def digest(bundle_dir: Path) -> str:
    """SHA-256 of the served graph (the model.json when a bundle has none)."""
    path = bundle_dir / TFLITE_FILE
    if not path.is_file():
        path = bundle_dir / METADATA_FILE
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def describe_bundle(bundle_dir: Path, source: str) -> Bundle:
    """A bundle folder as the registry records it (BundleError when it is not a usable bundle)."""
    model = BundleModel(bundle_dir)
    return Bundle(
        name=model.info.name,
        version=model.info.version,
        digest=digest(bundle_dir),
        path=str(bundle_dir.resolve()),
        source=source,
    )


def configured_bundles(settings: Settings) -> list[Bundle]:
    """The shipped bundles, then those of GATEWAY_INFERENCE__MODEL_DIRS (the registry's order)."""
    out = []
    for directory, source in [(SHIPPED_DIR, "shipped")] + [
        (Path(d), "configured") for d in settings.inference.model_dirs
    ]:
        for bundle_dir in bundle_dirs(directory):
            try:
                out.append(describe_bundle(bundle_dir, source))
            except BundleError as exc:
                log.error("skipping model bundle %s: %s", bundle_dir, exc)
    return out


def install_bundle(settings: Settings, source_dir: Path) -> Bundle:
    """Copy a bundle folder to ``DATA_DIR/models/<name>/<version>/`` (where bundles made here live) and
    describe it; the caller registers it."""
    found = describe_bundle(source_dir, "made")
    target = settings.data_dir / "models" / found.name / found.version
    if target.exists():
        if digest(target) != found.digest:
            raise BundleError(f"{target} holds other weights for {found.name} {found.version}")
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source_dir, target)
    return Bundle(found.name, found.version, found.digest, str(target.resolve()), "made")


class LiveModels:
    """The models of the active versions (and of those in shadow mode), reloaded when the registry changes."""

    def __init__(self, factory: sessionmaker[Session], fallback: ModelRegistry) -> None:
        self._factory = factory
        self._fallback = fallback
        self._key: tuple[tuple[str, str, str, str], ...] | None = None
        self._current = fallback
        self._shadows: dict[str, list[BundleModel]] = {}
        self._loaded: dict[tuple[str, str], BundleModel] = {}
        self._lock = threading.Lock()

    def current(self) -> ModelRegistry:
        """The active versions' models (the configured bundles while no version is active)."""
        self._refresh()
        return self._current

    def shadows(self, name: str) -> list[BundleModel]:
        """The versions of ``name`` in shadow mode, as of the last :meth:`current`."""
        with self._lock:
            return list(self._shadows.get(name, ()))

    def version(self, name: str, version: str) -> Model | None:
        """The loaded model of ``name`` at ``version`` (active, in shadow, or loaded before), else None."""
        with self._lock:
            current = self._current.get(name)
            models: list[Model] = [*self._loaded.values(), *([current] if current is not None else [])]
        return next((m for m in models if m.info.name == name and m.info.version == version), None)

    def _refresh(self) -> None:
        with read_session(self._factory) as session:
            rows = list(model_versions.active(session).values()) + model_versions.shadows(session)
        key = tuple(sorted((r.name, r.version, r.path, r.status) for r in rows))
        with self._lock:
            if key == self._key:
                return
            active = [k for k in key if k[3] == "active"]
            registry = ModelRegistry(include_shipped=False)
            shadows: dict[str, list[BundleModel]] = {}
            for name, version, path, status in key:
                model = self._load(name, version, path)
                if model is None:
                    continue
                if status == "active":
                    registry.register(model)
                else:
                    shadows.setdefault(name, []).append(model)
            self._current = registry if active else self._fallback
            self._shadows = shadows
            if self._key is not None:
                log.info("models now: %s", ", ".join(f"{n} {v} ({s})" for n, v, _, s in key))
            self._key = key

    def _load(self, name: str, version: str, path: str) -> BundleModel | None:
        model = self._loaded.get((path, version))
        if model is None:
            try:
                model = BundleModel(Path(path))
            except BundleError as exc:
                log.error("model %s %s not loaded from %s: %s", name, version, path, exc)
                return None
            self._loaded[(path, version)] = model
        return model


def propose_disc_crop(rgb: np.ndarray) -> tuple[int, int, int]:
    """The square optic-disc crop the glaucoma model's localiser would read, for the upload page to propose:
    (x, y, size) in the photograph's pixels, inside the image."""
    from inference.optic_disc import locate_disc

    h, w = rgb.shape[:2]
    location = locate_disc(np.asarray(rgb, dtype=np.float32) / 255.0)
    size = int(max(32, min(round(location.crop_side), w, h)))
    x = int(min(max(0, round(location.cx - size / 2)), w - size))
    y = int(min(max(0, round(location.cy - size / 2)), h - size))
    return x, y, size
