"""Verified SRs built from a real AI report and real DICOM files: dciodvfy-clean, and they say what the
reviewer decided, who decided it and what the AI had said."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.uid import UID
from pydicom.valuerep import DT

from core.domain import DECISION_SUPPORT_NOTICE, MANUFACTURER, Finding, ImageResult
from reporting import codes
from reporting.sr import build_report, report_series_uid, report_uid, write_report
from reporting.verified import (
    FLAGGED_TEXT,
    ReviewedFinding,
    Reviewer,
    build_verified_report,
    person_name,
    verified_report_uid,
    verified_series_uid,
)
from tests.reporting.dciodvfy import assert_dciodvfy_clean
from tests.reporting.factories import GLAUCOMA, PNEUMONIA, SHARED_DICOM, read_shared, ref

REVIEWER = Reviewer(name="Jane Doe", login="jdoe", organization="Test Hospital Radiology")
VERIFIED_AT = datetime(2024, 5, 6, 14, 3, 7, 250000, tzinfo=timezone(timedelta(hours=2)))
HIP_REASON = "hip radiograph, no chest in view"

Study = dict[str, pydicom.Dataset]


def walk(item: pydicom.Dataset) -> Iterator[pydicom.Dataset]:
    """Every content item below ``item`` (depth first)."""
    for child in item.get("ContentSequence", []):
        yield child
        yield from walk(child)


def meaning(item: pydicom.Dataset) -> str:
    return item.ConceptNameCodeSequence[0].CodeMeaning


def comments(item: pydicom.Dataset) -> list[str]:
    return [i.TextValue for i in walk(item) if i.ValueType == "TEXT" and meaning(i) == "Comment"]


def decisions(study: Study) -> list[ReviewedFinding]:
    """The reviewer's decisions on the pneumonia report of ``chest_study`` (tests/reporting/conftest.py).

    As the review page makes them, the action is the image's: the AI's "bacterial pneumonia" on the DX
    corrected to "viral pneumonia" (pneumonia itself stays present), the CR's "normal" to "pneumonia".
    """
    dx, cr, hip = (study[key].SOPInstanceUID for key in ("dx", "cr", "hip"))
    return [
        ReviewedFinding(dx, "pneumonia", True, True, 0.91, 0.5, "corrected"),
        ReviewedFinding(dx, "bacterial_pneumonia", False, True, 0.64, 0.6, "corrected"),
        ReviewedFinding(dx, "viral_pneumonia", True, False, 0.21, 0.4, "corrected"),
        ReviewedFinding(cr, "pneumonia", True, False, 0.12, 0.5, "corrected"),
        ReviewedFinding(hip, None, None, None, None, None, "not assessable", reason=HIP_REASON),
    ]


def build(study: Study, ai_report: pydicom.Dataset, **overrides: Any) -> hd.sr.Comprehensive3DSR:
    version = overrides.pop("version", 1)
    arguments: dict[str, Any] = {
        "ai_report": ai_report,
        "sources": list(study.values()),
        "findings": decisions(study),
        "reviewer": REVIEWER,
        "verified_at": VERIFIED_AT,
        "model": PNEUMONIA,
        "sop_instance_uid": verified_report_uid(ai_report.SOPInstanceUID, version),
        "series_instance_uid": verified_series_uid(ai_report.StudyInstanceUID, PNEUMONIA),
        "series_number": 9902,
        "comment": "Consolidation right lower lobe; bacterial pattern not convincing.",
        "flagged": True,
        **overrides,
    }
    return build_verified_report(**arguments)


@pytest.fixture
def ai_report(chest_report_path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(chest_report_path)


@pytest.fixture
def verified_path(tmp_path: Path, chest_study: Study, ai_report: pydicom.Dataset) -> Path:
    return write_report(build(chest_study, ai_report), tmp_path / "verified.dcm")


def groups_by_label(path: Path) -> dict[str, hd.sr.MeasurementsAndQualitativeEvaluations]:
    sr = hd.sr.srread(path)
    assert isinstance(sr.content, hd.sr.MeasurementReport)
    return {str(g.tracking_identifier): g for g in sr.content.get_image_measurement_groups()}


def test_verified_report_is_valid_dicom(verified_path: Path) -> None:
    assert_dciodvfy_clean(verified_path)


def test_header_says_verified_final_by_the_reviewer(
    verified_path: Path, ai_report: pydicom.Dataset, chest_study: Study
) -> None:
    sr = pydicom.dcmread(verified_path)
    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    assert sr.SOPInstanceUID == verified_report_uid(ai_report.SOPInstanceUID, 1)
    assert sr.SeriesInstanceUID == verified_series_uid(ai_report.StudyInstanceUID, PNEUMONIA)
    assert (sr.SeriesNumber, sr.InstanceNumber) == (9902, 1)
    assert (sr.VerificationFlag, sr.CompletionFlag, sr.PreliminaryFlag) == ("VERIFIED", "COMPLETE", "FINAL")
    (verifier,) = sr.VerifyingObserverSequence
    assert verifier.VerifyingObserverName == "Doe^Jane"
    assert verifier.VerifyingOrganization == "Test Hospital Radiology"
    assert DT(verifier.VerificationDateTime) == VERIFIED_AT
    # DA/TM have no offset: local time of this machine, like the AI report's
    local = VERIFIED_AT.astimezone()
    assert verifier.VerificationDateTime == local.strftime("%Y%m%d%H%M%S.%f%z")
    expected = (local.strftime("%Y%m%d"), local.strftime("%H%M%S.%f"))
    assert (sr.ContentDate, sr.ContentTime) == (sr.InstanceCreationDate, sr.InstanceCreationTime) == expected
    assert sr.Manufacturer == MANUFACTURER
    assert (sr.ManufacturerModelName, sr.SoftwareVersions) == ("pneumonia", "1.2.0")
    assert sr.SeriesDescription == "Reviewed: pneumonia 1.2.0"
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "StudyInstanceUID", "AccessionNumber"):
        assert sr[keyword].value == ai_report[keyword].value == chest_study["dx"][keyword].value, keyword
    evidence = {
        ref.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert evidence == {ds.SOPInstanceUID for ds in chest_study.values()}


def predecessors(sr: pydicom.Dataset) -> dict[str, tuple[str, str]]:
    """SOP Instance UID -> (series UID, SOP class UID) of each predecessor document."""
    (study,) = sr.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == sr.StudyInstanceUID
    return {
        instance.ReferencedSOPInstanceUID: (series.SeriesInstanceUID, instance.ReferencedSOPClassUID)
        for series in study.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    }


def test_ai_report_is_the_predecessor(verified_path: Path, ai_report: pydicom.Dataset) -> None:
    sr = pydicom.dcmread(verified_path)
    assert predecessors(sr) == {
        ai_report.SOPInstanceUID: (ai_report.SeriesInstanceUID, pydicom.uid.Comprehensive3DSRStorage)
    }


def test_revision_lists_ai_report_and_previous_verified(
    tmp_path: Path, verified_path: Path, ai_report: pydicom.Dataset, chest_study: Study
) -> None:
    first = pydicom.dcmread(verified_path)
    findings = decisions(chest_study)  # on second thought, the AI's "bacterial pneumonia" was right
    findings[:3] = [replace(f, present=f.ai_present, action="confirmed") for f in findings[:3]]
    revision = build(
        chest_study,
        ai_report,
        version=2,
        findings=findings,
        previous_verified=first,
        instance_number=2,
        verified_at=VERIFIED_AT + timedelta(minutes=10),
        comment=None,
        flagged=False,
    )
    path = write_report(revision, tmp_path / "verified_v2.dcm")
    assert_dciodvfy_clean(path)

    sr = pydicom.dcmread(path)
    assert sr.SOPInstanceUID == verified_report_uid(ai_report.SOPInstanceUID, 2) != first.SOPInstanceUID
    assert DT(sr.VerifyingObserverSequence[0].VerificationDateTime) == VERIFIED_AT + timedelta(minutes=10)
    assert predecessors(sr) == {
        ai_report.SOPInstanceUID: (ai_report.SeriesInstanceUID, pydicom.uid.Comprehensive3DSRStorage),
        first.SOPInstanceUID: (first.SeriesInstanceUID, pydicom.uid.Comprehensive3DSRStorage),
    }
    groups = groups_by_label(path)
    assert groups["image 1: bacterial_pneumonia"].get_qualitative_evaluations()[0].value == codes.PRESENT
    assert comments(groups["image 1: bacterial_pneumonia"][0])[0].endswith("; reviewer: confirmed")
    assert comments(sr.ContentSequence[-1]) == [DECISION_SUPPORT_NOTICE]


def test_observers_are_the_reviewer_then_the_model(verified_path: Path) -> None:
    sr = pydicom.dcmread(verified_path)
    context = [i for i in sr.ContentSequence if i.RelationshipType == "HAS OBS CONTEXT"]
    types = [i.ConceptCodeSequence[0].CodeMeaning for i in context if meaning(i) == "Observer Type"]
    assert types == ["Person", "Device"]
    by_name = {meaning(i): i for i in context}
    assert by_name["Person Observer Name"].PersonName == "Doe^Jane"
    assert by_name["Person Observer's Login Name"].TextValue == "jdoe"
    assert by_name["Person Observer's Organization Name"].TextValue == "Test Hospital Radiology"
    role = by_name["Person Observer's Role in this Procedure"].ConceptCodeSequence[0]
    assert (role.CodeValue, role.CodingSchemeDesignator) == ("121098", "DCM")
    assert by_name["Device Observer Model Name"].TextValue == "pneumonia"

    report = hd.sr.srread(verified_path).content
    assert isinstance(report, hd.sr.MeasurementReport)
    (person,) = report.get_observer_contexts(observer_type=dcm_codes.cid270.Person)
    attributes = person.observer_identifying_attributes
    assert isinstance(attributes, hd.sr.PersonObserverIdentifyingAttributes)
    assert (str(attributes.name), attributes.login_name) == ("Doe^Jane", "jdoe")


def test_groups_carry_the_final_values_and_the_ai_result(verified_path: Path) -> None:
    groups = groups_by_label(verified_path)
    assert set(groups) == {
        "image 1: pneumonia",
        "image 1: bacterial_pneumonia",
        "image 1: viral_pneumonia",
        "image 2: pneumonia",
        "image 3: not assessable",
    }
    expected = {
        "image 1: pneumonia": (
            codes.PRESENT,
            "AI (pneumonia 1.2.0): present, certainty 91.0 % at threshold 50.0 %; reviewer: confirmed",
        ),
        "image 1: bacterial_pneumonia": (
            codes.ABSENT,
            "AI (pneumonia 1.2.0): present, certainty 64.0 % at threshold 60.0 %; "
            "reviewer: corrected to absent",
        ),
        "image 1: viral_pneumonia": (
            codes.PRESENT,
            "AI (pneumonia 1.2.0): absent, certainty 21.0 % at threshold 40.0 %; "
            "reviewer: corrected to present",
        ),
        "image 2: pneumonia": (
            codes.PRESENT,
            "AI (pneumonia 1.2.0): absent, certainty 12.0 % at threshold 50.0 %; "
            "reviewer: corrected to present",
        ),
    }
    for label, (value, ai_text) in expected.items():
        group = groups[label]
        finding = codes.FINDING_CODES[label.split(": ")[1]]
        assert group.finding_type == finding
        (evaluation,) = group.get_qualitative_evaluations()
        assert (evaluation.name, evaluation.value) == (finding, value)
        assert comments(group[0]) == [ai_text]
        # the AI's certainty is quoted, never a measurement or an algorithm of the reviewer's document
        assert group.get_measurements() == []
        assert not [i for i in walk(group[0]) if i.ValueType == "NUM" or meaning(i).startswith("Algorithm")]
        assert len(group.source_images) == 1


def test_not_assessable_decision_is_undetermined_with_reason(verified_path: Path, chest_study: Study) -> None:
    group = groups_by_label(verified_path)["image 3: not assessable"]
    assert group.finding_type is None
    (evaluation,) = group.get_qualitative_evaluations()
    assert (evaluation.name, evaluation.value) == (codes.FINDING_CODES["pneumonia"], codes.UNDETERMINED)
    assert comments(group[0]) == [
        f"not assessable: {HIP_REASON}",
        "AI (pneumonia 1.2.0): not assessable; reviewer: not assessable",
    ]
    (image,) = group.source_images
    assert image.referenced_sop_instance_uid == chest_study["hip"].SOPInstanceUID


def test_reviewer_assesses_what_the_ai_did_not_and_the_reverse(
    tmp_path: Path, chest_study: Study, ai_report: pydicom.Dataset
) -> None:
    dx, hip = chest_study["dx"].SOPInstanceUID, chest_study["hip"].SOPInstanceUID
    findings = [
        ReviewedFinding(dx, "pneumonia", None, True, 0.91, 0.5, "not assessable", reason="motion blur"),
        ReviewedFinding(hip, "pneumonia", False, None, None, None, "corrected"),
    ]
    path = write_report(build(chest_study, ai_report, findings=findings), tmp_path / "v.dcm")
    assert_dciodvfy_clean(path)

    groups = groups_by_label(path)
    assert set(groups) == {"image 1: pneumonia", "image 3: pneumonia"}
    dx_group, hip_group = groups["image 1: pneumonia"], groups["image 3: pneumonia"]
    assert dx_group.finding_type == hip_group.finding_type == codes.FINDING_CODES["pneumonia"]
    assert dx_group.get_qualitative_evaluations()[0].value == codes.UNDETERMINED
    assert comments(dx_group[0]) == [
        "not assessable: motion blur",
        "AI (pneumonia 1.2.0): present, certainty 91.0 % at threshold 50.0 %; reviewer: not assessable",
    ]
    assert hip_group.get_qualitative_evaluations()[0].value == codes.ABSENT
    assert comments(hip_group[0]) == ["AI (pneumonia 1.2.0): not assessable; reviewer: absent"]


def test_notice_comment_and_flag(verified_path: Path) -> None:
    sr = pydicom.dcmread(verified_path)
    (evaluations,) = [
        i
        for i in sr.ContentSequence
        if i.ValueType == "CONTAINER" and meaning(i) == "Qualitative Evaluations"
    ]
    assert comments(evaluations) == [
        DECISION_SUPPORT_NOTICE,
        "Reviewer's comment: Consolidation right lower lobe; bacterial pattern not convincing.",
        FLAGGED_TEXT,
    ]
    assert FLAGGED_TEXT == "Flagged for a second reader"


def test_highdicom_parses_a_measurement_report(verified_path: Path) -> None:
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(verified_path))
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    assert report[0].ConceptNameCodeSequence[0].CodeValue == "126000"
    groups = report.get_image_measurement_groups()
    assert len(groups) == 5
    (present_pneumonia,) = report.get_image_measurement_groups(
        finding_type=codes.FINDING_CODES["bacterial_pneumonia"]
    )
    assert present_pneumonia.get_qualitative_evaluations()[0].value == codes.ABSENT


def test_built_report_content_view_is_its_tree(chest_study: Study, ai_report: pydicom.Dataset) -> None:
    sr = build(chest_study, ai_report)
    assert isinstance(sr.content, hd.sr.MeasurementReport)
    assert sr.content[0].ContentSequence is sr.ContentSequence
    assert len(sr.content.get_image_measurement_groups()) == 5


def test_same_decision_gives_the_same_bytes(
    tmp_path: Path, chest_study: Study, ai_report: pydicom.Dataset
) -> None:
    first = write_report(build(chest_study, ai_report), tmp_path / "a.dcm").read_bytes()
    second = write_report(build(chest_study, ai_report), tmp_path / "b.dcm").read_bytes()
    assert first == second
    elsewhere = VERIFIED_AT.astimezone(timezone(timedelta(hours=-5)))  # the same instant
    assert (
        write_report(build(chest_study, ai_report, verified_at=elsewhere), tmp_path / "d.dcm").read_bytes()
        == first
    )
    later = write_report(
        build(chest_study, ai_report, verified_at=VERIFIED_AT + timedelta(seconds=1)), tmp_path / "c.dcm"
    )
    assert later.read_bytes() != first


def test_uids_are_deterministic() -> None:
    ai_uid = "1.2.826.0.1.3680043.8.498.1"
    uid = verified_report_uid(ai_uid, 1)
    assert UID(uid).is_valid and len(uid) <= 64
    assert verified_report_uid(ai_uid, 1) == uid
    assert len({uid, verified_report_uid(ai_uid, 2), verified_report_uid("1.2.3.4", 1), ai_uid}) == 4

    study = "1.2.3.4"
    series = verified_series_uid(study, PNEUMONIA)
    assert UID(series).is_valid
    assert series == verified_series_uid(study, PNEUMONIA) != verified_series_uid(study, GLAUCOMA)
    assert series != report_series_uid(study, PNEUMONIA)
    assert series != verified_series_uid("1.2.3.5", PNEUMONIA)


def test_glaucoma_review_on_fundus_with_pixel_data(tmp_path: Path) -> None:
    fundus = pydicom.dcmread(SHARED_DICOM / "sc_fundus_j2k.dcm")  # pixel data present, never decoded
    result = ImageResult(
        instance=ref(fundus),
        model=GLAUCOMA,
        assessable=True,
        findings=(Finding("glaucoma", probability=0.912, threshold=0.419, present=True),),
    )
    study_uid = fundus.StudyInstanceUID
    ai_sr = build_report(
        results=[result],
        sources=[fundus],
        model=GLAUCOMA,
        sop_instance_uid=report_uid(study_uid, GLAUCOMA, [fundus.SOPInstanceUID]),
        series_instance_uid=report_series_uid(study_uid, GLAUCOMA),
    )
    ai_report = pydicom.dcmread(write_report(ai_sr, tmp_path / "ai.dcm"))
    sr = build_verified_report(
        ai_report=ai_report,
        sources=[fundus],
        findings=[ReviewedFinding(fundus.SOPInstanceUID, "glaucoma", False, True, 0.912, 0.419, "corrected")],
        reviewer=Reviewer(name="Doe^John", login="jd2", organization="Eye Clinic"),
        verified_at=datetime(2024, 1, 2, 8, 0, tzinfo=UTC),
        model=GLAUCOMA,
        sop_instance_uid=verified_report_uid(ai_report.SOPInstanceUID, 1),
        series_instance_uid=verified_series_uid(study_uid, GLAUCOMA),
        series_number=9903,
        institution_name="Test Hospital",
    )
    path = write_report(sr, tmp_path / "verified.dcm")
    assert_dciodvfy_clean(path)

    back = pydicom.dcmread(path)
    assert "PixelData" not in back
    assert back.InstitutionName == "Test Hospital"
    assert DT(back.VerifyingObserverSequence[0].VerificationDateTime) == datetime(
        2024, 1, 2, 8, 0, tzinfo=UTC
    )
    (group,) = groups_by_label(path).values()
    assert group.get_qualitative_evaluations()[0].value == codes.ABSENT
    assert comments(group[0]) == [
        "AI (glaucoma 0.9.1): present, certainty 91.2 % at threshold 41.9 %; reviewer: corrected to absent"
    ]


def test_non_ascii_reviewer_text_switches_to_utf8(
    tmp_path: Path, chest_study: Study, ai_report: pydicom.Dataset
) -> None:
    dx = chest_study["dx"]
    dx.SpecificCharacterSet, dx.PatientName = "ISO_IR 100", "Größe^Hans"  # a Latin-1 source
    plain = build(chest_study, ai_report)
    assert plain.SpecificCharacterSet == "ISO_IR 100"
    sr = build(
        chest_study,
        ai_report,
        reviewer=Reviewer(name="Łukasz Wójcik", login="lw", organization="Klinikum Süd"),
        comment="Verdichtung größer als angegeben",
    )
    path = write_report(sr, tmp_path / "utf8.dcm")
    assert_dciodvfy_clean(path)

    back = pydicom.dcmread(path)
    assert back.SpecificCharacterSet == "ISO_IR 192"
    assert back.PatientName == "Größe^Hans"
    assert back.VerifyingObserverSequence[0].VerifyingObserverName == "Wójcik^Łukasz"
    assert back.VerifyingObserverSequence[0].VerifyingOrganization == "Klinikum Süd"
    assert "Reviewer's comment: Verdichtung größer als angegeben" in comments(back.ContentSequence[-1])


@pytest.mark.parametrize(
    "name, expected",
    [
        ("Doe^Jane", "Doe^Jane"),
        ("Jane Doe", "Doe^Jane"),
        ("  Jane   Mary Doe ", "Doe^Jane Mary"),
        ("Doe, Jane", "Doe^Jane"),
        ("Doe", "Doe^"),
    ],
)
def test_person_name(name: str, expected: str) -> None:
    assert person_name(name) == expected


def invalid(case: str, study: Study) -> dict[str, Any]:
    """Arguments of ``build`` that make one input inconsistent."""
    dx = study["dx"].SOPInstanceUID
    good = ReviewedFinding(dx, "pneumonia", True, True, 0.91, 0.5, "confirmed")

    def one(**changes: Any) -> dict[str, Any]:
        return {"findings": [replace(good, **changes)]}

    other_study = read_shared("sc_fundus_j2k.dcm")
    cases: dict[str, dict[str, Any]] = {
        "no findings": {"findings": []},
        "unknown finding": one(finding="edema"),
        "probability above 1": one(ai_probability=1.5),
        "threshold below 0": one(ai_threshold=-0.1),
        "unknown action": one(action="rejected"),
        "not assessable without reason": one(finding=None, present=None, action="not assessable"),
        "no finding but a value": one(finding=None, action="confirmed"),
        "value with not assessable": one(action="not assessable", reason="blurred"),
        "image not in sources": one(sop_instance_uid="1.2.3.4"),
        "twice the same finding": {"findings": [good, good]},
        "a finding on a not-assessable image": {
            "findings": [replace(good, finding=None, present=None, action="not assessable", reason="x"), good]
        },
        "sources from two studies": {"sources": [*study.values(), other_study]},
        "previous of another study": {"previous_verified": other_study},
        "model other than the report's": {"model": GLAUCOMA},
        "naive verified_at": {"verified_at": VERIFIED_AT.replace(tzinfo=None)},
        "reviewer without organization": {"reviewer": replace(REVIEWER, organization=" ")},
        "reviewer without name": {"reviewer": replace(REVIEWER, name=" ")},
    }
    return cases[case]


@pytest.mark.parametrize(
    "case, message",
    [
        ("no findings", "at least one reviewed finding"),
        ("unknown finding", "unknown finding"),
        ("probability above 1", "probability 1.5 outside"),
        ("threshold below 0", "threshold -0.1 outside"),
        ("unknown action", "action 'rejected'"),
        ("not assessable without reason", "reason"),
        ("no finding but a value", "without a finding"),
        ("value with not assessable", "final value"),
        ("image not in sources", "not among sources"),
        ("twice the same finding", "conflicting decisions"),
        ("a finding on a not-assessable image", "conflicting decisions"),
        ("sources from two studies", "one study"),
        ("previous of another study", "previous_verified belongs to another study"),
        ("model other than the report's", "ai_report is of model"),
        ("naive verified_at", "timezone-aware"),
        ("reviewer without organization", "organization"),
        ("reviewer without name", "reviewer name"),
    ],
)
def test_rejects_inconsistent_input(
    chest_study: Study, ai_report: pydicom.Dataset, case: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        build(chest_study, ai_report, **invalid(case, chest_study))


def test_rejects_ai_report_of_another_study(chest_study: Study, ai_report: pydicom.Dataset) -> None:
    ai_report.StudyInstanceUID = "1.2.3.4.5"
    with pytest.raises(ValueError, match="ai_report belongs to another study"):
        build(chest_study, ai_report)
