"""A real Orthanc 1.10 with our plugin in front of the gateway: stable study -> webhook -> pull -> SR back in
Orthanc; the reconciler catches studies the webhook missed; replays never make a second SR; Orthanc down is
retried; our own SRs are not processed again."""

from __future__ import annotations

import io
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest
from orthanc_api_client import OrthancApiClient

from tests import factories as f
from tests.accounts import port_headers
from tests.inference.tiny_models import make_tiny_bundles
from tests.peers import free_port, gateway_serve, orthanc_server, storescu, wait_for
from tests.reporting.dciodvfy import assert_dciodvfy_clean

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SECRET = "test-secret-0123456789"
SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


class Setup:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.orthanc_http, self.orthanc_dicom = free_port(), free_port()
        self.gw_http, self.gw_dicom = free_port(), free_port()
        self.models = make_tiny_bundles(root / "models")
        self.api = OrthancApiClient(f"http://127.0.0.1:{self.orthanc_http}")

    @property
    def webhook(self) -> str:
        return f"http://127.0.0.1:{self.gw_http}/api/orthanc/webhook"

    def gateway_env(self) -> dict[str, str]:
        return {
            "GATEWAY_DATA_DIR": str(self.root / "var"),
            "GATEWAY_DICOM__PORT": str(self.gw_dicom),
            "GATEWAY_HTTP__PORT": str(self.gw_http),
            "GATEWAY_INFERENCE__MODEL_DIRS": str(self.models),
            "GATEWAY_COMPLETION__QUIET_SECONDS": "0.5",
            "GATEWAY_ORTHANC__URL": f"http://127.0.0.1:{self.orthanc_http}",
            "GATEWAY_ORTHANC__WEBHOOK_SECRET": SECRET,
            "GATEWAY_ORTHANC__RECONCILE_SECONDS": "1",
            "GATEWAY_ORTHANC__TIMEOUT": "5",
            "GATEWAY_WORKER__RETRY_BASE_SECONDS": "0.3",
            "GATEWAY_WORKER__RETRY_CAP_SECONDS": "1",
        }

    @contextmanager
    def orthanc(self) -> Iterator[None]:
        with orthanc_server(
            self.root / "orthanc",
            webhook_url=self.webhook,
            secret=SECRET,
            http_port=self.orthanc_http,
            dicom_port=self.orthanc_dicom,
        ):
            yield

    @contextmanager
    def gateway(self, name: str = "gateway") -> Iterator[None]:
        with gateway_serve(self.gateway_env(), self.root / f"{name}.log"):
            yield

    def our_srs(self, study_uid: str) -> list[pydicom.Dataset]:
        """SRs written by the gateway that Orthanc holds in the study."""
        found = self.api.studies.lookup(study_uid)
        if not found:
            return []
        out: list[pydicom.Dataset] = []
        for instance_id in self.api.studies.get_instances_ids(found):
            ds = pydicom.dcmread(io.BytesIO(self.api.instances.get_file(instance_id)))
            if str(ds.SOPClassUID).startswith(SR_PREFIX) and ds.get("Manufacturer") == "screening-gateway":
                out.append(ds)
        return out

    def post_webhook(self, body: dict[str, Any], secret: str | None = SECRET) -> int:
        headers = {"Content-Type": "application/json"}
        if secret is not None:
            headers["X-Gateway-Secret"] = secret
        request = urllib.request.Request(
            self.webhook, data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as rsp:
                return int(rsp.status)
        except urllib.error.HTTPError as err:
            return int(err.code)

    def study(self, uid: str) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.gw_http}/api/studies/{uid}"
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=port_headers(self.gw_http)), timeout=10
        ) as rsp:
            return json.loads(rsp.read())


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


def _send_study(setup: Setup, tmp_path: Path, n: int = 1) -> str:
    study_uid = pydicom.uid.generate_uid()
    files = [
        f.save(f.chest_radiograph(study_uid=study_uid), tmp_path / f"{study_uid}-{i}.dcm") for i in range(n)
    ]
    result = storescu(setup.orthanc_dicom, *files, called="ORTHANC")
    assert result.returncode == 0, result.stderr
    return study_uid


