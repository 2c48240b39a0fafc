"""The ``process_study`` job: route every series of a complete study, run each model, write one SR per model
and queue its deliveries.

One bad instance never fails its study: an image that cannot be decoded within the budget, or whose header
cannot be read or described in a report, is recorded as not assessable with its reason, and the rest are
reported.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from highdicom.sr import Comprehensive3DSR
from sqlalchemy import delete, select

from core.db import read_session, transaction
from core.domain import ImageResult, InstanceRef, ModelInfo
from core.encoding import describe, printable
from core.jobs import RENDER_STUDY, ClaimedJob, PermanentError, enqueue
from core.metrics import INFERENCE_SECONDS, timed
from core.tables import (
    AuditEvent,
    Instance,
    Prediction,
    Report,
    RoutingDecision,
    Series,
    Study,
)
from core.worklist import DERIVED_CLASSES, refresh_case
from gateway.delivery import ensure_deliveries
from gateway.result_pdf import write_result_pdf
from gateway.review import render_study_images
from gateway.runtime import Runtime
from gateway.sources import UnreadableSource, read_source
from inference.model import Model, not_assessable, run_model
from inference.preprocess import UnreadableImage, load_dicom_image
from inference.routing import SeriesInfo, route_series
from reporting.capture import build_capture
from reporting.sr import build_report, input_hash, report_series_uid, report_uid, write_report

log = logging.getLogger(__name__)

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def process_study(rt: Runtime, job: ClaimedJob) -> None:
    """Route every series of the study, run each model on its input set and write one SR per model."""
    study_uid = job.payload["study_instance_uid"]
    registry = rt.registry  # the active versions, once for the whole study
    with read_session(rt.factory) as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).first()
        if study is None:
            raise PermanentError(f"study {study_uid} not found")
        by_model: dict[str, list[InstanceRef]] = defaultdict(list)
        decisions: list[RoutingDecision] = []
        for series in session.scalars(select(Series).where(Series.study_id == study.id).order_by(Series.id)):
            instances = list(series.instances)
            if not instances:
                continue
            info = SeriesInfo(
                modality=series.modality,
                sop_class_uid=instances[0].sop_class_uid,
                body_part_examined=series.body_part_examined,
                series_description=series.series_description,
                study_description=study.study_description,
                manufacturer=series.manufacturer,
            )
            for route in route_series(info, rt.settings.routing):
                reason = route.reason
                if route.model_name and route.model_name not in registry.names():
                    reason = f"model {route.model_name} is not installed"
                    decisions.append(
                        RoutingDecision(
                            job_id=job.id,
                            series_id=series.id,
                            model_name=route.model_name,
                            routed=False,
                            reason=reason,
                        )
                    )
                    continue
                decisions.append(
                    RoutingDecision(
                        job_id=job.id,
                        series_id=series.id,
                        model_name=route.model_name,
                        routed=route.routed,
                        reason=reason,
                    )
                )
                if route.model_name:
                    by_model[route.model_name].extend(
                        _ref(study_uid, series.series_instance_uid, i, rt) for i in instances
                    )
        study_id = study.id
    with transaction(rt.factory) as session:
        session.add_all(decisions)
    decoded: dict[Path, np.ndarray | str] = {}  # each image decoded once for all the study's models
    for model_name, refs in by_model.items():
        model = registry.get(model_name)
        assert model is not None
        _report_model(rt, job, study_id, study_uid, model, refs, decoded)
    for model_name, refs in by_model.items():
        for shadow in rt.models.shadows(model_name):
            _run_shadow(rt, job, study_id, study_uid, shadow, refs, decoded)
    if by_model:
        _draw_for_review(rt, study_id, study_uid, decoded)
        write_result_pdf(rt, study_uid, actor=f"job:{job.id}")  # needs the images just drawn


def _draw_for_review(
    rt: Runtime, study_id: int, study_uid: str, decoded: dict[Path, np.ndarray | str]
) -> None:
    """What the case page shows, drawn now from the images decoded for the models (and the heatmaps from
    the gates' runs of them): once the reports are committed, so their deliveries go meanwhile. Should
    drawing fail, a ``render_study`` job draws it again later; the study's result stands either way. A crash
    before this point redoes the whole job, which finds its reports written and comes here again."""
    try:
        render_study_images(rt, study_uid, decoded)
    except Exception:
        log.exception("study %s: case page images not drawn; queued to draw again", study_uid)
        with transaction(rt.factory) as session:
            enqueue(
                session,
                kind=RENDER_STUDY,
                priority=150,  # after deliveries and new studies: nobody waits on the SR for it
                payload={"study_instance_uid": study_uid},
                study_id=study_id,
                dedupe_key=f"render:{study_uid}",
            )


def _run_shadow(
    rt: Runtime,
    job: ClaimedJob,
    study_id: int,
    study_uid: str,
    model: Model,
    refs: list[InstanceRef],
    decoded: dict[Path, np.ndarray | str],
) -> None:
    """A version in shadow mode on the same images: its predictions stored (replacing its earlier ones for
    this study), never a report, a delivery or a worklist entry; its failure never fails the study."""
    info = model.info
    try:
        with timed(INFERENCE_SECONDS, info.name, info.version):
            results = run_model(model, refs, limits=rt.settings.ingest, decoded=decoded)
        with transaction(rt.factory) as session:
            by_sop = {i.sop_instance_uid: i.id for i in _instances(rt, [r.sop_instance_uid for r in refs])}
            session.execute(
                delete(Prediction).where(
                    Prediction.study_id == study_id,
                    Prediction.model_name == info.name,
                    Prediction.model_version == info.version,
                    Prediction.shadow.is_(True),
                )
            )
            session.add_all(_predictions(results, study_id, by_sop, job.id, info, shadow=True))
    except Exception:
        log.exception("study %s: shadow model %s %s failed", study_uid, info.name, info.version)
        return
    log.info(
        "study %s: shadow %s %s predictions stored (%d images)", study_uid, info.name, info.version, len(refs)
    )


def _ref(study_uid: str, series_uid: str, instance: Instance, rt: Runtime) -> InstanceRef:
    return InstanceRef(
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        sop_instance_uid=instance.sop_instance_uid,
        sop_class_uid=instance.sop_class_uid,
        path=rt.storage.absolute(instance.path),
    )


def _report_model(
    rt: Runtime,
    job: ClaimedJob,
    study_id: int,
    study_uid: str,
    model: Model,
    refs: list[InstanceRef],
    decoded: dict[Path, np.ndarray | str],
) -> None:
    model_name = model.info.name
    sop_uids = [r.sop_instance_uid for r in refs]
    uid = report_uid(study_uid, model.info, sop_uids)
    with read_session(rt.factory) as session:  # no write lock for reading (a plain session takes it)
        existing_id = session.scalar(select(Report.id).where(Report.sop_instance_uid == uid))
        previous = session.scalars(
            select(Report)
            .where(Report.study_id == study_id, Report.model_name == model_name)
            .where(Report.sop_class_uid.not_in(DERIVED_CLASSES))
            .order_by(Report.id.desc())
        ).first()
        previous_id = previous.id if previous else None
        previous_path = rt.storage.absolute(previous.path) if previous else None
    if existing_id is not None:
        # Same study, model, version and input set: the SR exists; just make sure it is delivered.
        with transaction(rt.factory) as session:
            existing = session.get(Report, existing_id)
            if existing is not None:
                ensure_deliveries(rt, session, existing)
        log.info("study %s: %s report %s already exists", study_uid, model_name, uid)
        return

    captures_wanted = rt.settings.reporting.secondary_capture
    with timed(INFERENCE_SECONDS, model_name, model.info.version):
        results: list[ImageResult] = run_model(
            model, refs, with_heatmap=captures_wanted, limits=rt.settings.ingest, decoded=decoded
        )
    sources: dict[str, pydicom.Dataset] = {}
    left_out: dict[str, str] = {}
    for ref in refs:
        try:
            sources[ref.sop_instance_uid] = read_source(ref, rt.settings.ingest)
        except UnreadableSource as exc:
            left_out[ref.sop_instance_uid] = str(exc)
    sr, excluded = build_report_leaving_out_bad_sources(
        results,
        sources,
        model=model.info,
        sop_instance_uid=uid,
        series_instance_uid=report_series_uid(study_uid, model.info),
        series_number=rt.settings.reporting.series_number,
        previous_report=_previous(previous_path),
    )
    left_out.update(excluded)
    for sop_uid, reason in left_out.items():
        log.warning(
            "study %s: SOP instance %s left out of the %s report: %s", study_uid, sop_uid, model_name, reason
        )
        results = _unreportable(results, sop_uid, reason)
    if sr is None:
        raise PermanentError(
            f"no instance can be reported by {model_name}: " + "; ".join(sorted(set(left_out.values())))[:500]
        )
    relative = rt.storage.report_path(study_uid, uid)
    write_report(sr, rt.storage.absolute(relative))
    captures = (
        _write_captures(
            rt, results, {k: v for k, v in sources.items() if k not in left_out}, uid, sr, decoded
        )
        if captures_wanted
        else []
    )

    by_sop = {i.sop_instance_uid: i.id for i in _instances(rt, sop_uids)}
    with transaction(rt.factory) as session:
        report = Report(
            study_id=study_id,
            job_id=job.id,
            model_name=model.info.name,
            model_version=model.info.version,
            sop_instance_uid=uid,
            series_instance_uid=str(sr.SeriesInstanceUID),
            sop_class_uid=str(sr.SOPClassUID),
            input_hash=input_hash(sop_uids),
            path=relative,
            supersedes_id=previous_id,
        )
        session.add(report)
        session.flush()
        session.add_all(_predictions(results, study_id, by_sop, job.id, model.info, report_id=report.id))
        ensure_deliveries(rt, session, report)
        for capture_uid, capture_series, capture_path in captures:
            capture = Report(
                study_id=study_id,
                job_id=job.id,
                model_name=model.info.name,
                model_version=model.info.version,
                sop_instance_uid=capture_uid,
                series_instance_uid=capture_series,
                sop_class_uid=SECONDARY_CAPTURE,
                input_hash=report.input_hash,
                path=capture_path,
            )
            session.add(capture)
            session.flush()
            ensure_deliveries(rt, session, capture)
        session.flush()
        # the worklist shows the new result (and it awaits review again)
        review = rt.settings.review
        refresh_case(session, study_id, band=review.uncertain_band, sample_share=review.negative_sample_share)
        session.add(
            AuditEvent(
                actor=f"job:{job.id}",
                action="report_written",
                study_instance_uid=study_uid,
                detail={"model": model.info.name, "version": model.info.version, "sop_instance_uid": uid},
            )
        )
    log.info(
        "study %s: %s %s report %s written (%d images)",
        study_uid,
        model.info.name,
        model.info.version,
        uid,
        len(refs),
    )


def _predictions(
    results: list[ImageResult],
    study_id: int,
    by_sop: dict[str, int],
    job_id: int,
    info: ModelInfo,
    *,
    report_id: int | None = None,
    shadow: bool = False,
) -> list[Prediction]:
    """The rows of one model's results: one per finding, or one saying why an image was not assessable."""
    rows = []
    for result in results:
        common = dict(
            study_id=study_id,
            instance_id=by_sop[result.instance.sop_instance_uid],
            report_id=report_id,
            job_id=job_id,
            model_name=info.name,
            model_version=info.version,
            assessable=result.assessable,
            reason=printable(result.reason, 255) if result.reason else None,
            shadow=shadow,
        )
        if not result.assessable:
            rows.append(Prediction(**common))
        rows += [
            Prediction(
                **common,
                finding=f.name,
                probability=f.probability,
                threshold=f.threshold,
                label=f.label,
            )
            for f in result.findings
        ]
    return rows


def _unreportable(results: list[ImageResult], sop_uid: str, reason: str) -> list[ImageResult]:
    """``results`` with the one of ``sop_uid`` made not assessable for ``reason``."""
    return [
        replace(r, assessable=False, findings=(), reason=not_assessable(reason), heatmap=None)
        if r.instance.sop_instance_uid == sop_uid
        else r
        for r in results
    ]


def build_report_leaving_out_bad_sources(
    results: list[ImageResult], sources: dict[str, pydicom.Dataset], **header: Any
) -> tuple[Comprehensive3DSR | None, dict[str, str]]:
    """The SR of the results whose source could be read, and the instances it leaves out with the reason.

    Should highdicom refuse to describe some source (a value it cannot take), each source is tried alone and
    those that fail are left out; None when no result can be reported.
    """
    reportable = [r for r in results if r.instance.sop_instance_uid in sources]

    def build(chosen: list[ImageResult]) -> Comprehensive3DSR:
        return build_report(
            results=chosen, sources=[sources[r.instance.sop_instance_uid] for r in chosen], **header
        )

    if not reportable:
        return None, {}
    try:
        return build(reportable), {}
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # a source value highdicom cannot take: find which
        log.warning(
            "report of %d images failed (%s); trying each source alone", len(reportable), describe(exc)
        )
    excluded: dict[str, str] = {}
    for result in reportable:
        try:
            build([result])
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            excluded[result.instance.sop_instance_uid] = f"cannot be described in a report: {describe(exc)}"
    rest = [r for r in reportable if r.instance.sop_instance_uid not in excluded]
    return (build(rest) if rest else None), excluded


def _previous(path: Path | None) -> pydicom.Dataset | None:
    """The report this one supersedes (our own file), or None when it is gone or unreadable."""
    if path is None or not path.is_file():
        return None
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        log.warning("previous report %s unreadable (%s); not listed as predecessor", path.name, describe(exc))
        return None


def _write_captures(
    rt: Runtime,
    results: Sequence[ImageResult],
    sources: dict[str, pydicom.Dataset],
    report_uid: str,
    sr: Comprehensive3DSR,
    decoded: dict[Path, np.ndarray | str],
) -> list[tuple[str, str, str]]:
    """One Secondary Capture per image (heatmap and result burned in): (SOP UID, series UID, storage path).

    A capture is a convenience beside the SR: an image it cannot be drawn for is skipped, with a log line.
    """
    out = []
    for number, result in enumerate(results, start=1):
        source = sources.get(result.instance.sop_instance_uid)
        if source is None:
            continue
        image = decoded.get(result.instance.path)
        try:
            if image is None:
                image = load_dicom_image(result.instance.path, limits=rt.settings.ingest)
        except (UnreadableImage, OSError):
            continue  # nothing to draw on; the SR says why the image was not assessable
        if isinstance(image, str):
            continue
        try:
            sc = build_capture(
                result=result,
                source=source,
                image=image,
                report_uid=report_uid,
                report_series_uid=str(sr.SeriesInstanceUID),
                series_number=rt.settings.reporting.series_number,
                instance_number=number,
            )
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            log.warning("no capture of %s: %s", result.instance.sop_instance_uid, describe(exc))
            continue
        relative = rt.storage.report_path(result.instance.study_instance_uid, str(sc.SOPInstanceUID))
        write_report(sc, rt.storage.absolute(relative))
        out.append((str(sc.SOPInstanceUID), str(sc.SeriesInstanceUID), relative))
    return out


def _instances(rt: Runtime, sop_uids: list[str]) -> list[Instance]:
    with read_session(rt.factory) as session:
        return list(session.scalars(select(Instance).where(Instance.sop_instance_uid.in_(sop_uids))))
