"""The promotion gate: a candidate model version goes live only if it beats the active one on the same fixed
evaluation set, through the serving path.

Both bundles run on every image of the evaluation set (a labels CSV in the training data's vocabulary, as an
export's ``MODEL/labels.csv``) plus the cases radiologists confirmed or corrected that neither model was
trained on (the composition root finds them; a retrained version lists the exported images it learnt from
in its data summary); images either one finds not assessable are left out of both. The primary
metric is the ROC AUC of the model's first finding for a binary question (pneumonia vs normal, glaucoma
vs normal), compared by DeLong's test, and the accuracy of the three-class answer for covid19 (normal,
COVID-19, viral pneumonia), compared by McNemar's test. The candidate passes when its primary metric is
higher and its sensitivity (for the first finding, at its own calibrated threshold, the one its reports
use) is not lower than the active model's by more than ``margin``.

A version that answers more, not better (a refitted input-consistency gate in front of the same network)
passes the other way: its primary metric on the images both assess is not lower, it finds fewer images of
the evaluation set not assessable, and its primary metric on everything it assesses is not lower than the
active model's on everything that one assesses by more than ``margin``; the sensitivity rule applies too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from inference.bundle import BundleModel
from inference.model import assess
from inference.preprocess import load_any
from training.cards.compare import delong, mcnemar
from training.cards.metrics import wilson_ci
from training.data import labels_csv, read_labels

#: label -> positive, for the binary questions (the training vocabulary)
BINARY = {
    "pneumonia": {"pneumonia": 1, "normal": 0},
    "glaucoma": {"glaucoma": 1, "normal": 0},
}
COVID_CLASSES = ("normal", "covid19", "viral_pneumonia")


@dataclass
class Scored:
    """One model's answers on the evaluation images both models could assess."""

    version: str
    probabilities: list[dict[str, float]] = field(default_factory=list)
    present: list[bool] = field(default_factory=list)  # its first finding, at its own threshold


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reasons: list[str]
    figures: dict[str, Any]


def _score(model: BundleModel, images: list[np.ndarray]) -> list[Any]:
    out: list[Any] = []
    for start in range(0, len(images), 32):
        out += assess(model, images[start : start + 32])
    return out


def reference_figures(results: Sequence[Any], data: str) -> dict[str, Any]:
    """What a version's live figures are compared with for drift (core.agreement): on a labelled set, the
    share of images its gate finds not assessable and the mean calibrated probability of each finding over
    the others."""
    assessed = [r for r in results if r.assessable]
    by_finding: dict[str, list[float]] = {}
    for r in assessed:
        for f in r.findings:
            by_finding.setdefault(f.name, []).append(f.probability)
    means = {name: round(float(np.mean(values)), 6) for name, values in by_finding.items()}
    return {
        "data": data,
        "images": len(results),
        "not_assessable_share": round(1 - len(assessed) / len(results), 6) if results else None,
        "mean_probability": means,
    }


def reference_on(bundle_dir: Path, data: Path) -> dict[str, Any]:
    """:func:`reference_figures` of one bundle on a labels CSV (or a folder holding one), for
    ``gateway models reference``."""
    csv_path = labels_csv(data)
    model = BundleModel(bundle_dir)
    images = [load_any(csv_path.parent / r["path"]) for r in read_labels(csv_path)]
    return reference_figures(_score(model, images), str(csv_path))


def evaluate_pair(
    name: str,
    active_dir: Path,
    candidate_dir: Path,
    data: Path,
    *,
    margin: float = 0.02,
    reviewed: Sequence[dict[str, str]] = (),
    left_out: dict[str, int] | None = None,
) -> GateResult:
    """Run the gate on ``data`` (a labels CSV or a folder holding one) plus ``reviewed``: radiologists'
    confirmed or corrected cases that neither model trained on, rows in the same vocabulary with absolute
    paths (gateway.export.reviewed_evaluation). ``left_out`` (why reviewed cases were not used, counts) is
    stored with the figures."""
    csv_path = labels_csv(data)
    fixed = read_labels(csv_path)
    rows = fixed + list(reviewed)
    active, candidate = BundleModel(active_dir), BundleModel(candidate_dir)
    images = [load_any(csv_path.parent / r["path"]) for r in rows]
    a_all, c_all = _score(active, images), _score(candidate, images)
    labels: list[str] = []
    a, c = Scored(active.info.version), Scored(candidate.info.version)
    for row, ra, rc in zip(rows, a_all, c_all, strict=True):
        if not (ra.assessable and rc.assessable):
            continue
        labels.append(row["label"].strip().lower())
        for scored, result in ((a, ra), (c, rc)):
            scored.probabilities.append({f.name: f.probability for f in result.findings})
            scored.present.append(result.findings[0].present)
    figures: dict[str, Any] = {
        "model": name,
        "evaluation_set": str(csv_path),
        "images": len(rows),
        "fixed_images": len(fixed),
        "reviewed_images": len(reviewed),
        "reviewed_left_out": dict(left_out or {}),
        "assessed_by_both": len(labels),
        "active": {"version": a.version, "reference": reference_figures(a_all, str(csv_path))},
        "candidate": {"version": c.version, "reference": reference_figures(c_all, str(csv_path))},
        "margin": margin,
    }
    all_labels = [row["label"].strip().lower() for row in rows]
    if name in BINARY:
        for key, results in (("active", a_all), ("candidate", c_all)):
            figures[key]["auc_own"] = _own_auc(name, all_labels, results)
        return _binary_gate(name, labels, a, c, margin, figures)
    if name == "covid19":
        for key, results in (("active", a_all), ("candidate", c_all)):
            figures[key]["accuracy_own"] = _own_accuracy(all_labels, results)
        return _covid_gate(labels, a, c, margin, figures)
    raise ValueError(f"no promotion gate for model {name!r}")


