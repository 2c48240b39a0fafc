"""Training data: labels CSVs, a decoded-image cache outside the repository, seeded grouped splits."""

from __future__ import annotations

import csv
import hashlib
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from inference.preprocess import load_image_file, to_model_input

logger = logging.getLogger(__name__)

DEFAULT_SEED = 20240501


def read_labels(csv_path: Path) -> list[dict[str, str]]:
    """Rows of a labels CSV (``path`` relative to the CSV's folder, plus label columns)."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or "path" not in rows[0]:
        raise ValueError(f"{csv_path} needs a 'path' column and at least one row")
    return rows


def labels_csv(data: Path) -> Path:
    """The labels CSV of a data folder (``<data>/labels.csv``) or ``data`` itself when it is a CSV."""
    data = Path(data)
    return data if data.suffix.lower() == ".csv" else data / "labels.csv"


def load_images(root: Path, paths: Sequence[str], size: int, *, cache_dir: Path | None = None) -> np.ndarray:
    """Gray uint8 N x size x size, through :func:`load_image_file` and :func:`to_model_input`.

    Cached as ``.npy`` under ``cache_dir`` (default: the system temp folder), keyed by folder, paths and size,
    so a second run does not decode the JPEGs again. The cache holds derived pixels; it stays outside the
    repository.
    """
    key = hashlib.sha256(f"{Path(root).resolve()}|{size}|{'|'.join(paths)}".encode()).hexdigest()[:16]
    cache = Path(cache_dir or tempfile.gettempdir()) / "screening-gateway-cache" / f"gray{size}-{key}.npy"
    if cache.is_file():
        arr = np.load(cache)
        if arr.shape == (len(paths), size, size):
            return arr
    out = np.empty((len(paths), size, size), dtype=np.uint8)
    for i, rel in enumerate(paths):
        x = to_model_input(load_image_file(Path(root) / rel), size, 1)[..., 0]
        out[i] = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
        if (i + 1) % 1000 == 0:
            logger.info("decoded %d/%d images", i + 1, len(paths))
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, out)
    return out


def split_indices(
    y: np.ndarray, *, groups: Sequence[str] | None = None, val_fraction: float = 0.2, seed: int = DEFAULT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/validation indices; grouped (no group on both sides) when ``groups`` is given.

    One fold of a shuffled ``StratifiedGroupKFold`` / ``StratifiedKFold`` with ``round(1 / val_fraction)``
    folds, seeded.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    folds = max(2, round(1 / val_fraction))
    placeholder = np.zeros(len(y))
    if groups is not None:
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        train, val = next(splitter.split(placeholder, y, groups=np.asarray(groups)))
    else:
        train, val = next(StratifiedKFold(folds, shuffle=True, random_state=seed).split(placeholder, y))
    return np.sort(train), np.sort(val)
