"""bench/chest_shift.py: the shipped chest models under acquisition variation, on a few validation images."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from inference.bundle import BundleModel
from inference.registry import ModelRegistry
from tests.inference.conftest import bench_module


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return bench_module("chest_shift", "chest-xray-pneumonia")


def test_pneumonia_table_matches_the_served_model(
    bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "shift.json"
    result = bench.main(["--limit", "16", "--variations", "gamma,field", "--json", str(out)])

    printed = capsys.readouterr().out
    groups = ["unmodified", "gamma 0.7", "gamma 1.4", "field 85%", "field 115%"]
    assert list(result["groups"]) == groups and all(g in printed for g in groups)
    assert json.loads(out.read_text())["groups"] == result["groups"]

    # the unmodified row, recomputed here from the served model on the same images
    model = ModelRegistry().get("pneumonia")
    assert isinstance(model, BundleModel)
    root, paths, y = bench.validation_set(model, 16)
    assert len(paths) == 16 and set(y.tolist()) == {0, 1}  # spread over both classes
    images = [bench._gray(bench.load_image_file(root / p)) for p in paths]
    kept = [i for i, image in enumerate(images) if model.check_input(image) is None]
    p = model.probabilities([images[i] for i in kept])[:, 0]
    row = result["groups"]["unmodified"]
    assert (row["n"], row["refused"]) == (16, 16 - len(kept))
    assert row["auc"] == pytest.approx(roc_auc_score(y[kept], p))
    mirrored = model.probabilities([np.ascontiguousarray(images[i][:, ::-1]) for i in kept])[:, 0]
    assert row["auc averaged"] == pytest.approx(roc_auc_score(y[kept], (p + mirrored) / 2))


def test_covid19_reports_three_class_accuracy(bench: ModuleType) -> None:
    result = bench.main(["--model", "covid19", "--limit", "9", "--variations", "", "--no-flip"])
    row = result["groups"]["unmodified"]
    assert result["model"] == "covid19" and row["n"] == 9 and "auc mirrored" not in row
    assert row["accuracy"] is not None and 0.0 <= row["accuracy"] <= 1.0


def test_variations_are_seeded_and_keep_the_image_size(bench: ModuleType) -> None:
    image = np.random.default_rng(1).random((224, 200), dtype=np.float32)
    for name, (fn, strengths) in bench.VARIATIONS.items():
        for label, strength in strengths.items():
            first = fn(image.copy(), strength, bench.variation_rng(f"{name} {label}", "a.jpg"))
            again = fn(image.copy(), strength, bench.variation_rng(f"{name} {label}", "a.jpg"))
            assert first.shape == image.shape, name
            assert np.array_equal(first, again), name
            assert first.min() >= 0.0 and first.max() <= 1.0, name
            assert not np.array_equal(first, image), name
    wider = bench.field(np.ones((100, 100), np.float32), 1.25, bench.variation_rng("x", "y"))
    assert wider[0, 0] == 0.0 and wider[50, 50] == 1.0  # the chest smaller inside a black frame


def test_unknown_variation_is_refused(bench: ModuleType) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--variations", "gamma,sepia"])
