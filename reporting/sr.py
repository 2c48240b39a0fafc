"""DICOM Comprehensive 3D SR documents (TID 1500 Measurement Report) carrying our models' findings.

Also the deterministic UIDs of those documents and an atomic writer.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import ParamSpec, TypeVar

import pydicom
from highdicom.sr import (
    AlgorithmIdentification,
    Comprehensive3DSR,
    ContainerContentItem,
    ContentSequence,
    DeviceObserverIdentifyingAttributes,
    ImageContentItem,
    ImageLibraryEntryDescriptors,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr, write_data_element
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import VR

from core.domain import DECISION_SUPPORT_NOTICE, MANUFACTURER, Finding, ImageResult, ModelInfo
from core.labels import cautions
from core.storage import write_atomic
from reporting import codes as ourcodes

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

_UID_NAMESPACE = f"{MANUFACTURER}/reporting/sr"

#: Held while a report is built or written. Reports share content items (TID 4019, Image Library groups:
#: :func:`_algorithm_of`, ``_library_groups``), and writing one swaps the code sequences of its items, shared
#: ones too, for their encoded bytes for the time it takes (:func:`_encode_once`): no other thread of the
#: process may read a shared item meanwhile. (Reports are built one at a time per worker process but for a
#: verified report on a delivery lane: the lock is rarely waited for.)
SHARED_ITEMS = threading.RLock()


def holding_shared_items(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` (a report builder) runs holding :data:`SHARED_ITEMS`."""

    @functools.wraps(fn)
    def holding(*args: P.args, **kwargs: P.kwargs) -> R:
        with SHARED_ITEMS:
            return fn(*args, **kwargs)

    return holding


def input_hash(input_sop_uids: Iterable[str]) -> str:
    """Hex SHA-256 of the sorted, de-duplicated SOP Instance UIDs a report was computed from."""
    joined = "\n".join(sorted({str(uid) for uid in input_sop_uids}))
    return hashlib.sha256(joined.encode("ascii")).hexdigest()


def report_uid(study_uid: str, model: ModelInfo, input_sop_uids: Iterable[str]) -> str:
    """SOP Instance UID of the report of ``model`` on these inputs: same inputs, same UID.

    A different study, model name, model version or input set gives a different UID, so a re-run on
    unchanged inputs is idempotent at the PACS while a re-run on new inputs creates a new document.
    """
    sources = [_UID_NAMESPACE, "instance", study_uid, model.name, model.version, input_hash(input_sop_uids)]
    return generate_uid(entropy_srcs=sources)


def report_series_uid(study_uid: str, model: ModelInfo) -> str:
    """Series Instance UID of the reports of ``model`` (name and version) in a study."""
    return generate_uid(entropy_srcs=[_UID_NAMESPACE, "series", study_uid, model.name, model.version])


def _device_uid(model: ModelInfo) -> str:
    # TID 1004 "Device Observer UID": one stable UID per model version (the observing device).
    return generate_uid(entropy_srcs=[_UID_NAMESPACE, "device", model.name, model.version])


def _algorithm(model: ModelInfo, finding: Finding | None = None) -> AlgorithmIdentification:
    threshold = None if finding is None else finding.threshold
    return _algorithm_of(model.algorithm_name, model.version, threshold)


@functools.lru_cache(maxsize=256)
def _algorithm_of(name: str, version: str, threshold: float | None) -> AlgorithmIdentification:
    """TID 4019, built once per algorithm, version and threshold and shared by every group that cites it
    (content items are written where they appear and never changed once built; building them is a good
    part of a report's cost)."""
    parameters = None
    if threshold is not None:
        parameters = [ourcodes.THRESHOLD_PARAMETER.format(threshold=threshold)]
    return AlgorithmIdentification(
        name=name, version=version, manufacturer=MANUFACTURER, parameters=parameters
    )


def _comment(text: str) -> TextContentItem:
    return TextContentItem(
        name=ourcodes.COMMENT, value=text, relationship_type=RelationshipTypeValues.CONTAINS
    )


