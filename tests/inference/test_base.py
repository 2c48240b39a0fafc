from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest

from core.domain import Finding, ImageResult, InstanceRef, ModelInfo
from inference.model import ModalityKind, Model, run_model
from inference.registry import ModelRegistry
from tests.inference.conftest import shared_dicom


def _ref(path: Path) -> InstanceRef:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return InstanceRef(
        study_instance_uid=ds.StudyInstanceUID,
        series_instance_uid=ds.SeriesInstanceUID,
        sop_instance_uid=ds.SOPInstanceUID,
        sop_class_uid=ds.SOPClassUID,
        path=path,
    )


@pytest.fixture(scope="module")
def shared_refs() -> dict[str, InstanceRef]:
    names = ["cr_chest_jpegls.dcm", "dx_chest_small.dcm", "cr_hip_rle.dcm", "sc_fundus_j2k.dcm"]
    return {name: _ref(shared_dicom(name)) for name in names}


def _by_file(results: list[ImageResult]) -> dict[str, ImageResult]:
    return {r.instance.path.name: r for r in results}


def test_chest_model_on_shared_files(registry: ModelRegistry, shared_refs: dict[str, InstanceRef]) -> None:
    model = registry.get("pneumonia")
    assert model is not None
    refs = list(shared_refs.values())
    results = run_model(model, refs)
    assert [r.instance for r in results] == refs
    assert all(r.model == model.info for r in results)
    got = _by_file(results)
    for name in ("cr_chest_jpegls.dcm", "dx_chest_small.dcm"):
        assert got[name].assessable and got[name].reason is None
        assert [f.name for f in got[name].findings] == ["pneumonia", "bacterial_pneumonia", "viral_pneumonia"]
    fundus = got["sc_fundus_j2k.dcm"]
    assert not fundus.assessable and fundus.findings == ()
    assert fundus.reason is not None
    assert fundus.reason.startswith("not assessable: colour photograph, not a radiograph (saturation 0.9")


@pytest.mark.parametrize("name", ["pneumonia", "covid19"])
def test_hip_not_assessable_for_chest_model(name: str, shared_refs: dict[str, InstanceRef]) -> None:
    """The shipped chest models' SSIM/feature gate refuses a gray non-chest radiograph."""
    model = ModelRegistry().get(name)
    assert model is not None
    [hip] = run_model(model, [shared_refs["cr_hip_rle.dcm"]])
    assert not hip.assessable and hip.findings == ()
    assert hip.reason is not None and hip.reason.startswith("not assessable: ")


def test_fundus_model_on_shared_files(registry: ModelRegistry, shared_refs: dict[str, InstanceRef]) -> None:
    model = registry.get("glaucoma")
    assert model is not None
    got = _by_file(run_model(model, list(shared_refs.values()), with_heatmap=True))
    assert got["sc_fundus_j2k.dcm"].assessable
    assert got["sc_fundus_j2k.dcm"].heatmap.shape == (1868, 2226)
    for name in ("cr_chest_jpegls.dcm", "dx_chest_small.dcm", "cr_hip_rle.dcm"):
        assert not got[name].assessable and got[name].findings == () and got[name].heatmap is None
        reason = got[name].reason
        assert reason is not None
        assert reason.startswith("not assessable: grayscale image, not a colour fundus photograph")


def test_unreadable_instances_do_not_break_the_batch(
    registry: ModelRegistry, shared_refs: dict[str, InstanceRef], tmp_path: Path
) -> None:
    ds = pydicom.dcmread(shared_dicom("dx_chest_small.dcm"))
    del ds.PixelData
    ds.save_as(tmp_path / "no_pixels.dcm")
    (tmp_path / "garbage.dcm").write_bytes(b"\0" * 300)
    good = shared_refs["dx_chest_small.dcm"]
    refs = [
        _ref(tmp_path / "no_pixels.dcm"),
        good,
        InstanceRef("1.2", "1.2.3", "1.2.3.4", good.sop_class_uid, tmp_path / "garbage.dcm"),
        InstanceRef("1.2", "1.2.3", "1.2.3.5", good.sop_class_uid, tmp_path / "missing.dcm"),
    ]
    model = registry.get("covid19")
    assert model is not None
    results = run_model(model, refs)
    assert [r.assessable for r in results] == [False, True, False, False]
    assert results[0].reason == "not assessable: unreadable image: dataset has no pixel data"
    for r in (results[2], results[3]):
        assert r.reason is not None and r.reason.startswith(
            "not assessable: unreadable image: cannot read DICOM"
        )


