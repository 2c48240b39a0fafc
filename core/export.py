"""What a label export contains: every image a radiologist decided on, by its current (latest) review,
with the AI's answer beside the reviewer's. Pseudonyms and files are the composition root's
(gateway.export): this module only reads the database."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core import labels
from core.tables import Instance, Prediction, Report, Review, Series, Study, User

Decision = Literal["confirmed", "corrected", "any"]
DECISIONS: tuple[Decision, ...] = ("confirmed", "corrected", "any")


@dataclass(frozen=True)
class ExportFilter:
    model: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    label: str | None = None
    #: confirmed: the reviewer kept the AI's label; corrected: changed it; any: also "not assessable".
    decision: Decision = "confirmed"


@dataclass(frozen=True)
class ReviewedImage:
    """One image's decision: the unit of a manifest row."""

    review_id: int
    study_instance_uid: str
    sop_instance_uid: str
    path: str  # the instance file, relative to the storage folder
    modality: str | None
    body_part: str | None
    model_name: str
    model_version: str
    #: finding -> probability, of the AI report the review decided on
    probabilities: dict[str, float]
    ai_label: str
    label: str
    action: str  # confirmed | corrected | not assessable
    reviewer_role: str
    decided_at: datetime
    clinical: dict[str, Any]

    @property
    def primary_probability(self) -> float | None:
        """The probability of the model's first finding (the one its question is about)."""
        return next(iter(self.probabilities.values()), None)


def reviewed_images(session: Session, f: ExportFilter) -> Iterator[ReviewedImage]:
    """Every image of every current review that passes ``f``, oldest decision first."""
    latest = (
        select(Review.report_id, func.max(Review.version).label("version"))
        .group_by(Review.report_id)
        .subquery()
    )
    query = (
        select(Review, Report, Study.study_instance_uid, User.role)
        .join(latest, (latest.c.report_id == Review.report_id) & (latest.c.version == Review.version))
        .join(Report, Report.id == Review.report_id)
        .join(Study, Study.id == Review.study_id)
        .outerjoin(User, User.id == Review.user_id)
        .order_by(Review.at, Review.id)
    )
    if f.model:
        query = query.where(Review.model_name == f.model)
    if f.since:
        query = query.where(Review.at >= f.since)
    if f.until:
        query = query.where(Review.at < f.until)
    for review, report, study_uid, role in session.execute(query):
        answers = [a for a in review.answers if _wanted(a, f)]
        if not answers:
            continue
        instances = _instances(session, [a["sop_instance_uid"] for a in answers])
        probabilities = _probabilities(session, report.id)
        for answer in answers:
            found = instances.get(answer["sop_instance_uid"])
            if found is None:  # the instance was deleted since
                continue
            instance, series = found
            yield ReviewedImage(
                review_id=review.id,
                study_instance_uid=study_uid,
                sop_instance_uid=instance.sop_instance_uid,
                path=instance.path,
                modality=series.modality,
                body_part=series.body_part_examined,
                model_name=review.model_name,
                model_version=review.model_version,
                probabilities=probabilities.get(instance.id, {}),
                ai_label=answer["ai_label"],
                label=answer["label"],
                action=answer["action"],
                reviewer_role=role or "radiologist",
                decided_at=review.at,
                clinical=dict(review.clinical or {}),
            )


def _wanted(answer: dict[str, Any], f: ExportFilter) -> bool:
    if f.decision != "any" and answer["action"] != f.decision:
        return False
    if f.decision != "any" and answer["label"] == labels.NOT_ASSESSABLE:
        return False
    return f.label is None or answer["label"] == f.label


def _instances(session: Session, sop_uids: list[str]) -> dict[str, tuple[Instance, Series]]:
    rows = session.execute(
        select(Instance, Series)
        .join(Series, Series.id == Instance.series_id)
        .where(Instance.sop_instance_uid.in_(sop_uids))
    )
    return {instance.sop_instance_uid: (instance, series) for instance, series in rows}


def _probabilities(session: Session, report_id: int) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    rows = session.execute(
        select(Prediction.instance_id, Prediction.finding, Prediction.probability)
        .where(Prediction.report_id == report_id, Prediction.finding.is_not(None))
        .order_by(Prediction.id)
    )
    for instance_id, finding, probability in rows:
        if finding is not None and probability is not None:
            out.setdefault(instance_id, {})[finding] = float(probability)
    return out