class _EntryDescriptors(ImageLibraryEntryDescriptors):
    """TID 1602 descriptors; TID 1603 (projection radiography) only when the image has its inputs.

    highdicom adds TID 1603 for every CR/DX/... image and then needs PatientOrientation (type 2, may be
    empty) and ImagerPixelSpacing (type 3 in CR): real CRs without them must still be listed.
    """

    def _is_projection_radiography(self, ds: pydicom.Dataset) -> bool:
        complete = (
            len(ds.get("PatientOrientation") or ()) == 2 and len(ds.get("ImagerPixelSpacing") or ()) == 2
        )
        return complete and super()._is_projection_radiography(ds)


def _image_library(sources: Sequence[pydicom.Dataset]) -> ContainerContentItem:
    """TID 1600 Image Library: one Image Library Group (TID 1601 entry + TID 1602 descriptors) per image."""
    library = ContainerContentItem(
        name=codes.DCM.ImageLibrary, relationship_type=RelationshipTypeValues.CONTAINS
    )
    library.ContentSequence = ContentSequence()
    for src in sources:
        key = (str(src.SOPInstanceUID), *(str(src.get(k, "")) for k in _DESCRIBED))
        with _library_lock:
            group = _library_groups.get(key)
        if group is None:
            group = _library_group(src)
            with _library_lock:
                _library_groups[key] = group
                while len(_library_groups) > _LIBRARY_CACHE:
                    del _library_groups[next(iter(_library_groups))]
        library.ContentSequence.append(group)
    return library


#: Image Library Groups of the last images reported: the reports of every model of a study list the same
#: images (shared as _algorithm_of shares its items). Keyed by the SOP Instance UID and every attribute
#: the group is made of, so an instance received again with other values gets its own.
_library_groups: dict[tuple[str, ...], ContainerContentItem] = {}
_library_lock = threading.Lock()
_LIBRARY_CACHE = 64
_DESCRIBED = (
    "SOPClassUID",
    "Modality",
    "FrameOfReferenceUID",
    "Rows",
    "Columns",
    "PatientOrientation",
    "ImagerPixelSpacing",
    "PixelSpacing",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "SliceThickness",
    "SpacingBetweenSlices",
)


def _library_group(src: pydicom.Dataset) -> ContainerContentItem:
    image = ImageContentItem(
        name=ourcodes.SOURCE,
        referenced_sop_class_uid=src.SOPClassUID,
        referenced_sop_instance_uid=src.SOPInstanceUID,
        relationship_type=RelationshipTypeValues.CONTAINS,
    )
    image.ContentSequence = _EntryDescriptors(src)
    group = ContainerContentItem(
        name=codes.DCM.ImageLibraryGroup, relationship_type=RelationshipTypeValues.CONTAINS
    )
    group.ContentSequence = ContentSequence([image])
    return group


def _check_finding(finding: Finding) -> None:
    if finding.name not in ourcodes.FINDING_CODES:
        raise ValueError(f"unknown finding {finding.name!r}; known: {sorted(ourcodes.FINDING_CODES)}")
    for label, value in (("probability", finding.probability), ("threshold", finding.threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{finding.name}: {label} {value} outside [0, 1]")


def _finding_group(
    finding: Finding, source: pydicom.Dataset, model: ModelInfo, uid: str, label: str
) -> MeasurementsAndQualitativeEvaluations:
    """TID 1501 group: finding type, Present/Absent (CID 241), certainty (TID 300), TID 4019."""
    _check_finding(finding)
    concept = ourcodes.FINDING_CODES[finding.name]
    certainty = Measurement(
        name=ourcodes.CERTAINTY_OF_FINDING,
        value=round(finding.probability * 100.0, 4),
        unit=ourcodes.PERCENT,
        algorithm_id=_algorithm(model, finding),
    )
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=uid, identifier=label),
        finding_type=concept,
        algorithm_id=_algorithm(model, finding),
        measurements=[certainty],
        qualitative_evaluations=[
            QualitativeEvaluation(concept, ourcodes.PRESENT if finding.present else ourcodes.ABSENT)
        ],
        source_images=[SourceImageForMeasurementGroup.from_source_image(source)],
    )


