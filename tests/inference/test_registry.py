from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from core.domain import ModelInfo
from inference.bundle import BundleModel
from inference.registry import SHIPPED_DIR, ModelRegistry

REPO = Path(__file__).resolve().parents[2]


def test_importing_registry_base_preprocess_does_not_import_tensorflow() -> None:
    code = (
        "import sys, inference.registry, inference.model, inference.preprocess\n"
        "import inference.predict, inference.gates.rules\n"
        "from inference.registry import ModelRegistry\n"
        f"r = ModelRegistry([{str(REPO / 'inference' / 'weights')!r}])\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'TensorFlow imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_discovers_tiny_bundles_without_loading_them(tiny_bundle_dir: Path) -> None:
    registry = ModelRegistry([tiny_bundle_dir], include_shipped=False)
    assert registry.names() == ["covid19", "glaucoma", "pneumonia"]
    assert registry.infos()[0] == ModelInfo("covid19", "0.0.1-test", "Tiny untrained covid19 test model")
    model = registry.get("pneumonia")
    assert isinstance(model, BundleModel)
    assert not model.loaded
    assert model.modality_kind == "chest"
    assert [m.info.name for m in registry.of_kind("chest")] == ["covid19", "pneumonia"]
    assert registry.get("knee") is None


def test_shipped_folder_holds_the_chest_models() -> None:
    assert SHIPPED_DIR.is_dir() and (SHIPPED_DIR / "README.md").is_file()
    registry = ModelRegistry()
    assert not registry.problems
    assert {"pneumonia", "covid19"} <= set(registry.names())
    for name in ("pneumonia", "covid19"):
        model = registry.get(name)
        assert isinstance(model, BundleModel) and model.path == SHIPPED_DIR / name and not model.loaded


def test_single_bundle_dir_and_later_dirs_win(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    registry = ModelRegistry([tiny_bundle_dir, tiny_bundle_dir / "glaucoma"], include_shipped=False)
    glaucoma = registry.get("glaucoma")
    assert isinstance(glaucoma, BundleModel)
    assert glaucoma.path == tiny_bundle_dir / "glaucoma"


def test_broken_bundles_are_reported_not_fatal(tmp_path: Path) -> None:
    (tmp_path / "no_weights").mkdir()
    meta = {"name": "x", "version": "1", "kind": "chest", "input_size": 64, "channels": 1,
            "outputs": [{"finding": "pneumonia", "index": 0, "threshold": 0.5}]}  # fmt: skip
    (tmp_path / "no_weights" / "model.json").write_text(json.dumps(meta))
    (tmp_path / "bad_json").mkdir()
    (tmp_path / "bad_json" / "model.json").write_text("{")
    (tmp_path / "bad_kind").mkdir()
    (tmp_path / "bad_kind" / "model.json").write_text(json.dumps({**meta, "kind": "knee"}))
    (tmp_path / "bad_kind" / "model.tflite").write_bytes(b"")
    registry = ModelRegistry([tmp_path, tmp_path / "missing"], include_shipped=False)
    assert len(registry) == 0
    assert set(registry.problems) == {tmp_path / "no_weights", tmp_path / "bad_json", tmp_path / "bad_kind"}
    assert "model.tflite" in registry.problems[tmp_path / "no_weights"]
    assert "kind" in registry.problems[tmp_path / "bad_kind"]
