"""A case as the review page and its JSON twin show it: the study header (read from the instance file), the
images and what the case page draws for them, each model's findings and labels, the decisions so far."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.orm import Session

from core import labels
from core.decisions import changes, report_images
from core.encoding import printable
from core.settings import Settings
from core.storage import Storage
from core.tables import Instance, Report, Review, ReviewCase, Series, Study, User
from core.worklist import current_reports
from reporting.pdf import data_uri

#: The header fields of the case page, read from the first instance (never stored in the database).
_HEADER_TAGS = [
    "PatientName",
    "PatientID",
    "PatientSex",
    "PatientAge",
    "PatientBirthDate",
    "StudyDate",
    "AccessionNumber",
    "StudyDescription",
]
_AGE = re.compile(r"^(\d{3})([DWMY])$")
_MODEL_NAME = re.compile(r"^[a-z0-9_][a-z0-9_-]{0,31}$")


@dataclass
class CaseView:
    study: Study
    case: ReviewCase
    header: dict[str, str]
    images: list[dict[str, Any]]
    models: list[dict[str, Any]]
    history: list[dict[str, Any]]
    claimed_by: str | None
    claim_expires_at: datetime | None
    viewer_url: str | None
    notes: list[str] = field(default_factory=list)


def _text(value: Any, limit: int = 64) -> str:
    return printable(str(value), limit) if value not in (None, "") else ""


def person_name(value: Any) -> str:
    """A DICOM PN for people: "DOE^JANE^^DR" -> "DOE, JANE, DR" (the alphabetic group only)."""
    text = str(value or "").split("=")[0]
    parts = [p.strip() for p in text.split("^")]
    family, given = [*parts, "", ""][:2]
    rest = [p for p in parts[2:] if p]
    shown = ", ".join(p for p in [family, " ".join(filter(None, [given]))] if p)
    return printable(" ".join([shown, *rest]).strip(), 128)


def _age(ds: pydicom.Dataset) -> str:
    match = _AGE.match(str(ds.get("PatientAge") or ""))
    if match:
        number, unit = int(match.group(1)), match.group(2)
        return f"{number} {dict(D='days', W='weeks', M='months', Y='years')[unit]}"
    born, on = str(ds.get("PatientBirthDate") or ""), str(ds.get("StudyDate") or "")
    try:
        birth = datetime.strptime(born[:8], "%Y%m%d").date()
        day = datetime.strptime(on[:8], "%Y%m%d").date() if on else date.today()
    except ValueError:
        return ""
    years = day.year - birth.year - ((day.month, day.day) < (birth.month, birth.day))
    return f"{years} years" if 0 <= years < 150 else ""


def _date(value: Any) -> str:
    text = str(value or "")
    try:
        return datetime.strptime(text[:8], "%Y%m%d").strftime("%Y-%m-%d")
    except ValueError:
        return _text(text, 16)


def read_header(path: Any) -> dict[str, str]:
    """The patient/study header of the case page; every value reduced to printable text."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return {"error": "the study's header cannot be read"}
    try:
        return {
            "patient_name": person_name(ds.get("PatientName")),
            "patient_id": _text(ds.get("PatientID")),
            "sex": _text(ds.get("PatientSex"), 16),
            "age": _age(ds),
            "study_date": _date(ds.get("StudyDate")),
            "accession": _text(ds.get("AccessionNumber")),
            "description": _text(ds.get("StudyDescription"), 128),
        }
    except Exception:  # a value that does not decode: show the rest of the page all the same
        return {"error": "the study's header cannot be read"}


