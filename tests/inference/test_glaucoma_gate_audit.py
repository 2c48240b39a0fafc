"""bench/glaucoma_gate.py: the gate audit of the shipped glaucoma model, on 4 validation images."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from tests.inference.conftest import bench_module


@pytest.fixture(scope="module")
def audit() -> ModuleType:
    return bench_module("glaucoma_gate", "fundus-glaucoma")


def test_main_writes_table_and_records(
    audit: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "gate.json"
    argv = ["--limit", "4", "--variations", "brightness,fov", "--no-samples", "--quiet", "--json", str(out)]
    result = audit.main(argv)

    printed = capsys.readouterr().out
    groups = ["validation", "brightness x0.6", "brightness x1.5", "fov 80%", "fov 65%"]
    for group in groups:
        assert group in printed
    assert "agree on 28/28 images" in printed  # served verdict == stages measured by the script

    written = json.loads(out.read_text())
    assert written["model"] == "glaucoma" and written["summary"] == result["summary"]
    assert [row["group"] for row in written["summary"]] == ["validation", *_groups(audit)]
    assert all(row["n"] == 4 for row in written["summary"])
    records = written["records"]
    assert len(records) == 4 * 7
    for rec in records:
        assert rec["passed"] == (rec["reason"] is None)
        assert rec["kind"] in ("full", "disc")
        assert {"ssim", "ssim_bound", "colour", "colour_bound", "embedding", "domain"} <= set(rec["measures"])
        if not rec["passed"]:
            assert rec["check"] in {c for c, _ in audit.REASONS} and rec["margin"] is not None


def _groups(audit: ModuleType) -> list[str]:
    return [f"{name} {label}" for name in ("brightness", "fov") for label in audit.VARIATIONS[name][1]]


def test_reasons_parse_into_check_value_and_bound(audit: ModuleType) -> None:
    cases = {
        "does not look like a full-field fundus photograph (SSIM 0.31 with the average < 0.42)": "ssim",
        "colour/texture statistics unlike the training optic-disc crops "
        "(Mahalanobis distance 9.1 > 6.2)": "colour",
        "unlike the training fundus images (network feature distance 14.0 > 12.5)": "embedding",
        "not recognised as a colour fundus photograph (domain classifier score 0.100 < 0.493)": "domain",
        "grayscale image, not a colour fundus photograph (saturation 0.02 <= 0.08)": "rule-gray",
    }
    for reason, check in cases.items():
        parsed = audit.parse_reason(reason)
        assert parsed[0] == check and parsed[1] is not None and parsed[2] is not None


def test_variations_are_seeded_and_keep_shape(audit: ModuleType) -> None:
    image = np.random.default_rng(1).random((64, 80, 3), dtype=np.float32)
    for name, (fn, strengths) in audit.VARIATIONS.items():
        for label, strength in strengths.items():
            a = fn(image.copy(), strength, audit.variation_rng(name + label, "x"))
            b = fn(image.copy(), strength, audit.variation_rng(name + label, "x"))
            assert np.array_equal(a, b) and a.ndim == 3 and a.shape[2] == 3
            assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
            if name != "resolution":
                assert a.shape == image.shape
