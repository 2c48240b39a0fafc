"""The verified SR: a radiologist's reviewed decision on one AI report, as a TID 1500 Comprehensive 3D SR.

Also the deterministic UIDs of those documents. The AI report itself is built by :mod:`reporting.sr`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import pydicom
from highdicom.sr import (
    Comprehensive3DSR,
    ContainerContentItem,
    ContentSequence,
    DeviceObserverIdentifyingAttributes,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    PersonObserverIdentifyingAttributes,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    TrackingIdentifier,
)
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from pydicom.valuerep import DA, DT, TM

from core.domain import DECISION_SUPPORT_NOTICE, MANUFACTURER, ModelInfo
from reporting import codes as ourcodes
from reporting.sr import (
    _UID_NAMESPACE,
    _comment,
    _device_uid,
    _image_library,
    _without_children,
    holding_shared_items,
)

log = logging.getLogger(__name__)

#: What the reviewer did with an image's AI result (ReviewedFinding.action).
REVIEW_ACTIONS = ("confirmed", "corrected", "not assessable")

FLAGGED_TEXT = "Flagged for a second reader"


@dataclass(frozen=True)
class ReviewedFinding:
    """The reviewer's final value for one (image, finding) of the AI report."""

    sop_instance_uid: str  # the source image (must be among `sources`)
    finding: str | None  # a key of reporting.codes.FINDING_CODES; None: the image was judged not assessable
    present: bool | None  # final value (None when not assessable)
    ai_present: bool | None  # what the AI said (None when the AI said not assessable)
    ai_probability: float | None  # in [0, 1]
    ai_threshold: float | None  # in [0, 1]
    action: str  # one of REVIEW_ACTIONS (the image's: its label confirmed or corrected, or not assessable)
    reason: str | None = None  # why not assessable (reviewer's reason), required when not assessable


@dataclass(frozen=True)
class Reviewer:
    """The person accountable for the verified SR."""

    name: str  # DICOM PN ("Doe^Jane") or plain ("Jane Doe", "Doe, Jane"): see person_name()
    login: str
    organization: str


def verified_report_uid(ai_report_uid: str, version: int) -> str:
    """SOP Instance UID of decision ``version`` on the AI report ``ai_report_uid``: a retry is a duplicate."""
    return generate_uid(entropy_srcs=[_UID_NAMESPACE, "verified", ai_report_uid, str(version)])


def verified_series_uid(study_uid: str, model: ModelInfo) -> str:
    """Series Instance UID of the verified SRs of ``model`` (name and version) in a study."""
    return generate_uid(
        entropy_srcs=[_UID_NAMESPACE, "verified series", study_uid, model.name, model.version]
    )


def person_name(name: str) -> str:
    """``name`` as DICOM PN: kept when it has a caret, "Doe, Jane" and "Jane Doe" become "Doe^Jane".

    With more than two words the last one is taken as the family name ("Jane Mary Doe" -> "Doe^Jane Mary");
    a single word is a family name ("Doe^"), as highdicom refuses a PN without a caret.
    """
    name = " ".join(name.split())
    if not name or "\\" in name:
        raise ValueError(f"invalid reviewer name {name!r}")
    if "^" in name:
        pn = name
    elif "," in name:
        family, _, given = name.partition(",")
        pn = f"{family.strip()}^{given.strip()}"
    else:
        words = name.split(" ")
        pn = f"{words[-1]}^{' '.join(words[:-1])}"
    if any(len(component) > 64 for component in pn.split("^")):
        raise ValueError(f"reviewer name {name!r} has a component longer than 64 characters")
    return pn


def _check(item: ReviewedFinding) -> None:
    where = f"{item.sop_instance_uid} {item.finding or '(image)'}"
    if item.action not in REVIEW_ACTIONS:
        raise ValueError(f"{where}: action {item.action!r} is not one of {REVIEW_ACTIONS}")
    if item.finding is not None and item.finding not in ourcodes.FINDING_CODES:
        raise ValueError(f"unknown finding {item.finding!r}; known: {sorted(ourcodes.FINDING_CODES)}")
    for label, value in (("probability", item.ai_probability), ("threshold", item.ai_threshold)):
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"{where}: AI {label} {value} outside [0, 1]")
    if (item.action == "not assessable") != (item.present is None):
        raise ValueError(f"{where}: a final value goes with confirmed/corrected, none with not assessable")
    if item.finding is None and item.action != "not assessable":
        raise ValueError(f"{where}: a decision without a finding must be 'not assessable'")
    if item.action == "not assessable" and not (item.reason or "").strip():
        raise ValueError(f"{where}: not assessable needs the reviewer's reason")


