"""Test data for reporting: real shared DICOM files (read by path, never copied) and model results."""

from __future__ import annotations

from copy import deepcopy
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from core.domain import Finding, ImageResult, InstanceRef, ModelInfo

SHARED_DICOM = Path(__file__).resolve().parents[2].parent / "shared" / "dicom"

_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
)


def read_shared(name: str) -> pydicom.Dataset:
    path = SHARED_DICOM / name
    if not path.is_file():
        pytest.fail(f"missing shared test file {path} (see /work/shared/dicom/README.md)")
    return pydicom.dcmread(path, stop_before_pixels=True)


def into_study(ds: pydicom.Dataset, like: pydicom.Dataset) -> pydicom.Dataset:
    """A copy of ``ds`` as if acquired in the study (and for the patient) of ``like``, in its own series."""
    out = deepcopy(ds)
    for keyword in _PATIENT_STUDY:
        if keyword in like:
            setattr(out, keyword, like[keyword].value)
        elif keyword in out:
            delattr(out, keyword)
    out.SeriesInstanceUID = generate_uid(
        entropy_srcs=["test series", ds.SeriesInstanceUID, like.StudyInstanceUID]
    )
    return out


def ref(ds: pydicom.Dataset) -> InstanceRef:
    return InstanceRef(
        study_instance_uid=ds.StudyInstanceUID,
        series_instance_uid=ds.SeriesInstanceUID,
        sop_instance_uid=ds.SOPInstanceUID,
        sop_class_uid=ds.SOPClassUID,
        path=Path("unused.dcm"),
    )


PNEUMONIA = ModelInfo(name="pneumonia", version="1.2.0", display_name="Pneumonia screening (chest X-ray)")
GLAUCOMA = ModelInfo(name="glaucoma", version="0.9.1", display_name="Glaucoma screening (fundus)")


def chest_results(study: dict[str, pydicom.Dataset]) -> list[ImageResult]:
    return [
        ImageResult(
            instance=ref(study["dx"]),
            model=PNEUMONIA,
            assessable=True,
            findings=(
                Finding("pneumonia", probability=0.91, threshold=0.5, present=True),
                Finding("bacterial_pneumonia", probability=0.64, threshold=0.6, present=True),
                Finding("viral_pneumonia", probability=0.21, threshold=0.4, present=False),
            ),
        ),
        ImageResult(
            instance=ref(study["cr"]),
            model=PNEUMONIA,
            assessable=True,
            findings=(Finding("pneumonia", probability=0.12, threshold=0.5, present=False),),
        ),
        ImageResult(
            instance=ref(study["hip"]),
            model=PNEUMONIA,
            assessable=False,
            reason="not assessable: body part HIP is not a chest radiograph",
        ),
    ]
