"""From a trained Keras network to a served bundle: the TFLite graph (outputs, gate embedding, class
activation maps), ``model.json``, and a Grad-CAM reference for comparison.

The served graph has up to three outputs, told apart by shape in :class:`inference.runners.TfliteRunner`:

* the network's outputs, N x columns;
* the gate's embedding (:func:`embedding_model`): the layers named in ``feature_layers``, global-average
  pooled and concatenated, N x D;
* with a ``"heatmap"`` spec, class activation maps N x h x w x columns: the last feature maps (``"layers"``,
  concatenated on channels) times the kernels of the dense heads (``"heads"``, concatenated in output
  order) without bias. For a head on the global average of those maps (every shipped network) the map's
  spatial mean plus the bias is the head's logit, so the map is exactly what drove the output; serving
  needs no gradients and no TensorFlow to draw it.

Everything here imports TensorFlow/Keras inside the functions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from inference.metadata import METADATA_FILE, MODEL_FILE, TFLITE_FILE, BundleMetadata


def embedding_model(net: Any, layers: Sequence[str] = ("features",)) -> Any:
    """``net`` with a second output, the gate's embedding: the named layers' outputs, global-average-pooled
    when spatial, concatenated (one layer: as it is)."""
    import keras

    parts = []
    for name in layers:
        out = net.get_layer(name).output
        if len(out.shape) == 4:
            out = keras.layers.GlobalAveragePooling2D(name=f"gate_pool_{name}")(out)
        parts.append(out)
    embedding = parts[0] if len(parts) == 1 else keras.layers.Concatenate(name="gate_embedding")(parts)
    return keras.Model(net.inputs, [net.output, embedding])


def served_model(net: Any, layers: Sequence[str], heatmap: Mapping[str, Any] | None = None) -> Any:
    """The graph converted to ``model.tflite``: outputs, embedding and (with ``heatmap``) the class maps."""
    import keras

    names = {layer.name for layer in net.layers}
    # a network without the embedding layers (a plain classifier) is served without the gate embedding
    both = embedding_model(net, layers) if set(layers) <= names else keras.Model(net.inputs, [net.output])
    if heatmap is None:
        return both
    maps = [net.get_layer(name).output for name in heatmap["layers"]]
    fmap = maps[0] if len(maps) == 1 else keras.layers.Concatenate(name="cam_features")(maps)
    columns = []
    for name in heatmap["heads"]:
        kernel = np.asarray(net.get_layer(name).get_weights()[0])
        if kernel.shape[0] != fmap.shape[-1]:
            raise ValueError(f"head {name} reads {kernel.shape[0]} values, the maps have {fmap.shape[-1]}")
        dense = keras.layers.Dense(kernel.shape[1], use_bias=False, name=f"cam_{name}")
        columns.append(dense(fmap))
        dense.set_weights([kernel])
    cam = columns[0] if len(columns) == 1 else keras.layers.Concatenate(name="cam")(columns)
    return keras.Model(net.inputs, [*both.outputs, cam])


def export_tflite(
    net: Any, path: Path, *, layers: Sequence[str] = ("features",), heatmap: Mapping[str, Any] | None = None
) -> Path:
    """Convert :func:`served_model` of ``net`` to a float32 TFLite file."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(served_model(net, layers, heatmap))
    path.write_bytes(converter.convert())
    return path


def write_bundle(directory: Path, model: Any, metadata: dict[str, Any], *, tflite: bool = True) -> Path:
    """Save ``model`` (``model.keras``), its validated ``metadata`` (``model.json``) and, with ``tflite``, the
    served graph (``model.tflite``) as a bundle in ``directory`` (created if needed).

    The release fields of an existing ``model.json`` there (``version``, ``changelog``) are kept unless
    ``metadata`` sets them: a version is a decision recorded in the bundle, not in code.
    """
    directory = Path(directory)
    metadata = {**release_fields(directory), **metadata}
    parsed = BundleMetadata.from_dict(metadata)
    directory.mkdir(parents=True, exist_ok=True)
    model.save(directory / MODEL_FILE)
    if tflite:
        export_tflite(
            model, directory / TFLITE_FILE, layers=parsed.feature_layers, heatmap=metadata.get("heatmap")
        )
    (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    return directory


def release_fields(directory: Path) -> dict[str, Any]:
    """``version`` and ``changelog`` of the bundle's current ``model.json`` ({} when there is none)."""
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return {key: data[key] for key in ("version", "changelog") if key in data}


def reexport(directory: Path) -> Path:
    """Convert a bundle's ``model.keras`` to ``model.tflite`` again, as its ``model.json`` describes."""
    import keras

    directory = Path(directory)
    metadata = json.loads((directory / METADATA_FILE).read_text(encoding="utf-8"))
    parsed = BundleMetadata.from_dict(metadata)
    net = keras.models.load_model(directory / MODEL_FILE, compile=False)
    return export_tflite(
        net, directory / TFLITE_FILE, layers=parsed.feature_layers, heatmap=metadata.get("heatmap")
    )


def predict_with_features(
    net: Any, x: np.ndarray, batch_size: int = 64, *, layers: Sequence[str] = ("features",)
) -> tuple[np.ndarray, np.ndarray]:
    """Network outputs and gate embeddings (:func:`embedding_model`) of uint8 images."""
    both = embedding_model(net, layers)
    outs, feats = [], []
    for i in range(0, len(x), batch_size):
        batch = x[i : i + batch_size, ..., np.newaxis].astype(np.float32) / 255.0
        o, f = both(batch, training=False)
        outs.append(np.asarray(o))
        feats.append(np.asarray(f))
    return np.concatenate(outs).astype(np.float64), np.concatenate(feats).astype(np.float64)


def grad_cam(net: Any, x: np.ndarray, column: int) -> np.ndarray | None:
    """Grad-CAM (Selvaraju et al. 2017) of output ``column`` over the last top-level Conv2D of ``net`` for
    one network input ``x`` (S x S x C): ReLU of the gradient-weighted feature maps, at the conv's size.

    What the served heatmaps were before class activation maps replaced them; kept to compare the two.
    None when the network has no top-level Conv2D.
    """
    import keras
    import tensorflow as tf

    conv = next((layer for layer in reversed(net.layers) if isinstance(layer, keras.layers.Conv2D)), None)
    if conv is None:
        return None
    grad_model = keras.Model(net.inputs, [conv.output, net.output])
    inputs = tf.convert_to_tensor(np.asarray(x, dtype=np.float32)[np.newaxis])
    with tf.GradientTape() as tape:
        features, output = grad_model(inputs, training=False)
        score = output[:, column]
    grads = tape.gradient(score, features)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    return np.asarray(tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))[0], dtype=np.float32)
