import pydicom
import pytest

from core.settings import RoutingSettings
from inference.routing import SeriesInfo, route_series
from tests import factories as f
from tests.peers import SHARED_DICOM

RULES = RoutingSettings()


def _info(ds: pydicom.Dataset) -> SeriesInfo:
    return SeriesInfo.from_dataset(ds)


def _models(ds: pydicom.Dataset) -> list[str | None]:
    return [r.model_name for r in route_series(_info(ds), RULES)]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("cr_chest_jpegls.dcm", ["pneumonia", "covid19"]),
        ("dx_chest_small.dcm", ["pneumonia", "covid19"]),  # BodyPartExamined THORAX
        ("sc_fundus_j2k.dcm", ["glaucoma"]),  # SC/OT described as "Fundoscopy"
        ("cr_hip_rle.dcm", [None]),
    ],
)
def test_real_files(name: str, expected: list[str | None]) -> None:
    assert _models(pydicom.dcmread(SHARED_DICOM / name, stop_before_pixels=True)) == expected


def test_hip_is_skipped_with_its_body_part() -> None:
    [route] = route_series(
        _info(pydicom.dcmread(SHARED_DICOM / "cr_hip_rle.dcm", stop_before_pixels=True)), RULES
    )
    assert not route.routed and route.reason == "body part HIP"


@pytest.mark.parametrize("sr", sorted((SHARED_DICOM / "sr").glob("*.dcm")), ids=lambda p: p.name)
def test_structured_reports_are_never_routed(sr) -> None:
    [route] = route_series(_info(pydicom.dcmread(sr, stop_before_pixels=True)), RULES)
    assert not route.routed


@pytest.mark.parametrize(
    ("ds", "expected"),
    [
        (f.base_dataset(f.OP_8, "OP"), ["glaucoma"]),
        (f.base_dataset(f.OP_16, "OP"), ["glaucoma"]),
        (f.base_dataset(f.VL_PHOTO, "XC"), ["glaucoma"]),
        (f.base_dataset(f.VL_PHOTO, "OT"), ["glaucoma"]),  # by SOP class
        (f.base_dataset(f.CR, "CR"), ["pneumonia", "covid19"]),  # body part missing: the gate decides
        (f.base_dataset(f.DX_PROCESSING, "DX"), ["pneumonia", "covid19"]),
        (f.base_dataset(f.CR, "CT"), [None]),
        (f.base_dataset(f.SC, "OT"), [None]),  # SC without any fundus hint
        (f.base_dataset("1.2.840.10008.5.1.4.1.1.88.59", "KO"), [None]),
        (f.base_dataset("1.2.840.10008.5.1.4.1.1.11.1", "PR"), [None]),
        (f.base_dataset("1.2.840.10008.5.1.4.1.1.66.4", "SEG"), [None]),
    ],
)
def test_rules(ds: pydicom.Dataset, expected: list[str | None]) -> None:
    assert _models(ds) == expected


@pytest.mark.parametrize(
    "hint",
    [
        ("BodyPartExamined", "EYE"),
        ("SeriesDescription", "Retina OD"),
        ("StudyDescription", "FUNDUS PHOTO"),
        ("SeriesDescription", "papilla"),
    ],
)
def test_secondary_capture_fundus_hints(hint: tuple[str, str]) -> None:
    ds = f.base_dataset(f.SC, "OT")
    setattr(ds, *hint)
    assert _models(ds) == ["glaucoma"]


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")
def test_body_part_case_and_chest_synonyms() -> None:
    ds = f.base_dataset(f.CR, "CR")
    ds.BodyPartExamined = "chest"
    assert _models(ds) == ["pneumonia", "covid19"]
    ds.BodyPartExamined = "KNEE"
    assert [r.reason for r in route_series(_info(ds), RULES)] == ["body part KNEE"]


def test_our_own_objects_are_never_routed() -> None:
    ds = f.base_dataset(f.CR, "CR")
    ds.Manufacturer = "screening-gateway"
    [route] = route_series(_info(ds), RULES)
    assert not route.routed and "loop prevention" in route.reason


def test_rules_are_configurable() -> None:
    rules = RoutingSettings(chest_body_parts=["CHEST"], chest_models=["pneumonia"])
    ds = f.base_dataset(f.CR, "CR")
    assert [r.model_name for r in route_series(_info(ds), rules)] == [None]  # empty body part now refused
    ds.BodyPartExamined = "CHEST"
    assert [r.model_name for r in route_series(_info(ds), rules)] == ["pneumonia"]