def _not_assessable_group(
    result: ImageResult, source: pydicom.Dataset, model: ModelInfo, uid: str, label: str
) -> MeasurementsAndQualitativeEvaluations:
    """TID 1501 group for an image the model could not assess: "Undetermined" and the reason, no number."""
    concept = ourcodes.FINDING_CODES.get(model.name)
    evaluations = [QualitativeEvaluation(concept, ourcodes.UNDETERMINED)] if concept is not None else None
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=uid, identifier=label),
        algorithm_id=_algorithm(model),
        qualitative_evaluations=evaluations,
        source_images=[SourceImageForMeasurementGroup.from_source_image(source)],
    )
    reason = result.reason or "not assessable"
    if not reason.lower().startswith("not assessable"):
        reason = f"not assessable: {reason}"
    # TID 1501 allows TEXT qualitative evaluations beside the CODE ones.
    group[0].ContentSequence.append(_comment(reason))
    return group


def _without_children(root: pydicom.Dataset) -> pydicom.Dataset:
    """The root content item of a document without its content tree.

    Comprehensive3DSR deep-copies the tree it is given, parses the copy and walks the original once more
    for the images it references, which took most of the time of a report; it gets the root alone and the
    tree is attached afterwards. Its check that every referenced image is in the evidence holds by
    construction here: every IMAGE item is made from one of the sources, and all sources are the evidence.
    """
    shell = pydicom.Dataset()
    for elem in root:
        if elem.keyword != "ContentSequence":
            shell.add(elem)
    shell.ContentSequence = []
    return shell


