"""TID 1500 reports built from real DICOM files: dciodvfy-clean, and they say what the models said."""

from __future__ import annotations

import copy
import hashlib
import io
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.uid import UID, ExplicitVRLittleEndian

from core.domain import DECISION_SUPPORT_NOTICE, MANUFACTURER, Finding, ImageResult, ModelInfo
from core.labels import SUBTYPE_CAUTION
from reporting import codes
from reporting import sr as sr_module
from reporting.sr import build_report, input_hash, report_series_uid, report_uid, write_report
from tests.reporting.dciodvfy import assert_dciodvfy_clean
from tests.reporting.factories import (
    GLAUCOMA,
    PNEUMONIA,
    SHARED_DICOM,
    chest_results,
    into_study,
    read_shared,
    ref,
)


def walk(item: pydicom.Dataset) -> Iterator[pydicom.Dataset]:
    """Every content item below ``item`` (depth first)."""
    for child in item.get("ContentSequence", []):
        yield child
        yield from walk(child)


def meaning(item: pydicom.Dataset) -> str:
    return item.ConceptNameCodeSequence[0].CodeMeaning


def code_of(item: pydicom.Dataset) -> tuple[str, str]:
    value = item.ConceptCodeSequence[0]
    return value.CodeValue, value.CodingSchemeDesignator


def measurement_report(
    sr: hd.sr.EnhancedSR | hd.sr.ComprehensiveSR | hd.sr.Comprehensive3DSR,
) -> hd.sr.MeasurementReport:
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    assert isinstance(sr.content, hd.sr.MeasurementReport)
    return sr.content


def groups_by_label(path: Path) -> dict[str, hd.sr.MeasurementsAndQualitativeEvaluations]:
    groups = measurement_report(hd.sr.srread(path)).get_image_measurement_groups()
    return {str(g.tracking_identifier): g for g in groups}


def test_chest_report_is_valid_dicom(chest_report_path: Path) -> None:
    assert_dciodvfy_clean(chest_report_path)


def test_chest_report_header(chest_report_path: Path, chest_study: dict[str, pydicom.Dataset]) -> None:
    sr = pydicom.dcmread(chest_report_path)
    dx = chest_study["dx"]
    study_uid = dx.StudyInstanceUID
    sop_uids = [ds.SOPInstanceUID for ds in chest_study.values()]

    assert sr.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    assert sr.SOPInstanceUID == report_uid(study_uid, PNEUMONIA, sop_uids)
    assert sr.SeriesInstanceUID == report_series_uid(study_uid, PNEUMONIA)
    assert sr.Modality == "SR"
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID"):
        assert sr[keyword].value == dx[keyword].value, keyword
    assert sr.AccessionNumber == dx.AccessionNumber
    assert sr.Manufacturer == MANUFACTURER
    assert sr.ManufacturerModelName == "pneumonia"
    assert sr.SoftwareVersions == "1.2.0"
    assert sr.SeriesDescription == "AI screening: pneumonia 1.2.0"
    assert sr.SeriesNumber == 9901
    assert (sr.VerificationFlag, sr.CompletionFlag) == ("UNVERIFIED", "COMPLETE")
    assert "PredecessorDocumentsSequence" not in sr


def test_chest_report_references_every_source(
    chest_report_path: Path, chest_study: dict[str, pydicom.Dataset]
) -> None:
    expected = {ds.SOPInstanceUID for ds in chest_study.values()}
    sr = hd.sr.srread(chest_report_path)

    evidence = {instance for _, _, instance, _ in sr.get_evidence()}
    library = {
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in walk(sr)
        if item.ValueType == "IMAGE" and meaning(item) == "Source"
    }
    in_groups = {
        image.referenced_sop_instance_uid
        for group in measurement_report(sr).get_image_measurement_groups()
        for image in group.source_images
    }
    assert evidence == library == in_groups == expected


