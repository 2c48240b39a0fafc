"""Fitting networks: seeded TensorFlow set-up, the small from-scratch backbone, augmentation, the fit loop.

TensorFlow and Keras are imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: Batch-norm moving averages must follow fast-changing weights (0.99 lagged: inference-mode loss 2x).
BN_MOMENTUM = 0.9


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
    embedding) and the ReLU of the last Conv2D (1x1, ``"last_conv"``) is what the heatmaps are drawn
    from. About 0.2 M parameters at width 32 and some 20 M multiply-adds per 128 px image.
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


#: Console processing a radiograph may have had elsewhere (``fit(processing=True)``): each applied with
#: this chance, independently, after the geometric augmentation. bench/chest_shift.py measures the same kinds
#: of variation (and others, left out here on purpose: window, edge enhancement, collimation, JPEG,
#: resolution) on the validation split.
PROCESSING_CHANCE = 0.3


def console_processing(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gray images N x S x S x 1 in [0, 1], each varied as another console might have processed it: gamma
    0.7-1.45 (exposure curve), CLAHE (clip 1-3, 8 x 8 tiles), Gaussian blur (sigma 0.3-1 px), quantum noise
    (SD up to 0.03). Returns float32 in [0, 1]."""
    import cv2

    out = np.clip(np.asarray(batch, dtype=np.float32), 0.0, 1.0).copy()
    for i in range(len(out)):
        x: np.ndarray = out[i, ..., 0]
        if rng.random() < PROCESSING_CHANCE:
            x = np.power(x, float(np.exp(rng.uniform(np.log(0.7), np.log(1.45)))))
        if rng.random() < PROCESSING_CHANCE:
            clahe = cv2.createCLAHE(clipLimit=float(rng.uniform(1.0, 3.0)), tileGridSize=(8, 8))
            x = clahe.apply(np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)).astype(np.float32) / 255.0
        if rng.random() < PROCESSING_CHANCE:
            x = cv2.GaussianBlur(x, (0, 0), float(rng.uniform(0.3, 1.0)))
        if rng.random() < PROCESSING_CHANCE:
            x = x + rng.normal(0.0, rng.uniform(0.0, 0.03), x.shape).astype(np.float32)
        out[i, ..., 0] = np.clip(x, 0.0, 1.0)
    return out


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
    processing: bool = False,
) -> dict[str, list[float]]:
    """Train ``net`` on uint8 images (N x S x S gray or N x S x S x 3) with augmentation; early stopping
    restores the best weights. ``processing`` (gray only) adds :func:`console_processing`.

    Keras progress bars show each epoch. Returns the history.
    """
    import keras
    import tensorflow as tf

    aug = augmenter(seed)
    rng = np.random.default_rng(seed + 7)  # console processing; one map call at a time, so deterministic

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
                if processing:
                    shape = img.shape
                    img = tf.numpy_function(lambda b: console_processing(b, rng), [img], tf.float32)
                    img.set_shape(shape)
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
