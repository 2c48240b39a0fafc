"""Radiologists' decisions on AI reports: what each image of a report asks, and the append-only reviews.

A review is one reviewer's answer for every image of one AI report (confirm, correct to another label, or not
assessable with a reason), with an optional comment, a flag for a second reader and, for glaucoma, clinical
data. Saving never changes an earlier review: a revision is the next version. Each review queues the job that
writes its verified SR, in the same transaction, with its audit row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from core import audit, labels
from core.jobs import VERIFY_REVIEW, enqueue
from core.tables import Instance, Prediction, Report, Review, Study, User, utcnow
from core.worklist import refresh_case


class DecisionError(ValueError):
    """A review that cannot be saved as given (HTTP 422)."""


class ReviewConflict(DecisionError):
    """Someone saved another version meanwhile (HTTP 409): reload and decide again."""


class ClinicalData(BaseModel):
    """What the glaucoma service asks for once a finding is decided; every field optional."""

    model_config = ConfigDict(extra="forbid")

    age: int | None = Field(None, ge=0, le=130, description="years")
    sex: Literal["F", "M", "O"] | None = None
    laterality: Literal["R", "L"] | None = Field(None, description="eye: R right, L left")
    intraocular_pressure: float | None = Field(None, ge=0, le=80, description="mmHg")
    cup_to_disc_ratio: float | None = Field(None, ge=0, le=1)
    known_diagnosis: str | None = Field(None, max_length=128)


class Answer(BaseModel):
    """The reviewer's label for one image: a label key of the model, or ``not_assessable`` with a reason."""

    model_config = ConfigDict(extra="forbid")

    sop_instance_uid: str = Field(max_length=64)
    label: str = Field(max_length=32)
    reason: str | None = Field(None, max_length=255)


@dataclass(frozen=True)
class ImageQuestion:
    """One image of an AI report as the reviewer sees it."""

    sop_instance_uid: str
    instance_id: int
    assessable: bool
    reason: str | None
    findings: list[dict[str, Any]] = field(default_factory=list)  # finding, probability, threshold, label
    ai_label: str = labels.NOT_ASSESSABLE


def report_images(session: Session, report: Report) -> list[ImageQuestion]:
    """The images of an AI report, in report order, with the AI's findings and the label they amount to."""
    rows = session.execute(
        select(Prediction, Instance.sop_instance_uid)
        .join(Instance, Instance.id == Prediction.instance_id)
        .where(Prediction.report_id == report.id)
        .order_by(Prediction.id)
    ).all()
    by_instance: dict[int, tuple[str, list[Prediction]]] = {}
    for prediction, sop_uid in rows:
        by_instance.setdefault(prediction.instance_id, (sop_uid, []))[1].append(prediction)
    out = []
    for instance_id, (sop_uid, predictions) in by_instance.items():
        assessable = all(p.assessable for p in predictions)
        findings = [
            {"finding": p.finding, "probability": p.probability, "threshold": p.threshold, "label": p.label}
            for p in predictions
            if p.assessable and p.finding
        ]
        ai = (
            labels.ai_label(
                report.model_name,
                {
                    str(f["finding"]): (float(f["probability"] or 0.0), f["label"] == "present")
                    for f in findings
                },
            )
            if assessable
            else labels.NOT_ASSESSABLE
        )
        out.append(
            ImageQuestion(
                sop_instance_uid=sop_uid,
                instance_id=instance_id,
                assessable=assessable,
                reason=next((p.reason for p in predictions if p.reason), None),
                findings=findings,
                ai_label=ai,
            )
        )
    return out


def latest_review(session: Session, report_id: int) -> Review | None:
    return session.scalars(
        select(Review).where(Review.report_id == report_id).order_by(Review.version.desc()).limit(1)
    ).first()


def _answers(report: Report, images: list[ImageQuestion], given: list[Answer]) -> list[dict[str, Any]]:
    by_uid = {a.sop_instance_uid: a for a in given}
    unknown = sorted(set(by_uid) - {i.sop_instance_uid for i in images})
    if unknown:
        raise DecisionError(f"{report.model_name}: images not in the report: {', '.join(unknown)}")
    if len(by_uid) != len(given):
        raise DecisionError(f"{report.model_name}: one answer per image")
    out = []
    for image in images:
        answer = by_uid.get(image.sop_instance_uid)
        if answer is None:
            raise DecisionError(f"{report.model_name}: no answer for image {image.sop_instance_uid}")
        names = [str(f["finding"]) for f in image.findings]
        keys = [lab.key for lab in labels.labels_of(report.model_name, names)]
        if answer.label == labels.NOT_ASSESSABLE:
            reason = (answer.reason or "").strip()
            if not reason:
                raise DecisionError(
                    f"{report.model_name}: say why image {image.sop_instance_uid} is not assessable"
                )
            action = "not assessable"
        elif answer.label in keys:
            reason = None
            action = "confirmed" if answer.label == image.ai_label else "corrected"
        else:
            raise DecisionError(
                f"{report.model_name}: unknown label {answer.label!r}; "
                f"one of {', '.join(keys)} or not_assessable"
            )
        out.append(
            {
                "sop_instance_uid": image.sop_instance_uid,
                "ai_label": image.ai_label,
                "label": answer.label,
                "action": action,
                "reason": reason,
            }
        )
    return out


