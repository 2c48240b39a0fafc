"""The radiologists' worklist: one case per study with AI results, filtered, counted, ordered by priority, and
claimed while someone reviews it.

``review_case`` and ``review_finding`` are derived rows, rebuilt by :func:`refresh_case` in the transaction
that writes an AI report or a review, so the worklist query never aggregates predictions (10,000 studies stay
fast). Priority: a case with a present finding, or a finding within ``band`` of its threshold (uncertain),
comes first; then the oldest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, case, exists, false, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from core import labels
from core.tables import (
    Instance,
    Prediction,
    Report,
    Review,
    ReviewCase,
    ReviewFinding,
    ReviewTag,
    Series,
    Study,
    User,
    utcnow,
)

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
#: Objects we write beside the SRs (pictures, documents of the result): never a model's result themselves.
DERIVED_CLASSES = (SECONDARY_CAPTURE, ENCAPSULATED_PDF)
STATUSES = ("unreviewed", "in_review", "reviewed", "flagged")
AI_LABELS = ("present", "absent", "uncertain", "not_assessable")


@dataclass(frozen=True)
class WorklistFilter:
    """What the worklist shows; every field None means "any". Dates are DICOM DA strings (YYYYMMDD)."""

    model: str | None = None
    finding: str | None = None
    ai_label: str | None = None  # one of AI_LABELS
    status: str | None = "unreviewed"  # one of STATUSES
    assessable: bool | None = None
    date_from: str | None = None
    date_to: str | None = None
    modality: str | None = None


@dataclass(frozen=True)
class WorklistRow:
    study_instance_uid: str
    accession_number: str | None
    study_date: str
    modality: str | None
    received_at: datetime
    status: str  # one of STATUSES
    priority: int  # 0: positive, uncertain or sampled, 1: the rest
    #: An AI-negative case drawn at random for review (GATEWAY_REVIEW__NEGATIVE_SAMPLE_SHARE), so that the
    #: reviews also measure what the AI missed (without them, sensitivity cannot be measured).
    sampled: bool
    claimed_by: str | None
    claim_expires_at: datetime | None
    findings: list[dict[str, Any]]  # model, finding, label, probability, threshold, uncertain
    #: per (model, image): model, image (number, None for a single image), label, title, positive,
    #: probability (of the label's findings), uncertain
    summary: list[dict[str, Any]]


@dataclass(frozen=True)
class WorklistPage:
    rows: list[WorklistRow]
    total: int
    counts: dict[str, dict[str, int]]  # facet -> value -> cases (the other filters applied)


def current_reports(session: Session, study_id: int) -> list[Report]:
    """The latest AI report of each model for the study (not captures or PDFs, not verified reports)."""
    reports = session.scalars(
        select(Report)
        .where(
            Report.study_id == study_id,
            Report.verification == "UNVERIFIED",
            Report.sop_class_uid.not_in(DERIVED_CLASSES),
        )
        .order_by(Report.id)
    )
    latest: dict[str, Report] = {}
    for report in reports:
        latest[report.model_name] = report
    return sorted(latest.values(), key=lambda r: r.model_name)


def refresh_case(
    session: Session, study_id: int, *, band: float | None = None, sample_share: float = 0.0
) -> ReviewCase | None:
    """Rebuild the study's case from its current AI reports and their reviews (None: no AI report yet).
    With ``band`` (GATEWAY_REVIEW__UNCERTAIN_BAND) its tags also say which findings are uncertain; an
    AI-negative case is drawn for review with probability ``sample_share`` (:func:`sample_draw`)."""
    reports = current_reports(session, study_id)
    if not reports:
        return None
    study = session.get(Study, study_id)
    assert study is not None
    item = session.scalars(select(ReviewCase).where(ReviewCase.study_id == study_id)).first()
    if item is None:
        item = ReviewCase(
            study_id=study_id,
            status="unreviewed",
            study_date=study.study_date or study.first_received_at.strftime("%Y%m%d"),
            received_at=study.first_received_at,
            tags=",",
        )
        session.add(item)
        session.flush()
    predictions = list(
        session.scalars(
            select(Prediction)
            .where(Prediction.report_id.in_([r.id for r in reports]))
            .order_by(Prediction.id)
        )
    )
    session.query(ReviewFinding).filter(ReviewFinding.case_id == item.id).delete()
    margins: list[float] = []
    uncertain: list[tuple[str, str | None, float | None]] = []
    present = _present_by_image(predictions)
    for p in predictions:
        margin = _margin(p, present)
        if margin is not None:
            margins.append(margin)
        uncertain.append((p.model_name, p.finding if p.assessable else None, margin))
        session.add(
            ReviewFinding(
                case_id=item.id,
                prediction_id=p.id,
                model_name=p.model_name,
                finding=p.finding if p.assessable else None,
                label=p.label if p.assessable else None,
                margin=margin,
            )
        )
    modality = session.scalar(
        select(Series.modality)
        .join(Instance, Instance.series_id == Series.id)
        .where(Instance.id.in_([p.instance_id for p in predictions] or [-1]))
        .limit(1)
    )
    item.modality = modality
    item.study_date = study.study_date or study.first_received_at.strftime("%Y%m%d")
    item.received_at = study.first_received_at
    tokens = case_tokens(predictions)
    if band is not None:
        tokens |= uncertain_tokens(uncertain, band)
    item.ai_positive = any(p.assessable and p.label == "present" for p in predictions)
    item.margin = min(margins) if margins else None
    item.assessable = any(p.assessable for p in predictions)
    uncertain_case = band is not None and item.margin is not None and item.margin <= band
    negative = item.assessable and not item.ai_positive and not uncertain_case
    if negative and sample_draw(study.study_instance_uid) < sample_share:
        tokens.add(SAMPLED)
    item.tags = encode_tags(session, tokens)
    latest_reviews = [
        session.scalars(
            select(Review).where(Review.report_id == r.id).order_by(Review.version.desc()).limit(1)
        ).first()
        for r in reports
    ]
    if all(r is not None for r in latest_reviews):
        done = [r for r in latest_reviews if r is not None]
        item.status = "flagged" if any(r.flagged for r in done) else "reviewed"
        item.reviewed_at = max(r.at for r in done)
    else:
        item.status = "unreviewed"
    item.updated_at = utcnow()
    return item


def _present_by_image(predictions: list[Prediction]) -> dict[tuple[str, int], set[str]]:
    out: dict[tuple[str, int], set[str]] = {}
    for p in predictions:
        present = out.setdefault((p.model_name, p.instance_id), set())
        if p.assessable and p.finding and p.label == "present":
            present.add(p.finding)
    return out


def _margin(p: Prediction, present: dict[tuple[str, int], set[str]]) -> float | None:
    """|probability - threshold| of a finding that counts (see core.labels.counts), else None."""
    if not p.assessable or p.probability is None or p.threshold is None or not p.finding:
        return None
    if not labels.counts(p.model_name, p.finding, present.get((p.model_name, p.instance_id), set())):
        return None
    return abs(p.probability - p.threshold)


def _status_expr(now: datetime) -> Any:
    return case(
        (
            and_(ReviewCase.status == "unreviewed", ReviewCase.claim_expires_at > now),
            "in_review",
        ),
        else_=ReviewCase.status,
    )


def _priority_expr(band: float, tags: Tags) -> Any:
    first = or_(ReviewCase.ai_positive.is_(True), ReviewCase.margin <= band, tags.has(SAMPLED))
    return case((first, 0), else_=1)


def _finding_conditions(f: WorklistFilter, band: float) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    if f.model:
        conditions.append(ReviewFinding.model_name == f.model)
    if f.finding:
        conditions.append(ReviewFinding.finding == f.finding)
    if f.ai_label == "present":
        conditions.append(ReviewFinding.label == "present")
    elif f.ai_label == "absent":
        conditions.append(ReviewFinding.label == "absent")
    elif f.ai_label == "uncertain":
        conditions.append(ReviewFinding.margin <= band)
    elif f.ai_label == "not_assessable":
        conditions.append(ReviewFinding.finding.is_(None))
    return conditions


def _token(model: str | None, finding: str | None, label: str | None) -> str:
    parts = [f"{k}={v}" for k, v in (("m", model), ("f", finding), ("l", label)) if v]
    return "|".join(parts)


def case_tokens(predictions: list[Prediction]) -> set[str]:
    """Every combination of model, finding and AI label the case's findings have (token:
    "m=pneumonia|f=covid19|l=present", any part left out): a filter naming any of them is one condition on
    the case row."""
    tokens = set()
    for p in predictions:
        finding = p.finding if p.assessable else None
        label = p.label if p.assessable and p.finding else "not_assessable"
        for model_part in (p.model_name, None):
            for finding_part in (finding, None):
                for label_part in (label, None):
                    token = _token(model_part, finding_part, label_part)
                    if token:
                        tokens.add(token)
    return tokens


#: The tag of an AI-negative case drawn for review (verification sample).
SAMPLED = "sample=negative"


def sample_draw(study_uid: str) -> float:
    """A number in [0, 1) fixed by the Study Instance UID (SHA-256): the case is in the verification sample
    while it is below the configured share, so the draw is random across studies, unrelated to anything the
    model saw, and the same each time the case is rebuilt."""
    digest = hashlib.sha256(f"negative-sample:{study_uid}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def band_token(band: float) -> str:
    """The tag saying a case's uncertain tokens were computed with ``band``."""
    return f"band={band!r}"


