"""The dead letters end to end: a real `gateway serve` (tiny models, one worker process) whose PACS refuses
the SRs (a pynetdicom peer answering 0xC000, then 0xA700 "archive full") dead-letters them with the PACS's
status and reason; once a dcmtk storescp PACS listens on that port, a retry over the API (admin token) and
one from the command line (`gateway deliveries retry --all-failed`) send them, and they arrive. A failed
job is retried from the page's form with the session's CSRF token and runs again. Every retry is audited;
a radiologist gets 403."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from sqlalchemy import select

from core.db import make_engine, make_sessionmaker, transaction
from core.jobs import RENDER_STUDY
from core.tables import Job, Study, utcnow
from tests import factories as f
from tests.accounts import PASSWORD, add_user, bearer, database_url
from tests.peers import free_port, gateway_command, gateway_serve, send_file, storescp, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHEST_MODELS = 2  # pneumonia and covid19: one SR each for a chest radiograph


class RefusingPacs:
    """A PACS that answers every C-STORE with a failure: 0xC000 (cannot understand: dead at once) to the
    first, 0xA700 (out of resources, "archive full": retried, then failed) to the others."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.requests = 0
        self._server: Any = None

    def _handle_store(self, event: evt.Event) -> Dataset:
        self.requests += 1
        status = Dataset()
        status.Status = 0xC000 if self.requests == 1 else 0xA700
        status.ErrorComment = "cannot understand" if self.requests == 1 else "archive full"
        return status

    def start(self) -> None:
        ae = AE(ae_title="PACS")
        ae.supported_contexts = AllStoragePresentationContexts
        self._server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._handle_store)]
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


@dataclass
class Site:
    url: str
    env: dict[str, str]
    db: str
    study_uid: str
    pacs: RefusingPacs
    pacs_dir: Path

    def get(self, path: str, role: str = "admin", **params: Any) -> httpx.Response:
        return httpx.get(self.url + path, headers=bearer(self.env, role), params=params, timeout=30)

    def post(self, path: str, role: str = "admin") -> httpx.Response:
        return httpx.post(self.url + path, headers=bearer(self.env, role), timeout=30)

    def received(self) -> set[str]:
        """SOP Instance UIDs the storescp PACS stored (files still being written are skipped)."""
        out = set()
        for path in self.pacs_dir.glob("*"):
            try:
                out.add(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID))
            except (InvalidDicomError, EOFError, OSError, AttributeError):
                continue
        return out


@pytest.fixture(scope="module")
def site(bundles: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """One gateway for the module; its study's SRs dead-lettered (both, with the PACS's answers)."""
    root = tmp_path_factory.mktemp("deadletter")
    pacs = RefusingPacs(free_port())
    env = {
        "GATEWAY_DATA_DIR": str(root / "var"),
        "GATEWAY_DICOM__PORT": str(free_port()),
        "GATEWAY_HTTP__PORT": str(free_port()),
        "GATEWAY_DICOM__ALLOWED_CALLING_AES": "MODALITY",
        "GATEWAY_WORKER__PROCESSES": "1",
        "GATEWAY_COMPLETION__QUIET_SECONDS": "0.5",
        "GATEWAY_INFERENCE__MODEL_DIRS": str(bundles),
        "GATEWAY_STORAGE__RESERVE_BYTES": str(1 << 20),
        # give up fast: two tries 0.1-0.2 s apart
        "GATEWAY_WORKER__DELIVERY_MAX_ATTEMPTS": "2",
        "GATEWAY_WORKER__RETRY_BASE_SECONDS": "0.1",
        "GATEWAY_WORKER__RETRY_CAP_SECONDS": "0.2",
        "GATEWAY_DESTINATIONS": json.dumps(
            [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}]
        ),
    }
    pacs.start()
    try:
        with gateway_serve(env, root / "gateway.log"):
            study_uid = generate_uid()
            path = f.save(f.chest_radiograph(study_uid=study_uid), root / "chest.dcm")
            assert send_file(int(env["GATEWAY_DICOM__PORT"]), path, calling="MODALITY") == 0
            s = Site(
                f"http://127.0.0.1:{env['GATEWAY_HTTP__PORT']}",
                env,
                database_url(env),
                study_uid,
                pacs,
                root / "pacs",
            )
            wait_for(
                "both SRs dead-lettered",
                lambda: s.get("/api/deliveries").json()["total"] == CHEST_MODELS,
                timeout=120,
            )
            yield s
    finally:
        pacs.stop()