@holding_shared_items
def build_report(
    *,
    results: Sequence[ImageResult],
    sources: Sequence[pydicom.Dataset],
    model: ModelInfo,
    sop_instance_uid: str,
    series_instance_uid: str,
    series_number: int = 9901,
    instance_number: int = 1,
    previous_report: pydicom.Dataset | None = None,
    institution_name: str | None = None,
) -> Comprehensive3DSR:
    """Build the Comprehensive 3D SR of one model's results on one study.

    Content tree (PS3.16):

    - TID 1500 "Measurement Report", title (126000, DCM, "Imaging Measurement Report"), procedure
      reported (363679005, SCT, "Imaging procedure");
    - TID 1001 observation context with a device observer only (TID 1004): manufacturer
      ``MANUFACTURER``, model name ``model.name``, device UID stable per model version;
    - TID 1600 image library listing every dataset in ``sources``;
    - per (image, finding) one TID 1501 group: tracking identifier + UID (derived from
      ``sop_instance_uid`` and the group index), "Finding" = the finding's SNOMED code, TID 4019
      algorithm identification (name, version, manufacturer, decision threshold as parameter), the
      image as "Source" (CID 7551), a qualitative evaluation finding = Present/Absent (CID 241) and a
      TID 300 measurement "Certainty of Finding" (CID 6048) in percent, itself with TID 4019;
    - per not-assessable image one TID 1501 group: finding = Undetermined (CID 240) plus a TEXT
      "Comment" with the reason, and never a probability;
    - TID 1500 "Qualitative Evaluations" container with a TEXT "Comment" holding
      ``DECISION_SUPPORT_NOTICE`` (AI generated decision support, not a diagnosis).

    Patient and study attributes come from ``sources[0]`` (all sources must share the study).
    Header: Manufacturer ``MANUFACTURER``, ManufacturerModelName ``model.name``, SoftwareVersions
    ``model.version``, SeriesDescription "AI screening: <name> <version>", CompletionFlag COMPLETE,
    VerificationFlag UNVERIFIED, PreliminaryFlag PRELIMINARY. ``previous_report`` (an earlier SR of the
    same study) is listed in the Predecessor Documents Sequence, so this document supersedes it.

    ``sources`` may be read with ``stop_before_pixels=True``. Raises ValueError on inconsistent input
    (no results, results of another model or of images not in ``sources``, unknown finding names,
    probabilities outside [0, 1], mixed studies). Returns a highdicom ``Comprehensive3DSR`` (a
    ``pydicom.Dataset``) with explicit VR little endian file meta; write it with :func:`write_report`.
    """
    if not results:
        raise ValueError("a report needs at least one result")
    if not sources:
        raise ValueError("a report needs at least one source image")
    study_uid = sources[0].StudyInstanceUID
    if any(src.StudyInstanceUID != study_uid for src in sources):
        raise ValueError("all sources must belong to one study")
    if previous_report is not None and previous_report.StudyInstanceUID != study_uid:
        raise ValueError("previous_report belongs to another study")
    by_uid = {src.SOPInstanceUID: src for src in sources}
    image_numbers = {uid: number for number, uid in enumerate(by_uid, start=1)}

    groups: list[MeasurementsAndQualitativeEvaluations] = []
    for result in results:
        if result.model != model:
            raise ValueError(f"result of model {result.model.name!r} in a report of {model.name!r}")
        source = by_uid.get(result.instance.sop_instance_uid)
        if source is None:
            raise ValueError(f"result for {result.instance.sop_instance_uid}, which is not among sources")
        image_no = image_numbers[result.instance.sop_instance_uid]
        if not result.assessable:
            index = len(groups)
            uid = generate_uid(entropy_srcs=[sop_instance_uid, "group", str(index)])
            groups.append(
                _not_assessable_group(result, source, model, uid, f"image {image_no}: not assessable")
            )
            continue
        for finding in result.findings:
            index = len(groups)
            uid = generate_uid(entropy_srcs=[sop_instance_uid, "group", str(index)])
            groups.append(_finding_group(finding, source, model, uid, f"image {image_no}: {finding.name}"))
    if not groups:
        raise ValueError("results contain no finding and no not-assessable image")

    observer = ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=_device_uid(model),
            name=model.display_name or model.name,
            manufacturer_name=MANUFACTURER,
            model_name=model.name,
        ),
    )
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=ourcodes.IMAGING_PROCEDURE,
        imaging_measurements=groups,
    )
    content = report[0].ContentSequence
    # highdicom's own TID 1600 cannot list CRs lacking TID 1603 inputs; ours goes where TID 1500 puts it,
    # just before "Imaging Measurements".
    content.insert(len(content) - 1, _image_library(sources))
    # TID 1500 row "Qualitative Evaluations" (not built by highdicom 0.28): the notice, as TEXT.
    notice = ContainerContentItem(
        name=ourcodes.QUALITATIVE_EVALUATIONS, relationship_type=RelationshipTypeValues.CONTAINS
    )
    reported = [f.name for r in results for f in r.findings]
    texts = [DECISION_SUPPORT_NOTICE, *cautions(model.name, reported)]
    notice.ContentSequence = ContentSequence([_comment(text) for text in texts])
    content.append(notice)

    description = f"AI screening: {model.name} {model.version}"[:64]
    root = report[0]
    sr = Comprehensive3DSR(
        evidence=list(sources),
        content=_without_children(root),
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=model.name,
        software_versions=model.version,
        series_description=description,
        institution_name=institution_name,
        is_complete=True,
        is_final=False,
        is_verified=False,
        previous_versions=[previous_report] if previous_report is not None else None,
    )
    sr.ContentSequence = root.ContentSequence
    # The content view highdicom keeps beside the dataset (`sr.content`): what from_dataset(sr, copy=False)
    # would parse out of the tree again, which is `report` itself (tests/reporting/test_sr.py checks it).
    sr._content = report
    log.info(
        "built SR %s (series %s) of %s %s with %d groups",
        sop_instance_uid,
        series_instance_uid,
        model.name,
        model.version,
        len(groups),
    )
    return sr


#: The code sequences of content items (concept names, coded values, measurement units): one item of a few
#: strings each, a hundred per report, most of them the same few dozen codes in every report.
_CODE_SEQUENCES = frozenset(
    int(pydicom.datadict.tag_for_keyword(k))  # type: ignore[arg-type]
    for k in ("ConceptNameCodeSequence", "ConceptCodeSequence", "MeasurementUnitsCodeSequence")
)
_encoded_codes: dict[tuple[object, ...], RawDataElement] = {}
_ENCODED_CODES_MAX = 4096


