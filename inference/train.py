"""Training: a registry of per-model recipes and the pieces they share (labels, image cache, split, CNN, fit).

A recipe is registered under a model name with :func:`register`; ``gateway train MODEL`` and ``gateway
evaluate MODEL`` dispatch through :data:`RECIPES`. Recipes live in their own modules (chest models in
:mod:`inference.chest`; a fundus module registers ``glaucoma`` the same way) and are imported by
:func:`recipes`, so adding a model never edits this file's code paths: append the module to
:data:`RECIPE_MODULES` (or import it before calling :func:`get_recipe`).

Reproducibility: ``keras.utils.set_random_seed(seed)`` and TensorFlow op determinism; the split, the
augmentation and the weight initialisation all derive from ``seed``. This module and the recipe modules are
the only ones besides :mod:`inference.bundle` that import TensorFlow, and only inside functions.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from inference.preprocess import load_image_file, to_model_input

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
WEIGHTS_DIR = PACKAGE_DIR / "weights"
CARDS_DIR = PACKAGE_DIR / "cards"
#: Modules imported by :func:`recipes`; each calls :func:`register` at import. Missing ones are skipped.
RECIPE_MODULES = ["inference.chest", "inference.train_glaucoma"]
DEFAULT_SEED = 20240501
#: Batch-norm moving averages must follow fast-changing weights (0.99 lagged: inference-mode loss 2x).
BN_MOMENTUM = 0.9


@dataclass(frozen=True)
class TrainConfig:
    """What ``gateway train`` passes to a recipe."""

    data: Path
    out_dir: Path  # the bundle folder, e.g. inference/weights/pneumonia
    card_path: Path  # e.g. inference/cards/pneumonia.md; PNGs are written beside it
    epochs: int | None = None  # None: the recipe's default (early stopping still applies)
    seed: int = DEFAULT_SEED
    threads: int = 2
    extra: dict[str, Any] = field(default_factory=dict)


class TrainFn(Protocol):
    def __call__(self, config: TrainConfig) -> Path: ...


class EvaluateFn(Protocol):
    def __call__(self, bundle_dir: Path, data: Path) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Recipe:
    """How to train one model (writes bundle + card, returns the bundle folder) and evaluate it on data."""

    name: str
    train: TrainFn
    evaluate: EvaluateFn
    description: str = ""


RECIPES: dict[str, Recipe] = {}


def register(recipe: Recipe) -> Recipe:
    """Add (or replace) a recipe under ``recipe.name``."""
    RECIPES[recipe.name] = recipe
    return recipe


def recipes() -> dict[str, Recipe]:
    """All recipes, after importing :data:`RECIPE_MODULES` (modules that do not exist are skipped)."""
    for module in RECIPE_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    return RECIPES


def get_recipe(name: str) -> Recipe:
    found = recipes()
    if name not in found:
        raise KeyError(f"no training recipe for {name!r}; known: {', '.join(sorted(found)) or 'none'}")
    return found[name]


def default_config(name: str, data: Path, **kwargs: Any) -> TrainConfig:
    """Config that writes into the package (``inference/weights/<name>``, ``inference/cards/<name>.md``)."""
    return TrainConfig(
        data=Path(data), out_dir=WEIGHTS_DIR / name, card_path=CARDS_DIR / f"{name}.md", **kwargs
    )


# -- data ----------------------------------------------------------------------------------------------------


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


# -- network -------------------------------------------------------------------------------------------------


def setup_tensorflow(seed: int, threads: int = 2) -> None:
    """Seeds, op determinism and a thread cap (the machine is shared)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # already initialised in this process
        pass
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def build_backbone(size: int, channels: int = 1, width: int = 32) -> tuple[Any, Any]:
    """A small from-scratch CNN: conv stem, depthwise-separable blocks, a last Conv2D, global average pool.

    Returns ``(inputs, features)``; ``features`` is the GAP layer named ``"features"`` (the gate's
    embedding) and the last Conv2D (1x1), named ``"last_conv"``, is what Grad-CAM explains. About 0.2 M
    parameters at width 32 and some 20 M multiply-adds per 128 px image.
    """
    import keras
    from keras import layers

    def block(x: Any, filters: int, conv: Callable[..., Any], name: str, **kw: Any) -> Any:
        x = conv(filters, 3, padding="same", use_bias=False, name=name, **kw)(x)
        x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
        return layers.ReLU(name=f"{name}_relu")(x)

    sep = layers.SeparableConv2D
    inputs = keras.Input((size, size, channels), name="image")
    x = layers.Rescaling(4.0, offset=-2.0, name="standardise")(inputs)  # [0, 1] -> [-2, 2]
    x = block(x, width, layers.Conv2D, "stem", strides=2)
    x = block(x, 2 * width, sep, "b1a")
    x = layers.MaxPooling2D(name="pool1")(x)
    x = block(x, 2 * width, sep, "b2a")
    x = block(x, 4 * width, sep, "b2b")
    x = layers.MaxPooling2D(name="pool2")(x)
    x = block(x, 4 * width, sep, "b3a")
    x = block(x, 8 * width, sep, "b3b")
    x = layers.MaxPooling2D(name="pool3")(x)
    x = block(x, 8 * width, sep, "b4a")
    x = layers.Conv2D(8 * width, 1, use_bias=False, name="last_conv")(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name="last_conv_bn")(x)
    x = layers.ReLU(name="last_conv_relu")(x)
    features = layers.GlobalAveragePooling2D(name="features")(x)
    return inputs, features


