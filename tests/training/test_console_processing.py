"""training.fitting.console_processing: radiographs as other consoles process them; the fit loop uses it."""

from __future__ import annotations

import numpy as np

from training import fitting
from training.fitting import PROCESSING_CHANCE, console_processing


def _radiographs(n: int) -> np.ndarray:
    """Smooth gray images with structure (a bright band, a gradient), N x 64 x 64 x 1 in [0, 1]."""
    y, x = np.mgrid[0:64, 0:64].astype(np.float32) / 63
    base = 0.2 + 0.5 * x + 0.25 * np.exp(-(((y - 0.5) / 0.15) ** 2))
    rng = np.random.default_rng(0)
    return np.stack([np.clip(base * rng.uniform(0.8, 1.0), 0, 1)[..., None] for _ in range(n)])


def test_processing_is_seeded_in_range_and_leaves_the_input_alone() -> None:
    batch = _radiographs(200)
    before = batch.copy()
    first = console_processing(batch, np.random.default_rng(4))
    again = console_processing(batch, np.random.default_rng(4))
    other = console_processing(batch, np.random.default_rng(5))
    assert np.array_equal(batch, before)  # not modified in place
    assert first.shape == batch.shape and first.dtype == np.float32
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    assert first.min() >= 0.0 and first.max() <= 1.0
    changed = np.any(np.abs(first - batch) > 1e-6, axis=(1, 2, 3)).mean()
    expected = 1 - (1 - PROCESSING_CHANCE) ** 4  # four kinds, each independently
    assert abs(changed - expected) < 0.12, changed


def test_processing_changes_local_contrast_not_the_anatomy() -> None:
    """Whatever was applied, the image stays the same picture: strongly correlated with the original."""
    batch = _radiographs(50)
    out = console_processing(batch, np.random.default_rng(9))
    for a, b in zip(batch, out, strict=True):
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.8


def _fit(processing: bool) -> list[float]:
    import keras

    fitting.setup_tensorflow(3)
    rng = np.random.default_rng(3)
    images = (_radiographs(48)[..., 0] * 255).astype(np.uint8)
    labels = (rng.random(48) < 0.5).astype(np.float32)
    images[labels == 1, 20:40, 20:40] = 255  # a learnable sign
    inputs = keras.Input((64, 64, 1))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    net = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x))
    history = fitting.fit(
        net,
        images[:32],
        labels[:32],
        images[32:],
        labels[32:],
        loss="binary_crossentropy",
        epochs=2,
        seed=3,
        batch_size=16,
        processing=processing,
    )
    return history["loss"]


def test_fit_with_processing_trains_on_processed_images() -> None:
    plain, again, processed = _fit(False), _fit(False), _fit(True)
    assert plain == again  # seeded and deterministic, so the difference below is the processing
    assert len(processed) == 2 and all(np.isfinite(processed)) and processed != plain
