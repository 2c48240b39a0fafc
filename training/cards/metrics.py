"""Validation metrics, operating thresholds, calibration, plots and model cards (shared by every model).

No TensorFlow here: everything works on numpy arrays of labels, scores and logits, so a training recipe
(:mod:`training.recipes`) and ``gateway evaluate`` use the same figures.

* :func:`auc_ci` — ROC AUC with a seeded percentile-bootstrap 95 % CI;
* :func:`wilson_ci`, :func:`binary_metrics`, :func:`accuracy_ci` — proportions with Wilson score CIs;
* :func:`youden_threshold`, :func:`sensitivity_threshold` — operating points on the ROC;
* :func:`fit_temperature`, :func:`apply_temperature`, :func:`expected_calibration_error` — calibration;
* :func:`plot_roc`, :func:`plot_calibration` — PNGs (matplotlib, Agg backend);
* :func:`write_card` — the model card (markdown).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit, log_softmax, softmax
from scipy.stats import norm
from sklearn.metrics import roc_auc_score, roc_curve

DISCLAIMER = (
    "Research use only; not for clinical use without local validation. "
    "Results are decision support, not a diagnosis."
)


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its 95 % (or ``1 - alpha``) confidence interval."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.3f} (95% CI {self.low:.3f}–{self.high:.3f})"

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


# -- discrimination ------------------------------------------------------------------------------------------


def auc_ci(
    y_true: Sequence[int] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    groups: Sequence[str] | np.ndarray | None = None,
) -> Estimate:
    """ROC AUC of binary labels (1 = positive) with a percentile-bootstrap CI (resampling images, seeded).

    With ``groups`` (e.g. the database of each image) whole groups are resampled (cluster bootstrap), so the
    interval covers the spread between cameras or sites, not only between images. Resamples that hold one
    class only are skipped.
    """
    y, s = _binary(y_true), np.asarray(scores, dtype=np.float64)
    value = float(roc_auc_score(y, s))
    rng = np.random.default_rng(seed)
    members: list[np.ndarray] = []
    if groups is not None:
        g = np.asarray(groups)
        members = [np.flatnonzero(g == name) for name in dict.fromkeys(g.tolist())]
    boot: list[float] = []
    for _ in range(n_boot):
        if members:
            idx = np.concatenate([members[k] for k in rng.integers(0, len(members), len(members))])
        else:
            idx = rng.integers(0, len(y), len(y))
        if y[idx].min() == y[idx].max():
            continue
        boot.append(float(roc_auc_score(y[idx], s[idx])))
    if not boot:
        return Estimate(value, value, value)
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return Estimate(value, float(low), float(high))


def wilson_ci(successes: int, n: int, *, alpha: float = 0.05) -> Estimate:
    """The proportion ``successes / n`` with its Wilson score interval (NaN for n = 0)."""
    if n <= 0:
        return Estimate(math.nan, math.nan, math.nan)
    z = float(norm.ppf(1 - alpha / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return Estimate(p, max(0.0, centre - half), min(1.0, centre + half))


def binary_metrics(
    y_true: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray, threshold: float
) -> dict[str, Estimate]:
    """Accuracy, sensitivity and specificity at ``score >= threshold``, each with a Wilson CI."""
    y, pred = _binary(y_true), np.asarray(scores, dtype=np.float64) >= threshold
    tp, tn = int(np.sum(pred & (y == 1))), int(np.sum(~pred & (y == 0)))
    pos, neg = int(np.sum(y == 1)), int(np.sum(y == 0))
    return {
        "accuracy": wilson_ci(tp + tn, len(y)),
        "sensitivity": wilson_ci(tp, pos),
        "specificity": wilson_ci(tn, neg),
    }


def accuracy_ci(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray) -> Estimate:
    """Multi-class accuracy with a Wilson CI."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    return wilson_ci(int(np.sum(t == p)), len(t))