def uncertain_tokens(findings: Iterable[tuple[str, str | None, float | None]], band: float) -> set[str]:
    """Tokens for "uncertain" with a model and/or a finding, from (model, finding, margin) of each finding
    (margin None: it does not count), and the band they were computed with. The band is a setting: a
    case whose tags carry another band is looked at finding by finding (:func:`_uncertain_condition`)."""
    tokens = {band_token(band)}
    for model, finding, margin in findings:
        if margin is None or margin > band or not finding:
            continue
        for model_part in (model, None):
            for finding_part in (finding, None):
                if model_part or finding_part:
                    tokens.add(_token(model_part, finding_part, "uncertain"))
    return tokens


def _is_band_dependent(token: str) -> bool:
    return token.startswith("band=") or token.endswith("l=uncertain")


def retag_cases(session: Session, band: float, *, limit: int = 500) -> int:
    """Give up to ``limit`` cases whose tags were computed with another band (or none) the uncertain tokens
    of ``band``, from their findings; returns how many (0: every case is up to date)."""
    tags = Tags(session)
    current = tags.has(band_token(band))
    cases = list(session.scalars(select(ReviewCase).where(~current).order_by(ReviewCase.id).limit(limit)))
    if not cases:
        return 0
    by_case: dict[int, list[tuple[str, str | None, float | None]]] = {c.id: [] for c in cases}
    rows = session.execute(
        select(
            ReviewFinding.case_id, ReviewFinding.model_name, ReviewFinding.finding, ReviewFinding.margin
        ).where(ReviewFinding.case_id.in_(list(by_case)))
    )
    for case_id, model, finding, margin in rows:
        by_case[case_id].append((model, finding, margin))
    names = {number: token for token, number in tags.ids.items()}
    for item in cases:
        kept = {names[int(n)] for n in item.tags.strip(",").split(",") if n and int(n) in names}
        tokens = {t for t in kept if not _is_band_dependent(t)} | uncertain_tokens(by_case[item.id], band)
        item.tags = encode_tags(session, tokens)
    return len(cases)


