"""Live agreement of each model version with the radiologists: what the performance endpoint shows.

From the current (latest) review of every AI report: per image decided with a label (not "not assessable"),
the AI's label against the radiologist's. Per version: Cohen's kappa over the labels, and, taking "any
finding" as positive (every label but the model's "no finding" one), sensitivity, specificity, PPV and NPV
with Wilson 95 % intervals and their counts; the share of images confirmed and corrected; a weekly trend.
A version in shadow mode is scored on the images it predicted that radiologists decided, beside the active
version's answers on exactly those images.

Drift: per version, over every image it answered on live studies (reviewed or not, shadow included), the
share its gate found not assessable and the mean probability of each finding, against the version's
reference figures (the same measures on a labelled set: the promotion gate's evaluation set, or what
``gateway models reference`` measured); a warning when either is further than the configured band from
its reference, once the version has answered enough images for the comparison to mean something.

Kappa's interval is the large-sample one, kappa ± 1.96·sqrt(po(1 - po) / (n (1 - pe)^2)) (Cohen 1960).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core import labels
from core.tables import Instance, ModelVersion, Prediction, Report, Review

Z = 1.959963984540054


@dataclass(frozen=True)
class DriftBand:
    """How far (absolute) live figures may move from the reference before a warning, and from how many
    live images on (the settings' drift_* values)."""

    not_assessable: float = 0.05
    probability: float = 0.10
    min_images: int = 30


@dataclass(frozen=True)
class Pair:
    """One decided image: the AI's label, the radiologist's, when, and how the decision went."""

    sop_instance_uid: str
    ai: str
    final: str
    action: str
    at: datetime


def wilson(successes: int, n: int) -> dict[str, float | int | None]:
    if n == 0:
        return {"value": None, "low": None, "high": None, "successes": 0, "n": 0}
    p = successes / n
    centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n)) / (1 + Z * Z / n)
    return {
        "value": p,
        "low": max(0.0, centre - half),
        "high": min(1.0, centre + half),
        "successes": successes,
        "n": n,
    }


def kappa(pairs: Iterable[tuple[str, str]]) -> dict[str, float | int | None]:
    items = list(pairs)
    n = len(items)
    if n == 0:
        return {"value": None, "low": None, "high": None, "n": 0}
    po = sum(a == b for a, b in items) / n
    ai, final = Counter(a for a, _ in items), Counter(b for _, b in items)
    pe = sum(ai[k] * final[k] for k in set(ai) | set(final)) / (n * n)
    if pe >= 1:  # one label only, on both sides: agreement is complete but kappa undefined
        return {"value": None, "low": None, "high": None, "n": n}
    value = (po - pe) / (1 - pe)
    se = math.sqrt(po * (1 - po) / (n * (1 - pe) ** 2))
    return {"value": value, "low": max(-1.0, value - Z * se), "high": min(1.0, value + Z * se), "n": n}


def negative_label(model: str) -> str:
    """The model's "no finding" label."""
    return next(lab.key for lab in labels.labels_of(model) if not lab.present)


def figures(model: str, pairs: list[Pair]) -> dict[str, Any]:
    """Agreement of ``pairs`` (one version's answers): kappa, sensitivity, specificity, PPV, NPV, rates."""
    negative = negative_label(model)
    decided = [p for p in pairs if p.final != labels.NOT_ASSESSABLE and p.ai != labels.NOT_ASSESSABLE]
    tp = sum(p.ai != negative and p.final != negative for p in decided)
    fp = sum(p.ai != negative and p.final == negative for p in decided)
    fn = sum(p.ai == negative and p.final != negative for p in decided)
    tn = sum(p.ai == negative and p.final == negative for p in decided)
    confirmed = sum(p.action == "confirmed" for p in pairs)
    corrected = sum(p.action == "corrected" for p in pairs)
    return {
        "images": len(pairs),
        "decided": len(decided),
        "counts": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
        "kappa": kappa((p.ai, p.final) for p in decided),
        "sensitivity": wilson(tp, tp + fn),
        "specificity": wilson(tn, tn + fp),
        "ppv": wilson(tp, tp + fp),
        "npv": wilson(tn, tn + fn),
        "confirmation_rate": wilson(confirmed, len(pairs)),
        "override_rate": wilson(corrected, len(pairs)),
    }


def weekly(model: str, pairs: list[Pair]) -> list[dict[str, Any]]:
    """The figures per ISO week of the decision (oldest first): images, kappa, sensitivity, specificity."""
    by_week: dict[str, list[Pair]] = defaultdict(list)
    for p in pairs:
        iso = p.at.isocalendar()
        by_week[f"{iso.year}-W{iso.week:02d}"].append(p)
    out = []
    for label in sorted(by_week):
        f = figures(model, by_week[label])
        out.append(
            {
                "week": label,
                "images": f["images"],
                "kappa": f["kappa"]["value"],
                "sensitivity": f["sensitivity"]["value"],
                "specificity": f["specificity"]["value"],
            }
        )
    return out


def decided_pairs(session: Session, model: str) -> dict[str, list[Pair]]:
    """Per version: the images of its reports that radiologists decided, from the latest review of each."""
    latest = (
        select(Review.report_id, func.max(Review.version).label("version"))
        .group_by(Review.report_id)
        .subquery()
    )
    rows = session.execute(
        select(Review, Report.model_version)
        .join(latest, (latest.c.report_id == Review.report_id) & (latest.c.version == Review.version))
        .join(Report, Report.id == Review.report_id)
        .where(Review.model_name == model)
        .order_by(Review.at, Review.id)
    )
    out: dict[str, list[Pair]] = defaultdict(list)
    for review, version in rows:
        for a in review.answers:
            out[version].append(
                Pair(a["sop_instance_uid"], a["ai_label"], a["label"], a["action"], review.at)
            )
    return dict(out)