def _label(present: bool | None) -> str:
    return "not assessable" if present is None else "present" if present else "absent"


def _ai_text(item: ReviewedFinding, model: ModelInfo) -> str:
    """The AI's original result and the reviewer's action: "AI (glaucoma 1.1.0): present, ..."."""
    text = f"AI ({model.name} {model.version}): {_label(item.ai_present)}"
    if item.ai_present is not None and item.ai_probability is not None:
        text += f", certainty {item.ai_probability * 100:.1f} %"
        if item.ai_threshold is not None:
            text += f" at threshold {item.ai_threshold * 100:.1f} %"
    # Per finding, from the values: an image's label "corrected" may keep some of its findings as they were.
    if item.present is None or item.ai_present is None:
        return f"{text}; reviewer: {_label(item.present)}"
    if item.present == item.ai_present:
        return f"{text}; reviewer: confirmed"
    return f"{text}; reviewer: corrected to {_label(item.present)}"


def _group(
    item: ReviewedFinding, source: pydicom.Dataset, model: ModelInfo, uid: str, image_no: int
) -> MeasurementsAndQualitativeEvaluations:
    """TID 1501 group: the reviewer's final Present/Absent (or Undetermined) and the AI's result as TEXT."""
    finding_type = ourcodes.FINDING_CODES[item.finding] if item.finding is not None else None
    # Not assessable as a whole: Undetermined on the model's own finding, as reporting.sr does.
    concept = finding_type or ourcodes.FINDING_CODES.get(model.name)
    value = {None: ourcodes.UNDETERMINED, True: ourcodes.PRESENT, False: ourcodes.ABSENT}[item.present]
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=uid, identifier=f"image {image_no}: {item.finding or 'not assessable'}"
        ),
        finding_type=finding_type,
        qualitative_evaluations=[QualitativeEvaluation(concept, value)] if concept is not None else None,
        source_images=[SourceImageForMeasurementGroup.from_source_image(source)],
    )
    # TID 1501 TEXT qualitative evaluations: the reviewer's reason, then the AI's original result. The
    # AI's certainty is no TID 300 measurement here: this document's observer is the reviewer.
    if item.present is None:
        reason = (item.reason or "").strip()
        if not reason.lower().startswith("not assessable"):
            reason = f"not assessable: {reason}"
        group[0].ContentSequence.append(_comment(reason))
    group[0].ContentSequence.append(_comment(_ai_text(item, model)))
    return group


def _observation_context(reviewer: Reviewer, model: ModelInfo) -> ObservationContext:
    """TID 1001: the reviewer (TID 1003, role "Verifying"), then the model whose result was reviewed."""
    person = ObserverContext(
        observer_type=codes.cid270.Person,
        observer_identifying_attributes=PersonObserverIdentifyingAttributes(
            name=reviewer.name,
            login_name=reviewer.login,
            organization_name=reviewer.organization,
            # TID 1003 "Person Observer's Role in this Procedure": CID 7453 "Performing Roles".
            role_in_procedure=codes.cid7453.Verifying,
        ),
    )
    device = ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=_device_uid(model),
            name=model.display_name or model.name,
            manufacturer_name=MANUFACTURER,
            model_name=model.name,
        ),
    )
    return ObservationContext(observer_person_context=person, observer_device_context=device)


def _character_set(source: pydicom.Dataset, texts: Sequence[str | None]) -> str | list[str] | None:
    """The source's Specific Character Set (as highdicom would copy it), or UTF-8 for non-ASCII text of ours.

    A reviewer's name or comment is typed, not read from the images: "Müller" in a document declaring the
    default repertoire is invalid DICOM. pydicom re-encodes the values read from the sources on writing.
    """
    if all(text is None or text.isascii() for text in texts):
        return source.get("SpecificCharacterSet")
    return "ISO_IR 192"


