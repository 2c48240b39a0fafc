"""The ``process_study`` job: route every series of a complete study, run each model, write one SR per model
and queue its deliveries."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence

import pydicom
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db import transaction
from core.domain import ImageResult, InstanceRef
from core.jobs import DELIVER, ClaimedJob, PermanentError, enqueue
from core.tables import (
    AuditEvent,
    Delivery,
    Instance,
    Prediction,
    Report,
    RoutingDecision,
    Series,
    Study,
    utcnow,
)
from gateway.runtime import Runtime
from inference.model import run_model
from inference.preprocess import UnreadableImage, load_dicom_image
from inference.routing import SeriesInfo, route_series
from reporting.capture import build_capture
from reporting.sr import build_report, input_hash, report_series_uid, report_uid, write_report

log = logging.getLogger(__name__)

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def process_study(rt: Runtime, job: ClaimedJob) -> None:
    """Route every series of the study, run each model on its input set and write one SR per model."""
    study_uid = job.payload["study_instance_uid"]
    with rt.factory() as session:
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
                if route.model_name and route.model_name not in rt.registry.names():
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
    for model_name, refs in by_model.items():
        _report_model(rt, job, study_id, study_uid, model_name, refs)


def _ref(study_uid: str, series_uid: str, instance: Instance, rt: Runtime) -> InstanceRef:
    return InstanceRef(
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        sop_instance_uid=instance.sop_instance_uid,
        sop_class_uid=instance.sop_class_uid,
        path=rt.storage.absolute(instance.path),
    )


def _report_model(
    rt: Runtime, job: ClaimedJob, study_id: int, study_uid: str, model_name: str, refs: list[InstanceRef]
) -> None:
    model = rt.registry.get(model_name)
    assert model is not None
    sop_uids = [r.sop_instance_uid for r in refs]
    uid = report_uid(study_uid, model.info, sop_uids)
    with rt.factory() as session:
        existing = session.scalars(select(Report).where(Report.sop_instance_uid == uid)).first()
        if existing is not None:
            # Same study, model, version and input set: the SR exists; just make sure it is delivered.
            _ensure_deliveries(rt, session, existing)
            session.commit()
            log.info("study %s: %s report %s already exists", study_uid, model_name, uid)
            return
        previous = session.scalars(
            select(Report)
            .where(Report.study_id == study_id, Report.model_name == model_name)
            .where(Report.sop_class_uid != SECONDARY_CAPTURE)
            .order_by(Report.id.desc())
        ).first()
        previous_id = previous.id if previous else None
        previous_path = rt.storage.absolute(previous.path) if previous else None

    captures_wanted = rt.settings.reporting.secondary_capture
    results: list[ImageResult] = run_model(model, refs, with_heatmap=captures_wanted)
    sources = [pydicom.dcmread(r.path, stop_before_pixels=True) for r in refs]
    previous_ds = pydicom.dcmread(previous_path) if previous_path and previous_path.is_file() else None
    sr = build_report(
        results=results,
        sources=sources,
        model=model.info,
        sop_instance_uid=uid,
        series_instance_uid=report_series_uid(study_uid, model.info),
        series_number=rt.settings.reporting.series_number,
        previous_report=previous_ds,
    )
    relative = rt.storage.report_path(study_uid, uid)
    write_report(sr, rt.storage.absolute(relative))
    captures = (
        _write_captures(rt, results, sources, uid, str(sr.SeriesInstanceUID)) if captures_wanted else []
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
        for result in results:
            common = dict(
                study_id=study_id,
                instance_id=by_sop[result.instance.sop_instance_uid],
                report_id=report.id,
                job_id=job.id,
                model_name=model.info.name,
                model_version=model.info.version,
                assessable=result.assessable,
                reason=result.reason,
            )
            if not result.assessable:
                session.add(Prediction(**common))
            for finding in result.findings:
                session.add(
                    Prediction(
                        **common,
                        finding=finding.name,
                        probability=finding.probability,
                        threshold=finding.threshold,
                        label=finding.label,
                    )
                )
        _ensure_deliveries(rt, session, report)
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
            _ensure_deliveries(rt, session, capture)
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


def _write_captures(
    rt: Runtime,
    results: Sequence[ImageResult],
    sources: Sequence[pydicom.Dataset],
    report_uid: str,
    series_uid: str,
) -> list[tuple[str, str, str]]:
    """One Secondary Capture per image (heatmap and result burned in): (SOP UID, series UID, storage path)."""
    out = []
    for number, (result, source) in enumerate(zip(results, sources, strict=True), start=1):
        try:
            image = load_dicom_image(result.instance.path)
        except (UnreadableImage, OSError):
            continue  # nothing to draw on; the SR says why the image was not assessable
        sc = build_capture(
            result=result,
            source=source,
            image=image,
            report_uid=report_uid,
            report_series_uid=series_uid,
            series_number=rt.settings.reporting.series_number,
            instance_number=number,
        )
        relative = rt.storage.report_path(result.instance.study_instance_uid, str(sc.SOPInstanceUID))
        write_report(sc, rt.storage.absolute(relative))
        out.append((str(sc.SOPInstanceUID), str(sc.SeriesInstanceUID), relative))
    return out


def _instances(rt: Runtime, sop_uids: list[str]) -> list[Instance]:
    with rt.factory() as session:
        return list(session.scalars(select(Instance).where(Instance.sop_instance_uid.in_(sop_uids))))


def _ensure_deliveries(rt: Runtime, session: Session, report: Report) -> None:
    have = {d.destination for d in session.scalars(select(Delivery).where(Delivery.report_id == report.id))}
    for name in rt.destination_names:
        if name in have:
            continue
        delivery = Delivery(report_id=report.id, destination=name, status="pending", next_attempt_at=utcnow())
        session.add(delivery)
        session.flush()
        enqueue(
            session,
            kind=DELIVER,
            priority=10,
            payload={"delivery_id": delivery.id},
            study_id=report.study_id,
            max_attempts=rt.settings.worker.delivery_max_attempts,
        )
