"""De-identification (reporting.deid) of real files from other vendors and of a dataset full of identifiers:
nothing identifying survives, the checker finds what is put back, and the result still passes dciodvfy."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.sequence import Sequence

from reporting.deid import CHARACTERISTICS, Deidentifier, leaks, walk
from tests.peers import SHARED_DICOM
from tests.reporting.dciodvfy import dciodvfy

KEY = b"0123456789abcdef0123456789abcdef"
VENDOR_FILES = sorted(SHARED_DICOM.glob("*.dcm")) + sorted((SHARED_DICOM / "sr").glob("*.dcm"))


def _encoded(ds: Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _identified(path: Path) -> Dataset:
    """A vendor file with identifiers added where real ones live, nested ones included."""
    ds = pydicom.dcmread(path)
    ds.PatientName = "Doe^Jonathan^Q"
    ds.PatientID = "MRN-0042-7781"
    ds.PatientBirthDate = "19610412"
    ds.PatientSex = "M"
    ds.PatientAge = "063Y"
    ds.AccessionNumber = "ACC-99-12345"
    ds.InstitutionName = "Saint Example Hospital"
    ds.ReferringPhysicianName = "Welby^Marcus"
    ds.StudyDate = ds.SeriesDate = "20240315"
    ds.StudyTime = "101112"
    ds.StudyID = "STUDY-7781"
    ds.OperatorsName = "Tech^Terry"
    ds.add_new(0x00091010, "LO", "PRIVATE Doe^Jonathan")  # a private element (no creator): removed
    ref = Dataset()
    ref.ReferencedSOPClassUID = ds.SOPClassUID
    ref.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.111"
    ds.ReferencedImageSequence = Sequence([ref])
    other = Dataset()
    other.PatientID = "MRN-OTHER-555"
    ds.OtherPatientIDsSequence = Sequence([other])
    ds.preamble = b"MZ" + b"\0" * 126
    return ds


@pytest.mark.parametrize("path", VENDOR_FILES, ids=lambda p: p.name)
def test_vendor_files_keep_nothing_identifying(path: Path) -> None:
    source = _identified(path)
    deid = Deidentifier(KEY)
    out = deid.deidentify(_identified(path))
    data = _encoded(out)
    exported = pydicom.dcmread(io.BytesIO(data))
    assert leaks(source, exported, data, deid) == []
    for text in ("Doe", "Jonathan", "MRN-0042", "ACC-99", "Saint Example", "Welby", "20240315", "19610412"):
        assert text.encode() not in data, text
    assert data[:128] == b"\0" * 128
    assert exported.PatientIdentityRemoved == "YES"
    assert exported.PatientID == exported.PatientName == deid.patient("MRN-0042-7781")
    assert exported.StudyInstanceUID == deid.uid(str(source.StudyInstanceUID))
    assert exported.file_meta.MediaStorageSOPInstanceUID == exported.SOPInstanceUID
    assert exported.ReferencedImageSequence[0].ReferencedSOPInstanceUID == deid.uid(
        "1.2.826.0.1.3680043.8.498.111"
    )
    assert exported.SOPClassUID == source.SOPClassUID  # what it is, is kept
    assert "PatientSex" not in exported or not exported.PatientSex
    assert not any(e.tag.is_private for e in walk(exported))
    codes = [(c.CodeValue, c.CodingSchemeDesignator) for c in exported.DeidentificationMethodCodeSequence]
    assert codes == [("113100", "DCM"), ("113107", "DCM")]
    # dates move back by the patient's shift; the time of day stays
    shift = deid.shift_days("MRN-0042-7781")
    assert 365 <= shift <= 10 * 365
    assert exported.StudyDate != "20240315" and exported.StudyDate == exported.SeriesDate
    assert exported.StudyTime == "101112"
    assert exported.PatientBirthDate == ""


def test_pseudonyms_are_stable_per_key_and_differ_between_keys() -> None:
    a, b = Deidentifier(KEY), Deidentifier(b"another key, another project....")
    uid = "1.2.840.113619.2.55.3.604688119.969.1268071029.320"
    assert a.uid(uid) == Deidentifier(KEY).uid(uid) != b.uid(uid)
    assert a.uid(uid).startswith("2.25.") and len(a.uid(uid)) <= 64
    assert a.patient("X1") == Deidentifier(KEY).patient("X1") != b.patient("X1")
    assert a.shift_days("X1") == Deidentifier(KEY).shift_days("X1")


def test_patient_characteristics_are_kept_only_when_asked() -> None:
    path = SHARED_DICOM / "dx_chest_small.dcm"
    deid = Deidentifier(KEY, keep_characteristics=True)
    source = _identified(path)
    out = deid.deidentify(_identified(path))
    data = _encoded(out)
    assert (out.PatientSex, out.PatientAge) == ("M", "063Y")
    assert leaks(source, pydicom.dcmread(io.BytesIO(data)), data, deid) == []
    codes = [c.CodeValue for c in out.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113107", "113108"]
    assert {0x00100040, 0x00101010} <= {int(t) for t in CHARACTERISTICS}


def test_burned_in_annotation_is_refused() -> None:
    ds = _identified(SHARED_DICOM / "dx_chest_small.dcm")
    ds.BurnedInAnnotation = "YES"
    with pytest.raises(ValueError, match="Burned In Annotation"):
        Deidentifier(KEY).deidentify(ds)


def test_the_checker_finds_what_is_put_back() -> None:
    path = SHARED_DICOM / "cr_chest_jpegls.dcm"
    source = _identified(path)
    deid = Deidentifier(KEY)
    out = deid.deidentify(_identified(path))
    out.InstitutionName = "Saint Example Hospital"  # a removed attribute, with its value
    nested = Dataset()
    nested.PatientID = "MRN-OTHER-555"
    out.OtherPatientIDsSequence = Sequence([nested])
    out.add_new(0x00291010, "LO", "private")
    out.FrameOfReferenceUID = source.get("FrameOfReferenceUID", "1.2.3.4.5")
    data = _encoded(out)
    found = leaks(source, pydicom.dcmread(io.BytesIO(data)), data, deid)
    text = "\n".join(found)
    assert "InstitutionName value 'Saint Exampl'" in text
    assert "OtherPatientIDsSequence present, the profile removes it" in text
    assert "MRN-OTHER-55" in text
    assert "private attribute (0029,1010) present" in text
    assert "FrameOfReferenceUID is not a pseudonymous UID" in text


@pytest.mark.parametrize("name", ["cr_chest_jpegls.dcm", "cr_hip_rle.dcm", "sc_fundus_j2k.dcm"])
def test_exported_images_pass_dciodvfy_as_their_sources_do(name: str, tmp_path: Path) -> None:
    source = SHARED_DICOM / name
    out = tmp_path / name
    out.write_bytes(_encoded(Deidentifier(KEY).deidentify(pydicom.dcmread(source))))
    errors = {line for line in dciodvfy(out) if "Error" in line}
    before = {line for line in dciodvfy(source) if "Error" in line}
    assert errors <= before, sorted(errors - before)
