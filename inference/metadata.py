"""Bundle metadata: the validated content of ``model.json`` and the names of a bundle's files.

``model.json``::

    {"name": "pneumonia", "version": "1.0.1", "display_name": "Pneumonia screening (chest X-ray)",
     "changelog": [{"version": "1.0.1", "changes": "gate refuses lateral views"}, ...],
     "kind": "chest", "input_size": 224, "channels": 1,
     "outputs": [{"finding": "pneumonia", "index": 0, "threshold": 0.5}, ...],
     "gate": {"colour_saturation": 0.08},
     "heatmap": {"layers": ["last_conv_relu"], "heads": ["pneumonia", "subtype"], "softmax": [[1, 2]]}}

The version and its changelog (newest first; the first entry is the version) are release decisions kept in
the bundle, never in code; cards and SRs read them from here. ``heatmap`` says how :mod:`training.export`
built the class-activation output of ``model.tflite``; its ``softmax`` lists the output columns that are one
softmax, whose maps are drawn against the other classes of the group (see :meth:`inference.bundle.
BundleModel.heatmap`). See :mod:`inference.bundle` for the other optional
keys (``preprocess``, ``calibration``, ``feature_gate``, ``feature_layers``, an output's ``requires``) and
what the served model does with them. No TensorFlow here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from core.domain import ModelInfo
from inference.gates.domain import DomainGateSpec
from inference.gates.rules import GateBounds

MODEL_FILE = "model.keras"
TFLITE_FILE = "model.tflite"
METADATA_FILE = "model.json"
_KINDS = ("fundus", "chest")
#: ``"preprocess"`` value -> "module:class" of its :class:`InputAdapter` (imported on first use).
ADAPTERS = {"fundus-disc": "inference.gates.fundus:FundusDiscAdapter"}


class BundleError(ValueError):
    """A bundle directory is incomplete or its metadata is invalid."""


class InputAdapter(Protocol):
    """Model-specific gate and input preparation; built as ``cls(bundle_dir, input_size)``."""

    def check(self, image: np.ndarray) -> str | None: ...

    def prepare(self, image: np.ndarray) -> np.ndarray: ...

    def describe(self, image: np.ndarray) -> str | None: ...

    def heatmap_to_image(self, cam: np.ndarray, image: np.ndarray) -> np.ndarray: ...

    # optional: ``check_features(features: np.ndarray) -> str | None`` judges the network's "features"
    # embedding of an image that passed ``check``; the outputs computed for it are reused by predict.


@dataclass(frozen=True)
class OutputSpec:
    """One output column of the network and the finding it reports."""

    finding: str
    index: int
    threshold: float
    requires: str | None = None  # present only when this finding is present too


@dataclass(frozen=True)
class CalibrationGroup:
    """Temperature scaling of some output columns (sigmoid for one column, softmax over several)."""

    columns: tuple[int, ...]
    temperature: float


@dataclass(frozen=True)
class Release:
    """One changelog entry: a version and what changed in it."""

    version: str
    changes: str


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
    preprocess: str | None = None
    calibration: tuple[CalibrationGroup, ...] = ()
    feature_gate: str | None = None
    feature_layers: tuple[str, ...] = ("features",)
    domain_gate: DomainGateSpec | None = None
    changelog: tuple[Release, ...] = ()
    #: Output columns forming one softmax each (``heatmap.softmax``).
    softmax_groups: tuple[tuple[int, ...], ...] = ()

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(name=self.name, version=self.version, display_name=self.display_name)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BundleMetadata:
        try:
            name, version = str(data["name"]), str(data["version"])
            kind, size, channels = data["kind"], int(data["input_size"]), int(data["channels"])
            outputs = tuple(
                OutputSpec(
                    finding=str(o["finding"]),
                    index=int(o["index"]),
                    threshold=float(o["threshold"]),
                    requires=None if o.get("requires") is None else str(o["requires"]),
                )
                for o in data["outputs"]
            )
            calibration = tuple(
                CalibrationGroup(tuple(int(c) for c in g["columns"]), float(g["temperature"]))
                for g in data.get("calibration") or ()
            )
            feature_gate = None if data.get("feature_gate") is None else str(data["feature_gate"])
            feature_layers = tuple(str(n) for n in data.get("feature_layers") or ("features",))
            gate = GateBounds.from_mapping(data.get("gate"))
            preprocess = None if data.get("preprocess") is None else str(data["preprocess"])
            domain = data.get("domain_gate")
            domain_gate = None if domain is None else DomainGateSpec.from_mapping(domain)
            changelog = tuple(
                Release(str(r["version"]), str(r["changes"])) for r in data.get("changelog") or ()
            )
            heatmap = data.get("heatmap")
            if heatmap is not None and not (heatmap.get("layers") and heatmap.get("heads")):
                raise ValueError("heatmap needs non-empty 'layers' and 'heads'")
            softmax_groups = tuple(
                tuple(int(c) for c in group) for group in (heatmap or {}).get("softmax") or ()
            )
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
        if preprocess is not None and preprocess not in ADAPTERS:
            raise BundleError(f"preprocess must be one of {sorted(ADAPTERS)}, not {preprocess!r}")
        if len({o.finding for o in outputs}) != len(outputs):
            raise BundleError("each finding may appear once in outputs")
        for o in outputs:
            if o.index < 0 or not 0.0 <= o.threshold <= 1.0:
                raise BundleError(f"output {o.finding}: index must be >= 0 and threshold in [0, 1]")
            if o.requires is not None and o.requires not in {p.finding for p in outputs} - {o.finding}:
                raise BundleError(f"output {o.finding} requires unknown finding {o.requires!r}")
        if changelog and changelog[0].version != version:
            raise BundleError(f"the newest changelog entry is {changelog[0].version}, the version {version}")
        for g in calibration:
            if not g.columns or g.temperature <= 0 or min(g.columns) < 0:
                raise BundleError("calibration groups need columns >= 0 and a temperature > 0")
        return cls(
            name=name,
            version=version,
            display_name=str(data.get("display_name") or name),
            kind=kind,
            input_size=size,
            channels=channels,
            outputs=outputs,
            gate=gate,
            preprocess=preprocess,
            calibration=calibration,
            feature_gate=feature_gate,
            feature_layers=feature_layers,
            domain_gate=domain_gate,
            changelog=changelog,
            softmax_groups=softmax_groups,
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
