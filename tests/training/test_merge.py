"""Exports merged with the base data: one row per image, corrections win."""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path

import pytest

from training.data import read_labels
from training.merge import MergeError, merge_training_data


def _export(root: Path, rows: list[dict[str, str]]) -> Path:
    folder = root / "pneumonia"
    for row in rows:
        image = folder / row["path"]
        image.parent.mkdir(parents=True, exist_ok=True)
        image.write_bytes(b"png")
    with open(folder / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def _row(image: str, label: str, decision: str, at: str = "2024-01-01T00:00:00") -> dict[str, str]:
    return {
        "path": f"images/{label}/{image}.png",
        "label": label,
        "subtype": "bacteria" if label == "pneumonia" else "normal",
        "patient": "P-" + image,
        "image": image,
        "decision": decision,
        "decided_at": at,
    }


@pytest.fixture
def base(tmp_path: Path) -> Path:
    root = tmp_path / "base"
    (root / "images").mkdir(parents=True)
    (root / "images" / "a.png").write_bytes(b"png")
    (root / "labels.csv").write_text("path,label,subtype,patient_key\nimages/a.png,normal,normal,K1\n")
    return root


def test_each_image_once_and_a_correction_wins(tmp_path: Path, base: Path) -> None:
    first = _export(
        tmp_path / "e1", [_row("2.25.1", "pneumonia", "corrected"), _row("2.25.2", "normal", "confirmed")]
    )
    second = _export(
        tmp_path / "e2",
        [
            _row("2.25.1", "normal", "confirmed", "2025-01-01T00:00:00"),  # later, but a confirmation
            _row("2.25.2", "pneumonia", "confirmed", "2025-01-01T00:00:00"),  # the later confirmation wins
            _row("2.25.3", "normal", "not assessable"),  # not a label
        ],
    )
    merged, summary = merge_training_data("pneumonia", base, [first, second], tmp_path / "work")
    rows = {r.get("image") or "base": r for r in read_labels(merged)}
    assert set(rows) == {"base", "2.25.1", "2.25.2"}
    assert rows["2.25.1"]["label"] == "pneumonia" and rows["2.25.2"]["label"] == "pneumonia"
    assert rows["2.25.1"]["patient_key"] == "P-2.25.1" and rows["base"]["patient_key"] == "K1"
    assert all(Path(r["path"]).is_absolute() and Path(r["path"]).is_file() for r in rows.values())
    assert Path(rows["2.25.2"]["path"]).is_relative_to(second)
    assert (summary.base_rows, summary.exported, summary.duplicates, summary.corrected) == (1, 2, 2, 1)
    assert summary.labels == {"normal": 1, "pneumonia": 2}


def test_zip_exports_are_unpacked_and_unsafe_ones_refused(tmp_path: Path, base: Path) -> None:
    folder = _export(tmp_path / "e", [_row("2.25.9", "normal", "confirmed")])
    archive = tmp_path / "e.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in folder.rglob("*"):
            z.write(path, path.relative_to(folder).as_posix())
    merged, summary = merge_training_data("pneumonia", base, [archive], tmp_path / "work")
    assert summary.exported == 1 and "work/export-1/pneumonia/images" in read_labels(merged)[1]["path"]
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("pneumonia/../../escape.txt", "x")
    with pytest.raises(MergeError, match="unsafe"):
        merge_training_data("pneumonia", base, [evil], tmp_path / "work2")
    assert not (tmp_path / "escape.txt").exists()


def test_an_export_without_the_model_or_the_columns_is_refused(tmp_path: Path, base: Path) -> None:
    export = _export(tmp_path / "e", [_row("2.25.1", "normal", "confirmed")])
    with pytest.raises(MergeError, match=r"no covid19/labels\.csv"):
        merge_training_data("covid19", base, [export], tmp_path / "w")
    old = _export(tmp_path / "old", [{"path": "images/x.png", "label": "normal"}])
    with pytest.raises(MergeError, match="decision, image"):
        merge_training_data("pneumonia", base, [old], tmp_path / "w2")
