from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inference.bundle import BundleError, BundleMetadata, BundleModel
from inference.gates.domain import CHEST_SUBJECT
from inference.model import assess
from inference.preprocess import load_dicom_image
from inference.registry import ModelRegistry
from tests.inference.conftest import shared_dicom
from tests.inference.tiny_models import tiny_metadata


@pytest.fixture(scope="module")
def chest() -> np.ndarray:
    return load_dicom_image(shared_dicom("dx_chest_small.dcm"))


@pytest.fixture(scope="module")
def fundus() -> np.ndarray:
    return load_dicom_image(shared_dicom("sc_fundus_j2k.dcm"))


def _model(registry: ModelRegistry, name: str) -> BundleModel:
    model = registry.get(name)
    assert isinstance(model, BundleModel)
    return model


def test_metadata_validation() -> None:
    meta = tiny_metadata("pneumonia")
    parsed = BundleMetadata.from_dict(meta)
    assert [o.finding for o in parsed.outputs] == ["pneumonia", "bacterial_pneumonia", "viral_pneumonia"]
    assert parsed.domain_gate is None
    spec = {"file": "domain_gate.tflite", "input_size": 64, "min_score": 0.25}
    gray = BundleMetadata.from_dict({**meta, "domain_gate": spec}).domain_gate
    assert gray is not None and gray.as_dict() == {**spec, "channels": 1, "subject": CHEST_SUBJECT}
    rgb = BundleMetadata.from_dict({**meta, "domain_gate": {**spec, "channels": 3, "subject": "fundus"}})
    assert rgb.domain_gate is not None
    assert (rgb.domain_gate.channels, rgb.domain_gate.subject) == (3, "fundus")
    for broken in (
        {**meta, "channels": 2},
        {**meta, "kind": "knee"},
        {**meta, "outputs": []},
        {**meta, "outputs": [{"finding": "pneumonia", "index": 0, "threshold": 1.5}]},
        {**meta, "outputs": [{"finding": "pneumonia", "index": 0}]},
        {**meta, "gate": {"nonsense": 1}},
        {k: v for k, v in meta.items() if k != "version"},
        {**meta, "domain_gate": {"file": "../outside.tflite", "input_size": 64, "min_score": 0.1}},
        {**meta, "domain_gate": {"file": "d.tflite", "input_size": 64, "min_score": 1.5}},
        {**meta, "domain_gate": {"file": "d.tflite", "min_score": 0.1}},
        {**meta, "domain_gate": {"file": "d.tflite", "input_size": 64, "min_score": 0.1, "channels": 2}},
    ):
        with pytest.raises(BundleError):
            BundleMetadata.from_dict(broken)


def test_predict_is_deterministic_and_maps_outputs(registry: ModelRegistry, chest: np.ndarray) -> None:
    model = _model(registry, "pneumonia")
    first = model.predict([chest, chest[::-1]])
    assert model.loaded
    assert model.predict([chest, chest[::-1]]) == first  # frozen dataclasses: bit-identical probabilities
    [alone] = model.predict([chest])
    for a, b in zip(alone, first[0], strict=True):
        assert a.probability == pytest.approx(b.probability, abs=1e-6)
    assert [f.name for f in first[0]] == ["pneumonia", "bacterial_pneumonia", "viral_pneumonia"]
    for finding in first[0]:
        assert 0.0 <= finding.probability <= 1.0
        assert finding.threshold == 0.5
        assert finding.present == (finding.probability >= 0.5)
    assert model.predict([]) == []


def test_gate_rejects_fundus_for_chest_model_and_chest_for_fundus_model(
    registry: ModelRegistry, chest: np.ndarray, fundus: np.ndarray
) -> None:
    pneumonia, glaucoma = _model(registry, "pneumonia"), _model(registry, "glaucoma")
    [on_fundus, on_chest] = assess(pneumonia, [fundus, chest])
    assert not on_fundus.assessable and on_fundus.findings == ()
    assert on_fundus.reason is not None
    assert on_fundus.reason.startswith("not assessable: colour photograph, not a radiograph")
    assert on_chest.assessable and len(on_chest.findings) == 3

    [rejected, accepted] = assess(glaucoma, [chest, fundus])
    assert not rejected.assessable and rejected.findings == ()
    assert rejected.reason is not None
    assert rejected.reason.startswith("not assessable: grayscale image, not a colour fundus photograph")
    assert accepted.assessable and [f.name for f in accepted.findings] == ["glaucoma"]


def test_heatmap_matches_input(registry: ModelRegistry, chest: np.ndarray, fundus: np.ndarray) -> None:
    for name, image in (("pneumonia", chest), ("glaucoma", fundus[::8, ::8])):
        cam = _model(registry, name).heatmap(image)
        assert cam is not None
        assert cam.shape == image.shape[:2] and cam.dtype == np.float32
        assert cam.min() >= 0.0 and cam.max() <= 1.0
    with pytest.raises(ValueError, match="no output"):
        _model(registry, "pneumonia").heatmap(chest, finding="glaucoma")


def test_heatmap_none_without_maps(tmp_path: Path, chest: np.ndarray) -> None:
    import keras

    from training.export import write_bundle

    inputs = keras.Input((64, 64, 1))
    outputs = keras.layers.Dense(1, activation="sigmoid")(keras.layers.Flatten()(inputs))
    meta = {**tiny_metadata("covid19"), "outputs": [{"finding": "covid19", "index": 0, "threshold": 0.3}]}
    del meta["heatmap"]
    model = BundleModel(write_bundle(tmp_path / "dense", keras.Model(inputs, outputs), meta))
    assert model.heatmap(chest) is None
    [findings] = model.predict([chest])
    assert [f.threshold for f in findings] == [0.3]


def test_output_column_missing_is_an_error(tmp_path: Path, tiny_bundle_dir: Path, chest: np.ndarray) -> None:
    meta = BundleMetadata.from_dict(
        {**tiny_metadata("covid19"), "outputs": [{"finding": "covid19", "index": 5, "threshold": 0.5}]}
    )
    model = BundleModel(tiny_bundle_dir / "covid19", metadata=meta)
    with pytest.raises(BundleError, match="lacks column 5"):
        model.predict([chest])
    # assess() turns the failure into not-assessable results instead of raising
    [result] = assess(model, [chest])
    assert not result.assessable and result.reason is not None and "model error" in result.reason
