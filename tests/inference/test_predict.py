from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from inference.predict import predict_paths
from inference.registry import ModelRegistry
from tests.inference.conftest import DATA_DIR, shared_dicom


@pytest.fixture
def files(tmp_path: Path) -> Path:
    shutil.copy(shared_dicom("dx_chest_small.dcm"), tmp_path / "chest.dcm")
    fundus = next((DATA_DIR / "fundus-glaucoma" / "images" / "normal").glob("*.jpg"))
    (tmp_path / "sub").mkdir()
    pixels = cv2.imread(str(fundus))
    assert pixels is not None
    cv2.imwrite(str(tmp_path / "sub" / "fundus.png"), pixels)
    (tmp_path / "sub" / "notes.txt").write_text("ignored")
    return tmp_path


def test_default_choice_by_colour(registry: ModelRegistry, files: Path) -> None:
    rows = predict_paths([files], registry)
    json.dumps(rows)  # JSON-able
    got = [(Path(r["file"]).name, r["model"]) for r in rows]
    assert got == [("chest.dcm", "covid19"), ("chest.dcm", "pneumonia"), ("fundus.png", "glaucoma")]
    for row in rows:
        assert row["assessable"] and row["reason"] is None and row["version"] == "0.0.1-test"
    glaucoma = rows[2]["findings"][0]
    assert set(glaucoma) == {"finding", "probability", "threshold", "label"}
    assert glaucoma["label"] == ("present" if glaucoma["probability"] >= glaucoma["threshold"] else "absent")
    assert predict_paths([files], registry) == rows  # deterministic


def test_explicit_model_and_gate(registry: ModelRegistry, files: Path) -> None:
    rows = predict_paths([files / "sub" / "fundus.png", files / "chest.dcm"], registry, "pneumonia")
    assert [r["model"] for r in rows] == ["pneumonia", "pneumonia"]
    assert not rows[0]["assessable"] and rows[0]["findings"] == []
    assert rows[0]["reason"].startswith("not assessable: colour photograph")
    assert rows[1]["assessable"] and len(rows[1]["findings"]) == 3
    with pytest.raises(KeyError, match="unknown model"):
        predict_paths([files], registry, "knee")


def test_choose_callable_and_unreadable_files(registry: ModelRegistry, files: Path) -> None:
    (files / "broken.png").write_bytes(b"\x89PNG nonsense")
    seen: list[str] = []

    def choose(path: Path, image: np.ndarray) -> list[str]:
        seen.append(path.name)
        return ["glaucoma"] if image.ndim == 3 else []

    rows = predict_paths([files], registry, choose=choose)
    by_name = {Path(r["file"]).name: r for r in rows}
    assert sorted(seen) == ["chest.dcm", "fundus.png"]
    assert by_name["broken.png"]["model"] is None
    assert by_name["broken.png"]["reason"].startswith("not assessable: unreadable image")
    assert by_name["chest.dcm"]["model"] is None
    assert by_name["chest.dcm"]["reason"] == "not assessable: no model for this gray image"
    assert by_name["fundus.png"]["model"] == "glaucoma" and by_name["fundus.png"]["assessable"]


def test_empty_registry_says_so(files: Path) -> None:
    rows = predict_paths([files / "chest.dcm"], ModelRegistry(include_shipped=False))
    assert rows == [
        {
            "file": str(files / "chest.dcm"),
            "model": None,
            "version": None,
            "assessable": False,
            "reason": "not assessable: no model for this gray image",
            "findings": [],
        }
    ]
