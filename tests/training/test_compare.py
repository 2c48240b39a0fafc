"""The promotion gate's statistics (training.cards.compare): DeLong's test agrees with MLstatkit's
implementation to 1e-6 on fixed inputs (ties included); McNemar's test with hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from MLstatkit import Delong_test

from training.cards.compare import delong, mcnemar


def _cases(seed: int, n: int, ties: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    a = y * 0.8 + rng.normal(0, 0.7, n)
    b = y * 1.1 + 0.5 * a + rng.normal(0, 0.6, n)  # correlated with A, better
    if ties:
        a, b = np.round(a, 1), np.round(b, 1)
    return y, a, b


@pytest.mark.parametrize(
    ("seed", "n", "ties"), [(1, 40, False), (2, 200, True), (3, 1000, False), (4, 75, True)]
)
def test_delong_agrees_with_mlstatkit(seed: int, n: int, ties: bool) -> None:
    y, a, b = _cases(seed, n, ties)
    z_ref, p_ref, _ci_a, _ci_b, auc_a_ref, auc_b_ref, info = Delong_test(y, a, b)
    assert info["method"] == "delong"
    ours = delong(y, a, b)
    assert ours.auc_a == pytest.approx(auc_a_ref, abs=1e-6)
    assert ours.auc_b == pytest.approx(auc_b_ref, abs=1e-6)
    assert ours.z == pytest.approx(z_ref, abs=1e-6)  # both signed as (AUC_B - AUC_A) / SE
    assert ours.p == pytest.approx(p_ref, abs=1e-6)
    assert ours.se**2 == pytest.approx(info["var_diff"], abs=1e-9)
    assert ours.low < ours.diff < ours.high
    assert (ours.n_positive, ours.n_negative) == (int(y.sum()), int(len(y) - y.sum()))


def test_delong_of_a_model_against_itself() -> None:
    y, a, _ = _cases(5, 60, False)
    same = delong(y, a, a)
    assert (same.diff, same.p) == (0.0, 1.0)
    with pytest.raises(ValueError, match="positive and negative"):
        delong(np.ones(5), a[:5], a[:5])


def test_mcnemar_exact_and_chi_square() -> None:
    # 3 right by A alone, 9 by B alone (12 discordant < 25): exact two-sided binomial, 2 * P(X <= 3 | 12, 1/2)
    a = [True] * 3 + [False] * 9 + [True] * 20
    b = [False] * 3 + [True] * 9 + [True] * 20
    exact = mcnemar(a, b)
    assert (exact.only_a, exact.only_b, exact.exact) == (3, 9, True)
    assert exact.p == pytest.approx(2 * sum(math.comb(12, k) for k in range(4)) / 2**12, abs=1e-12)
    # 10 and 30 discordant: chi-square with continuity correction, (|10 - 30| - 1)^2 / 40 = 9.025
    a = [True] * 10 + [False] * 30
    b = [False] * 10 + [True] * 30
    big = mcnemar(a, b)
    assert big.statistic == pytest.approx(9.025) and not big.exact
    assert big.p == pytest.approx(0.0026626, abs=1e-6)
    assert mcnemar([True, False], [True, False]).p == 1.0
