"""The shipped chest models (pneumonia, covid19): package, determinism, the real DICOM files, the gate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from core.domain import InstanceRef
from inference.bundle import BundleModel
from inference.model import assess, run_model
from inference.preprocess import load_dicom_image
from inference.registry import SHIPPED_DIR, ModelRegistry
from reporting.codes import FINDING_CODES
from tests.inference.conftest import DICOM_DIR, shared_dicom
from training.probes import document, probe_images

REPO = Path(__file__).resolve().parents[2]
CHEST = ("pneumonia", "covid19")
VERSIONS = {name: json.loads((SHIPPED_DIR / name / "model.json").read_text())["version"] for name in CHEST}
FILES = ("dx_chest_small.dcm", "cr_chest_jpegls.dcm", "cr_hip_rle.dcm", "sc_fundus_j2k.dcm")


@pytest.fixture(scope="module")
def shipped() -> dict[str, BundleModel]:
    registry = ModelRegistry()
    models = {name: registry.get(name) for name in CHEST}
    for name, model in models.items():
        assert isinstance(model, BundleModel), f"{name} must ship in inference/weights/{name}"
    return models  # type: ignore[return-value]


@pytest.fixture(scope="module")
def refs() -> list[InstanceRef]:
    out = []
    for name in FILES:
        ds = pydicom.dcmread(shared_dicom(name), stop_before_pixels=True)
        out.append(
            InstanceRef(
                ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID, DICOM_DIR / name
            )
        )
    return out


@pytest.mark.parametrize("name", CHEST)
def test_bundle_ships_in_the_package_and_is_small(name: str, shipped: dict[str, BundleModel]) -> None:
    model = shipped[name]
    assert model.path == SHIPPED_DIR / name
    for file in ("model.keras", "model.json", "model.tflite", "gate_stats.npz", "domain_gate.tflite"):
        size = (model.path / file).stat().st_size
        assert 0 < size < 5_000_000, f"{file}: {size} bytes"
    assert model.modality_kind == "chest"
    assert {o.finding for o in model.metadata.outputs} <= set(FINDING_CODES)
    # the version is a release decision kept in model.json: its changelog and the card's title follow it
    assert model.metadata.changelog[0].version == model.info.version
    card = (model.path / "card.md").read_text()
    assert card.startswith(f"# Model card: {name} {model.info.version} ")


@pytest.mark.parametrize("name", CHEST)
def test_real_dicom_files_through_the_pipeline(
    name: str, shipped: dict[str, BundleModel], refs: list[InstanceRef]
) -> None:
    results = {r.instance.path.name: r for r in run_model(shipped[name], refs, with_heatmap=True)}
    r = results["cr_chest_jpegls.dcm"]  # a real PA chest CR of another vendor
    assert r.assessable, r.reason
    assert r.findings and all(0.0 <= f.probability <= 1.0 for f in r.findings)
    assert r.heatmap is not None and r.heatmap.shape == load_dicom_image(r.instance.path).shape[:2]
    # The hip, the fundus photograph and the lateral chest view (the models read frontal views only).
    for other in ("cr_hip_rle.dcm", "sc_fundus_j2k.dcm", "dx_chest_small.dcm"):
        r = results[other]
        assert not r.assessable and r.findings == () and r.reason is not None
        assert r.reason.startswith("not assessable: ")
    assert "frontal chest radiograph" in str(results["dx_chest_small.dcm"].reason)


@pytest.mark.parametrize("name", CHEST)
def test_gate_refuses_every_out_of_domain_probe(name: str, shipped: dict[str, BundleModel]) -> None:
    """Hip CR crops, drawn knees, pages, noise, gradients, fundus photographs (seeded, unlike the card's)."""
    probes = probe_images(DICOM_DIR.parent, seed=3)
    assert "crops of the hip CR" in probes and "fundus photo, gray" in probes
    for kind, images in probes.items():
        passed = [a for a in assess(shipped[name], images) if a.assessable]
        assert not passed, f"{name}: {len(passed)} of {len(images)} {kind} images passed the gate"


@pytest.mark.parametrize("name", CHEST)
def test_deterministic_across_instances(name: str, shipped: dict[str, BundleModel]) -> None:
    image = load_dicom_image(shared_dicom("cr_chest_jpegls.dcm"))
    first = shipped[name].probabilities([image, image])
    again = BundleModel(shipped[name].path).probabilities([image])
    assert np.array_equal(first[0], first[1]) and np.array_equal(first[0], again[0])


def test_pneumonia_subtypes_only_with_pneumonia(shipped: dict[str, BundleModel]) -> None:
    model = shipped["pneumonia"]
    images = [load_dicom_image(shared_dicom(n)) for n in ("dx_chest_small.dcm", "cr_chest_jpegls.dcm")]
    for findings in model.predict(images):
        by = {f.name: f for f in findings}
        assert list(by) == ["pneumonia", "bacterial_pneumonia", "viral_pneumonia"]
        assert by["bacterial_pneumonia"].probability + by["viral_pneumonia"].probability == pytest.approx(1.0)
        subtypes = by["bacterial_pneumonia"].present + by["viral_pneumonia"].present
        assert subtypes == (1 if by["pneumonia"].present else 0)


def test_covid19_findings(shipped: dict[str, BundleModel]) -> None:
    [findings] = shipped["covid19"].predict([load_dicom_image(shared_dicom("dx_chest_small.dcm"))])
    assert [f.name for f in findings] == ["covid19", "viral_pneumonia"]
    assert sum(f.probability for f in findings) <= 1.0 + 1e-9
    assert sum(f.present for f in findings) <= 1


@pytest.mark.parametrize("name", CHEST)
def test_gate_rejects_synthetic_non_chest_images(name: str, shipped: dict[str, BundleModel]) -> None:
    rng = np.random.default_rng(11)
    images = [rng.random((300, 300), dtype=np.float32), document(rng), np.full((200, 200), 0.5, np.float32)]
    for a in assess(shipped[name], images):
        assert not a.assessable and a.reason is not None and a.findings == ()


def test_gateway_predict_json_with_shipped_models(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_INFERENCE__MODEL_DIRS"}
    env["GATEWAY_DATA_DIR"] = str(tmp_path / "var")
    files = [str(DICOM_DIR / n) for n in ("dx_chest_small.dcm", "cr_chest_jpegls.dcm", "cr_hip_rle.dcm")]
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "predict", "--json", *files],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    keys = {"file", "model", "version", "assessable", "reason", "findings"}
    assert all(set(r) == keys for r in rows)
    chest = [r for r in rows if Path(r["file"]).name == "cr_chest_jpegls.dcm"]
    assert sorted(r["model"] for r in chest) == sorted(CHEST)
    for r in chest:
        assert r["assessable"] and r["version"] == VERSIONS[r["model"]]
        for f in r["findings"]:
            assert set(f) == {"finding", "probability", "threshold", "label"} and f["label"] in {
                "present",
                "absent",
            }
    [hip] = [r for r in rows if Path(r["file"]).name == "cr_hip_rle.dcm"]
    assert not hip["assessable"] and hip["findings"] == []
    lateral = [r for r in rows if Path(r["file"]).name == "dx_chest_small.dcm"]
    assert sorted(r["model"] for r in lateral) == sorted(CHEST)
    assert all(not r["assessable"] and r["findings"] == [] and r["reason"] for r in lateral)


def test_heatmap_reuses_the_gates_run(
    shipped: dict[str, BundleModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The case page's heatmap of an image the gate has run is drawn from that run's class maps: the same
    map a fresh run gives, without running the network again."""
    image = load_dicom_image(shared_dicom("cr_chest_jpegls.dcm"))
    for name, model in shipped.items():
        fresh = [model.heatmap(image.copy(), finding=o.finding) for o in model.metadata.outputs]
        seen = image.copy()
        assert model.check_input(seen) is None, name
        runs: list[int] = []
        original = model._run
        monkeypatch.setattr(
            model, "_run", lambda x, _run=original, _runs=runs, **kw: _runs.append(1) or _run(x, **kw)
        )
        again = [model.heatmap(seen, finding=o.finding) for o in model.metadata.outputs]
        monkeypatch.undo()
        assert runs == [], f"{name}: the network ran again for the heatmap"
        for a, b in zip(fresh, again, strict=True):
            assert a is not None and b is not None
            np.testing.assert_array_equal(a, b)