def test_finding_groups_carry_code_value_probability_and_algorithm(chest_report_path: Path) -> None:
    groups = groups_by_label(chest_report_path)
    assert set(groups) == {
        "image 1: pneumonia",
        "image 1: bacterial_pneumonia",
        "image 1: viral_pneumonia",
        "image 2: pneumonia",
        "image 3: not assessable",
    }
    expected = {
        "image 1: pneumonia": ("233604007", codes.PRESENT, 91.0, 0.5),
        "image 1: bacterial_pneumonia": ("53084003", codes.PRESENT, 64.0, 0.6),
        "image 1: viral_pneumonia": ("75570004", codes.ABSENT, 21.0, 0.4),
        "image 2: pneumonia": ("233604007", codes.ABSENT, 12.0, 0.5),
    }
    for label, (sct, value, percent, threshold) in expected.items():
        group = groups[label]
        assert group.finding_type is not None
        assert (group.finding_type.value, group.finding_type.scheme_designator) == (sct, "SCT")
        (evaluation,) = group.get_qualitative_evaluations()
        assert evaluation.name.value == sct
        assert evaluation.value == value
        (measurement,) = group.get_measurements()
        assert measurement.name == codes.CERTAINTY_OF_FINDING
        assert measurement.value == pytest.approx(percent)
        assert measurement.unit == codes.PERCENT
        algorithm = [i for i in walk(group[0]) if meaning(i).startswith("Algorithm")]
        texts = {(meaning(i), i.TextValue) for i in algorithm}
        assert ("Algorithm Name", PNEUMONIA.algorithm_name) in texts
        assert ("Algorithm Version", PNEUMONIA.version) in texts
        assert ("Algorithm Parameters", f"decision threshold={threshold:.4f} (probability)") in texts
        # TID 4019 on the group and again on the measurement
        assert sum(1 for i in algorithm if meaning(i) == "Algorithm Name") == 2


def test_not_assessable_group_has_reason_and_no_probability(chest_report_path: Path) -> None:
    group = groups_by_label(chest_report_path)["image 3: not assessable"]
    assert group.get_measurements() == []
    assert group.finding_type is None
    (evaluation,) = group.get_qualitative_evaluations()
    assert evaluation.name.value == codes.FINDING_CODES["pneumonia"].value
    assert evaluation.value == codes.UNDETERMINED
    items = list(walk(group[0]))
    assert not [i for i in items if i.ValueType == "NUM"]
    comments = [i.TextValue for i in items if i.ValueType == "TEXT" and meaning(i) == "Comment"]
    assert comments == ["not assessable: body part HIP is not a chest radiograph"]
    present_or_absent = {codes.PRESENT.value, codes.ABSENT.value}
    assert not [i for i in items if i.ValueType == "CODE" and code_of(i)[0] in present_or_absent]


def test_report_states_decision_support_notice(chest_report_path: Path) -> None:
    sr = pydicom.dcmread(chest_report_path)
    top = [i for i in sr.ContentSequence if i.ValueType == "CONTAINER"]
    (evaluations,) = [i for i in top if meaning(i) == "Qualitative Evaluations"]
    notice, *rest = evaluations.ContentSequence
    assert (notice.ValueType, meaning(notice), notice.TextValue) == (
        "TEXT",
        "Comment",
        DECISION_SUPPORT_NOTICE,
    )
    assert "not a diagnosis" in notice.TextValue
    # the pneumonia report carries bacterial/viral findings: their caution follows, once
    reported = {i.ConceptCodeSequence[0].CodeMeaning for i in walk(sr) if i.ValueType == "CODE"}
    assert {"Bacterial pneumonia", "Viral pneumonia"} <= reported
    assert [(i.ValueType, meaning(i), i.TextValue) for i in rest] == [("TEXT", "Comment", SUBTYPE_CAUTION)]
    assert "unreliable" in SUBTYPE_CAUTION


def test_device_observer(chest_report_path: Path) -> None:
    sr = pydicom.dcmread(chest_report_path)
    context = {meaning(i): i for i in sr.ContentSequence if i.RelationshipType == "HAS OBS CONTEXT"}
    assert code_of(context["Observer Type"]) == ("121007", "DCM")
    assert context["Device Observer Manufacturer"].TextValue == MANUFACTURER
    assert context["Device Observer Model Name"].TextValue == "pneumonia"
    assert UID(context["Device Observer UID"].UID).is_valid