def shadow_labels(session: Session, model: str) -> dict[str, dict[str, str]]:
    """Per shadow version: SOP Instance UID -> the label its findings amount to (latest prediction)."""
    rows = session.execute(
        select(Prediction, Instance.sop_instance_uid)
        .join(Instance, Instance.id == Prediction.instance_id)
        .where(Prediction.model_name == model, Prediction.shadow.is_(True))
        .order_by(Prediction.id)
    )
    found: dict[tuple[str, str], dict[str, tuple[float, bool]]] = defaultdict(dict)
    unassessable: set[tuple[str, str]] = set()
    for p, sop_uid in rows:
        key = (p.model_version, sop_uid)
        if not p.assessable:
            unassessable.add(key)
        elif p.finding is not None:
            found[key][p.finding] = (float(p.probability or 0.0), p.label == "present")
    out: dict[str, dict[str, str]] = defaultdict(dict)
    for key in set(found) | unassessable:
        version, sop_uid = key
        out[version][sop_uid] = (
            labels.NOT_ASSESSABLE if key in unassessable else labels.ai_label(model, found[key])
        )
    return dict(out)


def live_distribution(session: Session, model: str) -> dict[str, dict[str, Any]]:
    """Per version: images answered, the share not assessable, the mean probability of each finding (the
    latest prediction of each image counts)."""
    rows = session.execute(
        select(
            Prediction.model_version,
            Prediction.instance_id,
            Prediction.finding,
            Prediction.probability,
            Prediction.assessable,
        )
        .where(Prediction.model_name == model)
        .order_by(Prediction.id)
    )
    latest: dict[str, dict[int, dict[str, float] | None]] = defaultdict(dict)
    for version, instance_id, finding, probability, assessable in rows:
        answers = latest[version]
        if not assessable:
            answers[instance_id] = None
        elif finding is not None and probability is not None:
            current = answers.get(instance_id)
            answers[instance_id] = {**(current or {}), finding: float(probability)}
    out = {}
    for version, answers in latest.items():
        assessed = [a for a in answers.values() if a is not None]
        by_finding: dict[str, list[float]] = defaultdict(list)
        for a in assessed:
            for finding, probability in a.items():
                by_finding[finding].append(probability)
        out[version] = {
            "images": len(answers),
            "not_assessable_share": 1 - len(assessed) / len(answers),
            "mean_probability": {f: sum(v) / len(v) for f, v in by_finding.items()},
        }
    return out


def drift(session: Session, model: str, band: DriftBand) -> list[dict[str, Any]]:
    """Per version with live answers: its live figures, its reference, and the warnings (empty: no drift).
    ``status``: ok, drift, no reference (none measured yet) or too few images."""
    references = {
        version: (metrics or {}).get("reference")
        for version, metrics in session.execute(
            select(ModelVersion.version, ModelVersion.metrics).where(ModelVersion.name == model)
        )
    }
    out = []
    for version, live in sorted(live_distribution(session, model).items()):
        reference = references.get(version)
        warnings: list[str] = []
        if not reference:
            status = "no reference"
        elif live["images"] < band.min_images:
            status = "too few images"
        else:
            expected = reference.get("not_assessable_share")
            if expected is not None and abs(live["not_assessable_share"] - expected) > band.not_assessable:
                warnings.append(
                    f"not assessable: {live['not_assessable_share']:.1%} of live images against "
                    f"{expected:.1%} in the reference (band ±{band.not_assessable:.0%})"
                )
            for finding, expected_mean in sorted((reference.get("mean_probability") or {}).items()):
                mean = live["mean_probability"].get(finding)
                if mean is not None and abs(mean - expected_mean) > band.probability:
                    warnings.append(
                        f"mean probability of {finding}: {mean:.3f} live against {expected_mean:.3f} in the "
                        f"reference (band ±{band.probability:.2f})"
                    )
            status = "drift" if warnings else "ok"
        out.append(
            {"version": version, **live, "reference": reference, "status": status, "warnings": warnings}
        )
    return out


def performance(session: Session, model: str, band: DriftBand | None = None) -> dict[str, Any]:
    """What ``GET /api/models/{name}/performance`` answers."""
    pairs = decided_pairs(session, model)
    versions = [
        {"version": v, "kind": "reported", **figures(model, ps), "weekly": weekly(model, ps)}
        for v, ps in sorted(pairs.items())
    ]
    everything = [p for ps in pairs.values() for p in ps]
    final_by_image = {p.sop_instance_uid: p for p in everything}
    shadows = []
    for version, answers in sorted(shadow_labels(session, model).items()):
        same = [final_by_image[uid] for uid in answers if uid in final_by_image]
        shadow_pairs = [
            Pair(p.sop_instance_uid, answers[p.sop_instance_uid], p.final, "", p.at) for p in same
        ]
        shadows.append(
            {
                "version": version,
                "images": len(same),
                "shadow": figures(model, shadow_pairs),
                "active_on_the_same_images": figures(model, same),
            }
        )
    return {
        "model": model,
        "negative_label": negative_label(model),
        "versions": versions,
        "shadow": shadows,
        "drift": drift(session, model, band or DriftBand()),
    }
