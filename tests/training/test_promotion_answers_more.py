"""The promotion gate's second route: a version with the same network behind a gate that refuses fewer
genuine images ("answers more, not better") goes live; one that refuses more, or answers worse, does not.

Real tiny pneumonia bundles and real image files; the gates differ only in the aspect-ratio bound of the rule
gate, so a fifth of the evaluation images (stretched to 1:1.6) is refused by one version and not the other.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from inference.bundle import BundleModel
from inference.model import assess
from inference.preprocess import load_any
from tests import factories as f
from tests.inference.tiny_models import make_tiny_bundles
from training.promotion import describe, evaluate_pair

IMAGES = 30


def _with_gate(bundle: Path, out: Path, version: str, max_aspect: float) -> Path:
    shutil.copytree(bundle, out)
    meta = json.loads((out / "model.json").read_text())
    meta["version"], meta["gate"] = version, {**meta.get("gate", {}), "max_aspect": max_aspect}
    (out / "model.json").write_text(json.dumps(meta))
    return out


@pytest.fixture(scope="module")
def setting(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, Path]:
    root = tmp_path_factory.mktemp("answers_more")
    evaluation = root / "evaluation"
    (evaluation / "images").mkdir(parents=True)
    for i in range(IMAGES):
        image = f.chest_gray(index=i)
        if i % 5 == 0:  # a wide detector: 1:1.6
            image = cv2.resize(image, (410, 256), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(evaluation / "images" / f"{i}.png"), image)
    base = make_tiny_bundles(root / "base", seed=1000, version="1.0", names=("pneumonia",)) / "pneumonia"
    strict = _with_gate(base, root / "strict", "1.0-strict", 1.5)
    open_ = _with_gate(base, root / "open", "1.0-open", 2.5)
    other = make_tiny_bundles(root / "other", seed=4000, version="2.0", names=("pneumonia",)) / "pneumonia"
    other = _with_gate(other, root / "other-open", "2.0-open", 2.5)
    # labels the base network reproduces half-way: its own ranking with every third label flipped
    images = [load_any(evaluation / "images" / f"{i}.png") for i in range(IMAGES)]
    scores = [a.findings[0].probability for a in assess(BundleModel(open_), images)]
    cut = float(np.median(scores))
    with open(evaluation / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        for i, p in enumerate(scores):
            positive = (p > cut) != (i % 3 == 0)
            writer.writerow([f"images/{i}.png", "pneumonia" if positive else "normal"])
    return evaluation, strict, open_, other


def test_same_network_answering_more_is_promoted(setting: tuple[Path, Path, Path, Path]) -> None:
    evaluation, strict, open_, _ = setting
    result = evaluate_pair("pneumonia", strict, open_, evaluation)
    f = result.figures
    assert result.passed, result.reasons
    assert f["route"] == "answers more"
    assert f["active"]["auc"] == f["candidate"]["auc"]  # the same network on the images both assess
    assert f["active"]["reference"]["not_assessable_share"] == pytest.approx(6 / IMAGES)
    assert f["candidate"]["reference"]["not_assessable_share"] == 0
    assert f["assessed_by_both"] == IMAGES - 6
    text = describe(result)
    assert "answers more" in text and "not assessable active 1.0-strict: 0.2000" in text


def test_same_network_answering_less_is_refused(setting: tuple[Path, Path, Path, Path]) -> None:
    evaluation, strict, open_, _ = setting
    result = evaluate_pair("pneumonia", open_, strict, evaluation)
    assert not result.passed
    assert "route" not in result.figures
    assert "finds no fewer images not assessable (0.2000 vs the active model's 0.0000)" in result.reasons[0]


def test_another_network_must_still_be_better(setting: tuple[Path, Path, Path, Path]) -> None:
    """Answering more does not excuse a network that ranks the common images worse."""
    evaluation, strict, _, other = setting
    result = evaluate_pair("pneumonia", strict, other, evaluation)
    f = result.figures
    if f["candidate"]["auc"] > f["active"]["auc"]:
        pytest.fail(f"the other network was expected to rank worse here: {f['candidate']['auc']}")
    assert not result.passed and "route" not in f
    assert result.reasons[0].startswith(f"AUC {f['candidate']['auc']:.4f} is not higher")
