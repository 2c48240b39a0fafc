"""The shipped models after the move to LiteRT serving: same outputs as before, heatmaps that agree with the
Grad-CAM they replace, and a serving path that never imports TensorFlow.

``data/shipped_outputs.json`` was recorded with the code before the move (TensorFlow's TFLite interpreter,
Grad-CAM from Keras) on the real DICOM files of ``shared/dicom`` and a few images of each training set; the
entries of glaucoma (1.2.0: new localiser rule and gate) and pneumonia (1.1.0: three averaged networks) were
recorded again with their new versions, so they pin those versions' outputs from here on.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from inference.bundle import BundleModel
from inference.model import assess
from inference.preprocess import load_any
from inference.registry import ModelRegistry
from tests.inference.conftest import SHARED

REPO = Path(__file__).resolve().parents[2]
RECORDED = json.loads((Path(__file__).parent / "data" / "shipped_outputs.json").read_text())


def _model(name: str) -> BundleModel:
    model = ModelRegistry().get(name)
    assert isinstance(model, BundleModel)
    return model


def _image(key: str) -> np.ndarray:
    path = SHARED / key
    if not path.is_file():
        pytest.fail(f"shared file missing: {path}")
    return load_any(path)


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_same_outputs_as_before_the_move(name: str) -> None:
    model = _model(name)
    for key, before in RECORDED[name].items():
        (now,) = assess(model, [_image(key)])
        assert now.assessable == before["assessable"] and now.reason == before["reason"], key
        assert [(f.name, f.present) for f in now.findings] == [(n, p) for n, _, p in before["findings"]], key
        recorded = [p for _, p, _ in before["findings"]]
        np.testing.assert_allclose([f.probability for f in now.findings], recorded, atol=1e-5, err_msg=key)
        if "probabilities" in before:
            np.testing.assert_allclose(
                model.probabilities([_image(key)])[0], before["probabilities"], atol=1e-5
            )


@pytest.mark.parametrize(("name", "minimum"), [("pneumonia", 0.8), ("covid19", 0.6), ("glaucoma", 0.8)])
def test_heatmaps_agree_with_grad_cam(name: str, minimum: float) -> None:
    """Class activation maps from the served graph vs Grad-CAM of the Keras network over its last top-level
    Conv2D (the heatmap served before), per image at the network's map size; the median correlation must
    reach ``minimum`` (each value is printed: ``pytest -s``)."""
    import keras

    from training.export import grad_cam

    model = _model(name)
    net = keras.models.load_model(model.path / "model.keras", compile=False)
    column = model.metadata.outputs[0].index
    correlations = []
    for key, before in RECORDED[name].items():
        if not before["assessable"]:
            continue
        image = _image(key)
        served = model.activation_map(image)
        reference = grad_cam(net, model._input(image), column)
        assert served is not None and reference is not None
        assert served.shape == reference.shape
        if served.std() == 0 or reference.std() == 0:
            continue  # a flat map (no evidence for the finding) has no correlation
        correlations.append(float(np.corrcoef(served.ravel(), reference.ravel())[0, 1]))
        print(f"{name} {key}: r = {correlations[-1]:.3f}")
    assert len(correlations) >= 3
    assert float(np.median(correlations)) >= minimum, correlations


def test_serving_never_imports_tensorflow() -> None:
    """A worker process loads every shipped model, gates, predicts and draws heatmaps with TensorFlow, Keras,
    scikit-learn and matplotlib made unimportable."""
    script = f"""
import sys
BLOCKED = ("tensorflow", "keras", "sklearn", "matplotlib", "training")
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("serving imported " + name)
sys.meta_path.insert(0, Block())
import gateway.worker, gateway.cli, api.main
from inference.model import assess
from inference.preprocess import load_any
from inference.registry import ModelRegistry
registry = ModelRegistry()
for name, file in (("pneumonia", "cr_chest_jpegls.dcm"), ("covid19", "cr_chest_jpegls.dcm"),
                   ("glaucoma", "sc_fundus_j2k.dcm")):
    (a,) = assess(registry.get(name), [load_any({str(SHARED / "dicom")!r} + "/" + file)], with_heatmap=True)
    assert a.assessable and a.heatmap is not None and a.heatmap.max() == 1.0, (name, a.reason)
print("ok", sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok []")
