"""Paired comparisons of two models on the same cases, for the promotion gate: DeLong's test for two
correlated ROC AUCs, McNemar's test for paired decisions.

DeLong, DeLong & Clarke-Pearson (1988), "Comparing the areas under two or more correlated receiver operating
characteristic curves: a nonparametric approach", Biometrics 44:837-845; computed with the midrank
algorithm of Sun & Xu (2014), IEEE Signal Processing Letters 21:1389-1393. McNemar (1947); the exact
binomial form for fewer than 25 discordant pairs, else the chi-square with continuity correction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class AucComparison:
    auc_a: float
    auc_b: float
    #: auc_b - auc_a, its standard error, z = diff / se, two-sided p, and the 95 % CI of the difference
    diff: float
    se: float
    z: float
    p: float
    low: float
    high: float
    n_positive: int
    n_negative: int

    def as_dict(self) -> dict[str, float | int]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class DecisionComparison:
    """McNemar on paired right/wrong decisions: ``only_a`` right by A alone, ``only_b`` by B alone."""

    only_a: int
    only_b: int
    statistic: float
    p: float
    exact: bool

    def as_dict(self) -> dict[str, float | int | bool]:
        return dict(self.__dict__)


def _midranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    z = x[order]
    n = len(x)
    ranks = np.zeros(n, dtype=np.float64)
    i = 0
    while i < n:
        j = i
        while j < n and z[j] == z[i]:
            j += 1
        ranks[i:j] = 0.5 * (i + j - 1) + 1  # ties share the mean of their 1-based ranks
        i = j
    out = np.empty(n, dtype=np.float64)
    out[order] = ranks
    return out


def _structural(y: np.ndarray, scores: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AUC and DeLong's placement values V10 (per positive) and V01 (per negative)."""
    pos, neg = scores[y == 1], scores[y == 0]
    m, n = len(pos), len(neg)
    tx, ty, tz = _midranks(pos), _midranks(neg), _midranks(np.concatenate([pos, neg]))
    auc = float((tz[:m].sum() - m * (m + 1) / 2) / (m * n))
    v10 = (tz[:m] - tx) / n
    v01 = 1.0 - (tz[m:] - ty) / m
    return auc, v10, v01


def delong(
    y_true: Sequence[int] | np.ndarray,
    scores_a: Sequence[float] | np.ndarray,
    scores_b: Sequence[float] | np.ndarray,
    *,
    alpha: float = 0.05,
) -> AucComparison:
    """DeLong's test of AUC(B) against AUC(A) on the same cases (labels 1 = positive)."""
    y = np.asarray(y_true).astype(int)
    if set(np.unique(y)) != {0, 1}:
        raise ValueError("DeLong needs positive and negative cases")
    a, b = np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    if not len(y) == len(a) == len(b):
        raise ValueError("labels and both score lists must be of one length")
    auc_a, v10_a, v01_a = _structural(y, a)
    auc_b, v10_b, v01_b = _structural(y, b)
    m, n = len(v10_a), len(v01_a)
    s10 = np.cov(np.vstack([v10_a, v10_b]))
    s01 = np.cov(np.vstack([v01_a, v01_b]))
    cov = s10 / m + s01 / n
    diff = auc_b - auc_a
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    se = float(np.sqrt(var)) if var > 0 else 0.0
    if se > 0:
        z = diff / se
        p = float(2 * stats.norm.sf(abs(z)))
    else:  # identical rankings: no difference to test
        z, p = 0.0, 1.0
    q = float(stats.norm.ppf(1 - alpha / 2))
    return AucComparison(auc_a, auc_b, diff, se, z, p, diff - q * se, diff + q * se, m, n)


def mcnemar(
    correct_a: Sequence[bool] | np.ndarray, correct_b: Sequence[bool] | np.ndarray
) -> DecisionComparison:
    """McNemar's test of two models' paired right/wrong decisions on the same cases."""
    ca, cb = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if ca.shape != cb.shape:
        raise ValueError("both decision lists must be of one length")
    only_a, only_b = int(np.sum(ca & ~cb)), int(np.sum(~ca & cb))
    discordant = only_a + only_b
    if discordant == 0:
        return DecisionComparison(0, 0, 0.0, 1.0, True)
    if discordant < 25:
        p = float(stats.binomtest(min(only_a, only_b), discordant, 0.5).pvalue)
        return DecisionComparison(only_a, only_b, float(min(only_a, only_b)), min(p, 1.0), True)
    statistic = (abs(only_a - only_b) - 1) ** 2 / discordant
    return DecisionComparison(only_a, only_b, float(statistic), float(stats.chi2.sf(statistic, 1)), False)
