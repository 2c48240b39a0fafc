"""Model bundles: a directory with ``model.keras`` (Keras 3) and ``model.json`` (metadata).

``model.json`` is read and validated by :class:`inference.bundle_metadata.BundleMetadata` (format there);
:mod:`inference.runners` runs the network.

An optional ``"preprocess"`` key names an input adapter (:data:`ADAPTERS`) for models that need more than a
resize: it runs its own consistency checks after the rule gate, cuts the network input from the image, may
describe what it got (:meth:`KerasBundleModel.describe_input`) and maps the heatmap back onto the image.
``"fundus-disc"`` (:class:`inference.gate_fundus.FundusDiscAdapter`) finds the optic disc and crops it.

Optional keys used by the chest models: ``"calibration"``, a list of ``{"columns": [...], "temperature": T}``
(one column: sigmoid(logit(p) / T); several: softmax(log(p) / T) over them); ``"feature_gate"``, the name of
an ``.npz`` file with a :class:`inference.gate.FeatureGate` (SSIM to an average radiograph, Mahalanobis
distance of the network's embedding: the layers named in ``"feature_layers"``, default ``["features"]``,
global-average-pooled and concatenated, see ``embedding_model``); an output's ``"requires"``, another
finding that must be present for this one to be (a subtype); ``"domain_gate"``, a separate small classifier
of whole chest radiographs run last (:mod:`inference.domain_gate`). When ``model.tflite`` is present (a
float32 conversion with the outputs and the embedding as its two outputs) it serves the probabilities; Keras
still draws the heatmaps. ``embedding_model`` is :func:`inference.runners.embedding_model`.

The network receives float32 N x size x size x channels in [0, 1] (see :func:`inference.preprocess.
to_model_input`); any further normalisation belongs inside the Keras graph. Each output maps one column of
the (sigmoid or softmax) output to a finding; ``present`` is probability >= threshold.

TensorFlow/Keras are imported only when a model is first used: reading metadata and building a registry
stays cheap.
"""

from __future__ import annotations

import importlib
import json
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import cv2
import numpy as np

from core.domain import Finding, ModelInfo
from inference.bundle_metadata import (
    ADAPTERS,
    METADATA_FILE,
    MODEL_FILE,
    TFLITE_FILE,
    BundleError,
    BundleMetadata,
    InputAdapter,
    OutputSpec,
)
from inference.domain_gate import DomainGate
from inference.gate import MEASURE_SIDE, FeatureGate, check_consistency
from inference.preprocess import to_model_input
from inference.runners import KerasRunner, Runner, TfliteRunner, keras_module

if TYPE_CHECKING:
    import keras

__all__ = [
    "METADATA_FILE",
    "MODEL_FILE",
    "TFLITE_FILE",
    "BundleError",
    "BundleMetadata",
    "KerasBundleModel",
    "reduce_image",
    "write_bundle",
]

logger = logging.getLogger(__name__)

