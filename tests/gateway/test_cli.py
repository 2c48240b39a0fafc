"""The `gateway` command as a subprocess: predict, db upgrade."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
from sqlalchemy import create_engine, inspect

from core.migrate import head_revision
from tests import factories as f
from tests.inference.tiny_models import make_tiny_bundles
from tests.peers import REPO, SHARED_DICOM


def gateway(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        env={**os.environ, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def model_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cli")
    return {
        "GATEWAY_INFERENCE__MODEL_DIRS": str(make_tiny_bundles(root / "models")),
        "GATEWAY_DATA_DIR": str(root / "var"),
    }


def test_predict_json(model_env: dict[str, str], tmp_path: Path) -> None:
    png = tmp_path / "fundus.png"
    cv2.imwrite(str(png), cv2.cvtColor(f.fundus_rgb(), cv2.COLOR_RGB2BGR))
    jpeg = tmp_path / "chest.jpg"
    cv2.imwrite(str(jpeg), f.chest_gray())
    files = [
        SHARED_DICOM / "dx_chest_small.dcm",
        SHARED_DICOM / "sc_fundus_j2k.dcm",
        SHARED_DICOM / "cr_hip_rle.dcm",
        png,
        jpeg,
    ]
    proc = gateway("predict", "--json", *map(str, files), env=model_env)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    by_file: dict[str, list[dict]] = {}
    for row in rows:
        assert set(row) == {"file", "model", "version", "assessable", "reason", "findings"}
        by_file.setdefault(Path(row["file"]).name, []).append(row)
    assert {r["model"] for r in by_file["dx_chest_small.dcm"]} == {"pneumonia", "covid19"}
    assert [r["model"] for r in by_file["sc_fundus_j2k.dcm"]] == ["glaucoma"]
    assert [r["model"] for r in by_file["fundus.png"]] == ["glaucoma"]
    assert {r["model"] for r in by_file["chest.jpg"]} == {"pneumonia", "covid19"}
    [hip] = by_file["cr_hip_rle.dcm"]
    assert hip["model"] is None and not hip["assessable"] and hip["reason"] == "not routed: body part HIP"
    [glaucoma] = by_file["fundus.png"]
    assert glaucoma["assessable"] and glaucoma["version"] == "0.0.1-test"
    [finding] = glaucoma["findings"]
    assert finding["finding"] == "glaucoma" and 0 <= finding["probability"] <= 1
    assert finding["label"] == ("present" if finding["probability"] >= finding["threshold"] else "absent")


def test_predict_forced_model_gate_answers_not_assessable(model_env: dict[str, str]) -> None:
    proc = gateway(
        "predict", "--json", "--model", "pneumonia", str(SHARED_DICOM / "sc_fundus_j2k.dcm"), env=model_env
    )
    assert proc.returncode == 0, proc.stderr
    [row] = [json.loads(line) for line in proc.stdout.splitlines()]
    assert row["model"] == "pneumonia" and not row["assessable"] and row["findings"] == []
    assert row["reason"].startswith("not assessable: colour photograph")


def test_predict_unknown_model_is_an_error(model_env: dict[str, str]) -> None:
    proc = gateway("predict", "--model", "nonsense", str(SHARED_DICOM / "dx_chest_small.dcm"), env=model_env)
    assert proc.returncode == 2 and "unknown model 'nonsense'" in proc.stderr


def test_predict_text_output(model_env: dict[str, str]) -> None:
    proc = gateway("predict", str(SHARED_DICOM / "dx_chest_small.dcm"), env=model_env)
    assert proc.returncode == 0, proc.stderr
    assert "dx_chest_small.dcm: pneumonia 0.0.1-test: pneumonia " in proc.stdout


def test_db_upgrade(tmp_path: Path) -> None:
    proc = gateway("db", "upgrade", env={"GATEWAY_DATA_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert f"database at revision {head_revision()}" in proc.stdout
    tables = inspect(create_engine(f"sqlite:///{tmp_path / 'gateway.sqlite3'}")).get_table_names()
    assert {
        "study",
        "series",
        "instance",
        "job",
        "prediction",
        "report",
        "delivery",
        "audit_event",
        "user_account",
    } <= set(tables)


def test_worker_refuses_an_unmigrated_database(tmp_path: Path) -> None:
    proc = gateway("worker", env={"GATEWAY_DATA_DIR": str(tmp_path)})
    assert proc.returncode != 0 and "gateway db upgrade" in proc.stderr