def test_stable_study_gets_its_reports_in_the_same_orthanc_study(setup: Setup, tmp_path: Path) -> None:
    with setup.orthanc(), setup.gateway():
        study_uid = _send_study(setup, tmp_path, n=2)
        srs = wait_for("two SRs in Orthanc", lambda: len(s := setup.our_srs(study_uid)) == 2 and s)
        assert {ds.ManufacturerModelName for ds in srs} == {"pneumonia", "covid19"}
        for i, ds in enumerate(srs):
            path = tmp_path / f"sr{i}.dcm"
            ds.save_as(path)
            assert_dciodvfy_clean(path)
        study = setup.study(study_uid)
        assert {i["source"] for s in study["series"] for i in s["instances"]} >= {"orthanc"}
        uploads = [d for r in study["reports"] for d in r["deliveries"] if d["destination"] == "orthanc"]
        assert len(uploads) == 2 and all(d["status"] == "sent" for d in uploads)

        # Our SRs landing in Orthanc make the study stable again: processed, but no second report.
        time.sleep(4)
        assert len(setup.our_srs(study_uid)) == 2
        routing = setup.study(study_uid)["routing"]
        assert any(not r["routed"] and "loop prevention" in r["reason"] for r in routing)


def test_webhook_replayed_100_times_makes_one_report_per_model(setup: Setup, tmp_path: Path) -> None:
    with setup.orthanc(), setup.gateway():
        study_uid = _send_study(setup, tmp_path)
        wait_for("first SRs", lambda: len(setup.our_srs(study_uid)) == 2)
        orthanc_id = setup.api.studies.lookup(study_uid)
        for _ in range(100):
            assert setup.post_webhook({"study": orthanc_id}) == 202

        def drained() -> bool:
            jobs = setup.study(study_uid)["jobs"]
            return all(j["status"] in ("done", "failed") for j in jobs)

        wait_for("replayed jobs to finish", drained)
        assert len(setup.our_srs(study_uid)) == 2
        reports = setup.study(study_uid)["reports"]
        assert len(reports) == 2
        pulls = [j for j in setup.study(study_uid)["jobs"] if j["kind"] == "pull_orthanc_study"]
        assert all(j["status"] == "done" for j in pulls) and len(pulls) < 100  # replays coalesce


def test_webhook_refuses_without_the_secret(setup: Setup) -> None:
    with setup.orthanc(), setup.gateway():
        valid = {"study": "6b9e19d9-62094390-5f9ddb01-4a191ae7-9766b715"}
        assert setup.post_webhook(valid, secret=None) == 401
        assert setup.post_webhook(valid, secret="wrong") == 401
        assert setup.post_webhook({"study": "../../etc"}) == 422
        assert setup.post_webhook({"nonsense": 1}) == 422


def test_studies_stable_while_the_gateway_was_down_are_processed_after_restart(
    setup: Setup, tmp_path: Path
) -> None:
    with setup.orthanc():
        with setup.gateway("first"):
            pass  # the schema exists and the reconciler's cursor is set; then the gateway goes down
        study_uid = _send_study(setup, tmp_path)
        time.sleep(4)  # stable in Orthanc; the plugin's webhook fails (nobody listening)
        assert "webhook for study" in (setup.root / "orthanc" / "orthanc.log").read_text()
        with setup.gateway("second"):
            srs = wait_for("SRs from the reconciler", lambda: len(s := setup.our_srs(study_uid)) == 2 and s)
    assert len(srs) == 2


def test_orthanc_down_upload_is_retried_and_visible(setup: Setup, tmp_path: Path) -> None:
    # The study arrives over DIMSE while Orthanc is down: the upload fails, shows in the API, and succeeds
    # once Orthanc is back.
    with setup.gateway():
        study_uid = pydicom.uid.generate_uid()
        path = f.save(f.chest_radiograph(study_uid=study_uid), tmp_path / "x.dcm")
        assert storescu(setup.gw_dicom, path).returncode == 0

        def failing() -> bool:
            ups = [d for r in setup.study(study_uid)["reports"] for d in r["deliveries"]]
            return len(ups) == 2 and all(
                d["status"] == "pending" and d["attempts"] >= 1 and d["last_error"] for d in ups
            )

        wait_for("failed uploads visible in the API", failing)
        with setup.orthanc():
            wait_for("uploads after Orthanc came back", lambda: len(setup.our_srs(study_uid)) == 2)
            ups = [d for r in setup.study(study_uid)["reports"] for d in r["deliveries"]]
            assert all(d["status"] == "sent" for d in ups)
