"""Training recipes end to end on a tiny synthetic dataset, the recipe registry and the splits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from inference.bundle import BundleModel
from tests.training.tiny_data import write_tiny_pneumonia_data
from training import recipes as T
from training.cards.metrics import DISCLAIMER
from training.data import split_indices

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_pneumonia_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_pneumonia_data(tmp_path_factory.mktemp("pneumonia-data"))


def test_recipes_are_registered() -> None:
    found = T.recipes()
    assert {"pneumonia", "covid19"} <= set(found)
    with pytest.raises(KeyError, match="no training recipe"):
        T.get_recipe("knee")


def test_grouped_split_keeps_patients_apart_and_is_seeded() -> None:
    y = np.array([0, 1] * 50)
    groups = [f"p{i // 4}" for i in range(100)]
    tr, va = split_indices(y, groups=groups, seed=3)
    assert not {groups[i] for i in tr} & {groups[i] for i in va}
    assert 0.1 < len(va) / len(y) < 0.3
    assert np.array_equal(split_indices(y, groups=groups, seed=3)[1], va)
    tr2, va2 = split_indices(y, seed=3)
    assert len(va2) == 20 and y[va2].sum() == 10 and not set(tr2) & set(va2)


def gateway(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        env={**os.environ, "GATEWAY_TRAIN_QUIET": "1", **(env or {})},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def trained(tiny_pneumonia_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pneumonia bundle trained for one epoch by `gateway train --processing` (card beside it)."""
    out = tmp_path_factory.mktemp("trained") / "pneumonia"
    proc = gateway("train", "pneumonia", "--data", str(tiny_pneumonia_data), "--epochs", "1", "--seed", "5",
                   "--out", str(out), "--processing")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {out}" in proc.stdout
    return out


def test_train_pneumonia_end_to_end(trained: Path, tiny_pneumonia_data: Path) -> None:
    assert {"model.json", "model.keras", "model.tflite", "gate_stats.npz", "domain_gate.tflite"} <= {
        p.name for p in trained.iterdir()
    }
    meta = json.loads((trained / "model.json").read_text())
    assert meta["domain_gate"]["file"] == "domain_gate.tflite" and 0 <= meta["domain_gate"]["min_score"] < 1
    assert meta["training"]["seed"] == 5 and meta["training"]["epochs_run"] == 1
    assert meta["training"]["members"] == 3  # seeds 5, 6, 7 averaged in one graph
    assert meta["training"]["processing"] is True
    assert [o["finding"] for o in meta["outputs"]] == ["pneumonia", "bacterial_pneumonia", "viral_pneumonia"]
    assert meta["version"] == json.loads((T.WEIGHTS_DIR / "pneumonia" / "model.json").read_text())["version"]
    card = (trained / "card.md").read_text()
    assert DISCLAIMER in card and "![ROC](roc.png)" in card and f"pneumonia {meta['version']}" in card
    assert (trained / "calibration.png").is_file()
    assert "gateway train pneumonia" in card and "--seed 5" in card and "patient_key" in card
    assert "--epochs 1 --processing" in card  # the card's command reproduces the run

    model = BundleModel(trained)
    image = cv2.imread(str(tiny_pneumonia_data / "images" / "normal" / "img000.png"), cv2.IMREAD_GRAYSCALE)
    assert image is not None
    probabilities = model.probabilities([image.astype(np.float32) / 255.0])
    assert probabilities.shape == (1, 3) and np.all((probabilities >= 0) & (probabilities <= 1))
    assert probabilities[0, 1] + probabilities[0, 2] == pytest.approx(1.0)


def test_processing_is_refused_for_a_fundus_model(tiny_pneumonia_data: Path, tmp_path: Path) -> None:
    proc = gateway("train", "glaucoma", "--data", str(tiny_pneumonia_data), "--out", str(tmp_path / "g"),
                   "--processing")  # fmt: skip
    assert proc.returncode == 2 and "--processing is for the chest models" in proc.stderr
    assert not (tmp_path / "g").exists()


def test_gateway_evaluate_prints_metrics(trained: Path, tiny_pneumonia_data: Path) -> None:
    proc = gateway(
        "evaluate", "pneumonia", "--data", str(tiny_pneumonia_data / "labels.csv"),
        env={"GATEWAY_INFERENCE__MODEL_DIRS": str(trained)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["model"] == "pneumonia" and result["n"] == 40
    assert result["assessable"] + len(result["rejected"]) == 40
    assert gateway("evaluate", "knee", "--data", str(tiny_pneumonia_data)).returncode == 2


def test_combine_covid_averages_the_members() -> None:
    """The covid19 bundle network: mean of the members' softmax, the smaller member fed a resized input."""
    import keras
    import tensorflow as tf

    from training.chest.network import build_covid_net, combine_covid

    keras.utils.set_random_seed(3)
    small, large = build_covid_net(3, 32), build_covid_net(4, 40)
    combined = combine_covid([large, small])
    assert combined.input_shape[1] == 40
    # heatmap and gate use the large member's layers
    assert combined.get_layer("last_conv") is large.get_layer("last_conv")
    x = np.random.default_rng(0).random((3, 40, 40, 1)).astype(np.float32)
    resized = tf.image.resize(x, (32, 32), method="bilinear")
    expected = (np.asarray(large(x, training=False)) + np.asarray(small(resized, training=False))) / 2
    np.testing.assert_allclose(np.asarray(combined(x, training=False)), expected, atol=1e-5)
