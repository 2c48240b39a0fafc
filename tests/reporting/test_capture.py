"""Secondary Capture with the result burned in: valid per dciodvfy, in the source's study, deterministic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom

from core.domain import Finding, ImageResult, InstanceRef, ModelInfo
from reporting.capture import build_capture, capture_uid, render, result_lines
from reporting.sr import write_report
from tests.reporting.dciodvfy import assert_dciodvfy_clean

SHARED_DICOM = Path(__file__).resolve().parents[2].parent / "shared" / "dicom"
MODEL = ModelInfo(name="pneumonia", version="1.0.0")


def _result(ds: pydicom.Dataset, *, assessable: bool = True) -> ImageResult:
    ref = InstanceRef(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID, Path("x"))
    if not assessable:
        return ImageResult(ref, MODEL, False, reason="not assessable: not a chest radiograph")
    heat = np.zeros((32, 32), np.float32)
    heat[8:16, 8:16] = 1.0
    return ImageResult(ref, MODEL, True, (Finding("pneumonia", 0.91, 0.5, True),), heatmap=heat)


def test_capture_is_valid_and_says_what_it_is(tmp_path: Path) -> None:
    src = pydicom.dcmread(SHARED_DICOM / "dx_chest_small.dcm")
    image = src.pixel_array.astype(np.float32) / src.pixel_array.max()
    sc = build_capture(
        result=_result(src),
        source=src,
        image=image,
        report_uid="1.2.3.4",
        report_series_uid="1.2.3.5",
        series_number=9901,
    )
    path = write_report(sc, tmp_path / "sc.dcm")
    assert_dciodvfy_clean(path)
    back = pydicom.dcmread(path)
    assert back.StudyInstanceUID == src.StudyInstanceUID and back.PatientID == src.PatientID
    assert back.SOPInstanceUID == capture_uid("1.2.3.4", src.SOPInstanceUID)
    assert back.BurnedInAnnotation == "YES" and back.Manufacturer == "screening-gateway"
    assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert "not a diagnosis" in back.ImageComments
    pixels = back.pixel_array
    assert pixels.ndim == 3 and pixels.shape[2] == 3 and back.SeriesNumber == 9902


def test_capture_of_a_source_without_orientation(tmp_path: Path) -> None:
    src = pydicom.dcmread(SHARED_DICOM / "sc_fundus_j2k.dcm")
    assert not src.get("PatientOrientation")
    sc = build_capture(
        result=_result(src),
        source=src,
        image=np.zeros((40, 50, 3), np.float32),
        report_uid="1.2.3.4",
        report_series_uid="1.2.3.5",
        series_number=9901,
    )
    path = write_report(sc, tmp_path / "sc.dcm")
    assert_dciodvfy_clean(path)
    assert pydicom.dcmread(path).PatientOrientation == ""


def test_render_burns_heatmap_and_text() -> None:
    gray = np.full((100, 100), 0.5, np.float32)
    heat = np.zeros((10, 10), np.float32)
    heat[:5, :5] = 1.0
    plain = render(gray, None, ["line"])
    hot = render(gray, heat, ["line"])
    assert plain.shape == hot.shape and plain.dtype == np.uint8
    band = plain.shape[0] - 100
    assert plain[:band].max() == 255  # white text on the band
    assert not np.array_equal(
        hot[band : band + 50, :50], plain[band : band + 50, :50]
    )  # heat where it is hot
    assert np.array_equal(hot[band + 60 :, 60:], plain[band + 60 :, 60:])  # and nowhere else


def test_result_lines() -> None:
    src = pydicom.dcmread(SHARED_DICOM / "dx_chest_small.dcm", stop_before_pixels=True)
    assert result_lines(_result(src))[1] == "pneumonia: present (p=0.91, threshold 0.50)"
    assert result_lines(_result(src, assessable=False))[1] == "not assessable: not a chest radiograph"
