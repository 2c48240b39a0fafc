"""Training the domain classifier, the last stage of every gate (served by :mod:`inference.gates.domain`).

Positives and negatives are made in memory and never stored; see :mod:`inference.gates.domain` for what each
model's classifier is trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inference.gates.domain import CHEST_SUBJECT, DOMAIN_FILE, DOMAIN_SIZE, DomainGateSpec
from inference.preprocess import to_model_input

DOMAIN_WIDTH = 8
DOMAIN_EPOCHS = 8
#: Share of validation positives the bound may reject (0.1 %).
DOMAIN_QUANTILE = 0.001
CROP_SIDES = (0.25, 0.5)


def as_domain_input(
    images: Sequence[np.ndarray] | np.ndarray, size: int = DOMAIN_SIZE, channels: int = 1
) -> np.ndarray:
    """uint8 N x size x size (x 3 when ``channels`` is 3) of float [0, 1] or uint8 images (any shape)."""
    shape = (len(images), size, size) if channels == 1 else (len(images), size, size, 3)
    out = np.empty(shape, dtype=np.uint8)
    for i, img in enumerate(images):
        x = np.asarray(img, dtype=np.float32)
        if np.asarray(img).dtype == np.uint8:
            x = x / 255.0
        x = to_model_input(x, size, channels)
        out[i] = np.clip(np.rint((x[..., 0] if channels == 1 else x) * 255.0), 0, 255).astype(np.uint8)
    return out


def partial_views(images: np.ndarray, rng: np.random.Generator, count: int) -> list[np.ndarray]:
    """``count`` random square cut-outs (side a quarter to a half of the image's) and 90-degree turns."""
    out: list[np.ndarray] = []
    for _ in range(count):
        img = images[int(rng.integers(len(images)))]
        h, w = img.shape[:2]
        if rng.random() < 0.15:
            out.append(np.ascontiguousarray(np.rot90(img, k=int(rng.choice([1, 3])))))
            continue
        side = int(min(h, w) * rng.uniform(*CROP_SIDES))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        out.append(img[y : y + side, x : x + side])
    return out


def build_domain_net(size: int = DOMAIN_SIZE, width: int = DOMAIN_WIDTH, channels: int = 1) -> Any:
    import keras
    from keras import layers

    from training.fitting import build_backbone

    inputs, features = build_backbone(size, channels, width)
    outputs = layers.Dense(1, activation="sigmoid", name="in_domain")(features)
    return keras.Model(inputs, outputs, name="domain_cnn")


@dataclass
class DomainFit:
    """A trained domain classifier and its validation scores."""

    net: Any
    spec: DomainGateSpec
    scores_positive: np.ndarray
    scores_negative: np.ndarray
    n_train: tuple[int, int]

    def summary(self) -> dict[str, int]:
        """Counts for the model card: training sizes and the validation errors at the bound."""
        bound = self.spec.min_score
        return {
            "positives": self.n_train[0],
            "negatives": self.n_train[1],
            "validation positives rejected": int((self.scores_positive < bound).sum()),
            "validation positives": len(self.scores_positive),
            "validation negatives passed": int((self.scores_negative >= bound).sum()),
            "validation negatives": len(self.scores_negative),
        }


def fit_domain_gate(
    positives_train: Sequence[np.ndarray] | np.ndarray,
    positives_val: Sequence[np.ndarray] | np.ndarray,
    negatives_train: Sequence[np.ndarray],
    negatives_val: Sequence[np.ndarray],
    *,
    seed: int,
    epochs: int = DOMAIN_EPOCHS,
    channels: int = 1,
    subject: str = CHEST_SUBJECT,
    must_pass: Sequence[np.ndarray] = (),
) -> DomainFit:
    """Train the classifier on positives and negatives (float [0, 1] or uint8 images of any shape).

    The bound is the :data:`DOMAIN_QUANTILE` quantile of the validation positives' scores, lowered to half
    the score of each image of ``must_pass`` (e.g. a real chest DICOM of another vendor) scoring below it.
    """
    import keras

    from training import fitting as T

    keras.utils.set_random_seed(seed)
    pos_tr = as_domain_input(positives_train, channels=channels)
    pos_va = as_domain_input(positives_val, channels=channels)
    neg_tr = as_domain_input(negatives_train, channels=channels)
    neg_va = as_domain_input(negatives_val, channels=channels)
    x_tr = np.concatenate([pos_tr, neg_tr])
    y_tr = np.concatenate([np.ones(len(pos_tr)), np.zeros(len(neg_tr))]).astype(np.float32)
    x_va = np.concatenate([pos_va, neg_va])
    y_va = np.concatenate([np.ones(len(pos_va)), np.zeros(len(neg_va))]).astype(np.float32)
    net = build_domain_net(channels=channels)
    T.fit(
        net,
        x_tr,
        y_tr,
        x_va,
        y_va,
        loss=keras.losses.BinaryCrossentropy(),
        epochs=epochs,
        seed=seed,
        batch_size=64,
    )
    s_pos, s_neg = scores(net, pos_va), scores(net, neg_va)
    bound = float(np.quantile(s_pos, DOMAIN_QUANTILE))
    if must_pass:
        lowest = float(scores(net, as_domain_input(list(must_pass), channels=channels)).min())
        bound = min(bound, 0.5 * lowest)
    spec = DomainGateSpec(DOMAIN_FILE, DOMAIN_SIZE, bound, channels, subject)
    return DomainFit(net, spec, s_pos, s_neg, (len(pos_tr), len(neg_tr)))


def epochs_for(requested: int | None) -> int:
    """Epochs for the domain classifier when a recipe was asked for ``requested`` (a short test run stays
    short)."""
    return min(DOMAIN_EPOCHS, requested or DOMAIN_EPOCHS)


def scores(net: Any, x: np.ndarray) -> np.ndarray:
    """P(in domain) of uint8 N x S x S (gray) or N x S x S x 3 inputs (inference mode)."""
    x = x[..., np.newaxis] if x.ndim == 3 else x
    out = [
        np.asarray(net(x[i : i + 256].astype(np.float32) / 255.0, training=False))[:, 0]
        for i in range(0, len(x), 256)
    ]
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def export(net: Any, path: Path) -> Path:
    import tensorflow as tf

    path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(net).convert())
    return path
