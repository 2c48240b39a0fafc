"""Predictions on files (DICOM, PNG, JPEG) as JSON-able dicts; ``gateway predict`` wraps this."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from inference.gates.rules import is_colour
from inference.model import Assessment, Model, assess
from inference.preprocess import UnreadableImage, is_dicom_file, load_any
from inference.registry import ModelRegistry

logger = logging.getLogger(__name__)

#: Picks model names for one file from its path and pixels (float32 [0, 1], HxW or HxWx3), or returns a
#: string: the reason no model applies (e.g. a routing rule's "body part HIP").
Chooser = Callable[[Path, np.ndarray], Sequence[str] | str]

_IMAGE_SUFFIXES = {".dcm", ".dicom", ".png", ".jpg", ".jpeg"}
_CHUNK = 32  # files whose pixels are held at once


def predict_paths(
    paths: Iterable[str | PathLike[str]],
    registry: ModelRegistry,
    model_name: str | None = None,
    *,
    choose: Chooser | None = None,
) -> list[dict[str, Any]]:
    """One dict per (file, model) — or one per file when no model applies or the file is unreadable.

    Directories are searched recursively for DICOM (by content), PNG and JPEG files. The model is
    ``model_name`` when given (``KeyError`` if unknown), else ``choose(path, image)``, else every model of the
    image's kind: colour images go to ``fundus`` models, gray ones to ``chest`` models. Each dict::

        {"file", "model", "version", "assessable", "reason",
         "findings": [{"finding", "probability", "threshold", "label"}]}
    """
    if model_name is not None and registry.get(model_name) is None:
        raise KeyError(f"unknown model {model_name!r}; known: {', '.join(registry.names()) or 'none'}")
    if model_name is not None:
        choose = _fixed(model_name)
    elif choose is None:
        choose = _by_colour(registry)
    files = list(expand_paths(paths))
    rows: list[dict[str, Any]] = []
    for start in range(0, len(files), _CHUNK):
        rows += _predict_chunk(files[start : start + _CHUNK], registry, choose)
    return rows


def expand_paths(paths: Iterable[str | PathLike[str]]) -> Iterator[Path]:
    """Files as given; directories expanded recursively (sorted) to their DICOM, PNG and JPEG files."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.is_file()):
                if child.suffix.lower() in _IMAGE_SUFFIXES or is_dicom_file(child):
                    yield child
        else:
            yield path


def _predict_chunk(files: Sequence[Path], registry: ModelRegistry, choose: Chooser) -> list[dict[str, Any]]:
    images: dict[int, np.ndarray] = {}
    chosen: dict[int, list[str]] = {}
    failures: dict[int, dict[str, Any]] = {}
    for i, path in enumerate(files):
        try:
            images[i] = load_any(path)
        except (UnreadableImage, OSError) as exc:
            logger.warning("unreadable file %s: %s", path.name, exc)
            failures[i] = _row(path, None, Assessment.rejected(f"unreadable image: {exc}"))
            continue
        picked = choose(path, images[i])
        if isinstance(picked, str):
            failures[i] = _row(path, None, Assessment(assessable=False, reason=f"not routed: {picked}"))
            continue
        chosen[i] = [name for name in picked if registry.get(name) is not None]
        if not chosen[i]:
            kind = "colour" if is_colour(images[i]) else "gray"
            failures[i] = _row(path, None, Assessment.rejected(f"no model for this {kind} image"))

    by_model: dict[str, list[int]] = {}
    for i, names in chosen.items():
        for name in names:
            by_model.setdefault(name, []).append(i)
    outcome: dict[tuple[int, str], Assessment] = {}
    for name, indices in by_model.items():
        model = registry.get(name)
        assert model is not None
        for i, assessment in zip(indices, assess(model, [images[i] for i in indices]), strict=True):
            outcome[i, name] = assessment

    rows: list[dict[str, Any]] = []
    for i, path in enumerate(files):
        if i in failures:
            rows.append(failures[i])
            continue
        for name in chosen[i]:
            rows.append(_row(path, registry.get(name), outcome[i, name]))
    return rows


def _row(path: Path, model: Model | None, assessment: Assessment) -> dict[str, Any]:
    return {
        "file": str(path),
        "model": model.info.name if model else None,
        "version": model.info.version if model else None,
        "assessable": assessment.assessable,
        "reason": assessment.reason,
        "findings": [
            {
                "finding": f.name,
                "probability": float(f.probability),
                "threshold": float(f.threshold),
                "label": f.label,
            }
            for f in assessment.findings
        ],
    }


def _fixed(name: str) -> Chooser:
    def choose(path: Path, image: np.ndarray) -> Sequence[str]:
        return [name]

    return choose


def _by_colour(registry: ModelRegistry) -> Chooser:
    def choose(path: Path, image: np.ndarray) -> Sequence[str]:
        kind = "fundus" if is_colour(image) else "chest"
        return [model.info.name for model in registry.of_kind(kind)]

    return choose