def _own_auc(name: str, labels: list[str], results: Sequence[Any]) -> float | None:
    """AUC of the first finding on every labelled image the model assesses (None without both classes)."""
    from sklearn.metrics import roc_auc_score

    known = BINARY[name]
    kept = [
        (known[lb], r.findings[0].probability)
        for lb, r in zip(labels, results, strict=True)
        if r.assessable and lb in known
    ]
    if len({y for y, _ in kept}) < 2:
        return None
    return float(roc_auc_score([y for y, _ in kept], [p for _, p in kept]))


def _own_accuracy(labels: list[str], results: Sequence[Any]) -> float | None:
    right = [
        _covid_answer({f.name: f.probability for f in r.findings}) == COVID_CLASSES.index(lb)
        for lb, r in zip(labels, results, strict=True)
        if r.assessable and lb in COVID_CLASSES
    ]
    return sum(right) / len(right) if right else None


def _covid_answer(p: dict[str, float]) -> int:
    pc, pv = p.get("covid19", 0.0), p.get("viral_pneumonia", 0.0)
    return int(np.argmax([1.0 - pc - pv, pc, pv]))


def _primary(
    label: str, metric: str, active: float, candidate: float, margin: float, figures: dict[str, Any]
) -> list[str]:
    """Why the candidate's primary metric fails the gate: higher passes; equal or higher on the common
    images passes as a version that answers more (:func:`_answers_more`, ``figures["route"]``)."""
    if candidate > active:
        return []
    more = _answers_more(metric, margin, figures) if candidate >= active else "lower"
    if more is None:
        figures["route"] = "answers more"
        return []
    return [
        f"{label} {candidate:.4f} is not higher than the active model's {active:.4f}"
        + ("" if more == "lower" else f", and as an equal model {more}")
    ]


def _answers_more(metric: str, margin: float, figures: dict[str, Any]) -> str | None:
    """Why a candidate whose metric on the common images is not lower still fails the "answers more" route,
    or None when it passes it (fewer not assessable, its metric on everything it assesses not lower than the
    active's on everything that one assesses by more than ``margin``)."""
    na_a = figures["active"]["reference"]["not_assessable_share"]
    na_c = figures["candidate"]["reference"]["not_assessable_share"]
    if na_a is None or na_c is None or not na_c < na_a:
        return (
            f"it finds no fewer images not assessable ({na_c:.4f} vs the active model's {na_a:.4f})"
            if na_a is not None and na_c is not None
            else "no evaluation image"
        )
    own_a, own_c = figures["active"].get(f"{metric}_own"), figures["candidate"].get(f"{metric}_own")
    if own_a is not None and (own_c is None or own_c < own_a - margin):
        return (
            f"{metric} on everything it assesses {own_c if own_c is not None else float('nan'):.4f} is lower "
            f"than the active model's {own_a:.4f} by more than {margin}"
        )
    return None


def _binary_gate(
    name: str, labels: list[str], a: Scored, c: Scored, margin: float, figures: dict[str, Any]
) -> GateResult:
    known = BINARY[name]
    keep = [i for i, label in enumerate(labels) if label in known]
    y = np.array([known[labels[i]] for i in keep])
    if len(set(y.tolist())) < 2:
        return GateResult(
            False, ["the evaluation set needs positive and negative cases both models assess"], figures
        )
    first = name
    sa = [a.probabilities[i][first] for i in keep]
    sc = [c.probabilities[i][first] for i in keep]
    test = delong(y, sa, sc)
    figures["test"] = {"name": "DeLong", **test.as_dict()}
    figures["active"]["auc"], figures["candidate"]["auc"] = test.auc_a, test.auc_b
    reasons = _primary("AUC", "auc", test.auc_a, test.auc_b, margin, figures)
    reasons += _sensitivity(y, [a.present[i] for i in keep], [c.present[i] for i in keep], margin, figures)
    return GateResult(not reasons, reasons, figures)