_BATCH = 16


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
        self._adapter: InputAdapter | None = None
        self._lock = threading.RLock()  # re-entrant: _run builds a runner that loads the model
        self._runner: Runner | None = None
        self._feature_gate: FeatureGate | None = None
        self._domain: DomainGate | None = None
        # Gated images (by identity, weakly held) -> their raw outputs, for predict.
        self._recent: OrderedDict[int, tuple[weakref.ref[np.ndarray], np.ndarray]] = OrderedDict()

    def __repr__(self) -> str:
        return f"KerasBundleModel({self.info.name!r} {self.info.version}, {str(self.path)!r})"

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def check_input(self, image: np.ndarray) -> str | None:
        adapter = self._input_adapter()
        # Without an adapter, one reduction serves the rule gate (it measures at this size anyway) and the
        # network input: a full-size radiograph is resized once, not twice.
        # With an adapter, its working copy (one reduction of a full-resolution photograph, cached) is reduced
        # further for the rule gate instead of the original.
        working = getattr(adapter, "working_image", None)
        small = reduce_image(working(image) if working is not None else image)
        reason = check_consistency(small, self.modality_kind, self.metadata.gate)
        if reason is None and adapter is not None:
            reason = adapter.check(image)
        if reason is None and adapter is not None and hasattr(adapter, "check_features"):
            reason = self._check_adapter_features(image, adapter)
        if reason is None and self.metadata.feature_gate is not None:
            reason = self._check_features(image, small)
        if reason is None and self.metadata.domain_gate is not None:
            reason = self._domain_classifier().check(small)
        return reason

    def _check_features(self, image: np.ndarray, small: np.ndarray) -> str | None:
        """SSIM to the average radiograph, then the embedding tests; keeps the outputs for predict."""
        gate = self._gate_stats()
        x = self._input(small)
        reason = gate.check_ssim(x)
        if reason is not None:
            return reason
        outputs, features = self._run(x[np.newaxis])
        self._remember(image, outputs[0])
        if features is None:
            raise BundleError(f"{self.info.name}: the network has no 'features' layer for its feature gate")
        return gate.check_features(features[0])

    def _check_adapter_features(self, image: np.ndarray, adapter: Any) -> str | None:
        """The adapter's verdict on the network's ``"features"`` embedding; keeps the outputs for predict."""
        outputs, features = self._run(self._input(image)[np.newaxis])
        self._remember(image, outputs[0])
        if features is None:
            raise BundleError(f"{self.info.name}: the network has no 'features' layer for its adapter's gate")
        return cast(str | None, adapter.check_features(features[0]))

    def describe_input(self, image: np.ndarray) -> str | None:
        """What the adapter made of an accepted image (e.g. full photograph or disc crop), or None."""
        adapter = self._input_adapter()
        return adapter.describe(image) if adapter is not None else None

    def predict(self, images: Sequence[np.ndarray]) -> list[list[Finding]]:
        probabilities = self.probabilities(images)
        return [
            [
                Finding(
                    name=o.finding,
                    probability=float(row[o.index]),
                    threshold=o.threshold,
                    present=bool(row[o.index] >= o.threshold) and self._parent_present(o, row),
                )
                for o in self.metadata.outputs
            ]
            for row in probabilities
        ]

    def _parent_present(self, spec: OutputSpec, row: np.ndarray) -> bool:
        parent = next((o for o in self.metadata.outputs if o.finding == spec.requires), None)
        return parent is None or bool(row[parent.index] >= parent.threshold)

    def probabilities(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Calibrated network outputs, N x columns, float64 (inference mode, fixed batches: deterministic)."""
        if not images:
            return np.zeros((0, 1 + max(o.index for o in self.metadata.outputs)))
        known = [self._recalled(image) for image in images]
        todo = [i for i, row in enumerate(known) if row is None]
        if todo:
            x = np.stack([self._input(images[i]) for i in todo])
            fresh = np.concatenate([self._run(x[i : i + _BATCH])[0] for i in range(0, len(x), _BATCH)])
            for i, row in zip(todo, fresh, strict=True):
                known[i] = row
        out = self._calibrated(np.stack([np.asarray(row) for row in known]).astype(np.float64))
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
        keras = keras_module()
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
        adapter = self._input_adapter()
        if adapter is not None:
            cam = adapter.heatmap_to_image(cam, image)
        else:
            cam = cv2.resize(cam, (w, h), interpolation=cv2.INTER_LINEAR)
        peak = float(cam.max())
        return np.clip(cam / peak, 0.0, 1.0) if peak > 0 else np.zeros((h, w), dtype=np.float32)

    def _input(self, image: np.ndarray) -> np.ndarray:
        adapter = self._input_adapter()
        if adapter is not None:
            return adapter.prepare(image)
        return to_model_input(reduce_image(image), self.metadata.input_size, self.metadata.channels)

    def _run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw outputs (and features when the runner has them) of a batch of network inputs."""
        with self._lock:
            if self._runner is None:
                tflite = self.path / TFLITE_FILE
                self._runner = (
                    TfliteRunner(tflite)
                    if tflite.is_file()
                    else KerasRunner(self._keras_model(), self.metadata.feature_layers)
                )
            runner = self._runner
        return runner(x)

    def _gate_stats(self) -> FeatureGate:
        with self._lock:
            if self._feature_gate is None:
                assert self.metadata.feature_gate is not None
                self._feature_gate = FeatureGate.load(self.path / self.metadata.feature_gate)
            return self._feature_gate

    def _domain_classifier(self) -> DomainGate:
        with self._lock:
            if self._domain is None:
                assert self.metadata.domain_gate is not None
                self._domain = DomainGate(self.path, self.metadata.domain_gate)
            return self._domain

    def _remember(self, image: np.ndarray, row: np.ndarray) -> None:
        """Keep the outputs computed by the gate so predict need not resize and run the image again."""
        with self._lock:
            self._recent[id(image)] = (weakref.ref(image), row)
            while len(self._recent) > 64:
                self._recent.popitem(last=False)

    def _recalled(self, image: np.ndarray) -> np.ndarray | None:
        with self._lock:
            entry = self._recent.pop(id(image), None)
        if entry is None or entry[0]() is not image:
            return None
        return entry[1]

    def _calibrated(self, raw: np.ndarray) -> np.ndarray:
        out = raw.copy()
        for group in self.metadata.calibration:
            cols = list(group.columns)
            p = np.clip(raw[:, cols], 1e-7, 1 - 1e-7)
            if len(cols) == 1:
                z = np.log(p / (1 - p)) / group.temperature
                out[:, cols] = 1 / (1 + np.exp(-z))
            else:
                z = np.log(p) / group.temperature
                z -= z.max(axis=1, keepdims=True)
                out[:, cols] = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        return out

    def _input_adapter(self) -> InputAdapter | None:
        if self.metadata.preprocess is None:
            return None
        with self._lock:
            if self._adapter is None:
                module, _, name = ADAPTERS[self.metadata.preprocess].partition(":")
                cls = getattr(importlib.import_module(module), name)
                self._adapter = cast(InputAdapter, cls(self.path, self.metadata.input_size))
            return self._adapter

    def _keras_model(self) -> keras.Model:
        with self._lock:
            if self._model is None:
                keras = keras_module()
                logger.info("loading model %s %s from %s", self.info.name, self.info.version, self.path)
                self._model = keras.models.load_model(self.path / MODEL_FILE, compile=False)
            return self._model


def reduce_image(image: np.ndarray, side: int = MEASURE_SIDE) -> np.ndarray:
    """``image`` shrunk (INTER_AREA) to a long side of at most ``side``, as the rule gate measures it."""
    h, w = image.shape[:2]
    scale = side / max(h, w, 1)
    if scale >= 1:
        return image
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(cv2.resize(np.asarray(image, dtype=np.float32), size, interpolation=cv2.INTER_AREA))


def write_bundle(directory: Path, model: keras.Model, metadata: dict[str, Any]) -> Path:
    """Save ``model`` and its validated ``metadata`` as a bundle in ``directory`` (created if needed)."""
    BundleMetadata.from_dict(metadata)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save(directory / MODEL_FILE)
    (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    return directory


def _last_conv2d(model: keras.Model) -> Any:
    keras = keras_module()
    for layer in reversed(model.layers):
        if isinstance(layer, keras.layers.Conv2D):
            return layer
    return None