def youden_threshold(y_true: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """The score threshold maximising Youden's J = sensitivity + specificity - 1 (``score >= t`` positive)."""
    fpr, tpr, thr = roc_curve(_binary(y_true), np.asarray(scores, dtype=np.float64))
    best = int(np.argmax(tpr - fpr))
    return float(np.clip(thr[best], 0.0, 1.0))


def sensitivity_threshold(
    y_true: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray, target: float
) -> float:
    """The highest threshold whose sensitivity is >= ``target`` (so specificity is as high as it can be)."""
    _, tpr, thr = roc_curve(_binary(y_true), np.asarray(scores, dtype=np.float64))
    ok = np.flatnonzero(tpr >= target)
    return float(np.clip(thr[ok[0]], 0.0, 1.0))


# -- calibration ---------------------------------------------------------------------------------------------


def logit(p: np.ndarray | Sequence[float], eps: float = 1e-7) -> np.ndarray:
    """log(p / (1 - p)), clipped away from 0 and 1."""
    q = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    return np.asarray(np.log(q / (1 - q)))


def fit_temperature(logits: np.ndarray | Sequence[float], labels: np.ndarray | Sequence[int]) -> float:
    """Temperature T > 0 minimising the negative log-likelihood of ``softmax(logits / T)`` on validation.

    ``logits`` is 1-D for a binary sigmoid output (labels 0/1) or N x K for a softmax (labels 0..K-1).
    """
    z, y = np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=np.int64)

    def nll(log_t: float) -> float:
        t = math.exp(log_t)
        if z.ndim == 1:
            p = np.clip(expit(z / t), 1e-12, 1 - 1e-12)
            return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
        return float(-np.mean(log_softmax(z / t, axis=1)[np.arange(len(y)), y]))

    found = minimize_scalar(nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded")
    return float(math.exp(found.x))


def apply_temperature(logits: np.ndarray | Sequence[float], temperature: float) -> np.ndarray:
    """Calibrated probabilities: sigmoid for 1-D logits, softmax over the last axis for N x K."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    return np.asarray(expit(z) if z.ndim == 1 else softmax(z, axis=-1))


def expected_calibration_error(
    y_true: Sequence[int] | np.ndarray, probabilities: Sequence[float] | np.ndarray, *, n_bins: int = 10
) -> float:
    """ECE of binary probabilities over ``n_bins`` equal-width bins (weighted |accuracy - confidence|)."""
    y, p = _binary(y_true), np.asarray(probabilities, dtype=np.float64)
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            ece += mask.mean() * abs(float(y[mask].mean()) - float(p[mask].mean()))
    return float(ece)


# -- plots ---------------------------------------------------------------------------------------------------


def plot_roc(
    path: Path,
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    title: str = "ROC (validation)",
    points: Mapping[str, tuple[float, float]] | None = None,
) -> Path:
    """ROC curves, ``label -> (y_true, scores)``, AUC in the legend; ``points``: label -> (fpr, tpr)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    for label, (y, s) in curves.items():
        fpr, tpr, _ = roc_curve(_binary(y), np.asarray(s, dtype=np.float64))
        ax.plot(fpr, tpr, lw=1.5, label=f"{label} (AUC {roc_auc_score(_binary(y), s):.3f})")
    for label, (x, yv) in (points or {}).items():
        ax.plot([x], [yv], "o", label=label)
    ax.plot([0, 1], [0, 1], ":", color="gray", lw=1)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_calibration(
    path: Path,
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    n_bins: int = 10,
    title: str = "Calibration (validation)",
) -> Path:
    """Reliability diagram, ``label -> (y_true, probabilities)``, ECE in the legend."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    for label, (y, p) in curves.items():
        yb, pb = _binary(y), np.asarray(p, dtype=np.float64)
        bins = np.minimum((pb * n_bins).astype(int), n_bins - 1)
        xs = [pb[bins == b].mean() for b in range(n_bins) if (bins == b).any()]
        ys = [yb[bins == b].mean() for b in range(n_bins) if (bins == b).any()]
        ece = expected_calibration_error(yb, pb, n_bins=n_bins)
        ax.plot(xs, ys, "o-", lw=1.5, label=f"{label} (ECE {ece:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="gray", lw=1)
    ax.set(xlabel="predicted probability", ylabel="observed frequency", title=title, xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


# -- model card ----------------------------------------------------------------------------------------------


def write_card(
    path: Path,
    *,
    title: str,
    data_and_split: str,
    architecture: str,
    training_command: str,
    metrics: Mapping[str, Estimate | float | str],
    figures: Mapping[str, Path | str],
    threshold_rule: str,
    gate: str,
    confounds: str,
    intended_use: str,
    extra: Mapping[str, str] | None = None,
) -> Path:
    """Write a markdown model card; figure paths are linked relative to the card's folder.

    ``metrics`` maps a name to an :class:`Estimate` (printed with its 95 % CI), a number or a text;
    ``extra`` adds sections (heading -> markdown) before "Intended use". The card always ends with
    :data:`DISCLAIMER`.
    """
    path = Path(path)
    rows = "\n".join(f"| {name} | {_cell(value)} |" for name, value in metrics.items())
    links = "\n\n".join(f"![{label}]({_relative(fig, path.parent)})" for label, fig in figures.items())
    sections = [
        f"# {title}\n\n> {DISCLAIMER}",
        f"## Data and split\n\n{data_and_split}",
        f"## Architecture\n\n{architecture}",
        f"## Training command\n\n```sh\n{training_command}\n```",
        f"## Validation metrics (95 % confidence intervals)\n\n| metric | value |\n|---|---|\n{rows}",
        f"## ROC and calibration\n\n{links}",
        f"## Threshold rule\n\n{threshold_rule}",
        f"## Input-consistency gate\n\n{gate}",
        f"## Confounds and limitations\n\n{confounds}",
        *(f"## {heading}\n\n{body}" for heading, body in (extra or {}).items()),
        f"## Intended use\n\n{intended_use}\n\n**{DISCLAIMER}**",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(s.strip() for s in sections) + "\n", encoding="utf-8")
    return path


# -- helpers -------------------------------------------------------------------------------------------------


def _binary(y: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(y).astype(np.int64)
    if arr.size and not np.isin(arr, (0, 1)).all():
        raise ValueError("binary labels must be 0 or 1")
    return arr


def _cell(value: Estimate | float | str) -> str:
    if isinstance(value, Estimate):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _relative(figure: Path | str, folder: Path) -> str:
    fig = Path(figure)
    try:
        return fig.resolve().relative_to(folder.resolve()).as_posix()
    except ValueError:
        return fig.as_posix()


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    _pyplot().close(fig)
    return path
