"""The ``pull_orthanc_study`` job: download a stable Orthanc study through the durable ingest path, then
process it."""

from __future__ import annotations

import logging

from sqlalchemy import update

from core.db import transaction
from core.ingest import IngestError, read_instance, store_instance, validate_instance
from core.jobs import ClaimedJob, PermanentError
from core.tables import Study, utcnow
from gateway.runtime import Runtime
from gateway.study import process_study
from orthanc.client import OrthancRejected

log = logging.getLogger(__name__)


def pull_orthanc_study(rt: Runtime, job: ClaimedJob) -> None:
    """Download every instance of an Orthanc study through the durable ingest path, then process it.

    Orthanc unreachable: the job is retried with backoff. The study deleted in Orthanc: permanent failure.
    """
    orthanc_id = job.payload["orthanc_study_id"]
    source = rt.orthanc
    try:
        instance_ids = source.instance_ids(orthanc_id)
    except OrthancRejected as exc:
        raise PermanentError(f"Orthanc study {orthanc_id}: {exc}") from exc
    study_uids: set[str] = set()
    for instance_id in instance_ids:
        try:
            data = source.instance_file(instance_id)
        except OrthancRejected:
            log.warning("Orthanc instance %s vanished while pulling study %s", instance_id, orthanc_id)
            continue
        try:  # the checks C-STORE and STOW make: nothing stored may fail a worker later
            ds = read_instance(data, rt.settings.ingest)
            meta = validate_instance(ds, str(ds.file_meta.TransferSyntaxUID), rt.settings.ingest)
        except IngestError as exc:
            log.warning("Orthanc instance %s refused: %s", instance_id, exc)
            continue
        store_instance(rt.storage, rt.factory, meta, data, source="orthanc")
        study_uids.add(meta.study_instance_uid)
    for study_uid in sorted(study_uids):
        # Orthanc already judged the study stable: complete it now instead of waiting for a quiet period.
        with transaction(rt.factory) as session:
            session.execute(
                update(Study)
                .where(Study.study_instance_uid == study_uid)
                .values(status="complete", completed_at=utcnow())
            )
        process_study(
            rt,
            ClaimedJob(
                job.id,
                job.kind,
                {"study_instance_uid": study_uid},
                job.study_id,
                job.attempts,
                job.max_attempts,
            ),
        )
    log.info("pulled Orthanc study %s: %d instances", orthanc_id, len(instance_ids))
