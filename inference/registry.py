"""Models by name: bundles shipped in ``inference/weights/<name>/`` plus bundles in extra directories.

Discovery reads only ``model.json``; TensorFlow is imported when a model first predicts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from core.domain import ModelInfo
from inference.bundle import METADATA_FILE, BundleError, BundleModel
from inference.model import Model

logger = logging.getLogger(__name__)

SHIPPED_DIR = Path(__file__).resolve().parent / "weights"


class ModelRegistry:
    """Models keyed by :attr:`ModelInfo.name`.

    Each directory searched is either a bundle itself (it holds ``model.json``) or the parent of bundle
    folders. Later directories win on a name clash, so extra directories override the shipped weights.
    Broken bundles are logged and listed in :attr:`problems`, never fatal.
    """

    def __init__(self, extra_dirs: Sequence[Path] = (), *, include_shipped: bool = True) -> None:
        self._models: dict[str, Model] = {}
        self.problems: dict[Path, str] = {}
        dirs = [SHIPPED_DIR] if include_shipped else []
        dirs += [Path(d) for d in extra_dirs]
        for directory in dirs:
            for bundle_dir in bundle_dirs(directory):
                self._add_bundle(bundle_dir)

    def register(self, model: Model) -> None:
        """Add (or replace) a model under its own name; for models that are not Keras bundles."""
        if model.info.name in self._models:
            logger.info("model %s replaced by %s", model.info.name, model)
        self._models[model.info.name] = model

    def get(self, name: str) -> Model | None:
        return self._models.get(name)

    def names(self) -> list[str]:
        return sorted(self._models)

    def infos(self) -> list[ModelInfo]:
        return [self._models[name].info for name in self.names()]

    def of_kind(self, kind: str) -> list[Model]:
        """Models whose ``modality_kind`` is ``kind`` ("fundus" or "chest"), by name."""
        return [self._models[name] for name in self.names() if self._models[name].modality_kind == kind]

    def __len__(self) -> int:
        return len(self._models)

    def __contains__(self, name: object) -> bool:
        return name in self._models

    def _add_bundle(self, bundle_dir: Path) -> None:
        try:
            model = BundleModel(bundle_dir)
        except BundleError as exc:
            logger.error("skipping model bundle %s: %s", bundle_dir, exc)
            self.problems[bundle_dir] = str(exc)
            return
        logger.info("found model %s %s in %s", model.info.name, model.info.version, bundle_dir)
        self.register(model)


def bundle_dirs(directory: Path) -> Iterable[Path]:
    """The bundle folders of ``directory``: itself when it holds a model.json, else its children that do."""
    if (directory / METADATA_FILE).is_file():
        yield directory
        return
    if not directory.is_dir():
        logger.warning("model directory %s does not exist", directory)
        return
    for child in sorted(directory.iterdir()):
        if child.is_dir() and (child / METADATA_FILE).is_file():
            yield child