def save_review(
    session: Session,
    *,
    report: Report,
    user: User,
    answers: list[Answer],
    base_version: int,
    comment: str | None = None,
    flagged: bool = False,
    clinical: ClinicalData | None = None,
    actor: str,
    client: str | None = None,
    band: float | None = None,
    sample_share: float = 0.0,
) -> tuple[Review, bool]:
    """Record ``user``'s decision on ``report``; (the review, whether it is new).

    ``base_version`` is the version the reviewer saw (0: none). A newer one saved meanwhile is a conflict,
    unless it is this very decision (a retried request), which is returned as it is. ``band``: the
    uncertain band the worklist case is tagged with (GATEWAY_REVIEW__UNCERTAIN_BAND), ``sample_share`` its
    verification sample (GATEWAY_REVIEW__NEGATIVE_SAMPLE_SHARE).
    """
    study = session.get(Study, report.study_id)
    assert study is not None
    images = report_images(session, report)
    rows = _answers(report, images, answers)
    comment = (comment or "").strip() or None
    clinical_values = (clinical or ClinicalData()).model_dump(exclude_none=True)
    latest = latest_review(session, report.id)
    latest_version = latest.version if latest else 0
    if latest is not None and latest_version == base_version + 1 and latest.user_id == user.id:
        same = (
            latest.answers == rows
            and latest.comment == comment
            and latest.flagged == flagged
            and latest.clinical == clinical_values
        )
        if same:
            return latest, False
    if latest_version != base_version:
        who = latest.full_name or latest.username if latest else "nobody"
        raise ReviewConflict(
            f"{report.model_name}: version {latest_version} was saved by {who} meanwhile "
            f"(you decided on version {base_version}); reload the case"
        )
    review = Review(
        study_id=study.id,
        report_id=report.id,
        model_name=report.model_name,
        model_version=report.model_version,
        version=latest_version + 1,
        user_id=user.id,
        username=user.username,
        full_name=user.full_name,
        at=utcnow(),
        answers=rows,
        comment=comment,
        flagged=flagged,
        clinical=clinical_values,
    )
    session.add(review)
    session.flush()
    enqueue(
        session,
        kind=VERIFY_REVIEW,
        priority=20,
        payload={"review_id": review.id},
        study_id=study.id,
        dedupe_key=f"review:{review.id}",
    )
    audit.record(
        session,
        actor=actor,
        action="decision.create" if review.version == 1 else "decision.revise",
        study_uid=study.study_instance_uid,
        client=client,
        detail={
            "model": report.model_name,
            "report": report.sop_instance_uid,
            "version": review.version,
            "labels": [r["label"] for r in rows],
            "actions": [r["action"] for r in rows],
            "flagged": flagged,
        },
    )
    refresh_case(session, study.id, band=band, sample_share=sample_share)
    return review, True


def changes(previous: Review | None, review: Review) -> list[str]:
    """What ``review`` changed against ``previous``, in words, for the case page's history."""
    number = {a["sop_instance_uid"]: n for n, a in enumerate(review.answers, start=1)}
    many = len(review.answers) > 1

    def title(answer: dict[str, Any]) -> str:
        where = f"image {number[answer['sop_instance_uid']]}: " if many else ""
        return where + labels.label_title(review.model_name, answer["label"])

    if previous is None:
        return [f"{a['action']} {title(a)}" for a in review.answers]
    out = []
    before = {a["sop_instance_uid"]: a for a in previous.answers}
    for a in review.answers:
        old = before.get(a["sop_instance_uid"])
        if old is None or old["label"] != a["label"]:
            was = labels.label_title(review.model_name, old["label"]) if old else "-"
            out.append(f"{title(a)} (was {was})")
    if previous.comment != review.comment:
        out.append("comment changed")
    if previous.flagged != review.flagged:
        out.append("flagged" if review.flagged else "flag removed")
    if previous.clinical != review.clinical:
        out.append("clinical data changed")
    return out or ["saved again, unchanged"]
