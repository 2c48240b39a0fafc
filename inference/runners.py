"""What runs a bundle's network on a batch: the TFLite interpreter (served) or the Keras model (fallback).

Both return ``(outputs, embedding)``; the embedding is the gate's (:func:`embedding_model`) or None when the
network lacks the layers. TensorFlow is imported only when a runner is built.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np

if TYPE_CHECKING:
    import keras


class Runner(Protocol):
    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]: ...


class KerasRunner:
    """The Keras network; with the gate embedding of ``layers`` as second output when the network has them."""

    def __init__(self, net: keras.Model, layers: Sequence[str]) -> None:
        names = {layer.name for layer in net.layers}
        self._both = set(layers) <= names
        self._net = embedding_model(net, layers) if self._both else net

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if not self._both:
            return as_numpy(self._net(x, training=False)), None
        out, features = self._net(x, training=False)
        return np.asarray(out), np.asarray(features)


class TfliteRunner:
    """A TFLite interpreter (2 threads) with two outputs: probabilities (narrower) and features (wider)."""

    def __init__(self, path: Path) -> None:
        import warnings

        import tensorflow as tf

        with warnings.catch_warnings():  # "tf.lite.Interpreter is deprecated" (LiteRT is not a dependency)
            warnings.simplefilter("ignore")
            self._interpreter = tf.lite.Interpreter(model_path=str(path), num_threads=2)
        self._interpreter.allocate_tensors()
        self._input = self._interpreter.get_input_details()[0]["index"]
        details = sorted(self._interpreter.get_output_details(), key=lambda d: int(d["shape"][-1]))
        self._outputs = [d["index"] for d in details]
        self._lock = threading.Lock()

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        rows, feats = [], []
        with self._lock:
            for xi in np.asarray(x, dtype=np.float32):
                self._interpreter.set_tensor(self._input, xi[np.newaxis])
                self._interpreter.invoke()
                rows.append(self._interpreter.get_tensor(self._outputs[0])[0].copy())
                feats.append(self._interpreter.get_tensor(self._outputs[-1])[0].copy())
        return np.stack(rows), (np.stack(feats) if len(self._outputs) > 1 else None)


def embedding_model(net: keras.Model, layers: Sequence[str] = ("features",)) -> keras.Model:
    """``net`` with a second output, the gate's embedding: the named layers' outputs, global-average-pooled
    when spatial, concatenated (one layer: as it is)."""
    keras = keras_module()
    parts = []
    for name in layers:
        out = net.get_layer(name).output
        if len(out.shape) == 4:
            out = keras.layers.GlobalAveragePooling2D(name=f"gate_pool_{name}")(out)
        parts.append(out)
    embedding = parts[0] if len(parts) == 1 else keras.layers.Concatenate(name="gate_embedding")(parts)
    return keras.Model(net.inputs, [net.output, embedding])


def keras_module() -> Any:
    import keras

    return keras


def as_numpy(output: Any) -> np.ndarray:
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return np.concatenate([np.asarray(o) for o in output], axis=-1)
    return cast(np.ndarray, np.asarray(output))
