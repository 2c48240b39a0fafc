"""Fixtures of the worker tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.inference.tiny_models import make_tiny_bundles


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model bundles (pneumonia, covid19, glaucoma), made once per test module."""
    return make_tiny_bundles(tmp_path_factory.mktemp("models"))