def _check_documents(
    sources: Sequence[pydicom.Dataset],
    ai_report: pydicom.Dataset,
    previous_verified: pydicom.Dataset | None,
    model: ModelInfo,
    sop_instance_uid: str,
) -> None:
    if not sources:
        raise ValueError("a verified report needs at least one source image")
    study_uid = sources[0].StudyInstanceUID
    if any(src.StudyInstanceUID != study_uid for src in sources):
        raise ValueError("all sources must belong to one study")
    patient_id = sources[0].get("PatientID")
    for label, doc in (("ai_report", ai_report), ("previous_verified", previous_verified)):
        if doc is not None and (doc.StudyInstanceUID != study_uid or doc.get("PatientID") != patient_id):
            raise ValueError(f"{label} belongs to another study or patient than the sources")
    model_of_report = (ai_report.get("ManufacturerModelName"), ai_report.get("SoftwareVersions"))
    if model_of_report != (None, None) and model_of_report != (model.name, model.version):
        raise ValueError(f"ai_report is of model {model_of_report}, not of {model.name} {model.version}")
    if sop_instance_uid in {ai_report.SOPInstanceUID, getattr(previous_verified, "SOPInstanceUID", None)}:
        raise ValueError("a verified report cannot have its own SOP Instance UID as a predecessor")