def augmenter(seed: int) -> Any:
    """Light, label-preserving augmentation for radiographs (small shifts, zoom, rotation, contrast)."""
    import keras
    from keras import layers

    return keras.Sequential(
        [
            layers.RandomTranslation(0.06, 0.06, fill_mode="constant", seed=seed),
            layers.RandomZoom((-0.1, 0.1), fill_mode="constant", seed=seed + 1),
            layers.RandomRotation(0.02, fill_mode="constant", seed=seed + 2),
            layers.RandomContrast(0.2, seed=seed + 3),
        ],
        name="augment",
    )


def fit(
    net: Any,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    loss: Any,
    epochs: int,
    seed: int,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    patience: int = 4,
    monitor: str = "val_loss",
    metrics: Sequence[Any] = (),
) -> dict[str, list[float]]:
    """Train ``net`` on uint8 images (N x S x S gray or N x S x S x 3) with augmentation; early stopping
    restores the best weights.

    Keras progress bars show each epoch. Returns the history.
    """
    import keras
    import tensorflow as tf

    aug = augmenter(seed)

    def dataset(x: np.ndarray, y: np.ndarray, train: bool) -> tf.data.Dataset:
        ds = tf.data.Dataset.from_tensor_slices((x, y.astype(np.float32)))
        if train:
            ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
        ds = ds.batch(batch_size)

        def prep(img: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            img = tf.cast(img, tf.float32) / 255.0
            if len(img.shape) == 3:  # gray N x S x S
                img = img[..., tf.newaxis]
            if train:
                img = tf.clip_by_value(aug(img, training=True), 0.0, 1.0)
            return img, label

        return ds.map(prep, num_parallel_calls=1).prefetch(2)

    steps = epochs * int(np.ceil(len(x_train) / batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, steps, alpha=0.02)
    net.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=1e-4), loss=loss, metrics=list(metrics)
    )
    # Validation loss is noisy while the learning rate is high: stop early only in the second half.
    stop = keras.callbacks.EarlyStopping(
        monitor=monitor, patience=patience, restore_best_weights=True, start_from_epoch=epochs // 2
    )
    history = net.fit(
        dataset(x_train, y_train, True),
        validation_data=dataset(x_val, y_val, False),
        epochs=epochs,
        callbacks=[stop],
        verbose=1 if os.environ.get("GATEWAY_TRAIN_QUIET") is None else 2,
    )
    return {k: [float(v) for v in vs] for k, vs in history.history.items()}


def cached_network(
    cache_dir: str | Path | None, name: str, train: Callable[[], tuple[Any, dict]]
) -> tuple[Any, dict]:
    """A trained network and its history: loaded from ``cache_dir/<name>.keras`` (+ ``.history.json``) when an
    earlier run saved it there (a recipe's ``extra["members_dir"]``), else ``train()``-ed and saved there."""
    import json

    import keras

    path = Path(cache_dir) / f"{name}.keras" if cache_dir else None
    if path is not None and path.is_file():
        logger.info("%s loaded from %s", name, path)
        saved = path.with_suffix(".history.json")
        return keras.models.load_model(path, compile=False), (
            json.loads(saved.read_text()) if saved.is_file() else {}
        )
    net, history = train()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        net.save(path)
        path.with_suffix(".history.json").write_text(json.dumps(history), encoding="utf-8")
    return net, history


def predict_with_features(
    net: Any, x: np.ndarray, batch_size: int = 64, *, layers: Sequence[str] = ("features",)
) -> tuple[np.ndarray, np.ndarray]:
    """Network outputs and gate embeddings (:func:`inference.runners.embedding_model`) of uint8 images."""
    from inference.runners import embedding_model

    both = embedding_model(net, layers)
    outs, feats = [], []
    for i in range(0, len(x), batch_size):
        batch = x[i : i + batch_size, ..., np.newaxis].astype(np.float32) / 255.0
        o, f = both(batch, training=False)
        outs.append(np.asarray(o))
        feats.append(np.asarray(f))
    return np.concatenate(outs).astype(np.float64), np.concatenate(feats).astype(np.float64)


def export_tflite(net: Any, path: Path, *, layers: Sequence[str] = ("features",)) -> Path:
    """Convert ``net`` with a second output, the gate embedding of ``layers``, to a float32 TFLite file."""
    import tensorflow as tf

    from inference.runners import embedding_model

    both = embedding_model(net, layers)
    converter = tf.lite.TFLiteConverter.from_keras_model(both)
    path.write_bytes(converter.convert())
    return path