def tag_ids(session: Session, tokens: set[str]) -> dict[str, int]:
    """The review_tag numbers of ``tokens``, adding the new ones (concurrent writers add each once)."""
    found = select(ReviewTag.token, ReviewTag.id).where(ReviewTag.token.in_(tokens))
    known = dict(session.execute(found).all())
    missing = sorted(tokens - known.keys())
    if missing:
        dialect = session.get_bind().dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        session.execute(
            insert(ReviewTag).values([{"token": t} for t in missing]).on_conflict_do_nothing(),
        )
        added = select(ReviewTag.token, ReviewTag.id).where(ReviewTag.token.in_(missing))
        known.update(session.execute(added).all())
    return known


def encode_tags(session: Session, tokens: set[str]) -> str:
    """``tokens`` as review_case.tags stores them: ",<id>,<id>," (sorted)."""
    ids = sorted(tag_ids(session, tokens).values()) if tokens else []
    return "," + "".join(f"{i}," for i in ids)


class Tags:
    """The tag dictionary, read once per worklist query: a token as a condition on the case row."""

    def __init__(self, session: Session) -> None:
        self.ids = dict(session.execute(select(ReviewTag.token, ReviewTag.id)).all())

    def has(self, token: str) -> ColumnElement[bool]:
        number = self.ids.get(token)
        return false() if number is None else ReviewCase.tags.like(f"%,{number},%")


