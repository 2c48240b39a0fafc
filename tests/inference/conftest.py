from __future__ import annotations

from pathlib import Path

import pytest

from inference.registry import ModelRegistry
from tests.inference.tiny_models import make_tiny_bundles

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
DICOM_DIR = SHARED / "dicom"
DATA_DIR = SHARED / "data"


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