def test_fundus_report_with_pixel_data_source(tmp_path: Path) -> None:
    fundus = pydicom.dcmread(SHARED_DICOM / "sc_fundus_j2k.dcm")  # pixel data present, never decoded
    result = ImageResult(
        instance=ref(fundus),
        model=GLAUCOMA,
        assessable=True,
        findings=(Finding("glaucoma", probability=0.73, threshold=0.55, present=True),),
    )
    sr = build_report(
        results=[result],
        sources=[fundus],
        model=GLAUCOMA,
        sop_instance_uid=report_uid(fundus.StudyInstanceUID, GLAUCOMA, [fundus.SOPInstanceUID]),
        series_instance_uid=report_series_uid(fundus.StudyInstanceUID, GLAUCOMA),
        institution_name="Test Hospital",
    )
    path = write_report(sr, tmp_path / "fundus_sr.dcm")
    assert_dciodvfy_clean(path)
    texts = [i.TextValue for i in walk(pydicom.dcmread(path)) if i.ValueType == "TEXT"]
    assert DECISION_SUPPORT_NOTICE in texts and SUBTYPE_CAUTION not in texts  # no caution for glaucoma

    back = pydicom.dcmread(path)
    assert back.StudyInstanceUID == fundus.StudyInstanceUID
    assert back.InstitutionName == "Test Hospital"
    assert "PixelData" not in back
    (group,) = groups_by_label(path).values()
    assert group.finding_type is not None
    assert group.finding_type.value == "23986001"
    assert group.get_qualitative_evaluations()[0].value == codes.PRESENT
    assert group.get_measurements()[0].value == pytest.approx(73.0)


def test_previous_report_is_referenced_as_predecessor(
    tmp_path: Path, chest_report_path: Path, chest_study: dict[str, pydicom.Dataset]
) -> None:
    previous = pydicom.dcmread(chest_report_path)
    dx = chest_study["dx"]
    sources = [dx, chest_study["cr"]]
    sr = build_report(
        results=chest_results(chest_study)[:2],
        sources=sources,
        model=PNEUMONIA,
        sop_instance_uid=report_uid(dx.StudyInstanceUID, PNEUMONIA, [s.SOPInstanceUID for s in sources]),
        series_instance_uid=previous.SeriesInstanceUID,
        instance_number=2,
        previous_report=previous,
    )
    path = write_report(sr, tmp_path / "second.dcm")
    assert_dciodvfy_clean(path)

    back = pydicom.dcmread(path)
    assert back.SOPInstanceUID != previous.SOPInstanceUID
    (study,) = back.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == dx.StudyInstanceUID
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == previous.SeriesInstanceUID
    (instance,) = series.ReferencedSOPSequence
    assert instance.ReferencedSOPInstanceUID == previous.SOPInstanceUID
    assert instance.ReferencedSOPClassUID == pydicom.uid.Comprehensive3DSRStorage


def test_report_uid_is_deterministic_and_input_sensitive() -> None:
    study = "1.2.3.4"
    uid = report_uid(study, PNEUMONIA, ["1.2.3.4.5", "1.2.3.4.6"])
    assert UID(uid).is_valid and len(uid) <= 64
    assert report_uid(study, PNEUMONIA, ["1.2.3.4.6", "1.2.3.4.5"]) == uid
    assert report_uid(study, PNEUMONIA, iter(["1.2.3.4.5", "1.2.3.4.6"])) == uid
    others = {
        report_uid(study, PNEUMONIA, ["1.2.3.4.5"]),
        report_uid(study, PNEUMONIA, ["1.2.3.4.5", "1.2.3.4.6", "1.2.3.4.7"]),
        report_uid("1.2.3.9", PNEUMONIA, ["1.2.3.4.5", "1.2.3.4.6"]),
        report_uid(study, ModelInfo("pneumonia", "1.2.1"), ["1.2.3.4.5", "1.2.3.4.6"]),
        report_uid(study, ModelInfo("covid19", "1.2.0"), ["1.2.3.4.5", "1.2.3.4.6"]),
    }
    assert uid not in others and len(others) == 5

    series = report_series_uid(study, PNEUMONIA)
    assert UID(series).is_valid
    assert series == report_series_uid(study, PNEUMONIA) != report_series_uid(study, GLAUCOMA)
    assert series != uid


def test_input_hash_is_sha256_of_sorted_uids() -> None:
    expected = hashlib.sha256(b"1.2.3\n1.2.4").hexdigest()
    assert input_hash(["1.2.4", "1.2.3"]) == input_hash(["1.2.3", "1.2.4", "1.2.3"]) == expected
    assert input_hash(["1.2.3"]) != expected


