"""The review's worker jobs: ``render_study`` draws what the case page shows (display image, thumbnail, the
models' heatmaps, the optic disc), ``verify_review`` turns a saved review into a verified SR and queues its
deliveries.

Renditions are files beside the reports (``storage.rendition_path``): the page serves them as they are, so it
never decodes a DICOM image or runs a model while a radiologist waits.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
from sqlalchemy import select

from core import audit, labels
from core.db import read_session, transaction
from core.decisions import ImageQuestion, report_images
from core.domain import InstanceRef, ModelInfo
from core.jobs import ClaimedJob, PermanentError
from core.tables import Instance, Report, Review, Series, Study
from core.worklist import current_reports
from gateway.delivery import ensure_deliveries
from gateway.result_pdf import write_result_pdf
from gateway.runtime import Runtime
from gateway.sources import UnreadableSource, read_source
from inference.optic_disc import locate_disc
from inference.preprocess import UnreadableImage, load_dicom_image
from reporting.sr import write_report
from reporting.verified import (
    ReviewedFinding,
    Reviewer,
    build_verified_report,
    verified_report_uid,
    verified_series_uid,
)

log = logging.getLogger(__name__)

THUMB_SIDE = 160
HEATMAP_SIDE = 512
#: Reviews are their own series, beside the AI reports' (GATEWAY_REPORTING__SERIES_NUMBER).
VERIFIED_SERIES_OFFSET = 1


def render_study(rt: Runtime, job: ClaimedJob) -> None:
    """The job: :func:`render_study_images` of the payload's study (when drawing it within
    ``process_study`` failed, or asked for by ``gateway worklist retag``)."""
    render_study_images(rt, job.payload["study_instance_uid"])


def render_study_images(
    rt: Runtime, study_uid: str, decoded: Mapping[Path, np.ndarray | str] | None = None
) -> None:
    """Draw every image of the study's current AI reports once, and each model's heatmap on it.

    ``decoded``: images ``process_study`` has decoded already (by file path), drawn as they are; the
    models' gates ran on those very arrays, so their heatmaps come from those runs' class maps.
    """
    with read_session(rt.factory) as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).first()
        if study is None:
            raise PermanentError(f"study {study_uid} not found")
        wanted: dict[int, list[tuple[str, str, bool]]] = {}  # instance id -> (model, version, assessable)
        for report in current_reports(session, study.id):
            for image in report_images(session, report):
                wanted.setdefault(image.instance_id, []).append(
                    (report.model_name, report.model_version, image.assessable)
                )
        instances = {
            i.id: i for i in session.scalars(select(Instance).where(Instance.id.in_(list(wanted) or [-1])))
        }
        series = {i.id: session.get(Series, i.series_id) for i in instances.values()}
    for instance_id, models in wanted.items():
        instance = instances[instance_id]
        ref = InstanceRef(
            study_instance_uid=study_uid,
            series_instance_uid=series[instance_id].series_instance_uid,  # type: ignore[union-attr]
            sop_instance_uid=instance.sop_instance_uid,
            sop_class_uid=instance.sop_class_uid,
            path=rt.storage.absolute(instance.path),
        )
        known = (decoded or {}).get(ref.path)
        _render_instance(rt, ref, models, known if isinstance(known, np.ndarray) else None)


def _render_instance(
    rt: Runtime, ref: InstanceRef, models: list[tuple[str, str, bool]], image: np.ndarray | None = None
) -> None:
    storage = rt.storage

    def put(relative: str, data: bytes) -> None:  # derived files, drawn again when missing: no fsync
        storage.write_bytes(relative, data, durable=False)

    meta_path = storage.rendition_path(ref.study_instance_uid, ref.sop_instance_uid, ".json")
    heatmaps = {
        m: storage.heatmap_path(ref.study_instance_uid, ref.sop_instance_uid, m, v)
        for m, v, assessable in models
        if assessable
    }
    if storage.exists(meta_path) and all(storage.exists(p) for p in heatmaps.values()):
        return  # drawn already (a retried or repeated job)
    try:
        if image is None:
            image = load_dicom_image(ref.path, limits=rt.settings.ingest)
    except (UnreadableImage, OSError) as exc:
        log.info("SOP instance %s: nothing to show (%s)", ref.sop_instance_uid, exc)
        put(meta_path, json.dumps({"error": f"image cannot be shown: {exc}"[:300]}).encode())
        return
    meta: dict[str, Any] = {"source_width": int(image.shape[1]), "source_height": int(image.shape[0])}
    colour = image.ndim == 3
    display, scale = _fit(image, rt.settings.review.display_max_side)
    pixels = np.clip(display * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if colour:
        encoded = _encode(".jpg", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
        name = ".jpg"
    else:
        encoded = _encode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        name = ".png"
    put(storage.rendition_path(ref.study_instance_uid, ref.sop_instance_uid, name), encoded)
    thumb, _ = _fit(pixels, THUMB_SIDE)
    thumb_bgr = cv2.cvtColor(thumb, cv2.COLOR_RGB2BGR) if colour else thumb
    put(
        storage.rendition_path(ref.study_instance_uid, ref.sop_instance_uid, ".thumb.jpg"),
        _encode(".jpg", thumb_bgr, [cv2.IMWRITE_JPEG_QUALITY, 85]),
    )
    meta.update(
        width=int(pixels.shape[1]), height=int(pixels.shape[0]), channels=3 if colour else 1, file=name
    )
    if colour:
        try:
            disc = locate_disc(image)
            meta["disc"] = {
                "kind": disc.kind,
                "x": disc.cx * scale,
                "y": disc.cy * scale,
                "crop_side": disc.crop_side * scale,
            }
        except Exception as exc:  # an illustration: a photograph it cannot read shows without it
            log.info("SOP instance %s: no optic disc (%s)", ref.sop_instance_uid, exc)
    versions = {m: v for m, v, _ in models}
    for model_name, path in heatmaps.items():
        # the version that made the report (a promotion since may have changed the active one)
        model = rt.models.version(model_name, versions[model_name]) or rt.registry.get(model_name)
        method = getattr(model, "heatmap", None)
        if method is None:
            continue
        try:
            heat = method(image)
        except Exception:
            log.exception("heatmap of %s failed on %s", model_name, ref.sop_instance_uid)
            continue
        if heat is None:
            continue
        small, _ = _fit(np.asarray(heat, dtype=np.float32), HEATMAP_SIDE)
        put(path, _encode(".png", np.clip(small * 255.0 + 0.5, 0, 255).astype(np.uint8), []))
    # the metadata last: its presence says the rest is there
    put(meta_path, json.dumps(meta).encode())


def _fit(image: np.ndarray, side: int) -> tuple[np.ndarray, float]:
    h, w = image.shape[:2]
    scale = min(1.0, side / max(h, w))
    if scale >= 1.0:
        return image, 1.0
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA), scale


def _encode(ext: str, pixels: np.ndarray, params: list[int]) -> bytes:
    ok, buffer = cv2.imencode(ext, pixels, params)
    if not ok:
        raise RuntimeError(f"cannot encode {ext}")
    return buffer.tobytes()


def verify_review(rt: Runtime, job: ClaimedJob) -> None:
    """Write the verified SR of one review (deterministic UID: a retry writes the same document) and queue
    its deliveries."""
    review_id = job.payload["review_id"]
    with rt.factory() as session:
        review = session.get(Review, review_id)
        if review is None:
            raise PermanentError(f"review {review_id} not found")
        report = session.get(Report, review.report_id)
        study = session.get(Study, review.study_id)
        if report is None or study is None:
            raise PermanentError(f"review {review_id}: its AI report or study is gone")
        uid = verified_report_uid(report.sop_instance_uid, review.version)
        existing = session.scalars(select(Report).where(Report.sop_instance_uid == uid)).first()
        if existing is not None:
            ensure_deliveries(rt, session, existing)
            session.commit()
            return
        earlier = session.scalars(
            select(Report)
            .join(Review, Review.id == Report.review_id)
            .where(Review.report_id == report.id, Review.version < review.version)
            .order_by(Review.version.desc())
        ).first()
        images = report_images(session, report)
        paths = {
            i.sop_instance_uid: (i.series.series_instance_uid, i.sop_class_uid, rt.storage.absolute(i.path))
            for i in session.scalars(select(Instance).where(Instance.id.in_([q.instance_id for q in images])))
        }
        ai_path = rt.storage.absolute(report.path)
        earlier_path = rt.storage.absolute(earlier.path) if earlier else None
        earlier_id = earlier.id if earlier else None
        study_uid = study.study_instance_uid
        study_id = study.id
        review_data = (review.version, review.answers, review.comment, review.flagged, review.at)
        reviewer = Reviewer(
            name=review.full_name or review.username,
            login=review.username,
            organization=rt.settings.review.organization,
        )
        model = ModelInfo(name=report.model_name, version=report.model_version)
        ai_report_id, input_hash = report.id, report.input_hash
    version, answers, comment, flagged, at = review_data
    sources = []
    for image in images:
        series_uid, sop_class, path = paths[image.sop_instance_uid]
        ref = InstanceRef(study_uid, series_uid, image.sop_instance_uid, sop_class, path)
        try:
            sources.append(read_source(ref, rt.settings.ingest))
        except UnreadableSource as exc:
            raise PermanentError(f"source {image.sop_instance_uid} unreadable: {exc}") from None
    sr = build_verified_report(
        ai_report=pydicom.dcmread(ai_path, stop_before_pixels=True),
        sources=sources,
        findings=reviewed_findings(model.name, images, answers),
        reviewer=reviewer,
        verified_at=at,
        model=model,
        sop_instance_uid=uid,
        series_instance_uid=verified_series_uid(study_uid, model),
        series_number=rt.settings.reporting.series_number + VERIFIED_SERIES_OFFSET,
        instance_number=version,
        previous_verified=pydicom.dcmread(earlier_path, stop_before_pixels=True) if earlier_path else None,
        comment=comment,
        flagged=flagged,
    )
    relative = rt.storage.report_path(study_uid, uid)
    write_report(sr, rt.storage.absolute(relative))
    with transaction(rt.factory) as session:
        verified = Report(
            study_id=study_id,
            job_id=job.id,
            model_name=model.name,
            model_version=model.version,
            sop_instance_uid=uid,
            series_instance_uid=str(sr.SeriesInstanceUID),
            sop_class_uid=str(sr.SOPClassUID),
            input_hash=input_hash,
            path=relative,
            verification="VERIFIED",
            supersedes_id=earlier_id or ai_report_id,
            review_id=review_id,
        )
        session.add(verified)
        session.flush()
        ensure_deliveries(rt, session, verified)
        audit.record(
            session,
            actor=f"job:{job.id}",
            action="report.verified",
            study_uid=study_uid,
            detail={"model": model.name, "version": version, "sop_instance_uid": uid},
        )
    log.info(
        "study %s: verified report %s (review %d, version %d) written", study_uid, uid, review_id, version
    )
    write_result_pdf(rt, study_uid, actor=f"job:{job.id}")  # the document at the PACS shows the decision


def reviewed_findings(
    model: str, images: list[ImageQuestion], answers: list[dict[str, Any]]
) -> list[ReviewedFinding]:
    """The final value of every (image, finding) of a review, with the AI's original beside it."""
    by_uid = {i.sop_instance_uid: i for i in images}
    out: list[ReviewedFinding] = []
    for answer in answers:
        image = by_uid[answer["sop_instance_uid"]]
        if answer["label"] == labels.NOT_ASSESSABLE:
            out.append(
                ReviewedFinding(
                    sop_instance_uid=image.sop_instance_uid,
                    finding=None,
                    present=None,
                    ai_present=None,
                    ai_probability=None,
                    ai_threshold=None,
                    action="not assessable",
                    reason=answer.get("reason") or "not assessable",
                )
            )
            continue
        ai = {f["finding"]: f for f in image.findings}
        names = list(ai) or sorted({f for lab in labels.labels_of(model) for f in lab.present})
        for finding, present in labels.findings_of(model, answer["label"], names).items():
            original = ai.get(finding)
            out.append(
                ReviewedFinding(
                    sop_instance_uid=image.sop_instance_uid,
                    finding=finding,
                    present=present,
                    ai_present=(original["label"] == "present") if original else None,
                    ai_probability=original["probability"] if original else None,
                    ai_threshold=original["threshold"] if original else None,
                    action=answer["action"],
                )
            )
    return out