@holding_shared_items
def build_verified_report(
    *,
    ai_report: pydicom.Dataset,
    sources: Sequence[pydicom.Dataset],
    findings: Sequence[ReviewedFinding],
    reviewer: Reviewer,
    verified_at: datetime,
    model: ModelInfo,
    sop_instance_uid: str,
    series_instance_uid: str,
    series_number: int,
    instance_number: int = 1,
    previous_verified: pydicom.Dataset | None = None,
    comment: str | None = None,
    flagged: bool = False,
    institution_name: str | None = None,
) -> Comprehensive3DSR:
    """Build the Comprehensive 3D SR of a reviewer's final decision on the AI report ``ai_report``.

    Content tree (PS3.16), the structure of :func:`reporting.sr.build_report`:

    - TID 1500 "Measurement Report", title (126000, DCM, "Imaging Measurement Report"), procedure
      reported (363679005, SCT, "Imaging procedure");
    - TID 1001 observation context: first the reviewer as person observer (TID 1002 observer type
      (121006, DCM, "Person"), TID 1003 name as PN, login name, organization name, role in this procedure
      (121098, DCM, "Verifying") of CID 7453), then the reviewed model as device observer (TID 1004, as
      in the AI report);
    - TID 1600 image library listing every dataset in ``sources``;
    - per ReviewedFinding one TID 1501 group: tracking identifier "image N: <finding>" + UID (derived
      from ``sop_instance_uid`` and the group index), "Finding" = the finding's SNOMED code, the image as
      "Source" (CID 7551), a qualitative evaluation = the reviewer's final Present/Absent (CID 241), and a
      TEXT "Comment" with the AI's original result and, from the two values, the reviewer's ("AI
      (glaucoma 1.1.0): present, certainty 91.2 % at threshold 41.9 %; reviewer: corrected to absent" or
      "...; reviewer: confirmed"). No TID 300 measurement and no TID 4019: the evaluations are the
      reviewer's, the AI's certainty is only quoted;
    - a not-assessable decision: Undetermined (CID 240) and a TEXT "Comment" with the reviewer's reason
      (tracking identifier "image N: not assessable" when the whole image was not assessable);
    - TID 1500 "Qualitative Evaluations" container, TEXT "Comment" items: ``DECISION_SUPPORT_NOTICE``,
      the reviewer's ``comment`` when given, and "Flagged for a second reader" when ``flagged``.

    Header (PS3.3 C.17.2 SR Document General): VerificationFlag VERIFIED with one Verifying Observer
    (PN name, organization, VerificationDateTime = ``verified_at``), CompletionFlag COMPLETE,
    PreliminaryFlag FINAL; the Predecessor Documents Sequence lists ``ai_report`` and, for a
    revision, ``previous_verified``. Manufacturer ``MANUFACTURER``, ManufacturerModelName ``model.name``,
    SoftwareVersions ``model.version``, SeriesDescription "Reviewed: <name> <version>". Patient and study
    attributes come from ``sources[0]``, SpecificCharacterSet too unless text of ours is not ASCII
    (then ISO_IR 192, UTF-8). ContentDate/Time, InstanceCreationDate/Time, VerificationDateTime and
    highdicom's ContributionDateTime are ``verified_at`` in the machine's local time zone (DA and TM have
    no offset; the AI report's are local too), so the same decision always gives the same bytes on one
    machine (with the same highdicom version), whatever zone ``verified_at`` is given in.

    Raises ValueError on inconsistent input: no findings, unknown finding names, probabilities outside
    [0, 1], an action not in REVIEW_ACTIONS, "not assessable" with a final value (or another action
    without one), not assessable without reason, images not in ``sources``, two decisions on one finding
    or on a not-assessable image, mixed studies, an ``ai_report`` (or ``previous_verified``) of another
    study or model, a naive ``verified_at``.
    Write the result with :func:`reporting.sr.write_report`.
    """
    if not findings:
        raise ValueError("a verified report needs at least one reviewed finding")
    if verified_at.utcoffset() is None:
        raise ValueError("verified_at must be timezone-aware")
    # DA/TM carry no offset and mean local time, as in the AI report (and the sources' StudyDate/Time).
    local = verified_at.astimezone()
    reviewer = Reviewer(
        name=person_name(reviewer.name),
        login=reviewer.login.strip(),
        organization=reviewer.organization.strip(),
    )
    if not reviewer.organization or len(reviewer.organization) > 64 or not reviewer.login:
        raise ValueError("the reviewer needs a login and an organization of at most 64 characters")
    _check_documents(sources, ai_report, previous_verified, model, sop_instance_uid)
    by_uid = {src.SOPInstanceUID: src for src in sources}
    image_numbers = {uid: number for number, uid in enumerate(by_uid, start=1)}

    groups: list[MeasurementsAndQualitativeEvaluations] = []
    decided: dict[str, set[str | None]] = {}  # image -> findings decided (None: the whole image)
    for index, item in enumerate(findings):
        _check(item)
        source = by_uid.get(item.sop_instance_uid)
        if source is None:
            raise ValueError(f"finding for {item.sop_instance_uid}, which is not among sources")
        earlier = decided.setdefault(item.sop_instance_uid, set())
        if item.finding in earlier or (earlier and (item.finding is None or None in earlier)):
            raise ValueError(f"conflicting decisions on {item.sop_instance_uid} {item.finding or '(image)'}")
        earlier.add(item.finding)
        uid = generate_uid(entropy_srcs=[sop_instance_uid, "group", str(index)])
        groups.append(_group(item, source, model, uid, image_numbers[item.sop_instance_uid]))

    report = MeasurementReport(
        observation_context=_observation_context(reviewer, model),
        procedure_reported=ourcodes.IMAGING_PROCEDURE,
        imaging_measurements=groups,
    )
    content = report[0].ContentSequence
    content.insert(len(content) - 1, _image_library(sources))  # TID 1600 before "Imaging Measurements"
    texts = [DECISION_SUPPORT_NOTICE]
    if comment is not None and comment.strip():
        texts.append(f"Reviewer's comment: {comment.strip()}")
    if flagged:
        texts.append(FLAGGED_TEXT)
    evaluations = ContainerContentItem(
        name=ourcodes.QUALITATIVE_EVALUATIONS, relationship_type=RelationshipTypeValues.CONTAINS
    )
    evaluations.ContentSequence = ContentSequence([_comment(text) for text in texts])
    content.append(evaluations)

    root = report[0]
    # All text typed by people or configured, not read from the sources (see _character_set).
    typed = [*texts, *(i.reason for i in findings), reviewer.name, reviewer.login, reviewer.organization]
    typed += [institution_name, model.display_name]
    previous = [ai_report] if previous_verified is None else [ai_report, previous_verified]
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
        series_description=f"Reviewed: {model.name} {model.version}"[:64],
        institution_name=institution_name,
        is_complete=True,
        is_final=True,
        is_verified=True,
        verifying_observer_name=reviewer.name,
        verifying_organization=reviewer.organization,
        previous_versions=previous,
        specific_character_set=_character_set(sources[0], typed),
        content_date=DA(local.date()),
        content_time=TM(local.time()),
    )
    # highdicom stamps datetime.now() on these three; the decision's own time keeps a retry identical.
    sr.VerifyingObserverSequence[0].VerificationDateTime = DT(local)
    sr.InstanceCreationDate, sr.InstanceCreationTime = DA(local.date()), TM(local.time())
    for equipment in sr.get("ContributingEquipmentSequence", []):
        if equipment.get("ManufacturerModelName") == "highdicom":
            equipment.ContributionDateTime = DT(local)
    sr.ContentSequence = root.ContentSequence
    sr._content = report  # as in reporting.sr.build_report: the parsed view of the attached tree
    log.info(
        "built verified SR %s of AI SR %s (%d groups)",
        sop_instance_uid,
        ai_report.SOPInstanceUID,
        len(groups),
    )
    return sr


__all__ = [
    "FLAGGED_TEXT",
    "REVIEW_ACTIONS",
    "ReviewedFinding",
    "Reviewer",
    "build_verified_report",
    "person_name",
    "verified_report_uid",
    "verified_series_uid",
]