def _single_finding_condition(f: WorklistFilter, band: float, tags: Tags) -> ColumnElement[bool]:
    """The model/finding/AI label filter as a condition on the case row."""
    if f.ai_label == "uncertain":
        if not (f.model or f.finding):
            return ReviewCase.margin <= band
        return _uncertain_condition(f, band, tags)
    return tags.has(_token(f.model, f.finding, f.ai_label))


def _uncertain_condition(f: WorklistFilter, band: float, tags: Tags) -> ColumnElement[bool]:
    """Uncertain with a model and/or a finding: the case's tag where its tags were computed with this band
    (every case, once :func:`retag_cases` has run), else its findings one by one."""
    current = tags.has(band_token(band))
    by_findings = exists().where(ReviewFinding.case_id == ReviewCase.id, *_finding_conditions(f, band))
    return or_(
        and_(current, tags.has(_token(f.model, f.finding, "uncertain"))),
        and_(~current, by_findings),
    )


def _finding_level(f: WorklistFilter, band: float, tags: Tags) -> ColumnElement[bool] | None:
    """The model/finding/AI label filter as one condition on a case (None: no such filter)."""
    if not _finding_conditions(f, band):
        return None
    return _single_finding_condition(f, band, tags)


def _case_conditions(f: WorklistFilter, band: float, now: datetime, tags: Tags) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    finding_level = _finding_level(f, band, tags)
    if finding_level is not None:
        conditions.append(finding_level)
    if f.status:
        conditions.append(_status_expr(now) == f.status)
    if f.assessable is not None:
        conditions.append(ReviewCase.assessable.is_(f.assessable))
    if f.date_from:
        conditions.append(ReviewCase.study_date >= f.date_from)
    if f.date_to:
        conditions.append(ReviewCase.study_date <= f.date_to)
    if f.modality:
        conditions.append(ReviewCase.modality == f.modality)
    return conditions


def query_worklist(
    session: Session,
    f: WorklistFilter,
    *,
    band: float,
    offset: int = 0,
    limit: int = 50,
    now: datetime | None = None,
) -> WorklistPage:
    """One page of the worklist in priority order, its total and the counts per filter value."""
    now = now or utcnow()
    tags = Tags(session)
    conditions = _case_conditions(f, band, now, tags)
    status = _status_expr(now)
    priority = _priority_expr(band, tags)
    rows = session.execute(
        select(ReviewCase, Study.study_instance_uid, Study.accession_number, status, priority)
        .join(Study, Study.id == ReviewCase.study_id)
        .where(*conditions)
        .order_by(priority, ReviewCase.received_at, ReviewCase.id)
        .offset(offset)
        .limit(limit)
    ).all()
    total = session.scalar(select(func.count()).select_from(ReviewCase).where(*conditions)) or 0
    findings, summary = _findings_of(session, [r[0].id for r in rows], band)
    sampled = tags.ids.get(SAMPLED)
    claimers = _claimers(session, [r[0] for r in rows])
    page = [
        WorklistRow(
            study_instance_uid=uid,
            accession_number=accession,
            study_date=item.study_date,
            modality=item.modality,
            received_at=item.received_at,
            status=row_status,
            priority=row_priority,
            sampled=sampled is not None and f",{sampled}," in item.tags,
            claimed_by=claimers.get(item.claimed_by_id) if row_status == "in_review" else None,
            claim_expires_at=item.claim_expires_at if row_status == "in_review" else None,
            findings=findings.get(item.id, []),
            summary=summary.get(item.id, []),
        )
        for item, uid, accession, row_status, row_priority in rows
    ]
    return WorklistPage(page, total, facet_counts(session, f, band=band, now=now, tags=tags))


