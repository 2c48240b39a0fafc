"""De-identified label exports: the reviewed images, their decisions and (optionally) the images themselves,
written to a folder or a ZIP, and the check of an export against its sources (``gateway export --verify``).

Layout of an export::

    README.txt                 what this is, how it was de-identified; research use only
    manifest.csv | .jsonl      one row per reviewed image (pseudonymous ids only)
    <model>/labels.csv         path + the label columns `gateway train <model> --data <export>/<model>` reads,
                               the pseudonymous patient and image ids, decision and decision time
                               (what `gateway train <model> --from-export <export>` merges by)
    <model>/images/<label>/<image id>.png | .dcm

Pseudonyms (reporting.deid): patient ``P-`` + 16 hex digits, study and image ids the 2.25 UIDs the DICOM files
carry; the decision time moves back by the patient's date shift, like the dates inside the files.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import secrets
import struct
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import IO, Any, Literal, Protocol

import cv2
import numpy as np
import pydicom
from sqlalchemy.orm import Session, sessionmaker

from core import labels
from core.db import read_session
from core.export import ExportFilter, ReviewedImage, reviewed_images
from core.settings import Settings
from core.storage import Storage
from inference.preprocess import UnreadableImage, load_dicom_image
from reporting.deid import BurnedInAnnotation, Deidentifier, leaks

log = logging.getLogger(__name__)

Images = Literal["dicom", "png", "none"]
Format = Literal["csv", "jsonl"]
NOTICE = (
    "Research use only. The AI labels in this export are research decision support, never a diagnosis; "
    "the final labels are radiologists' decisions."
)
MANIFEST_COLUMNS = (
    "patient",
    "study",
    "image",
    "modality",
    "body_part",
    "model",
    "model_version",
    "ai_probability",
    "ai_probabilities",
    "ai_label",
    "label",
    "decision",
    "reviewer_role",
    "decided_at",
    "clinical",
    "file",
)
#: Clinical fields that are patient characteristics (kept only with Retain Patient Characteristics).
_CHARACTERISTIC_FIELDS = ("age", "sex")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_PIXEL_CHUNKS = {b"IHDR", b"PLTE", b"IDAT", b"IEND"}


@dataclass(frozen=True)
class ExportOptions:
    filter: ExportFilter = field(default_factory=ExportFilter)
    format: Format = "csv"
    images: Images = "png"


@dataclass
class ExportCounts:
    rows: int = 0
    images: int = 0
    #: Burned In Annotation YES: the pixels may show identifying text
    burned_in: int = 0
    #: files missing or unreadable (counted, named in the log by UID)
    unreadable: int = 0
    by_label: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "images": self.images,
            "left_out_burned_in": self.burned_in,
            "left_out_unreadable": self.unreadable,
            "by_label": dict(sorted(self.by_label.items())),
        }


class Sink(Protocol):
    def add(self, name: str, data: bytes) -> None: ...


class FolderSink:
    """Files under ``root`` (made; must be empty or new)."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        if any(root.iterdir()):
            raise ValueError(f"{root} is not empty")
        self.root = root

    def add(self, name: str, data: bytes) -> None:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


