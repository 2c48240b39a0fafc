"""Studies with AI results written straight into a database (as the worker's process_study would write their
rows), for worklist and decision tests and the worklist benchmark."""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta

from pydicom.uid import generate_uid
from sqlalchemy.orm import Session

from core.tables import Instance, Prediction, Report, Series, Study, utcnow
from core.worklist import refresh_case

_counter = itertools.count(1)
FINDINGS = {
    "pneumonia": ("pneumonia", "bacterial_pneumonia", "viral_pneumonia"),
    "covid19": ("covid19", "viral_pneumonia"),
    "glaucoma": ("glaucoma",),
}
THRESHOLDS = {"pneumonia": 0.8, "covid19": 0.5, "glaucoma": 0.42, "bacterial_pneumonia": 0.5}


def add_study(
    session: Session,
    *,
    models: dict[str, dict[str, float] | None],
    modality: str = "DX",
    study_date: str | None = "20240101",
    received_at: datetime | None = None,
    images: int = 1,
    band: float | None = 0.1,
    sample_share: float = 0.0,
) -> Study:
    """A study of ``images`` instances with one AI report per model; ``models``: name -> finding ->
    probability (missing findings: 0.01), or None for a model that found every image not assessable."""
    n = next(_counter)
    at = received_at or utcnow() - timedelta(minutes=n)
    study = Study(
        study_instance_uid=generate_uid(),
        accession_number=f"ACC{n:06d}",
        study_date=study_date,
        status="complete",
        first_received_at=at,
        last_received_at=at,
    )
    session.add(study)
    session.flush()
    series = Series(study_id=study.id, series_instance_uid=generate_uid(), modality=modality)
    session.add(series)
    session.flush()
    instances = []
    for _ in range(images):
        uid = generate_uid()
        instance = Instance(
            series_id=series.id,
            sop_instance_uid=uid,
            sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            path=f"instances/{study.study_instance_uid}/{series.series_instance_uid}/{uid}.dcm",
            size=1,
        )
        session.add(instance)
        instances.append(instance)
    session.flush()
    for model, probabilities in models.items():
        report = Report(
            study_id=study.id,
            model_name=model,
            model_version="1.0.0",
            sop_instance_uid=generate_uid(),
            series_instance_uid=generate_uid(),
            sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
            input_hash="0" * 64,
            path=f"reports/{study.study_instance_uid}/x.dcm",
        )
        session.add(report)
        session.flush()
        for instance in instances:
            common = dict(
                study_id=study.id,
                instance_id=instance.id,
                report_id=report.id,
                model_name=model,
                model_version="1.0.0",
            )
            if probabilities is None:
                session.add(
                    Prediction(**common, assessable=False, reason="not assessable: not a chest image")
                )
                continue
            for finding in FINDINGS[model]:
                p = probabilities.get(finding, 0.01)
                t = THRESHOLDS.get(finding, 0.5)
                session.add(
                    Prediction(
                        **common,
                        assessable=True,
                        finding=finding,
                        probability=p,
                        threshold=t,
                        label="present" if p >= t else "absent",
                    )
                )
    session.flush()
    refresh_case(session, study.id, band=band, sample_share=sample_share)
    return study