def facet_counts(
    session: Session, f: WorklistFilter, *, band: float, now: datetime, tags: Tags | None = None
) -> dict[str, dict[str, int]]:
    """Cases per value of each filter, with the other filters applied (what choosing that value would
    show)."""
    status = _status_expr(now)
    tags = tags or Tags(session)
    counts: dict[str, dict[str, int]] = {}
    without = _case_conditions(replace(f, status=None), band, now, tags)
    counts["status"] = {
        str(value): n
        for value, n in session.execute(
            select(status, func.count()).select_from(ReviewCase).where(*without).group_by(status)
        )
    }
    without = _case_conditions(replace(f, modality=None), band, now, tags)
    counts["modality"] = {
        str(value or ""): n
        for value, n in session.execute(
            select(ReviewCase.modality, func.count()).where(*without).group_by(ReviewCase.modality)
        )
    }
    without = _case_conditions(replace(f, assessable=None), band, now, tags)
    counts["assessable"] = {
        ("yes" if value else "no"): n
        for value, n in session.execute(
            select(ReviewCase.assessable, func.count()).where(*without).group_by(ReviewCase.assessable)
        )
    }
    counts.update(_finding_facets(session, f, band=band, now=now, tags=tags))
    return counts


def _finding_facets(
    session: Session, f: WorklistFilter, *, band: float, now: datetime, tags: Tags
) -> dict[str, dict[str, int]]:
    """Cases per model, per finding and per AI label. Each value is counted as if chosen in place of that
    facet's current value: one pass over the cases, each value a condition on the case row."""
    pairs = session.execute(select(ReviewFinding.model_name, ReviewFinding.finding).distinct()).all()
    values = {
        "model": sorted({m for m, _ in pairs}),
        "finding": sorted({x for _, x in pairs if x}),
        "ai_label": list(AI_LABELS),
    }
    out: dict[str, dict[str, int]] = {facet: {} for facet in values}
    where = _case_conditions(replace(f, model=None, finding=None, ai_label=None), band, now, tags)
    columns, keys = [], []
    for facet, names in values.items():
        for name in names:
            chosen_value: dict[str, Any] = {facet: name}
            condition = _single_finding_condition(replace(f, **chosen_value), band, tags)
            columns.append(func.sum(case((condition, 1), else_=0)))
            keys.append((facet, name))
    row = session.execute(select(*columns).select_from(ReviewCase).where(*where)).one()
    for (facet, name), n in zip(keys, row, strict=True):
        if n:
            out[facet][name] = int(n)
    return out


