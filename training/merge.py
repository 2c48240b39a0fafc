"""Training data for a retrained version: the base data plus radiologists' labels from exports.

``gateway train MODEL --data BASE --from-export EXPORT ...`` trains on one labels CSV that this module writes:
every row of the base data, then each exported image of MODEL once. An export (``gateway export``, folder or
ZIP; see gateway.export for its layout) lists in ``<model>/labels.csv`` each image with its pseudonymous image
id, the radiologist's final label in the training columns, and whether the decision confirmed or corrected the
AI. An image in several exports (or twice in one) is kept once, by its image id: a correction wins over a
confirmation, then the later decision, then the later export on the command line. Paths in the merged CSV are
absolute, so the recipes read the images where they are; the patient pseudonym becomes ``patient_key`` (the
pneumonia recipe keeps a patient's images on one side of its split).
"""

from __future__ import annotations

import csv
import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from training.data import labels_csv, read_labels

#: Which decision wins when an image is in more than one export (higher wins).
_RANK = {"confirmed": 1, "corrected": 2}


class MergeError(ValueError):
    """An export that cannot be trained on (not an export, nothing for this model, unsafe ZIP member)."""


@dataclass
class MergeSummary:
    """What the merged CSV holds (the candidate's ``data_summary``; printed by ``gateway train``)."""

    base: str
    base_rows: int
    exports: list[dict[str, Any]] = field(default_factory=list)
    #: exported images kept (after de-duplication)
    exported: int = 0
    #: exported rows dropped as the same image again
    duplicates: int = 0
    #: images whose kept label is a correction of the AI's
    corrected: int = 0
    labels: Counter[str] = field(default_factory=Counter)
    #: the pseudonymous ids of the exported images trained on: the promotion gate leaves these reviewed
    #: cases out of its evaluation (a model is not evaluated on what it learnt from)
    image_ids: set[str] = field(default_factory=set)

    def as_dict(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "base_rows": self.base_rows,
            "exports": self.exports,
            "exported_images": self.exported,
            "duplicates_dropped": self.duplicates,
            "corrected": self.corrected,
            "labels": dict(sorted(self.labels.items())),
            "exported_image_ids": sorted(self.image_ids),
        }

    def describe(self) -> str:
        parts = ", ".join(f"{n} {label}" for label, n in sorted(self.labels.items()))
        return (
            f"{self.base_rows} base rows + {self.exported} exported images ({self.corrected} corrected) from "
            f"{len(self.exports)} export(s), {self.duplicates} duplicate rows dropped; labels: {parts}"
        )


def merge_training_data(
    model: str, base: Path, exports: Sequence[Path], work: Path
) -> tuple[Path, MergeSummary]:
    """Write ``work/labels.csv`` (base rows, then the exported images of ``model``); ZIP exports are unpacked
    under ``work``. Returns the CSV and what it holds."""
    work.mkdir(parents=True, exist_ok=True)
    base_csv = labels_csv(base).resolve()
    rows = [_absolute(row, base_csv.parent) for row in read_labels(base_csv)]
    summary = MergeSummary(base=str(base_csv), base_rows=len(rows))
    chosen: dict[str, tuple[tuple[int, str, int], dict[str, str]]] = {}
    for order, export in enumerate(exports):
        folder = _unpacked(export, model, work / f"export-{order + 1}")
        export_csv = folder / model / "labels.csv"
        if not export_csv.is_file():
            raise MergeError(f"{export}: no {model}/labels.csv (an export of {model} decisions is needed)")
        exported = read_labels(export_csv)
        missing = {"image", "decision"} - set(exported[0])
        if missing:
            raise MergeError(f"{export_csv} lacks the column(s) {', '.join(sorted(missing))}: export again")
        summary.exports.append({"path": str(Path(export).resolve()), "rows": len(exported)})
        for row in exported:
            decision = row["decision"].strip()
            if decision not in _RANK:
                continue  # not a label (e.g. "not assessable": exports leave those out anyway)
            key = row["image"].strip()
            rank = (_RANK[decision], row.get("decided_at", ""), order)
            previous = chosen.get(key)
            if previous is not None:
                summary.duplicates += 1
                if previous[0] >= rank:
                    continue
            entry = _absolute(row, export_csv.parent)
            entry.setdefault("patient_key", row.get("patient", ""))
            chosen[key] = (rank, entry)
    for key, (rank, entry) in chosen.items():
        rows.append(entry)
        summary.image_ids.add(key)
        summary.exported += 1
        summary.corrected += rank[0] == _RANK["corrected"]
    summary.labels.update(row.get("label", "") for row in rows)
    merged = work / "labels.csv"
    columns = list(dict.fromkeys(column for row in rows for column in row))
    with open(merged, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return merged, summary


def _absolute(row: dict[str, str], folder: Path) -> dict[str, str]:
    path = Path(row["path"])
    if not path.is_absolute():
        path = folder / path
    if not path.is_file():
        raise MergeError(f"image {path} listed in {folder / 'labels.csv'} does not exist")
    return {**row, "path": str(path)}


def _unpacked(export: Path, model: str, target: Path) -> Path:
    """The export folder; a ZIP export's ``<model>/`` members are extracted to ``target`` first."""
    export = Path(export)
    if export.is_dir():
        return export
    if not zipfile.is_zipfile(export):
        raise MergeError(f"{export} is neither an export folder nor an export ZIP")
    with zipfile.ZipFile(export) as archive:
        for member in archive.infolist():
            name = PurePosixPath(member.filename)
            if name.is_absolute() or ".." in name.parts:
                raise MergeError(f"{export}: unsafe member name {member.filename!r}")
            if name.parts[:1] == (model,) and not member.is_dir():
                archive.extract(member, target)
    return target
