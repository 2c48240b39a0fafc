from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from inference.registry import ModelRegistry
from tests.inference.tiny_models import make_tiny_bundles

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
DICOM_DIR = SHARED / "dicom"
DATA_DIR = SHARED / "data"
BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="session")
def tiny_bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Parent directory of the tiny pneumonia, covid19 and glaucoma bundles (built once per session)."""
    return make_tiny_bundles(tmp_path_factory.mktemp("bundles"))


@pytest.fixture(scope="session")
def registry(tiny_bundle_dir: Path) -> ModelRegistry:
    """Only the tiny bundles (the shipped folder is left out so tests do not depend on it)."""
    return ModelRegistry([tiny_bundle_dir], include_shipped=False)


def shared_dicom(name: str) -> Path:
    path = DICOM_DIR / name
    if not path.is_file():
        pytest.fail(f"shared test file missing: {path}")
    return path


def bench_module(name: str, data_folder: str) -> ModuleType:
    """``bench/<name>.py`` imported as a module, after checking that the training data it reads is there."""
    if not (DATA_DIR / data_folder / "labels.csv").is_file():
        pytest.fail(f"shared training data missing: {DATA_DIR / data_folder}")
    spec = importlib.util.spec_from_file_location(name, BENCH_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
