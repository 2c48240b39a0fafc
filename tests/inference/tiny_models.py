"""Tiny, untrained bundles (Keras, exported to TFLite as training does) with fixed seeds, for tests only.

Other test packages (end-to-end) build the same bundles with :func:`make_tiny_bundles`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_INPUT_SIZE = 64

#: name -> (kind, channels, findings in output-column order)
TINY_MODELS: dict[str, tuple[str, int, tuple[str, ...]]] = {
    "pneumonia": ("chest", 1, ("pneumonia", "bacterial_pneumonia", "viral_pneumonia")),
    "covid19": ("chest", 1, ("covid19", "viral_pneumonia")),
    "glaucoma": ("fundus", 3, ("glaucoma",)),
}


def tiny_metadata(name: str) -> dict[str, Any]:
    kind, channels, findings = TINY_MODELS[name]
    return {
        "name": name,
        "version": "0.0.1-test",
        "display_name": f"Tiny untrained {name} test model",
        "kind": kind,
        "input_size": TINY_INPUT_SIZE,
        "channels": channels,
        "outputs": [{"finding": f, "index": i, "threshold": 0.5} for i, f in enumerate(findings)],
        "heatmap": {"layers": ["conv"], "heads": ["head"]},
    }


def make_tiny_bundles(
    root: Path, *, seed: int = 1000, version: str | None = None, names: tuple[str, ...] | None = None
) -> Path:
    """Write one bundle per :data:`TINY_MODELS` entry (or ``names``) under ``root/<name>/``; returns ``root``.
    Another ``seed`` gives other weights (and ``version`` another version: a retrained model)."""
    import keras

    from training.export import write_bundle

    root = Path(root)
    for offset, name in enumerate(sorted(TINY_MODELS)):
        if names is not None and name not in names:
            continue
        _, channels, findings = TINY_MODELS[name]
        keras.utils.set_random_seed(seed + offset)
        inputs = keras.Input((TINY_INPUT_SIZE, TINY_INPUT_SIZE, channels))
        x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
        x = keras.layers.GlobalAveragePooling2D(name="features")(x)
        outputs = keras.layers.Dense(len(findings), activation="sigmoid", name="head")(x)
        model = keras.Model(inputs, outputs, name=f"tiny_{name}")
        metadata = tiny_metadata(name)
        if version is not None:
            metadata["version"] = version
        write_bundle(root / name, model, metadata)
    return root
