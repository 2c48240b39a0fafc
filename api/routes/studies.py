"""Studies as JSON: what arrived, what was routed where, predictions, reports and their delivery."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query
from sqlalchemy import func, select

from api.deps import SessionDep
from api.security import require
from core.encoding import printable
from core.tables import Delivery, Instance, Job, Prediction, Report, RoutingDecision, Series, Study

router = APIRouter(prefix="/api/studies", tags=["studies"], dependencies=[Depends(require("studies:read"))])


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _prediction(p: Prediction, instances: dict[int, Instance]) -> dict[str, Any]:
    return {
        "sop_instance_uid": instances[p.instance_id].sop_instance_uid if p.instance_id in instances else None,
        "model": p.model_name,
        "version": p.model_version,
        "finding": p.finding,
        "probability": p.probability,
        "threshold": p.threshold,
        "label": p.label,
        "assessable": p.assessable,
        "reason": p.reason,
    }


def _study_summary(study: Study, instance_count: int) -> dict[str, Any]:
    return {
        "study_instance_uid": study.study_instance_uid,
        "accession_number": study.accession_number,
        "study_date": study.study_date,
        "status": study.status,
        "instances": instance_count,
        "first_received_at": _iso(study.first_received_at),
        "last_received_at": _iso(study.last_received_at),
        "completed_at": _iso(study.completed_at),
    }


@router.get("")
def list_studies(
    session: SessionDep,
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0),
) -> list[dict[str, Any]]:
    counts = (
        select(Series.study_id, func.count(Instance.id).label("n"))
        .join(Instance, Instance.series_id == Series.id)
        .group_by(Series.study_id)
        .subquery()
    )
    rows = session.execute(
        select(Study, func.coalesce(counts.c.n, 0))
        .outerjoin(counts, counts.c.study_id == Study.id)
        .order_by(Study.last_received_at.desc(), Study.id.desc())
        .limit(limit)
        .offset(offset)
    ).all()
    return [_study_summary(study, n) for study, n in rows]


@router.get("/{study_uid}")
def get_study(study_uid: str, session: SessionDep) -> dict[str, Any]:
    study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).first()
    if study is None:
        raise HTTPException(status_code=404, detail=f"study {study_uid} not found")
    series_rows = list(session.scalars(select(Series).where(Series.study_id == study.id).order_by(Series.id)))
    by_series_id = {s.id: s.series_instance_uid for s in series_rows}
    instances = {
        i.id: i
        for i in session.scalars(
            select(Instance).where(Instance.series_id.in_(list(by_series_id))).order_by(Instance.id)
        )
    }
    jobs = list(session.scalars(select(Job).where(Job.study_id == study.id).order_by(Job.id)))
    decisions = list(
        session.scalars(
            select(RoutingDecision)
            .where(RoutingDecision.series_id.in_(list(by_series_id)))
            .order_by(RoutingDecision.id)
        )
    )
    reports = list(session.scalars(select(Report).where(Report.study_id == study.id).order_by(Report.id)))
    predictions = list(
        session.scalars(select(Prediction).where(Prediction.study_id == study.id).order_by(Prediction.id))
    )
    deliveries = list(
        session.scalars(
            select(Delivery).where(Delivery.report_id.in_([r.id for r in reports])).order_by(Delivery.id)
        )
    )
    n_instances = len(instances)
    return {
        **_study_summary(study, n_instances),
        "series": [
            {
                "series_instance_uid": s.series_instance_uid,
                "modality": s.modality,
                "body_part_examined": s.body_part_examined,
                "series_description": s.series_description,
                "instances": [
                    {
                        "sop_instance_uid": i.sop_instance_uid,
                        "sop_class_uid": i.sop_class_uid,
                        "transfer_syntax_uid": i.transfer_syntax_uid,
                        "source": i.source,
                        "received_at": _iso(i.received_at),
                    }
                    for i in instances.values()
                    if i.series_id == s.id
                ],
            }
            for s in series_rows
        ],
        "routing": [
            {
                "job_id": d.job_id,
                "series_instance_uid": by_series_id.get(d.series_id),
                "model": d.model_name,
                "routed": d.routed,
                "reason": d.reason,
            }
            for d in decisions
        ],
        "jobs": [
            {
                "id": j.id,
                "kind": j.kind,
                "status": j.status,
                "attempts": j.attempts,
                "next_attempt_at": _iso(j.next_attempt_at) if j.status == "pending" else None,
                # The reason only: no traceback, and nothing a dataset put into a message (bytes, controls).
                "last_error": printable(j.last_error.splitlines()[0], 300) if j.last_error else None,
                "created_at": _iso(j.created_at),
                "finished_at": _iso(j.finished_at),
            }
            for j in jobs
        ],
        "predictions": [_prediction(p, instances) for p in predictions if not p.shadow],
        # versions in shadow mode: stored to compare with the active one, never the result
        "shadow_predictions": [_prediction(p, instances) for p in predictions if p.shadow],
        "reports": [
            {
                "sop_instance_uid": r.sop_instance_uid,
                "sop_class_uid": r.sop_class_uid,
                "series_instance_uid": r.series_instance_uid,
                "model": r.model_name,
                "version": r.model_version,
                "verification": r.verification,
                "supersedes": next((x.sop_instance_uid for x in reports if x.id == r.supersedes_id), None),
                "created_at": _iso(r.created_at),
                "deliveries": [
                    {
                        "destination": d.destination,
                        "status": d.status,
                        "attempts": d.attempts,
                        "last_status": d.last_status,
                        "last_error": d.last_error,
                        "next_attempt_at": _iso(d.next_attempt_at),
                        "delivered_at": _iso(d.delivered_at),
                    }
                    for d in deliveries
                    if d.report_id == r.id
                ],
            }
            for r in reports
        ],
    }
