"""The PDF result as a DICOM Encapsulated PDF in the study, delivered with the SRs
(GATEWAY_REPORTING__ENCAPSULATED_PDF=true): written after a study's SRs (process_study) and after a
radiologist's verified SR (verify_review), so the document at the PACS shows the latest results and decision.

The same PDF as ``GET /studies/{uid}/report.pdf`` (api.cases.pdf_context, reporting.pdf). A convenience beside
the SRs: should it fail, the SRs stand and the failure is logged.
"""

from __future__ import annotations

import logging

import pydicom
from sqlalchemy import select

from api.cases import load_case, pdf_context
from core.db import read_session, transaction
from core.domain import software_version
from core.encoding import describe
from core.tables import AuditEvent, Instance, Report, Study, utcnow
from core.worklist import DERIVED_CLASSES
from gateway.delivery import ensure_deliveries
from gateway.runtime import Runtime
from reporting.encapsulated import ENCAPSULATED_PDF, build_encapsulated_pdf, pdf_uid
from reporting.pdf import render_pdf
from reporting.sr import input_hash, write_report

log = logging.getLogger(__name__)


def write_result_pdf(rt: Runtime, study_uid: str, *, actor: str) -> str | None:
    """Write and queue for delivery the Encapsulated PDF of the study's current results, unless disabled
    or already written for exactly these reports; returns its SOP Instance UID (None when none was
    written). Never raises: the SRs are the result."""
    if not rt.settings.reporting.encapsulated_pdf:
        return None
    try:
        return _write(rt, study_uid, actor)
    except Exception as exc:
        log.error("study %s: no Encapsulated PDF of the result: %s", study_uid, describe(exc))
        return None


def _write(rt: Runtime, study_uid: str, actor: str) -> str | None:
    with read_session(rt.factory) as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).first()
        if study is None:
            return None
        reports = [
            (sop_class, sop)
            for sop_class, sop in session.execute(
                select(Report.sop_class_uid, Report.sop_instance_uid).where(
                    Report.study_id == study.id, Report.sop_class_uid.not_in(DERIVED_CLASSES)
                )
            )
        ]
        if not reports:
            return None
        uid = pdf_uid(study_uid, [r[1] for r in reports])
        if session.scalar(select(Report.id).where(Report.sop_instance_uid == uid)) is not None:
            return None
        view = load_case(session, study_uid, rt.settings, rt.storage)
        if view is None:
            return None
        shown = [str(i["sop_instance_uid"]) for i in view.images]
        classes = {
            sop: sop_class
            for sop, sop_class in session.execute(
                select(Instance.sop_instance_uid, Instance.sop_class_uid).where(
                    Instance.sop_instance_uid.in_(shown)
                )
            )
        }
        images = [(classes[sop], sop) for sop in shown if sop in classes]
        study_id = study.id
    if not images:
        return None
    pdf = render_pdf(pdf_context(view, rt.storage, study_uid))
    source = pydicom.dcmread(view.images[0]["path"], stop_before_pixels=True)
    ds = build_encapsulated_pdf(
        pdf,
        source=source,
        sources=[*images, *reports],
        sop_instance_uid=uid,
        series_number=rt.settings.reporting.series_number + 2,
        software_version=software_version(),
        now=utcnow(),
    )
    relative = rt.storage.report_path(study_uid, uid)
    write_report(ds, rt.storage.absolute(relative))
    with transaction(rt.factory) as session:
        if session.scalar(select(Report.id).where(Report.sop_instance_uid == uid)) is not None:
            return None  # another worker wrote the same document meanwhile
        report = Report(
            study_id=study_id,
            model_name="pdf",
            model_version=software_version()[:32],
            sop_instance_uid=uid,
            series_instance_uid=str(ds.SeriesInstanceUID),
            sop_class_uid=ENCAPSULATED_PDF,
            input_hash=input_hash([r[1] for r in reports]),
            path=relative,
        )
        session.add(report)
        session.flush()
        ensure_deliveries(rt, session, report)
        session.add(
            AuditEvent(
                actor=actor,
                action="report_written",
                study_instance_uid=study_uid,
                detail={"model": "pdf", "sop_instance_uid": uid, "reports": len(reports)},
            )
        )
    log.info("study %s: Encapsulated PDF %s written (%d reports)", study_uid, uid, len(reports))
    return uid