def test_dead_letters_are_listed_and_retried_until_the_pacs_has_them(site: Site) -> None:
    listed = site.get("/api/deliveries").json()["deliveries"]
    by_status = {d["status"]: d for d in listed}
    assert set(by_status) == {"dead", "failed"}, listed
    dead, failed = by_status["dead"], by_status["failed"]
    assert (dead["last_status"], dead["last_status_hex"], dead["attempts"]) == (0xC000, "0xC000", 1)
    assert (failed["last_status_hex"], failed["attempts"]) == ("0xA700", 2)
    assert "(cannot understand)" in dead["last_error"] and "(archive full)" in failed["last_error"]
    assert {d["study_instance_uid"] for d in listed} == {site.study_uid}
    assert all(d["destination"] == "pacs" and d["failed_at"] and d["job_id"] for d in listed)
    failed_jobs = site.get("/api/jobs", status="failed").json()["jobs"]
    assert {j["id"] for j in failed_jobs} >= {dead["job_id"], failed["job_id"]}

    page = site.get("/admin/deliveries")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for text in ("0xC000", "0xA700", "archive full", dead["report_sop_instance_uid"], "Retry all failed"):
        assert text in page.text

    for path in ("/api/deliveries", "/api/jobs", "/admin/deliveries"):
        assert site.get(path, role="radiologist").status_code == 403, path
    assert site.post(f"/api/deliveries/{dead['id']}/retry", role="radiologist").status_code == 403
    assert site.post("/api/deliveries/retry-failed", role="radiologist").status_code == 403

    site.pacs.stop()
    with storescp(site.pacs_dir, site.pacs.port):
        retried = site.post(f"/api/deliveries/{dead['id']}/retry")
        assert retried.status_code == 200, retried.text
        assert (retried.json()["status"], retried.json()["job_id"]) == ("pending", dead["job_id"])
        assert site.post(f"/api/deliveries/{dead['id']}/retry").status_code == 409  # queued once
        assert site.post("/api/deliveries/999999/retry").status_code == 404
        wait_for("the dead SR at the PACS", lambda: dead["report_sop_instance_uid"] in site.received(), 60)

        cli = gateway_command(site.env, "deliveries", "retry", "--all-failed", timeout=120)
        assert cli.returncode == 0, cli.stderr
        assert f"1 delivery queued again: {failed['id']}" in cli.stdout
        wait_for(
            "the failed SR at the PACS", lambda: failed["report_sop_instance_uid"] in site.received(), 60
        )
        wait_for("both sent", lambda: site.get("/api/deliveries", status="sent").json()["total"] == 2, 30)

    assert site.get("/api/deliveries").json() == {"total": 0, "deliveries": []}
    again = gateway_command(site.env, "deliveries", "retry", "--all-failed", timeout=120)
    assert again.returncode == 0 and "no failed or dead delivery to retry" in again.stdout
    unknown = gateway_command(site.env, "deliveries", "retry", "999999", timeout=120)
    assert unknown.returncode == 1 and "no delivery 999999" in unknown.stderr
    sent = gateway_command(site.env, "deliveries", "list", "--status", "sent", timeout=120)
    assert sent.returncode == 0 and dead["report_sop_instance_uid"] in sent.stdout

    events = site.get("/api/audit", action="delivery.retry").json()["events"]
    assert sorted((e["actor"].split(":")[0], e["detail"]["delivery_id"]) for e in events) == sorted(
        [("token", dead["id"]), ("cli", failed["id"])]
    )
    assert all(e["study_instance_uid"] == site.study_uid for e in events)


def test_a_failed_job_is_retried_from_the_page(site: Site) -> None:
    """Drawing the study's images failed for good (as if a codec had crashed): the admin retries it from the
    page, signed in, and it runs again."""
    engine = make_engine(site.db)
    try:
        with transaction(make_sessionmaker(engine)) as s:
            study_id = s.scalars(select(Study.id).where(Study.study_instance_uid == site.study_uid)).one()
            job = Job(
                kind=RENDER_STUDY,
                status="failed",
                payload={"study_instance_uid": site.study_uid},
                study_id=study_id,
                attempts=1,
                max_attempts=1,
                last_error="PanicException: decoder crashed",
                finished_at=utcnow(),
            )
            s.add(job)
            s.flush()
            job_id = job.id
    finally:
        engine.dispose()

    name = add_user(site.db, "admin")
    with httpx.Client(base_url=site.url, timeout=30) as browser:
        assert browser.post("/login", data={"username": name, "password": PASSWORD}).status_code == 303
        page = browser.get("/admin/deliveries", headers={"Accept": "text/html"})
        assert page.status_code == 200 and "PanicException: decoder crashed" in page.text
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert csrf is not None
        assert f'action="/admin/jobs/{job_id}/retry"' in page.text
        assert browser.post(f"/admin/jobs/{job_id}/retry").status_code == 403  # no CSRF token
        done = browser.post(f"/admin/jobs/{job_id}/retry", data={"csrf_token": csrf.group(1)})
        assert done.status_code == 303 and done.headers["location"].startswith("/admin/deliveries?message=")
        shown = browser.get(done.headers["location"], headers={"Accept": "text/html"})
        assert f"job {job_id} queued again" in shown.text
        refused = browser.post(f"/admin/jobs/{job_id}/retry", data={"csrf_token": csrf.group(1)})
        assert refused.status_code == 409 and "not failed" in refused.text

    wait_for(
        "the job to run again",
        lambda: any(j["id"] == job_id for j in site.get("/api/jobs", status="done").json()["jobs"]),
        60,
    )
    [event] = site.get("/api/audit", action="job.retry").json()["events"]
    assert (event["actor"], event["detail"]["job_id"]) == (f"user:{name}", job_id)
    assert site.post(f"/api/jobs/{job_id}/retry").status_code == 409
    assert site.post("/api/jobs/999999/retry").status_code == 404
