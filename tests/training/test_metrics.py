"""Metrics, thresholds, calibration, plots and model cards of training.cards.metrics, against known values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from training.cards import metrics as E


@pytest.fixture(scope="module")
def scored() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 400)
    scores = 1 / (1 + np.exp(-(2.0 * y - 1 + rng.normal(0, 1.2, 400))))
    return y, scores


def test_auc_matches_sklearn_with_a_seeded_ci(scored: tuple[np.ndarray, np.ndarray]) -> None:
    y, s = scored
    est = E.auc_ci(y, s, n_boot=300, seed=1)
    assert est.value == pytest.approx(roc_auc_score(y, s))
    assert est.low < est.value < est.high and est.high - est.low < 0.15
    assert E.auc_ci(y, s, n_boot=300, seed=1) == est
    assert str(est).startswith(f"{est.value:.3f} (95% CI ")


def test_auc_ci_by_groups_resamples_whole_groups() -> None:
    """Four sites, two of them ranked well and two badly: resampling sites gives a wider interval than
    resampling images, and a group resample never splits a site."""
    rng = np.random.default_rng(3)
    y, s, g = [], [], []
    for site, good in (("a", True), ("b", True), ("c", False), ("d", False)):
        labels = rng.integers(0, 2, 40)
        noise = rng.normal(0, 0.3 if good else 3.0, 40)
        y += labels.tolist()
        s += (labels + noise).tolist()
        g += [site] * 40
    by_image = E.auc_ci(y, s, n_boot=400, seed=2)
    by_site = E.auc_ci(y, s, n_boot=400, seed=2, groups=g)
    assert by_site.value == by_image.value
    assert by_site.high - by_site.low > 1.5 * (by_image.high - by_image.low)
    assert E.auc_ci(y, s, n_boot=400, seed=2, groups=np.asarray(g)) == by_site


def test_wilson_interval_known_values() -> None:
    est = E.wilson_ci(8, 10)
    assert (est.value, round(est.low, 3), round(est.high, 3)) == (0.8, 0.49, 0.943)
    assert E.wilson_ci(0, 5).low == 0.0 and E.wilson_ci(5, 5).high == 1.0


def test_binary_metrics_and_accuracy() -> None:
    y = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    s = np.array([0.9, 0.8, 0.2, 0.1, 0.6, 0.3, 0.2, 0.7])
    m = E.binary_metrics(y, s, 0.5)
    assert m["sensitivity"].value == 0.75 and m["specificity"].value == 0.75 and m["accuracy"].value == 0.75
    assert E.accuracy_ci([0, 1, 2, 2], [0, 1, 1, 2]).value == 0.75
    with pytest.raises(ValueError):
        E.binary_metrics([0, 2], [0.1, 0.2], 0.5)


def test_thresholds(scored: tuple[np.ndarray, np.ndarray]) -> None:
    y, s = scored
    fpr, tpr, thr = roc_curve(y, s)
    assert E.youden_threshold(y, s) == pytest.approx(thr[np.argmax(tpr - fpr)])
    t = E.sensitivity_threshold(y, s, 0.95)
    assert E.binary_metrics(y, s, t)["sensitivity"].value >= 0.95
    higher = s[s > t].min()
    assert E.binary_metrics(y, s, higher)["sensitivity"].value < 0.95


def test_temperature_scaling_recovers_an_overconfident_model() -> None:
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, 4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-true_logits))).astype(int)
    t = E.fit_temperature(true_logits * 3.0, y)  # three times too confident
    assert t == pytest.approx(3.0, rel=0.15)
    before = E.expected_calibration_error(y, E.apply_temperature(true_logits * 3.0, 1.0))
    after = E.expected_calibration_error(y, E.apply_temperature(true_logits * 3.0, t))
    assert after < before / 2
    multi = rng.normal(0, 1, (3000, 3))
    labels = np.array([rng.choice(3, p=np.exp(r) / np.exp(r).sum()) for r in multi])
    assert E.fit_temperature(multi / 2.0, labels) == pytest.approx(0.5, rel=0.2)
    assert E.apply_temperature(multi, 2.0).sum(axis=1) == pytest.approx(np.ones(3000))


def test_expected_calibration_error_known_value() -> None:
    # two bins: p=0.25 (observed 0.5) and p=0.85 (observed 1.0), half of the images each
    y = np.array([0, 1, 1, 1])
    p = np.array([0.25, 0.25, 0.85, 0.85])
    assert E.expected_calibration_error(y, p, n_bins=10) == pytest.approx(0.5 * 0.25 + 0.5 * 0.15)


def test_plots_and_card(tmp_path: Path, scored: tuple[np.ndarray, np.ndarray]) -> None:
    y, s = scored
    roc = E.plot_roc(tmp_path / "cards" / "m_roc.png", {"m": (y, s)}, points={"t": (0.1, 0.8)})
    cal = E.plot_calibration(tmp_path / "cards" / "m_cal.png", {"m": (y, s)})
    for png in (roc, cal):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = E.write_card(
        tmp_path / "cards" / "m.md",
        title="Model card: m",
        data_and_split="data",
        architecture="cnn",
        training_command="gateway train m --data x",
        metrics={"AUC": E.auc_ci(y, s, n_boot=50), "n": 400, "ECE": 0.0123},
        figures={"ROC": roc, "Calibration": cal},
        threshold_rule="Youden",
        gate="gate figures",
        confounds="none known",
        intended_use="research",
        extra={"Notes": "extra section"},
    )
    text = card.read_text()
    assert "![ROC](m_roc.png)" in text and "![Calibration](m_cal.png)" in text
    assert (
        E.DISCLAIMER in text and "Research use only; not for clinical use without local validation." in text
    )
    for heading in ("Data and split", "Architecture", "Training command", "Threshold rule", "Notes"):
        assert f"## {heading}" in text
    assert "| n | 400 |" in text and "| ECE | 0.0123 |" in text and "95% CI" in text