def test_tracking_uids_are_deterministic_and_unique(chest_study: dict[str, pydicom.Dataset]) -> None:
    def tracking_uids(sop_uid: str) -> list[str]:
        sr = build_report(
            results=chest_results(chest_study),
            sources=list(chest_study.values()),
            model=PNEUMONIA,
            sop_instance_uid=sop_uid,
            series_instance_uid="1.2.3",
        )
        return [
            i.UID for i in walk(sr) if i.ValueType == "UIDREF" and meaning(i) == "Tracking Unique Identifier"
        ]

    first = tracking_uids("1.2.3.4")
    assert len(first) == len(set(first)) == 5
    assert tracking_uids("1.2.3.4") == first
    assert set(tracking_uids("1.2.3.5")).isdisjoint(first)


def test_built_report_content_view_is_its_tree(chest_study: dict[str, pydicom.Dataset]) -> None:
    """build_report hands highdicom the root alone and attaches the tree: `sr.content` must still be it."""
    sources = list(chest_study.values())
    sr = build_report(
        results=chest_results(chest_study),
        sources=sources,
        model=PNEUMONIA,
        sop_instance_uid="1.2.3.4",
        series_instance_uid="1.2.3",
    )
    report = measurement_report(sr)
    assert report[0].ContentSequence is sr.ContentSequence
    labels = sorted(str(g.tracking_identifier) for g in report.get_image_measurement_groups())
    assert labels == [
        "image 1: bacterial_pneumonia",
        "image 1: pneumonia",
        "image 1: viral_pneumonia",
        "image 2: pneumonia",
        "image 3: not assessable",
    ]
    # Evidence still lists every source, as when highdicom collected it from the whole tree.
    evidence = {uids[2] for uids in sr.get_evidence()}
    assert evidence == {s.SOPInstanceUID for s in sources}


def inconsistent_input(
    case: str, study: dict[str, pydicom.Dataset]
) -> tuple[list[pydicom.Dataset], list[ImageResult]]:
    sources, results = list(study.values()), chest_results(study)
    dx = results[0].instance

    def one(finding: Finding) -> list[ImageResult]:
        return [ImageResult(dx, PNEUMONIA, assessable=True, findings=(finding,))]

    cases = {
        "result for an image not in sources": (sources[1:], results),
        "no results": (sources, []),
        "sources from two studies": ([*sources, read_shared("sc_fundus_j2k.dcm")], results),
        "unknown finding": (sources, one(Finding("edema", 0.5, 0.5, present=True))),
        "probability above 1": (sources, one(Finding("pneumonia", 1.5, 0.5, present=True))),
        "result of another model": (sources, [ImageResult(dx, GLAUCOMA, assessable=False, reason="x")]),
    }
    return cases[case]


@pytest.mark.parametrize(
    "case, message",
    [
        ("result for an image not in sources", "not among sources"),
        ("no results", "at least one result"),
        ("sources from two studies", "one study"),
        ("unknown finding", "unknown finding"),
        ("probability above 1", "outside"),
        ("result of another model", "result of model 'glaucoma'"),
    ],
)
def test_build_report_rejects_inconsistent_input(
    chest_study: dict[str, pydicom.Dataset], case: str, message: str
) -> None:
    sources, results = inconsistent_input(case, chest_study)
    with pytest.raises(ValueError, match=message):
        build_report(
            results=results,
            sources=sources,
            model=PNEUMONIA,
            sop_instance_uid="1.2.3",
            series_instance_uid="1.2.4",
        )


def test_write_report_replaces_atomically(tmp_path: Path, chest_report_path: Path) -> None:
    ds = pydicom.dcmread(chest_report_path)
    target = tmp_path / "out.dcm"
    target.write_bytes(b"old content")
    ds.InstanceNumber = 7
    assert write_report(ds, target) == target
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    raw = target.read_bytes()
    assert raw[128:132] == b"DICM"
    assert pydicom.dcmread(target).InstanceNumber == 7


def test_dciodvfy_helper_reports_errors(tmp_path: Path, chest_report_path: Path) -> None:
    ds = pydicom.dcmread(chest_report_path)
    del ds.CompletionFlag  # type 1 in the SR Document General Module
    broken = write_report(ds, tmp_path / "broken.dcm")
    with pytest.raises(AssertionError, match="dciodvfy errors"):
        assert_dciodvfy_clean(broken)


