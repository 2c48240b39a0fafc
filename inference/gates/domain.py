"""Domain classifier: a tiny CNN answering "is this the kind of picture the model reads?" (last gate stage).

The statistical stages of the gates (:class:`inference.gates.features.FeatureGate`,
:mod:`inference.gates.fundus`) work on hand-made statistics or on the diagnostic network's own embedding,
which was never taught what a hip, a knee or a cut-out of a radiograph looks like: crops of the hip CR and
drawn knees passed the chest gates, a synthetic outdoor scene the fundus gate. This stage is a separate
network trained for the question itself, on positives and negatives made in memory (never stored):

* chest (:mod:`training.chest.bundle`): positives are the radiographs the gate statistics use (the model's
  training split plus 80 % of the other chest data set); negatives are partial views cut from them (a
  quarter to a half of the side: one lung, a shoulder, the spine, so bone-and-soft-tissue pictures that are
  not a whole chest), the radiographs turned by 90 degrees, and :func:`training.probes.training_negatives`
  (noise, pages, drawn knees, gradients, gray fundus photographs; seeds and photographs disjoint from the
  probes the model card reports). Nothing from the hip CR of ``shared/dicom``: it stays an honest test.
  Gray input.
* fundus (:mod:`training.glaucoma.recipe`): positives are the training photographs and disc crops cut from
  them at several scales with colour jitter; negatives are seeded colour noise, pages and synthetic scenes
  (other seeds than the card's probes). RGB input.

Input: the image squashed to ``input_size`` (64 px). Network: the small backbone of
:mod:`training.fitting` at width 8 with one sigmoid unit (about 15 k weights), trained by
:mod:`training.domain_gate` and served as TFLite (``domain_gate.tflite`` in the bundle); bound
``min_score`` set on validation positives.

``model.json``: ``"domain_gate": {"file": "domain_gate.tflite", "input_size": 64, "min_score": 0.02,
"channels": 1, "subject": "whole frontal chest radiograph"}`` (``channels`` and ``subject`` may be left out
for a gray chest classifier).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inference.preprocess import to_model_input

DOMAIN_FILE = "domain_gate.tflite"
DOMAIN_SIZE = 64
CHEST_SUBJECT = "whole frontal chest radiograph"
FUNDUS_SUBJECT = "colour fundus photograph or optic-disc crop"


@dataclass(frozen=True)
class DomainGateSpec:
    """The ``"domain_gate"`` object of ``model.json`` (``channels`` 1 gray or 3 RGB; ``subject`` names what
    the classifier recognises, for the rejection reason)."""

    file: str
    input_size: int
    min_score: float
    channels: int = 1
    subject: str = CHEST_SUBJECT

    @classmethod
    def from_mapping(cls, value: Mapping[str, Any]) -> DomainGateSpec:
        spec = cls(
            str(value["file"]),
            int(value["input_size"]),
            float(value["min_score"]),
            int(value.get("channels", 1)),
            str(value.get("subject") or CHEST_SUBJECT),
        )
        if "/" in spec.file or "\\" in spec.file or spec.file.startswith("."):
            raise ValueError(f"domain_gate file must be a file name in the bundle, not {spec.file!r}")
        if spec.input_size < 8 or not 0.0 <= spec.min_score < 1.0 or spec.channels not in (1, 3):
            raise ValueError("domain_gate needs input_size >= 8, min_score in [0, 1) and channels 1 or 3")
        return spec

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "input_size": self.input_size,
            "min_score": round(self.min_score, 6),
            "channels": self.channels,
            "subject": self.subject,
        }


class DomainGate:
    """The served classifier: ``check`` of an image already reduced for the rule gate."""

    def __init__(self, bundle_dir: Path, spec: DomainGateSpec) -> None:
        from inference.runners import TfliteRunner

        self.spec = spec
        self._runner = TfliteRunner(Path(bundle_dir) / spec.file)  # thread-safe (it locks)

    def score(self, image: np.ndarray) -> float:
        result = self._runner(to_model_input(image, self.spec.input_size, self.spec.channels)[np.newaxis])
        return float(result.outputs[0, 0])

    def check(self, image: np.ndarray) -> str | None:
        score = self.score(image)
        if score < self.spec.min_score:
            return (
                f"not recognised as a {self.spec.subject} "
                f"(domain classifier score {score:.3f} < {self.spec.min_score:.3f})"
            )
        return None
