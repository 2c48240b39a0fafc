"""Validate DICOM files with dicom3tools' ``dciodvfy`` (IOD, module and attribute checks)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def dciodvfy(path: Path) -> list[str]:
    """Lines ``dciodvfy`` prints about ``path`` (it reports on stderr); fails the test if it is missing."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.fail("dciodvfy not found: install dicom3tools (e.g. `apt-get install dicom3tools`)")
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120, check=False)
    return [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]


def assert_dciodvfy_clean(path: Path) -> list[str]:
    """Assert ``dciodvfy`` finds no error in ``path``; print and return its warnings."""
    lines = dciodvfy(path)
    errors = [line for line in lines if "Error" in line]
    warnings = [line for line in lines if line.startswith("Warning")]
    for line in warnings:
        print(f"dciodvfy {Path(path).name}: {line}")
    assert not errors, f"dciodvfy errors in {path}:\n" + "\n".join(lines)
    return warnings
