"""Model bundles: a directory with ``model.tflite`` (the served graph), ``model.json`` (metadata), gate files
and the training artefacts (``model.keras``, ``card.md``) that serving never reads.

``model.json`` is read and validated by :class:`inference.metadata.BundleMetadata` (format there);
:mod:`inference.runners` runs the graph on the LiteRT interpreter: serving needs no TensorFlow.

An optional ``"preprocess"`` key names an input adapter (:data:`ADAPTERS`) for models that need more than a
resize: it runs its own consistency checks after the rule gate, cuts the network input from the image, may
describe what it got (:meth:`BundleModel.describe_input`) and maps the heatmap back onto the image.
``"fundus-disc"`` (:class:`inference.gates.fundus.FundusDiscAdapter`) finds the optic disc and crops it.

Optional keys used by the chest models: ``"calibration"``, a list of ``{"columns": [...], "temperature": T}``
(one column: sigmoid(logit(p) / T); several: softmax(log(p) / T) over them); ``"feature_gate"``, the name of
an ``.npz`` file with a :class:`inference.gates.features.FeatureGate` (SSIM to an average radiograph,
Mahalanobis distance of the network's embedding: the layers named in ``"feature_layers"``, default
``["features"]``, global-average-pooled and concatenated, an output of the served graph); an output's
``"requires"``, another finding that must be present for this one to be (a subtype); ``"domain_gate"``, a
separate small classifier run last (:mod:`inference.gates.domain`). Heatmaps are the class activation maps
the served graph outputs (:mod:`training.export` says how they are built).

The network receives float32 N x size x size x channels in [0, 1] (see :func:`inference.preprocess.
to_model_input`); any further normalisation belongs inside the graph. Each output maps one column of the
(sigmoid or softmax) output to a finding; ``present`` is probability >= threshold. The interpreter loads on
first use: reading metadata and building a registry stays cheap.
"""

from __future__ import annotations

import importlib
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, cast

import cv2
import numpy as np

from core.domain import Finding, ModelInfo
from inference.gates.domain import DomainGate
from inference.gates.features import FeatureGate
from inference.gates.rules import MEASURE_SIDE, check_consistency
from inference.metadata import (
    ADAPTERS,
    METADATA_FILE,
    TFLITE_FILE,
    BundleError,
    BundleMetadata,
    InputAdapter,
    OutputSpec,
)
from inference.preprocess import to_model_input
from inference.runners import RunResult, TfliteRunner

__all__ = [
    "METADATA_FILE",
    "TFLITE_FILE",
    "BundleError",
    "BundleMetadata",
    "BundleModel",
    "reduce_image",
]

logger = logging.getLogger(__name__)

_BATCH = 16