def _encoded_code(elem: DataElement, encodings: object) -> RawDataElement | None:
    """The code sequence ``elem`` as pydicom writes it (explicit VR little endian), as a raw element that
    pydicom's writer copies as it is; None for one that is not a single item of plain ASCII strings."""
    seq = elem.value
    if elem.is_undefined_length or len(seq) != 1 or seq[0].get("is_undefined_length_sequence_item"):
        return None
    parts: list[object] = [int(elem.tag), str(encodings)]
    for item_elem in seq[0]:
        value = item_elem.value
        if item_elem.VR == VR.SQ or type(value) is not str or not value.isascii():
            return None
        parts.append((int(item_elem.tag), item_elem.VR, value))
    key = tuple(parts)
    raw = _encoded_codes.get(key)
    if raw is None:
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_data_element(fp, elem, encodings)  # type: ignore[arg-type]
        data = fp.getvalue()
        value_bytes = data[12:]  # after tag (4), "SQ", 2 reserved bytes and the 4-byte length
        if data[4:6] != b"SQ" or int.from_bytes(data[8:12], "little") != len(value_bytes):
            return None
        raw = RawDataElement(elem.tag, "SQ", len(value_bytes), value_bytes, 0, False, True)
        if len(_encoded_codes) >= _ENCODED_CODES_MAX:
            _encoded_codes.clear()
        _encoded_codes[key] = raw
    return raw


def _encode_once(ds: pydicom.Dataset) -> list[tuple[pydicom.Dataset, DataElement]]:
    """Resolve the ambiguous VRs of the whole tree once, mark every dataset in it as already in the
    encoding it will be written in (explicit VR little endian, its own character set), and put the encoded
    bytes of each code sequence in place of the sequence; returns what to put back after writing.

    pydicom's writer corrects ambiguous VRs in every dataset whose original encoding differs from the
    output's, recursively, and does so again for each nested item as it writes it: for a tree built in
    memory (no original encoding anywhere) that is once per level of nesting, most of the time of writing a
    report. Code sequences are half the elements of a report and nearly all alike: each distinct one is
    encoded by pydicom once per process, and the writer copies those bytes (pydicom writes a raw element as
    it is). A shared item is visited once. The bytes written are the same (tests/reporting/test_sr.py
    compares them).
    """
    correct_ambiguous_vr(ds, True)
    swapped: list[tuple[pydicom.Dataset, DataElement]] = []
    seen: set[int] = set()
    todo = [ds]
    while todo:
        item = todo.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        charset = item._character_set
        item.set_original_encoding(False, True, charset)  # what the writer compares with
        for elem in item:
            if elem.VR != VR.SQ:
                continue
            if int(elem.tag) in _CODE_SEQUENCES:
                raw = _encoded_code(elem, charset)
                if raw is not None:
                    swapped.append((item, elem))
                    item._dict[elem.tag] = raw
                    continue
            todo.extend(elem.value)
    return swapped


def write_report(ds: pydicom.Dataset, path: Path) -> Path:
    """Write ``ds`` atomically as a DICOM file (Part 10 header, explicit VR little endian).

    An encapsulated (compressed) transfer syntax already in ``ds.file_meta`` is kept. Readers see either the
    old file or the complete new one (core.storage.write_atomic).
    """
    meta = ds.file_meta if hasattr(ds, "file_meta") else FileMetaDataset()
    transfer_syntax = meta.get("TransferSyntaxUID")
    if transfer_syntax is None or not transfer_syntax.is_compressed:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    buffer = io.BytesIO()
    with SHARED_ITEMS:
        swapped = _encode_once(ds)
        try:
            ds.save_as(buffer, enforce_file_format=True)
        finally:
            for item, elem in reversed(swapped):  # the tree as it was, shared items included
                item._dict[elem.tag] = elem
    return write_atomic(Path(path), buffer.getbuffer())


__all__ = [
    "build_report",
    "input_hash",
    "report_series_uid",
    "report_uid",
    "write_report",
]