class ZipSink:
    """Members of a ZIP written to ``stream`` (images stored as they are, text deflated)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.zip = zipfile.ZipFile(stream, "w")

    def add(self, name: str, data: bytes) -> None:
        kind = zipfile.ZIP_DEFLATED if name.endswith((".csv", ".jsonl", ".txt")) else zipfile.ZIP_STORED
        self.zip.writestr(name, data, compress_type=kind)

    def close(self) -> None:
        self.zip.close()


def export_key(settings: Settings) -> bytes:
    """The project key pseudonyms derive from: GATEWAY_EXPORT__KEY, else ``DATA_DIR/export.key``, made once
    (32 random bytes, owner-only) so that exports stay consistent with each other."""
    configured = settings.export.key
    if configured is not None and configured.get_secret_value():
        return configured.get_secret_value().encode()
    path = settings.data_dir / "export.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_hex(32).encode())
    return path.read_bytes().strip()


def deidentifier(settings: Settings) -> Deidentifier:
    return Deidentifier(export_key(settings), settings.export.keep_patient_characteristics)


def count_export(factory: sessionmaker[Session], f: ExportFilter) -> Counter[str]:
    """What an export with ``f`` would hold, by model and label (``--dry-run``)."""
    with read_session(factory) as session:
        return Counter(f"{r.model_name}/{r.label}" for r in reviewed_images(session, f))


def write_export(
    factory: sessionmaker[Session],
    storage: Storage,
    deid: Deidentifier,
    options: ExportOptions,
    sink: Sink,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> ExportCounts:
    """Write one export into ``sink``; returns what it holds and what it left out."""
    with read_session(factory) as session:
        rows = list(reviewed_images(session, options.filter))
    counts = ExportCounts()
    manifest: list[dict[str, Any]] = []
    training: dict[str, list[dict[str, str]]] = {}
    for done, row in enumerate(rows, start=1):
        entry = _export_row(row, storage, deid, options, sink, counts)
        if entry is not None:
            manifest.append(entry)
            if entry["file"] and row.label != labels.NOT_ASSESSABLE:  # a class to train on
                model_folder = f"{row.model_name}/"
                training.setdefault(row.model_name, []).append(
                    {
                        "path": entry["file"].removeprefix(model_folder),
                        **labels.training_columns(row.model_name, row.label),
                        "patient": entry["patient"],
                        "image": entry["image"],
                        # what `gateway train --from-export` de-duplicates by (a correction wins)
                        "decision": entry["decision"],
                        "decided_at": entry["decided_at"],
                    }
                )
        if progress is not None:
            progress(done, len(rows))
    sink.add(f"manifest.{options.format}", _manifest(manifest, options.format))
    for model, entries in sorted(training.items()):
        sink.add(f"{model}/labels.csv", _csv(entries))
    sink.add("README.txt", _readme(deid, options, counts).encode())
    return counts


def _export_row(
    row: ReviewedImage,
    storage: Storage,
    deid: Deidentifier,
    options: ExportOptions,
    sink: Sink,
    counts: ExportCounts,
) -> dict[str, Any] | None:
    path = storage.absolute(row.path)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=options.images != "dicom")
    except Exception as exc:  # a file removed or damaged since it was reviewed
        log.warning("export: SOP instance %s left out: %s", row.sop_instance_uid, exc)
        counts.unreadable += 1
        return None
    if str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES":
        log.info("export: SOP instance %s left out: burned-in annotation", row.sop_instance_uid)
        counts.burned_in += 1
        return None
    patient_key = str(ds.get("PatientID") or "") or row.study_instance_uid
    image_id = deid.uid(row.sop_instance_uid)
    folder = f"{row.model_name}/images/{row.label}"
    file = ""
    try:
        if options.images == "dicom":
            file = f"{folder}/{image_id}.dcm"
            sink.add(file, _deidentified_bytes(ds, deid))
        elif options.images == "png":
            file = f"{folder}/{image_id}.png"
            sink.add(file, _png(path))
    except (BurnedInAnnotation, UnreadableImage, OSError, ValueError) as exc:
        log.warning("export: SOP instance %s left out: %s", row.sop_instance_uid, exc)
        counts.unreadable += 1
        return None
    counts.rows += 1
    counts.images += bool(file)
    counts.by_label[f"{row.model_name}/{row.label}"] += 1
    clinical = dict(row.clinical)
    if not deid.keep_characteristics:
        for name in _CHARACTERISTIC_FIELDS:
            clinical.pop(name, None)
    probability = row.primary_probability
    return {
        "patient": deid.patient(patient_key),
        "study": deid.uid(row.study_instance_uid),
        "image": image_id,
        "modality": row.modality or "",
        "body_part": row.body_part or "",
        "model": row.model_name,
        "model_version": row.model_version,
        "ai_probability": "" if probability is None else round(probability, 6),
        "ai_probabilities": {k: round(v, 6) for k, v in row.probabilities.items()},
        "ai_label": row.ai_label,
        "label": row.label,
        "decision": row.action,
        "reviewer_role": row.reviewer_role,
        "decided_at": (row.decided_at - timedelta(days=deid.shift_days(patient_key))).isoformat(),
        "clinical": {k: v for k, v in clinical.items() if v is not None},
        "file": file,
    }


def _deidentified_bytes(ds: pydicom.Dataset, deid: Deidentifier) -> bytes:
    deid.deidentify(ds)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _png(path: Path) -> bytes:
    """The image as the models read it (modality LUT, VOI window, MONOCHROME1 inverted), 8-bit, first frame;
    a PNG of IHDR, IDAT and IEND only: no text, no time, no metadata of any kind."""
    image = load_dicom_image(path)
    pixels: np.ndarray = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if pixels.ndim == 3:
        pixels = np.asarray(cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR))
    ok, buffer = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise ValueError("cannot encode PNG")
    return buffer.tobytes()


def _manifest(rows: list[dict[str, Any]], fmt: Format) -> bytes:
    if fmt == "jsonl":
        return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()
    flat = [
        {k: json.dumps(v, sort_keys=True) if isinstance(v, dict) else v for k, v in r.items()} for r in rows
    ]
    return _csv(flat, MANIFEST_COLUMNS)


def _csv(rows: list[dict[str, Any]], columns: tuple[str, ...] | None = None) -> bytes:
    names = list(columns or dict.fromkeys(k for r in rows for k in r))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode()


def _readme(deid: Deidentifier, options: ExportOptions, counts: ExportCounts) -> str:
    texts, applied = deid.method()
    f = options.filter
    return "\n".join(
        [
            "screening-gateway label export",
            "",
            NOTICE,
            "",
            "Selection: "
            + ", ".join(
                f"{k}={v}"
                for k, v in (
                    ("model", f.model),
                    ("since", f.since),
                    ("until", f.until),
                    ("label", f.label),
                    ("decision", f.decision),
                )
                if v is not None
            ),
            f"Images: {options.images}; manifest: {options.format}",
            "De-identification: " + "; ".join(texts),
            "Codes (CID 7050): " + ", ".join(f"{c.value} {c.meaning}" for c in applied),
            "Counts: " + json.dumps(counts.as_dict(), sort_keys=True),
            "",
        ]
    )


def zip_export(
    factory: sessionmaker[Session], storage: Storage, deid: Deidentifier, options: ExportOptions
) -> tuple[Path, dict[str, Any]]:
    """An export as a ZIP in the storage volume's temp folder (the caller removes it; a crash leaves it to
    ``Storage.prepare``), and its counts."""
    fh, path = storage.open_temp()
    try:
        with fh:
            sink = ZipSink(fh)
            counts = write_export(factory, storage, deid, options, sink)
            sink.close()
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path, counts.as_dict()


def verify_export(
    factory: sessionmaker[Session], storage: Storage, deid: Deidentifier, root: Path
) -> list[str]:
    """Every way an export folder (or ZIP) leaks what its sources say; empty when it is clean.

    Each DICOM file is checked against its source instance (found by its pseudonymous UID among the reviewed
    instances) with :func:`reporting.deid.leaks`; each PNG must hold pixel chunks only; the manifest and
    labels files must not contain an identifying value of any exported image's source.
    """
    members = _members(root)
    with read_session(factory) as session:
        sources = {
            deid.uid(r.sop_instance_uid): r.path
            for r in reviewed_images(session, ExportFilter(decision="any"))
        }
    problems: list[str] = []
    identifying: set[str] = set()
    for name, data in members.items():
        if name.endswith(".dcm"):
            exported = pydicom.dcmread(io.BytesIO(data))
            source_path = sources.get(str(exported.get("SOPInstanceUID", "")))
            if source_path is None:
                problems.append(f"{name}: no reviewed instance has this pseudonymous UID")
                continue
            source = pydicom.dcmread(storage.absolute(source_path))
            problems += [f"{name}: {p}" for p in leaks(source, exported, data, deid)]
            identifying |= _identifying(source)
        elif name.endswith(".png"):
            problems += [f"{name}: {p}" for p in _png_problems(data)]
    if not identifying:  # PNG or no images: the sources of the manifest's rows
        for path in sources.values():
            try:
                identifying |= _identifying(pydicom.dcmread(storage.absolute(path), stop_before_pixels=True))
            except Exception:
                continue
    for name, data in members.items():
        if name.endswith((".csv", ".jsonl", ".txt")):
            problems += [
                f"{name}: contains {text[:12]!r}…" for text in sorted(identifying) if text.encode() in data
            ]
    return problems


def _identifying(source: pydicom.Dataset) -> set[str]:
    """Values no text file of an export may contain: names, IDs, UIDs, dates, accession numbers."""
    out: set[str] = set()
    for keyword in (
        "PatientName",
        "PatientID",
        "AccessionNumber",
        "StudyInstanceUID",
        "SOPInstanceUID",
        "SeriesInstanceUID",
        "StudyDate",
        "PatientBirthDate",
        "InstitutionName",
        "StudyID",
    ):
        value = str(source.get(keyword) or "").strip()
        if len(value) >= 4:
            out.add(value)
    return out


def _png_problems(data: bytes) -> list[str]:
    if not data.startswith(_PNG_SIGNATURE):
        return ["not a PNG"]
    problems, offset = [], len(_PNG_SIGNATURE)
    while offset + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        if kind not in _PNG_PIXEL_CHUNKS:
            problems.append(f"PNG chunk {kind.decode('latin-1')!r} (metadata)")
        offset += 12 + length
    return problems


def _members(root: Path) -> dict[str, bytes]:
    if root.is_file():
        with zipfile.ZipFile(root) as z:
            return {n: z.read(n) for n in z.namelist() if not n.endswith("/")}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@dataclass
class ReviewedEvaluation:
    """Radiologists' decisions as extra cases for the promotion gate (rows in the training vocabulary, with
    absolute paths to the stored instances) and what was left out."""

    rows: list[dict[str, str]] = field(default_factory=list)
    #: reviewed images one of the two models was trained on (by pseudonymous image id)
    trained_on: int = 0
    #: files missing since the review
    missing: int = 0


def reviewed_evaluation(
    factory: sessionmaker[Session], storage: Storage, deid: Deidentifier, model: str, exclude: set[str]
) -> ReviewedEvaluation:
    """Every image of ``model`` a radiologist confirmed or corrected (its current review's final label),
    except those whose pseudonymous image id is in ``exclude`` (what either model trained on: a retrained
    version's ``data_summary.exported_image_ids``, the ids ``gateway export`` writes with the same key)."""
    out = ReviewedEvaluation()
    seen: set[str] = set()
    with read_session(factory) as session:
        rows = list(reviewed_images(session, ExportFilter(model=model, decision="any")))
    for row in reversed(rows):  # newest decision first: an image decided twice counts once, as decided last
        if row.action not in ("confirmed", "corrected") or row.label == labels.NOT_ASSESSABLE:
            continue
        if row.sop_instance_uid in seen:
            continue
        seen.add(row.sop_instance_uid)
        image_id = deid.uid(row.sop_instance_uid)
        if image_id in exclude:
            out.trained_on += 1
            continue
        path = storage.absolute(row.path)
        if not path.is_file():
            out.missing += 1
            continue
        columns = labels.training_columns(model, row.label)
        out.rows.append({"path": str(path), **columns, "image": image_id, "source": "review"})
    return out