def _covid_gate(
    labels: list[str], a: Scored, c: Scored, margin: float, figures: dict[str, Any]
) -> GateResult:
    keep = [i for i, label in enumerate(labels) if label in COVID_CLASSES]
    if not keep:
        return GateResult(False, ["no evaluation image both models assess"], figures)
    truth = [COVID_CLASSES.index(labels[i]) for i in keep]

    def answers(s: Scored) -> list[int]:
        return [_covid_answer(s.probabilities[i]) for i in keep]

    right_a = [x == t for x, t in zip(answers(a), truth, strict=True)]
    right_c = [x == t for x, t in zip(answers(c), truth, strict=True)]
    test = mcnemar(right_a, right_c)
    acc_a, acc_c = wilson_ci(sum(right_a), len(keep)), wilson_ci(sum(right_c), len(keep))
    figures["test"] = {"name": "McNemar", **test.as_dict()}
    figures["active"]["accuracy"], figures["candidate"]["accuracy"] = acc_a.as_dict(), acc_c.as_dict()
    reasons = _primary("accuracy", "accuracy", acc_a.value, acc_c.value, margin, figures)
    y = np.array([1 if labels[i] == "covid19" else 0 for i in keep])
    reasons += _sensitivity(y, [a.present[i] for i in keep], [c.present[i] for i in keep], margin, figures)
    return GateResult(not reasons, reasons, figures)


def _sensitivity(
    y: np.ndarray, present_a: list[bool], present_c: list[bool], margin: float, figures: dict[str, Any]
) -> list[str]:
    positives = int(y.sum())
    if positives == 0:
        return ["the evaluation set has no positive case to measure sensitivity on"]
    sens_a = wilson_ci(int(sum(p for p, t in zip(present_a, y, strict=True) if t)), positives)
    sens_c = wilson_ci(int(sum(p for p, t in zip(present_c, y, strict=True) if t)), positives)
    figures["active"]["sensitivity"], figures["candidate"]["sensitivity"] = sens_a.as_dict(), sens_c.as_dict()
    if sens_c.value < sens_a.value - margin:
        return [
            f"sensitivity {sens_c.value:.4f} is lower than the active model's {sens_a.value:.4f} "
            f"by more than {margin}"
        ]
    return []


def describe(result: GateResult) -> str:
    """Both models' figures side by side, the test, and the verdict."""
    f = result.figures
    lines = [
        f"{f['model']}: {f['assessed_by_both']} of {f['images']} evaluation images assessed by both "
        f"({f['fixed_images']} of the fixed set, {f['reviewed_images']} reviewed cases "
        "neither model trained on"
        + "".join(f", {n} {why} left out" for why, n in f["reviewed_left_out"].items() if n)
        + ")"
    ]
    for key in ("auc", "accuracy", "sensitivity"):
        if key in f["active"]:
            lines.append(
                f"  {key:12} active {f['active']['version']}: {_fmt(f['active'][key])}   "
                f"candidate {f['candidate']['version']}: {_fmt(f['candidate'][key])}"
            )
    if "test" in f:
        t = f["test"]
        lines.append(
            f"  {t['name']}: p = {t['p']:.4g}"
            + (
                f", AUC difference {t['diff']:+.4f} (95% CI {t['low']:+.4f} to {t['high']:+.4f})"
                if t["name"] == "DeLong"
                else f", right by active only {t['only_a']}, by candidate only {t['only_b']}"
            )
        )
    shares = [f[k]["reference"].get("not_assessable_share") for k in ("active", "candidate")]
    if None not in shares:
        lines.append(
            f"  not assessable active {f['active']['version']}: {shares[0]:.4f}   "
            f"candidate {f['candidate']['version']}: {shares[1]:.4f}"
        )
    if result.passed and f.get("route") == "answers more":
        lines.append("  PASSED (as good where both answer, and answers more)")
    else:
        lines.append("  PASSED" if result.passed else "  REFUSED: " + "; ".join(result.reasons))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, dict):
        return f"{value['value']:.4f} ({value['low']:.4f}-{value['high']:.4f})"
    return f"{float(value):.4f}"