class _FailingModel:
    info = ModelInfo("broken", "0")
    modality_kind: ModalityKind = "chest"

    def check_input(self, image: np.ndarray) -> str | None:
        return None

    def predict(self, images: Sequence[np.ndarray]) -> list[list[Finding]]:
        raise RuntimeError("out of memory")


def test_model_failure_becomes_not_assessable(shared_refs: dict[str, InstanceRef]) -> None:
    model = _FailingModel()
    assert isinstance(model, Model)
    results = run_model(model, [shared_refs["dx_chest_small.dcm"]])
    assert results[0].reason == "not assessable: model error: RuntimeError: out of memory"
    assert run_model(model, []) == []


class _BrokenGateModel(_FailingModel):
    def check_input(self, image: np.ndarray) -> str | None:
        raise ValueError("cannot measure")


def test_gate_failure_becomes_not_assessable(shared_refs: dict[str, InstanceRef]) -> None:
    [result] = run_model(_BrokenGateModel(), [shared_refs["dx_chest_small.dcm"]])
    assert result.reason == "not assessable: input check failed: ValueError: cannot measure"


def test_models_of_a_study_share_each_decoded_image(
    registry: ModelRegistry, shared_refs: dict[str, InstanceRef], tmp_path: Path
) -> None:
    """With one ``decoded`` map only the first model reads the files (they are gone for the others), the
    results equal separate runs, and every image is kept read-only (a model writing into its input fails)."""
    copies = tmp_path / "copies"
    copies.mkdir()
    refs = []
    for name, ref in shared_refs.items():
        (copies / name).write_bytes(ref.path.read_bytes())
        refs.append(replace(ref, path=copies / name))
    (copies / "broken.dcm").write_bytes(shared_refs["dx_chest_small.dcm"].path.read_bytes()[:-5000])
    refs.append(replace(refs[1], sop_instance_uid="1.2.3.4.5", path=copies / "broken.dcm"))
    decoded: dict[Path, np.ndarray | str] = {}
    shared: dict[str, list[ImageResult]] = {}
    for name in ("pneumonia", "covid19", "glaucoma"):
        model = registry.get(name)
        assert model is not None
        shared[name] = run_model(model, refs, decoded=decoded, with_heatmap=name == "glaucoma")
        if name == "pneumonia":
            assert set(decoded) == {r.path for r in refs}
            shutil.rmtree(copies)  # from now on every image can come only from the map
    assert isinstance(decoded[copies / "broken.dcm"], str)
    assert all(not image.flags.writeable for image in decoded.values() if isinstance(image, np.ndarray))
    assert _by_file(shared["covid19"])["cr_chest_jpegls.dcm"].assessable
    assert _by_file(shared["glaucoma"])["sc_fundus_j2k.dcm"].assessable
    assert not _by_file(shared["covid19"])["broken.dcm"].assessable
    originals = [*shared_refs.values(), replace(refs[-1], path=tmp_path / "broken.dcm")]
    originals[-1].path.write_bytes(shared_refs["dx_chest_small.dcm"].path.read_bytes()[:-5000])
    for name, results in shared.items():
        model = registry.get(name)
        assert model is not None
        alone = run_model(model, originals, with_heatmap=name == "glaucoma")
        assert [(r.assessable, r.reason, r.findings) for r in results] == [
            (r.assessable, r.reason, r.findings) for r in alone
        ]