def test_sources_in_one_study_factory_is_consistent(chest_study: dict[str, pydicom.Dataset]) -> None:
    # guards the test data: the CR images were moved into the DX study, nothing else changed
    dx, cr = chest_study["dx"], chest_study["cr"]
    original = read_shared("cr_chest_jpegls.dcm")
    assert cr.StudyInstanceUID == dx.StudyInstanceUID != original.StudyInstanceUID
    assert cr.SOPInstanceUID == original.SOPInstanceUID
    assert into_study(original, dx).SeriesInstanceUID == cr.SeriesInstanceUID != original.SeriesInstanceUID


@pytest.mark.parametrize("finding", sorted(codes.FINDING_CODES))
def test_every_finding_code_builds_a_valid_report(tmp_path: Path, finding: str) -> None:
    dx = pydicom.dcmread(SHARED_DICOM / "dx_chest_small.dcm", stop_before_pixels=True)
    model = ModelInfo(name="covid19" if finding == "covid19" else "pneumonia", version="1.0.0")
    result = ImageResult(
        instance=ref(dx),
        model=model,
        assessable=True,
        findings=(Finding(finding, probability=0.61, threshold=0.5, present=True),),
    )
    sr = build_report(
        results=[result],
        sources=[dx],
        model=model,
        sop_instance_uid=report_uid(dx.StudyInstanceUID, model, [dx.SOPInstanceUID]),
        series_instance_uid=report_series_uid(dx.StudyInstanceUID, model),
    )
    assert_dciodvfy_clean(write_report(sr, tmp_path / "sr.dcm"))


def _pneumonia_report(study: dict[str, pydicom.Dataset], sources: list[pydicom.Dataset]) -> pydicom.Dataset:
    return build_report(
        results=chest_results(study),
        sources=sources,
        model=PNEUMONIA,
        sop_instance_uid="1.2.3.4",
        series_instance_uid="1.2.3",
    )


def _written(ds: pydicom.Dataset, path: Path) -> bytes:
    return write_report(ds, path).read_bytes()


def test_shared_content_items_and_the_single_encoding_pass_change_no_byte(
    tmp_path: Path, chest_study: dict[str, pydicom.Dataset]
) -> None:
    """Reports share the TID 4019 and Image Library items they have in common, and write_report resolves
    the encoding once for the whole tree: the file is byte for byte what pydicom writes for a report built
    from scratch with nothing shared."""
    sources = list(chest_study.values())
    sr_module._algorithm_of.cache_clear()
    sr_module._library_groups.clear()
    cold = _pneumonia_report(chest_study, sources)
    plain = copy.deepcopy(cold)  # nothing marked as already encoded: pydicom's own path
    plain.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    plain.save_as(buffer, enforce_file_format=True)
    warm = _pneumonia_report(chest_study, sources)  # everything it can share comes from the caches
    assert sr_module._algorithm_of.cache_info().hits > 0
    for keyword in ("ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime"):
        setattr(warm, keyword, cold[keyword].value)  # built a moment later
    equipment = zip(warm.ContributingEquipmentSequence, cold.ContributingEquipmentSequence, strict=True)
    for mine, theirs in equipment:
        if "ContributionDateTime" in theirs:
            mine.ContributionDateTime = theirs.ContributionDateTime
    assert _written(cold, tmp_path / "cold.dcm") == buffer.getvalue()
    assert _written(warm, tmp_path / "warm.dcm") == buffer.getvalue()


def test_an_instance_received_again_with_other_values_gets_its_own_library_entry(
    tmp_path: Path, chest_study: dict[str, pydicom.Dataset]
) -> None:
    def library_rows(sr: pydicom.Dataset) -> set[float]:
        return {
            float(i.MeasuredValueSequence[0].NumericValue)
            for i in walk(sr)
            if meaning(i) == "Pixel Data Rows"
        }

    sources = list(chest_study.values())
    before = library_rows(_pneumonia_report(chest_study, sources))
    changed = copy.deepcopy(chest_study["dx"])  # same SOP Instance UID, other pixel matrix
    changed.Rows = int(changed.Rows) + 7
    again = [changed, *sources[1:]]
    after = library_rows(_pneumonia_report({**chest_study, "dx": changed}, again))
    assert int(chest_study["dx"].Rows) + 7 in after and int(chest_study["dx"].Rows) not in after - before
