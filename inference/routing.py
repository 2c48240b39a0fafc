"""Routing rules: which models a series goes to, and why a series is skipped. No TensorFlow here."""

from __future__ import annotations

from dataclasses import dataclass

from pydicom import Dataset

from core.domain import MANUFACTURER
from core.settings import RoutingSettings

SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"  # SC and the multi-frame SC family (.7.1 - .7.4)
SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."  # every Structured Report storage class, KO (.88.59) included
PR_PREFIX = "1.2.840.10008.5.1.4.1.1.11."  # presentation states
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"


@dataclass(frozen=True)
class SeriesInfo:
    """The attributes routing looks at (from the first instance of the series)."""

    modality: str | None
    sop_class_uid: str
    body_part_examined: str | None = None
    series_description: str | None = None
    study_description: str | None = None
    manufacturer: str | None = None

    @classmethod
    def from_dataset(cls, ds: Dataset) -> SeriesInfo:
        return cls(
            modality=ds.get("Modality"),
            sop_class_uid=str(ds.get("SOPClassUID", "")),
            body_part_examined=ds.get("BodyPartExamined"),
            series_description=ds.get("SeriesDescription"),
            study_description=ds.get("StudyDescription"),
            manufacturer=ds.get("Manufacturer"),
        )


@dataclass(frozen=True)
class Route:
    model_name: str | None  # None: skipped
    reason: str

    @property
    def routed(self) -> bool:
        return self.model_name is not None


def route_series(series: SeriesInfo, rules: RoutingSettings) -> list[Route]:
    """Models for ``series`` (one Route each), or a single skip Route with its reason."""
    sop = series.sop_class_uid
    modality = (series.modality or "").strip().upper()
    body_part = (series.body_part_examined or "").strip().upper()
    if (series.manufacturer or "").strip() == MANUFACTURER:
        return [Route(None, f"created by {MANUFACTURER} (loop prevention)")]
    if sop.startswith(SR_PREFIX) or modality in {"SR", "KO"}:
        return [Route(None, "structured report or key object selection")]
    if sop.startswith(PR_PREFIX) or modality == "PR":
        return [Route(None, "presentation state")]
    if sop == SEGMENTATION or modality == "SEG":
        return [Route(None, "segmentation")]

    fundus_reason = _fundus_reason(series, modality, body_part, rules)
    if fundus_reason:
        return [Route(name, fundus_reason) for name in rules.fundus_models]

    if modality in {m.upper() for m in rules.chest_modalities}:
        if body_part in {b.upper() for b in rules.chest_body_parts}:
            why = (
                f"modality {modality}, body part {body_part}"
                if body_part
                else f"modality {modality}, no body part"
            )
            return [Route(name, why) for name in rules.chest_models]
        return [Route(None, f"body part {body_part}")]
    return [Route(None, f"modality {modality or 'missing'} is not routed")]


def _fundus_reason(series: SeriesInfo, modality: str, body_part: str, rules: RoutingSettings) -> str | None:
    if modality in {m.upper() for m in rules.fundus_modalities}:
        return f"modality {modality}"
    if series.sop_class_uid in rules.fundus_sop_classes:
        return f"SOP class {series.sop_class_uid}"
    if series.sop_class_uid.startswith(SECONDARY_CAPTURE_PREFIX) or modality == "OT":
        if body_part in {b.upper() for b in rules.fundus_body_parts}:
            return f"secondary capture, body part {body_part}"
        text = " ".join(filter(None, [series.series_description, series.study_description])).lower()
        for word in rules.fundus_keywords:
            if word.lower() in text:
                return f"secondary capture described as {word!r}"
    return None
