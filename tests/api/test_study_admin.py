"""Stored studies for administrators, against `gateway serve` with the shipped models and a dcmtk PACS:
search (JSON), the study's DICOM files as a ZIP, deletion of a reviewed study (files, rows, audit; the PACS
keeps its copies), the scheduled retention job, and who may do it."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pydicom
import pytest
from sqlalchemy import create_engine, func, select, update

from core.tables import AuditEvent, Prediction, Report, Review, Study, utcnow
from tests.accounts import bearer
from tests.peers import wait_for
from tests.review_site import Site, decide, review_site

pytestmark = [pytest.mark.e2e]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    settings = {"STORAGE__RETENTION_DAYS": "30", "STORAGE__RETENTION_CHECK_SECONDS": "1"}
    with review_site(tmp_path_factory.mktemp("admin-studies"), **settings) as site:
        yield site


@pytest.fixture(scope="module")
def admin(site: Site) -> dict[str, str]:
    return bearer(site.env, "admin")


def _search(site: Site, admin: dict[str, str], **params: str) -> set[str]:
    response = site.get("/api/admin/studies", headers=admin, **params)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["total"] == len(body["studies"])
    return {s["study_instance_uid"] for s in body["studies"]}


def _files(site: Site, uid: str) -> list[Path]:
    storage = site.data_dir / "storage"
    return [
        p for folder in ("instances", "reports", "renditions") for p in (storage / folder / uid).rglob("*")
    ]


def test_search(site: Site, admin: dict[str, str]) -> None:
    chest, fundus, chest2 = site.studies["chest"], site.studies["fundus"], site.studies["chest2"]
    # the last deliveries of the site's studies may still be queued
    wait_for("every job done", lambda: not _search(site, admin, state="queued"), timeout=60)
    assert {chest, fundus, chest2} <= _search(site, admin)
    assert _search(site, admin, accession_number="ACC-XSS") == {chest}
    assert _search(site, admin, accession_number="ACC-*") == {chest, fundus, chest2}
    assert _search(site, admin, modality="OP") == {fundus}
    assert _search(site, admin, date_from="2024-01-01", date_to="2024-02-15") == {chest, chest2}
    assert _search(site, admin, study_uid=chest2) == {chest2}
    assert _search(site, admin, patient_id="TEST-001", state="reported") >= {chest, chest2}
    one = site.get("/api/admin/studies", headers=admin, study_uid=chest2).json()["studies"][0]
    assert one["instances"] == 2 and one["modalities"] == ["DX"] and one["state"] == "reported"
    assert one["patient_id"] == "TEST-001"
    bad = site.get("/api/admin/studies", headers=admin, date_from="5 Jan")
    assert bad.status_code == 422 and "YYYY-MM-DD" in bad.text
    assert site.get("/api/admin/studies", headers=admin, state="lost").status_code == 422
    detail = site.get(f"/api/admin/studies/{chest2}", headers=admin).json()
    assert len(detail["series"][0]["instances"]) == 2 and detail["reports"]
    assert all(d["status"] == "sent" for r in detail["reports"] for d in r["deliveries"])


def test_zip_holds_the_instances_and_our_reports(site: Site, admin: dict[str, str]) -> None:
    uid = site.studies["chest2"]
    response = site.get(f"/api/admin/studies/{uid}/dicom.zip", headers=admin)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(response.content)) as z:
        assert z.testzip() is None
        datasets = [pydicom.dcmread(io.BytesIO(z.read(name))) for name in z.namelist()]
    assert {str(ds.StudyInstanceUID) for ds in datasets} == {uid}
    modalities = sorted(str(ds.Modality) for ds in datasets)
    assert modalities.count("DX") == 2 and "SR" in modalities
    assert site.get(f"/api/admin/studies/{uid}/dicom.zip", headers=admin).content == response.content


def test_only_admins(site: Site) -> None:
    uid = site.studies["chest"]
    for method, path in [
        ("GET", "/api/admin/studies"),
        ("GET", f"/api/admin/studies/{uid}"),
        ("GET", f"/api/admin/studies/{uid}/dicom.zip"),
        ("DELETE", f"/api/admin/studies/{uid}"),
        ("GET", "/admin/studies"),
        ("GET", f"/admin/studies/{uid}/delete"),
    ]:
        response = httpx.request(method, site.url + path, headers=site.radiologist, timeout=30)
        assert response.status_code == 403, (method, path)
        assert httpx.request(method, site.url + path, timeout=30).status_code == 401, (method, path)
    assert uid in _search(site, bearer(site.env, "admin"))


def test_delete_a_reviewed_study(site: Site, admin: dict[str, str]) -> None:
    uid = site.studies["chest"]
    decide(site, uid, correct=False)
    engine = create_engine(site.db)
    with engine.connect() as db:
        study_id = db.scalar(select(Study.id).where(Study.study_instance_uid == uid))

    def verified() -> bool:
        with engine.connect() as db:
            return bool(
                db.scalar(
                    select(func.count())
                    .select_from(Report)
                    .where(Report.study_id == study_id, Report.verification == "VERIFIED")
                )
            )

    wait_for("the verified SR", verified, timeout=60)

    def state() -> str:
        return str(site.get("/api/admin/studies", headers=admin, study_uid=uid).json()["studies"][0]["state"])

    wait_for("the verified SR delivered", lambda: state() == "reviewed", timeout=60)
    sent_to_pacs = len(site.pacs_objects())
    assert _files(site, uid)

    response = httpx.delete(f"{site.url}/api/admin/studies/{uid}", headers=admin, timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["instances"] == 1 and body["reports"] >= 3 and body["files_removed"]
    assert _files(site, uid) == []
    assert uid not in _search(site, admin)
    assert site.get(f"/api/cases/{uid}").status_code == 404
    assert httpx.delete(f"{site.url}/api/admin/studies/{uid}", headers=admin, timeout=30).status_code == 404
    with engine.connect() as db:
        for table in (Report, Prediction, Review):
            assert not db.scalar(select(func.count()).select_from(table).where(table.study_id == study_id))
        event = db.execute(
            select(AuditEvent.action, AuditEvent.detail).where(
                AuditEvent.study_instance_uid == uid, AuditEvent.action == "study.delete"
            )
        ).one()
        assert event.detail["reason"] == "admin" and event.detail["instances"] == 1
    engine.dispose()
    assert len(site.pacs_objects()) == sent_to_pacs  # what the PACS has stays there


def test_retention_job_deletes_old_studies(site: Site, admin: dict[str, str]) -> None:
    uid = site.studies["fundus"]
    engine = create_engine(site.db)
    with engine.begin() as db:
        db.execute(
            update(Study)
            .where(Study.study_instance_uid == uid)
            .values(last_received_at=utcnow() - timedelta(days=31))
        )
    wait_for("the retention job", lambda: uid not in _search(site, admin), timeout=60)
    assert _files(site, uid) == []
    assert site.studies["chest2"] in _search(site, admin)  # recent: kept
    with engine.connect() as db:
        actor, detail = db.execute(
            select(AuditEvent.actor, AuditEvent.detail).where(
                AuditEvent.study_instance_uid == uid, AuditEvent.action == "study.delete"
            )
        ).one()
    engine.dispose()
    assert actor == "retention" and detail["reason"] == "retention 30 days"
