"""Model bundles: a directory with ``model.keras`` (Keras 3) and ``model.json`` (metadata).

``model.json``::

    {"name": "pneumonia", "version": "1.0.0", "display_name": "Pneumonia screening (chest X-ray)",
     "kind": "chest", "input_size": 224, "channels": 1,
     "outputs": [{"finding": "pneumonia", "index": 0, "threshold": 0.5}, ...],
     "gate": {"colour_saturation": 0.08}}

The network receives float32 N x size x size x channels in [0, 1] (see :func:`inference.preprocess.
to_model_input`); any further normalisation belongs inside the Keras graph. Each output maps one column of
the (sigmoid or softmax) output to a finding; ``present`` is probability >= threshold.

This is the only module that imports TensorFlow/Keras, and only when a model is first used: reading metadata
and building a registry stays cheap.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import cv2
import numpy as np

from core.domain import Finding, ModelInfo
from inference.gate import GateBounds, check_consistency
from inference.preprocess import to_model_input

if TYPE_CHECKING:
    import keras

logger = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
METADATA_FILE = "model.json"
_KINDS = ("fundus", "chest")
_BATCH = 16


class BundleError(ValueError):
    """A bundle directory is incomplete or its metadata is invalid."""


@dataclass(frozen=True)
class OutputSpec:
    """One output column of the network and the finding it reports."""

    finding: str
    index: int
    threshold: float


@dataclass(frozen=True)
class BundleMetadata:
    """The validated content of ``model.json``."""

    name: str
    version: str
    display_name: str
    kind: Literal["fundus", "chest"]
    input_size: int
    channels: int
    outputs: tuple[OutputSpec, ...]
    gate: GateBounds

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(name=self.name, version=self.version, display_name=self.display_name)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BundleMetadata:
        try:
            name, version = str(data["name"]), str(data["version"])
            kind, size, channels = data["kind"], int(data["input_size"]), int(data["channels"])
            outputs = tuple(
                OutputSpec(finding=str(o["finding"]), index=int(o["index"]), threshold=float(o["threshold"]))
                for o in data["outputs"]
            )
            gate = GateBounds.from_mapping(data.get("gate"))
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"invalid model metadata: {exc!r}") from exc
        if not name or not version:
            raise BundleError("model metadata needs a non-empty name and version")
        if kind not in _KINDS:
            raise BundleError(f"kind must be one of {_KINDS}, not {kind!r}")
        if size < 8 or channels not in (1, 3):
            raise BundleError(f"input_size must be >= 8 and channels 1 or 3 (got {size}, {channels})")
        if not outputs:
            raise BundleError("model metadata lists no outputs")
        if len({o.finding for o in outputs}) != len(outputs):
            raise BundleError("each finding may appear once in outputs")
        for o in outputs:
            if o.index < 0 or not 0.0 <= o.threshold <= 1.0:
                raise BundleError(f"output {o.finding}: index must be >= 0 and threshold in [0, 1]")
        return cls(
            name=name,
            version=version,
            display_name=str(data.get("display_name") or name),
            kind=kind,
            input_size=size,
            channels=channels,
            outputs=outputs,
            gate=gate,
        )

    @classmethod
    def read(cls, bundle_dir: Path) -> BundleMetadata:
        path = Path(bundle_dir) / METADATA_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise BundleError(f"cannot read {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise BundleError(f"{path} must hold a JSON object")
        return cls.from_dict(data)


class KerasBundleModel:
    """A :class:`inference.base.Model` backed by a bundle directory; Keras loads on first prediction."""

    def __init__(self, path: Path, metadata: BundleMetadata | None = None) -> None:
        self.path = Path(path)
        self.metadata = metadata or BundleMetadata.read(self.path)
        if not (self.path / MODEL_FILE).is_file():
            raise BundleError(f"{self.path} has no {MODEL_FILE}")
        self.info: ModelInfo = self.metadata.info
        self.modality_kind: Literal["fundus", "chest"] = self.metadata.kind
        self._model: keras.Model | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"KerasBundleModel({self.info.name!r} {self.info.version}, {str(self.path)!r})"

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def check_input(self, image: np.ndarray) -> str | None:
        return check_consistency(image, self.modality_kind, self.metadata.gate)

    def predict(self, images: Sequence[np.ndarray]) -> list[list[Finding]]:
        probabilities = self.probabilities(images)
        return [
            [
                Finding(
                    name=o.finding,
                    probability=float(row[o.index]),
                    threshold=o.threshold,
                    present=bool(row[o.index] >= o.threshold),
                )
                for o in self.metadata.outputs
            ]
            for row in probabilities
        ]

    def probabilities(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Raw network outputs, N x columns, float64 (inference mode, fixed batches: deterministic)."""
        if not images:
            return np.zeros((0, 1 + max(o.index for o in self.metadata.outputs)))
        model = self._keras_model()
        x = np.stack([self._input(image) for image in images])
        rows = [_as_numpy(model(x[i : i + _BATCH], training=False)) for i in range(0, len(x), _BATCH)]
        out = np.concatenate(rows).astype(np.float64)
        needed = 1 + max(o.index for o in self.metadata.outputs)
        if out.ndim != 2 or out.shape[1] < needed:
            raise BundleError(f"{self.info.name}: output shape {out.shape} lacks column {needed - 1}")
        return out

    def heatmap(self, image: np.ndarray, finding: str | None = None) -> np.ndarray | None:
        """Grad-CAM over the last top-level Conv2D for ``finding`` (default: the first output).

        Float32 of the image's HxW in [0, 1], or None when the network has no top-level Conv2D (a backbone
        nested as one layer is not searched).
        """
        import tensorflow as tf

        model = self._keras_model()
        conv = _last_conv2d(model)
        if conv is None:
            return None
        spec = next((o for o in self.metadata.outputs if finding in (None, o.finding)), None)
        if spec is None:
            raise ValueError(f"{self.info.name} has no output {finding!r}")
        keras = _keras()
        grad_model = keras.Model(model.inputs, [conv.output, model.output])
        x = tf.convert_to_tensor(self._input(image)[np.newaxis])
        with tf.GradientTape() as tape:
            features, output = grad_model(x, training=False)
            if isinstance(output, (list, tuple)):
                output = tf.concat(list(output), axis=-1)
            score = output[:, spec.index]
        grads = tape.gradient(score, features)
        if grads is None:
            return None
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))[0].numpy().astype(np.float32)
        h, w = image.shape[:2]
        cam = cv2.resize(cam, (w, h), interpolation=cv2.INTER_LINEAR)
        peak = float(cam.max())
        return np.clip(cam / peak, 0.0, 1.0) if peak > 0 else np.zeros((h, w), dtype=np.float32)

    def _input(self, image: np.ndarray) -> np.ndarray:
        return to_model_input(image, self.metadata.input_size, self.metadata.channels)

    def _keras_model(self) -> keras.Model:
        with self._lock:
            if self._model is None:
                keras = _keras()
                logger.info("loading model %s %s from %s", self.info.name, self.info.version, self.path)
                self._model = keras.models.load_model(self.path / MODEL_FILE, compile=False)
            return self._model


def write_bundle(directory: Path, model: keras.Model, metadata: dict[str, Any]) -> Path:
    """Save ``model`` and its validated ``metadata`` as a bundle in ``directory`` (created if needed)."""
    BundleMetadata.from_dict(metadata)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save(directory / MODEL_FILE)
    (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    return directory


def _keras() -> Any:
    import keras

    return keras


def _as_numpy(output: Any) -> np.ndarray:
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return np.concatenate([np.asarray(o) for o in output], axis=-1)
    return cast(np.ndarray, np.asarray(output))


def _last_conv2d(model: keras.Model) -> Any:
    keras = _keras()
    for layer in reversed(model.layers):
        if isinstance(layer, keras.layers.Conv2D):
            return layer
    return None
