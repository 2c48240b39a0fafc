"""The glaucoma network: a small CNN on the optic-disc crop, its augmentation and seeded training loop.

Input: the disc-centred crop (:func:`inference.optic_disc.crop_disc`), float32 RGB in [0, 1], ``INPUT_SIZE``
px. The first layer standardises each image per channel (LayerNormalization over height and width, no learned
scale), so camera colour and exposure differences between databases matter less. Training crops are jittered
in scale (x0.8-1.25), position (+-8 % of the side), rotation (+-15 deg), flipped (left/right eyes) and colour
(per-channel gain, gamma, blur), which also makes the network tolerant of hand-made crops.

This module imports TensorFlow/Keras; :mod:`inference.bundle` loads the saved network without it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np

from inference.optic_disc import DiscLocation, crop_at

logger = logging.getLogger(__name__)

INPUT_SIZE = 128
WIDTHS = (16, 32, 48, 64, 96)


def build_network(size: int = INPUT_SIZE, widths: Sequence[int] = WIDTHS, dropout: float = 0.3) -> Any:
    """Conv-BN-ReLU blocks, max-pooling, global average pooling, one sigmoid output (about 0.2 M weights)."""
    import keras

    inputs = keras.Input((size, size, 3), name="disc")
    x = keras.layers.LayerNormalization(axis=(1, 2), center=False, scale=False, name="standardise")(inputs)
    x = _trunk(x, widths, "")
    x = keras.layers.Dropout(dropout)(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", name="glaucoma")(x)
    return keras.Model(inputs, outputs, name="glaucoma_disc_cnn")


def _trunk(x: Any, widths: Sequence[int], prefix: str) -> Any:
    import keras

    for i, width in enumerate(widths):
        for half in "ab":
            name = f"{prefix}conv{i}{half}"
            x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name=name)(x)
            x = keras.layers.BatchNormalization(name=f"{prefix}bn{i}{half}")(x)
            x = keras.layers.ReLU(name=f"{prefix}relu{i}{half}")(x)
        if i < len(widths) - 1:
            x = keras.layers.MaxPooling2D(name=f"{prefix}pool{i}")(x)
    return keras.layers.GlobalAveragePooling2D(name=f"{prefix}features")(x)


def ensemble_network(members: Sequence[Any], size: int = INPUT_SIZE, widths: Sequence[int] = WIDTHS) -> Any:
    """One network that averages the logits of trained ``members`` (each from :func:`build_network`).

    The members' trunks are copied side by side (layers ``m<k>_...``) behind the shared, parameter-free
    standardisation; ``"features"`` concatenates their pooled embeddings and the ``"glaucoma"`` unit holds
    their output weights divided by the number of members, so its logit is the mean of the members' logits
    (temperature folding, the embedding gate and TFLite export work as for one network). The last top-level
    convolution is the last member's (the served heatmap uses every member's maps, see model.json).
    """
    import keras

    inputs = keras.Input((size, size, 3), name="disc")
    x = keras.layers.LayerNormalization(axis=(1, 2), center=False, scale=False, name="standardise")(inputs)
    pooled = [_trunk(x, widths, f"m{k}_") for k in range(len(members))]
    features = keras.layers.Concatenate(name="features")(pooled)
    outputs = keras.layers.Dense(1, activation="sigmoid", name="glaucoma")(features)
    model = keras.Model(inputs, outputs, name=f"glaucoma_disc_cnn_x{len(members)}")
    for k, member in enumerate(members):
        for layer in member.layers:
            if layer.weights and layer.name != "glaucoma":
                model.get_layer(f"m{k}_{layer.name}").set_weights(layer.get_weights())
    heads = [member.get_layer("glaucoma").get_weights() for member in members]
    kernel = np.concatenate([w for w, _ in heads], axis=0) / len(members)
    bias = np.mean([b for _, b in heads], axis=0)
    model.get_layer("glaucoma").set_weights([kernel, bias])
    return model


def augmented_crop(
    image: np.ndarray, location: DiscLocation, size: int, rng: np.random.Generator, camera: bool = False
) -> np.ndarray:
    """One randomly jittered disc crop of a full photograph (training only); with ``camera`` the photograph
    first as another camera would take it (:data:`training.camera.PHOTOMETRIC` variations)."""
    if camera:
        from training.camera import PHOTOMETRIC, random_camera

        image = random_camera(image, rng, names=PHOTOMETRIC, keep_size=True)
    side = location.crop_side * float(np.exp(rng.uniform(np.log(0.8), np.log(1.25))))
    cx = location.cx + rng.uniform(-0.08, 0.08) * side
    cy = location.cy + rng.uniform(-0.08, 0.08) * side
    # crop a larger square, rotate it, take the centre: no black corners from the rotation
    big = crop_at(image, cx, cy, side * 1.42, round(size * 1.42))
    angle = rng.uniform(-15, 15)
    centre = (big.shape[1] / 2, big.shape[0] / 2)
    big = cv2.warpAffine(big, cv2.getRotationMatrix2D(centre, angle, 1.0), big.shape[1::-1])
    start = (big.shape[0] - size) // 2
    x = big[start : start + size, start : start + size]
    if rng.random() < 0.5:
        x = x[:, ::-1]
    return colour_jitter(np.ascontiguousarray(x), rng)


def colour_jitter(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = x * rng.uniform(0.85, 1.15, size=3).astype(np.float32) * np.float32(rng.uniform(0.8, 1.2))
    x = np.clip(x, 0, 1) ** np.float32(rng.uniform(0.8, 1.25))
    if rng.random() < 0.3:
        x = cv2.GaussianBlur(x, (0, 0), sigmaX=rng.uniform(0.5, 1.5))
    return np.asarray(np.clip(x, 0, 1), dtype=np.float32)


def fit(
    images: Sequence[np.ndarray],
    locations: Sequence[DiscLocation],
    labels: np.ndarray,
    *,
    seed: int,
    epochs: int,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    progress: Callable[[int, dict[str, float]], None] | None = None,
    camera: bool = False,
) -> Any:
    """Train a fresh network on full photographs (disc crops cut and jittered each epoch, with ``camera``
    also varied as other cameras would take them); seeded."""
    import keras

    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_network()
    steps = max(1, -(-len(images) // batch_size)) * epochs
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=steps, warmup_steps=0)
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=1e-4),
        loss=keras.losses.BinaryCrossentropy(label_smoothing=0.05),
        metrics=[keras.metrics.AUC(name="auc")],
    )
    y = np.asarray(labels, dtype=np.float32)
    for epoch in range(epochs):
        x = np.stack(
            [
                augmented_crop(im, loc, INPUT_SIZE, rng, camera)
                for im, loc in zip(images, locations, strict=True)
            ]
        )
        history = model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=True, verbose=0)
        logs = {k: float(v[-1]) for k, v in history.history.items()}
        if progress is not None:
            progress(epoch, logs)
    return model


def predict_crops(model: Any, crops: np.ndarray, *, flip_average: bool = False) -> np.ndarray:
    """Probabilities for prepared crops (N x size x size x 3), batch 64, inference mode."""
    out = [np.asarray(model(crops[i : i + 64], training=False))[:, 0] for i in range(0, len(crops), 64)]
    p = np.concatenate(out) if out else np.zeros(0)
    if flip_average:
        p = (p + predict_crops(model, crops[:, :, ::-1].copy())) / 2
    return p.astype(np.float64)
