"""Fixtures for reporting tests."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from reporting.sr import build_report, report_series_uid, report_uid, write_report
from tests.reporting.factories import PNEUMONIA, chest_results, into_study, read_shared


@pytest.fixture
def chest_study() -> dict[str, pydicom.Dataset]:
    """DX chest (its own study), plus the CR chest and the CR hip moved into that study."""
    dx = read_shared("dx_chest_small.dcm")
    return {
        "dx": dx,
        "cr": into_study(read_shared("cr_chest_jpegls.dcm"), dx),
        "hip": into_study(read_shared("cr_hip_rle.dcm"), dx),
    }


@pytest.fixture
def chest_report_path(tmp_path: Path, chest_study: dict[str, pydicom.Dataset]) -> Path:
    """The pneumonia report on the chest study, written to ``tmp_path``."""
    sources = list(chest_study.values())
    study_uid = sources[0].StudyInstanceUID
    sr = build_report(
        results=chest_results(chest_study),
        sources=sources,
        model=PNEUMONIA,
        sop_instance_uid=report_uid(study_uid, PNEUMONIA, [s.SOPInstanceUID for s in sources]),
        series_instance_uid=report_series_uid(study_uid, PNEUMONIA),
    )
    return write_report(sr, tmp_path / "chest_sr.dcm")