def image_meta(storage: Storage, study_uid: str, sop_uid: str) -> dict[str, Any] | None:
    """What render_study wrote for an instance (None: not drawn yet)."""
    path = storage.absolute(storage.rendition_path(study_uid, sop_uid, ".json"))
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def load_case(session: Session, study_uid: str, settings: Settings, storage: Storage) -> CaseView | None:
    study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).first()
    if study is None:
        return None
    item = session.scalars(select(ReviewCase).where(ReviewCase.study_id == study.id)).first()
    if item is None:
        return None
    reports = current_reports(session, study.id)
    models: list[dict[str, Any]] = []
    image_ids: list[int] = []
    history: list[dict[str, Any]] = []
    for report in reports:
        questions = report_images(session, report)
        reviews = list(
            session.scalars(select(Review).where(Review.report_id == report.id).order_by(Review.version))
        )
        latest = reviews[-1] if reviews else None
        answers = {a["sop_instance_uid"]: a for a in latest.answers} if latest else {}
        names = sorted({str(f["finding"]) for q in questions for f in q.findings})
        verified = {
            r.review_id: r.sop_instance_uid
            for r in session.scalars(
                select(Report).where(Report.review_id.in_([v.id for v in reviews] or [-1]))
            )
        }
        for n, review in enumerate(reviews):
            previous = reviews[n - 1] if n else None
            history.append(
                {
                    "model": report.model_name,
                    "version": review.version,
                    "by": review.full_name or review.username,
                    "at": review.at,
                    "changes": changes(previous, review),
                    "comment": review.comment,
                    "flagged": review.flagged,
                    "verified_sr": verified.get(review.id),
                }
            )
        models.append(
            {
                "name": report.model_name,
                "version": report.model_version,
                "report_uid": report.sop_instance_uid,
                "card_url": f"/models/{report.model_name}/card"
                if _MODEL_NAME.match(report.model_name)
                else None,
                "labels": [
                    {"key": lab.key, "title": lab.title} for lab in labels.labels_of(report.model_name, names)
                ],
                "cautions": labels.cautions(report.model_name, names),
                "base_version": latest.version if latest else 0,
                "comment": latest.comment if latest else None,
                "flagged": latest.flagged if latest else False,
                "clinical": latest.clinical if latest else {},
                "images": [
                    {
                        "sop_instance_uid": q.sop_instance_uid,
                        "assessable": q.assessable,
                        "reason": q.reason,
                        "findings": q.findings,
                        "ai_label": q.ai_label,
                        "ai_title": labels.label_title(report.model_name, q.ai_label, names),
                        "label": answers.get(q.sop_instance_uid, {}).get("label"),
                        "label_reason": answers.get(q.sop_instance_uid, {}).get("reason"),
                    }
                    for q in questions
                ],
            }
        )
        image_ids.extend(q.instance_id for q in questions if q.instance_id not in image_ids)
    rows = session.execute(
        select(Instance, Series.series_instance_uid, Series.modality)
        .join(Series, Series.id == Instance.series_id)
        .where(Instance.id.in_(image_ids or [-1]))
    ).all()
    by_id = {i.id: (i, series_uid, modality) for i, series_uid, modality in rows}
    images = []
    for number, instance_id in enumerate(image_ids, start=1):
        instance, series_uid, modality = by_id[instance_id]
        sop = instance.sop_instance_uid
        meta = image_meta(storage, study_uid, sop)
        base = f"/cases/{study_uid}/images/{sop}"
        heatmaps = {
            m["name"]: f"{base}/heatmap/{m['name']}"
            for m in models
            if any(i["sop_instance_uid"] == sop and i["assessable"] for i in m["images"])
        }
        images.append(
            {
                "number": number,
                "sop_instance_uid": sop,
                "series_instance_uid": series_uid,
                "modality": modality,
                "display_url": f"{base}/display" if meta and "file" in meta else None,
                "thumb_url": f"{base}/thumb" if meta and "file" in meta else None,
                "heatmaps": heatmaps if meta and "file" in meta else {},
                "meta": meta,
                "path": storage.absolute(instance.path),
            }
        )
    header = read_header(images[0]["path"]) if images else {}
    claimer = session.get(User, item.claimed_by_id) if item.claimed_by_id else None
    template = settings.review.viewer_url_template
    viewer_url = (
        template.format(study_uid=study_uid, accession=study.accession_number or "") if template else None
    )
    history.sort(key=lambda h: h["at"], reverse=True)
    return CaseView(
        study=study,
        case=item,
        header=header,
        images=images,
        models=models,
        history=history,
        claimed_by=(claimer.full_name or claimer.username) if claimer else None,
        claim_expires_at=item.claim_expires_at,
        viewer_url=viewer_url,
    )


# -- the PDF result (api.routes.report; gateway.result_pdf in the study) ------------------------------------


def pdf_context(view: CaseView, storage: Storage, study_uid: str) -> dict[str, Any]:
    """What reporting/templates/report.html reads: the case's images (inline data: URIs), each model's
    findings, the gate's reasons, the latest decisions."""
    decisions = _decisions(view)
    images = []
    for image in view.images:
        sop = image["sop_instance_uid"]
        meta = image.get("meta") or {}
        display = None
        if "file" in meta:
            display = _inline(storage, storage.rendition_path(study_uid, sop, meta["file"]))
        heatmaps = {}
        results = []
        for m in view.models:
            answer = next((i for i in m["images"] if i["sop_instance_uid"] == sop), None)
            if answer is None:
                continue
            if answer["assessable"]:
                uri = _inline(storage, storage.heatmap_path(study_uid, sop, m["name"], m["version"]))
                if uri:
                    heatmaps[m["name"]] = uri
            results.append(
                {
                    "model": m["name"],
                    "version": m["version"],
                    "assessable": answer["assessable"],
                    "reason": answer["reason"],
                    "findings": answer["findings"],
                    "cautions": labels.cautions(m["name"], [str(f["finding"]) for f in answer["findings"]]),
                    "ai_title": answer["ai_title"],
                    "decision": decisions.get((m["name"], sop)),
                }
            )
        images.append(
            {
                "number": image["number"],
                "modality": image["modality"],
                "display": display,
                "heatmaps": heatmaps,
                "results": results,
            }
        )
    return {
        "study_uid": study_uid,
        "header": view.header,
        "images": images,
        "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _decisions(view: CaseView) -> dict[tuple[str, str], dict[str, Any]]:
    """(model, SOP Instance UID) -> the latest decision on that image: label, action, reason, who, when."""
    latest: dict[str, dict[str, Any]] = {}
    for h in view.history:  # newest first
        latest.setdefault(h["model"], h)
    out = {}
    for m in view.models:
        review = latest.get(m["name"])
        names = sorted({str(f["finding"]) for i in m["images"] for f in i["findings"]})
        for i in m["images"]:
            if review is None or not i["label"]:
                continue
            action = "confirmed" if i["label"] == i["ai_label"] else "corrected"
            if i["label"] == labels.NOT_ASSESSABLE:
                action = "not assessable"
            out[(m["name"], i["sop_instance_uid"])] = {
                "title": labels.label_title(m["name"], i["label"], names),
                "action": action,
                "reason": i["label_reason"],
                "by": review["by"],
                "at": review["at"].strftime("%Y-%m-%d %H:%M UTC"),
            }
    return out


def _inline(storage: Storage, relative: str) -> str | None:
    path = storage.absolute(relative)
    if not path.is_file():
        return None
    media = "image/png" if path.suffix == ".png" else "image/jpeg"
    return data_uri(path.read_bytes(), media)
