"""The promotion gate through `gateway models promote`: three tiny pneumonia bundles with other weights, an
evaluation set whose labels one of them (B) reproduces; B beats the active A and is promoted, C does not
beat B and is refused; the figures of both models, the DeLong test and the verdict are printed and stored."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from inference.bundle import BundleModel
from inference.model import assess
from inference.preprocess import load_any
from tests import factories as f
from tests.inference.tiny_models import make_tiny_bundles
from tests.peers import gateway_command

IMAGES = 40


def _bundle(root: Path, seed: int, version: str) -> Path:
    return make_tiny_bundles(root / version, seed=seed, version=version, names=("pneumonia",)) / "pneumonia"


def _own_median_threshold(bundle: Path, images: list[np.ndarray]) -> list[float]:
    """Set the bundle's pneumonia threshold to the median of its outputs (as calibration would place it on
    this population) and return its probabilities."""
    probabilities = [a.findings[0].probability for a in assess(BundleModel(bundle), images)]
    meta = json.loads((bundle / "model.json").read_text())
    meta["outputs"][0]["threshold"] = float(np.median(probabilities))
    (bundle / "model.json").write_text(json.dumps(meta))
    return probabilities


def _evaluation_images(tmp_path: Path) -> tuple[Path, list[np.ndarray]]:
    """An evaluation folder with IMAGES synthetic radiographs (labels written later) and the images."""
    evaluation = tmp_path / "evaluation"
    (evaluation / "images").mkdir(parents=True)
    for i in range(IMAGES):
        cv2.imwrite(str(evaluation / "images" / f"{i}.png"), f.chest_gray(index=i))
    return evaluation, [load_any(evaluation / "images" / f"{i}.png") for i in range(IMAGES)]


def _write_labels(evaluation: Path, truth: list[float]) -> None:
    """labels.csv: pneumonia where ``truth`` is above its median, so whoever produced ``truth`` has AUC 1."""
    cut = float(np.median(truth))
    with open(evaluation / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "subtype"])
        for i, p in enumerate(truth):
            writer.writerow(
                [f"images/{i}.png", *(("pneumonia", "bacteria") if p > cut else ("normal", "normal"))]
            )


def _env(tmp_path: Path, evaluation: Path) -> dict[str, str]:
    return {
        "GATEWAY_DATA_DIR": str(tmp_path / "var"),
        "GATEWAY_INFERENCE__EVALUATION_SETS": json.dumps({"pneumonia": str(evaluation)}),
    }


def test_better_candidate_promoted_worse_refused(tmp_path: Path) -> None:
    evaluation, images = _evaluation_images(tmp_path)
    a, b, c = (
        _bundle(tmp_path, 1000, "1.0-a"),
        _bundle(tmp_path, 2000, "1.1-b"),
        _bundle(tmp_path, 3000, "1.2-c"),
    )
    for bundle in (a, c):
        _own_median_threshold(bundle, images)
    truth = _own_median_threshold(b, images)
    _write_labels(evaluation, truth)
    env = _env(tmp_path, evaluation)
    for bundle in (a, b, c):
        assert gateway_command(env, "models", "add", str(bundle)).returncode == 0
    first = gateway_command(
        env, "models", "promote", "pneumonia", "1.0-a", "--force", "--reason", "first version"
    )
    assert first.returncode == 0, first.stderr

    better = gateway_command(env, "models", "promote", "pneumonia", "1.1-b")
    assert better.returncode == 0, better.stdout + better.stderr
    assert "PASSED" in better.stdout and "DeLong" in better.stdout
    assert "active 1.0-a" in better.stdout and "candidate 1.1-b: 1.0000" in better.stdout  # B's AUC is 1

    worse = gateway_command(env, "models", "promote", "pneumonia", "1.2-c")
    assert worse.returncode == 1
    assert "REFUSED" in worse.stdout and "is not higher than the active model's 1.0000" in worse.stdout

    listed = {tuple(line.split()[:3]) for line in gateway_command(env, "models", "list").stdout.splitlines()}
    assert {
        ("pneumonia", "1.1-b", "active"),
        ("pneumonia", "1.0-a", "retired"),
        ("pneumonia", "1.2-c", "candidate"),
    } <= listed
    shown = json.loads(gateway_command(env, "models", "show", "pneumonia", "1.1-b").stdout)
    gate = shown["metrics"]["gate"]
    assert gate["candidate"]["auc"] == pytest.approx(1.0) and gate["test"]["name"] == "DeLong"
    assert gate["active"]["auc"] < 1.0 and 0 <= gate["test"]["p"] <= 1
    refused = json.loads(gateway_command(env, "models", "show", "pneumonia", "1.2-c").stdout)["history"]
    assert [h["action"] for h in refused] == ["model.register", "model.promote_refused"]


def test_a_fresh_data_folder_measures_a_candidate_against_the_shipped_version(tmp_path: Path) -> None:
    """No `gateway serve` has run on this data folder yet: the candidate is still measured against the
    shipped pneumonia bundle (the one `serve` would make active), not promoted as the first version. The
    labels are the shipped model's own answers, so no candidate can beat it."""
    shipped = Path(__file__).resolve().parents[2] / "inference" / "weights" / "pneumonia"
    version = json.loads((shipped / "model.json").read_text())["version"]
    evaluation, images = _evaluation_images(tmp_path)
    truth = [a.findings[0].probability for a in assess(BundleModel(shipped), images)]
    _write_labels(evaluation, truth)
    env = _env(tmp_path, evaluation)
    assert gateway_command(env, "models", "add", str(_bundle(tmp_path, 1000, "9.0-new"))).returncode == 0

    promoted = gateway_command(env, "models", "promote", "pneumonia", "9.0-new")
    assert promoted.returncode == 1, promoted.stdout + promoted.stderr
    assert f"active {version}: 1.0000" in promoted.stdout and "REFUSED" in promoted.stdout
    listed = {tuple(line.split()[:3]) for line in gateway_command(env, "models", "list").stdout.splitlines()}
    assert {("pneumonia", version, "active"), ("pneumonia", "9.0-new", "candidate")} <= listed
    history = json.loads(gateway_command(env, "models", "show", "pneumonia", "9.0-new").stdout)["history"]
    assert [h["action"] for h in history] == ["model.register", "model.promote_refused"]