def _findings_of(
    session: Session, case_ids: list[int], band: float
) -> tuple[dict[int, list[dict[str, Any]]], dict[int, list[dict[str, Any]]]]:
    """Per case: its findings, and per (model, image) the label they amount to (what the worklist shows)."""
    findings: dict[int, list[dict[str, Any]]] = {}
    summary: dict[int, list[dict[str, Any]]] = {}
    if not case_ids:
        return findings, summary
    rows = session.execute(
        select(ReviewFinding.case_id, ReviewFinding.margin, Prediction)
        .join(Prediction, Prediction.id == ReviewFinding.prediction_id)
        .where(ReviewFinding.case_id.in_(case_ids))
        .order_by(ReviewFinding.id)
    ).all()
    groups: dict[tuple[int, str, int], list[tuple[Prediction, bool]]] = {}
    for case_id, margin, p in rows:
        uncertain = margin is not None and margin <= band
        findings.setdefault(case_id, []).append(
            {
                "model": p.model_name,
                "finding": p.finding if p.assessable else None,
                "label": p.label if p.assessable else "not_assessable",
                "probability": p.probability,
                "threshold": p.threshold,
                "uncertain": uncertain,
            }
        )
        groups.setdefault((case_id, p.model_name, p.instance_id), []).append((p, uncertain))
    images: dict[int, list[int]] = {}
    for (case_id, model, instance_id), members in groups.items():
        numbers = images.setdefault(case_id, [])
        if instance_id not in numbers:
            numbers.append(instance_id)
        assessable = all(p.assessable for p, _ in members)
        probabilities = {
            str(p.finding): (float(p.probability or 0.0), p.label == "present")
            for p, _ in members
            if p.finding
        }
        key = labels.ai_label(model, probabilities) if assessable else labels.NOT_ASSESSABLE
        chosen = [lab for lab in labels.labels_of(model, tuple(probabilities)) if lab.key == key]
        named = chosen[0].present if chosen else frozenset()
        summary.setdefault(case_id, []).append(
            {
                "model": model,
                "image": numbers.index(instance_id) + 1,
                "label": key,
                "title": labels.label_title(model, key, tuple(probabilities)),
                "positive": bool(named),
                "probability": max((probabilities[f][0] for f in named), default=None),
                "uncertain": any(u for _, u in members),
            }
        )
    for case_id, items in summary.items():
        if len(images[case_id]) == 1:
            for item in items:
                item["image"] = None
    return findings, summary


def _claimers(session: Session, cases: list[ReviewCase]) -> dict[int, str]:
    ids = {c.claimed_by_id for c in cases if c.claimed_by_id is not None}
    if not ids:
        return {}
    return {
        uid: (full or name)
        for uid, name, full in session.execute(
            select(User.id, User.username, User.full_name).where(User.id.in_(ids))
        )
    }


def claim(
    session: Session, case_id: int, user_id: int, *, minutes: float, now: datetime | None = None
) -> bool:
    """Mark the case as being reviewed by ``user_id`` until ``minutes`` from now; False when someone else
    holds an unexpired claim. Renewing one's own claim is a claim."""
    now = now or utcnow()
    result = session.execute(
        update(ReviewCase)
        .where(
            ReviewCase.id == case_id,
            or_(
                ReviewCase.claimed_by_id.is_(None),
                ReviewCase.claimed_by_id == user_id,
                ReviewCase.claim_expires_at <= now,
            ),
        )
        .values(claimed_by_id=user_id, claim_expires_at=now + timedelta(minutes=minutes))
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def release(session: Session, case_id: int, user_id: int) -> None:
    """End ``user_id``'s claim on the case (no-op when they do not hold it)."""
    session.execute(
        update(ReviewCase)
        .where(ReviewCase.id == case_id, ReviewCase.claimed_by_id == user_id)
        .values(claimed_by_id=None, claim_expires_at=None)
        .execution_options(synchronize_session=False)
    )


def next_case(
    session: Session,
    f: WorklistFilter,
    user_id: int,
    *,
    band: float,
    minutes: float,
    exclude_study_id: int | None = None,
    now: datetime | None = None,
) -> str | None:
    """Claim the first case of the filter (priority order) nobody else holds; its Study Instance UID."""
    now = now or utcnow()
    tags = Tags(session)
    if f.status == "unreviewed":  # cases this user holds count as theirs to take, not as in review
        conditions = [
            *_case_conditions(replace(f, status=None), band, now, tags),
            ReviewCase.status == "unreviewed",
        ]
    else:
        conditions = _case_conditions(f, band, now, tags)
    free = or_(
        ReviewCase.claimed_by_id.is_(None),
        ReviewCase.claimed_by_id == user_id,
        ReviewCase.claim_expires_at <= now,
    )
    query = (
        select(ReviewCase.id, Study.study_instance_uid)
        .join(Study, Study.id == ReviewCase.study_id)
        .where(*conditions, free)
        .order_by(_priority_expr(band, Tags(session)), ReviewCase.received_at, ReviewCase.id)
        .limit(20)
    )
    if exclude_study_id is not None:
        query = query.where(ReviewCase.study_id != exclude_study_id)
    for case_id, uid in session.execute(query).all():
        if claim(session, case_id, user_id, minutes=minutes, now=now):
            return str(uid)
    return None