class BundleModel:
    """A :class:`inference.model.Model` backed by a bundle directory; the interpreter loads on first use."""

    def __init__(self, path: Path, metadata: BundleMetadata | None = None) -> None:
        self.path = Path(path)
        self.metadata = metadata or BundleMetadata.read(self.path)
        if not (self.path / TFLITE_FILE).is_file():
            raise BundleError(f"{self.path} has no {TFLITE_FILE}")
        self.info: ModelInfo = self.metadata.info
        self.modality_kind: Literal["fundus", "chest"] = self.metadata.kind
        self._adapter: InputAdapter | None = None
        self._lock = threading.RLock()
        self._runner: TfliteRunner | None = None
        self._feature_gate: FeatureGate | None = None
        self._domain: DomainGate | None = None
        # Gated images (by identity, weakly held) -> their raw outputs, for predict.
        self._recent: OrderedDict[int, tuple[weakref.ref[np.ndarray], np.ndarray]] = OrderedDict()
        #: The gate's run of an image also gave its class maps: kept (outputs, maps) so the heatmap the case
        #: page shows need not run the network again. Not taken away by predict, unlike ``_recent``.
        self._maps: OrderedDict[int, tuple[weakref.ref[np.ndarray], np.ndarray, np.ndarray]] = OrderedDict()

    def __repr__(self) -> str:
        return f"BundleModel({self.info.name!r} {self.info.version}, {str(self.path)!r})"

    @property
    def loaded(self) -> bool:
        return self._runner is not None

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
        result = self._run(x[np.newaxis], with_cam=True)
        self._remember(image, result)
        if result.features is None:
            raise BundleError(f"{self.info.name}: the served graph has no embedding for its feature gate")
        return gate.check_features(result.features[0])

    def _check_adapter_features(self, image: np.ndarray, adapter: Any) -> str | None:
        """The adapter's verdict on the network's ``"features"`` embedding; keeps the outputs for predict."""
        result = self._run(self._input(image)[np.newaxis], with_cam=True)
        self._remember(image, result)
        if result.features is None:
            raise BundleError(f"{self.info.name}: the served graph has no embedding for its adapter's gate")
        return cast(str | None, adapter.check_features(result.features[0]))

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
            fresh = np.concatenate([self._run(x[i : i + _BATCH]).outputs for i in range(0, len(x), _BATCH)])
            for i, row in zip(todo, fresh, strict=True):
                known[i] = row
        out = self._calibrated(np.stack([np.asarray(row) for row in known]).astype(np.float64))
        needed = 1 + max(o.index for o in self.metadata.outputs)
        if out.ndim != 2 or out.shape[1] < needed:
            raise BundleError(f"{self.info.name}: output shape {out.shape} lacks column {needed - 1}")
        return out

    def heatmap(self, image: np.ndarray, finding: str | None = None) -> np.ndarray | None:
        """:meth:`activation_map` of ``finding`` (default: the first output) on the image: float32 of the
        image's HxW in [0, 1] (scaled to its peak), or None when the served graph has no maps."""
        cam = self.activation_map(image, finding)
        if cam is None:
            return None
        h, w = image.shape[:2]
        adapter = self._input_adapter()
        if adapter is not None:
            cam = adapter.heatmap_to_image(cam, image)
        else:
            cam = cv2.resize(cam, (w, h), interpolation=cv2.INTER_LINEAR)
        peak = float(cam.max())
        return np.clip(cam / peak, 0.0, 1.0) if peak > 0 else np.zeros((h, w), dtype=np.float32)

    def activation_map(self, image: np.ndarray, finding: str | None = None) -> np.ndarray | None:
        """Class activation map of ``finding`` at the network's last feature-map size (ReLU, unscaled).

        For a column of a softmax group the map is drawn against the group's other classes,
        ``cam_c - sum_j p_j cam_j`` (p: the network's outputs in the group): the direction in which the
        softmax output of c grows, which is what Grad-CAM of a softmax output measures.
        """
        spec = next((o for o in self.metadata.outputs if finding in (None, o.finding)), None)
        if spec is None:
            raise ValueError(f"{self.info.name} has no output {finding!r}")
        known = self._maps_of(image)
        if known is not None:
            outputs, maps = known
        else:
            result = self._run(self._input(image)[np.newaxis], with_cam=True)
            if result.cam is None:
                return None
            outputs, maps = result.outputs[0], result.cam[0]
        cam = maps[:, :, spec.index]
        group = next((g for g in self.metadata.softmax_groups if spec.index in g), None)
        if group is not None:
            p = outputs[list(group)]
            cam = cam - np.tensordot(maps[:, :, list(group)], p / max(float(p.sum()), 1e-12), axes=([2], [0]))
        return np.maximum(cam, 0.0).astype(np.float32)

    def _input(self, image: np.ndarray) -> np.ndarray:
        adapter = self._input_adapter()
        if adapter is not None:
            return adapter.prepare(image)
        return to_model_input(reduce_image(image), self.metadata.input_size, self.metadata.channels)

    def _run(self, x: np.ndarray, *, with_cam: bool = False) -> RunResult:
        """Raw outputs, embedding (and with ``with_cam`` the class maps) of a batch of network inputs."""
        with self._lock:
            if self._runner is None:
                logger.info("loading model %s %s from %s", self.info.name, self.info.version, self.path)
                self._runner = TfliteRunner(self.path / TFLITE_FILE)
            runner = self._runner
        return runner(x, with_cam=with_cam)

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

    def _remember(self, image: np.ndarray, result: RunResult) -> None:
        """Keep the outputs computed by the gate so predict need not resize and run the image again, and its
        class maps for :meth:`activation_map`."""
        row = result.outputs[0]
        with self._lock:
            self._recent[id(image)] = (weakref.ref(image), row)
            while len(self._recent) > 64:
                self._recent.popitem(last=False)
            if result.cam is not None:
                self._maps[id(image)] = (weakref.ref(image), row, result.cam[0])
                while len(self._maps) > 64:
                    self._maps.popitem(last=False)

    def _maps_of(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        with self._lock:
            entry = self._maps.get(id(image))
        if entry is None or entry[0]() is not image:
            return None
        return entry[1], entry[2]

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


def reduce_image(image: np.ndarray, side: int = MEASURE_SIDE) -> np.ndarray:
    """``image`` shrunk (INTER_AREA) to a long side of at most ``side``, as the rule gate measures it."""
    h, w = image.shape[:2]
    scale = side / max(h, w, 1)
    if scale >= 1:
        return image
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(cv2.resize(np.asarray(image, dtype=np.float32), size, interpolation=cv2.INTER_AREA))
