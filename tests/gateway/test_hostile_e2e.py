"""The probes' regression files against `gateway serve` as users run it (dcmtk storescu in, the API out):
the nested one is refused, the panicking one is accepted and reported as not assessable beside the good image
of its study, and the workers go on processing later studies."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests import hostile as h
from tests.accounts import port_headers
from tests.inference.tiny_models import make_tiny_bundles
from tests.peers import SHARED_DICOM, free_port, gateway_serve, storescu, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _api(port: int, path: str) -> Any:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=port_headers(port))
    with urllib.request.urlopen(request, timeout=10) as rsp:
        return json.loads(rsp.read())


def _copy_into(study_uid: str, out: Path) -> Path:
    ds = pydicom.dcmread(SHARED_DICOM / "dx_chest_small.dcm")
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(out, enforce_file_format=True)
    return out


def test_regression_files_through_gateway_serve(tmp_path: Path) -> None:
    dicom_port, http_port = free_port(), free_port()
    env = {
        "GATEWAY_DATA_DIR": str(tmp_path / "var"),
        "GATEWAY_DICOM__PORT": str(dicom_port),
        "GATEWAY_HTTP__PORT": str(http_port),
        "GATEWAY_COMPLETION__QUIET_SECONDS": "0.5",
        "GATEWAY_INFERENCE__MODEL_DIRS": str(make_tiny_bundles(tmp_path / "models")),
        "GATEWAY_WORKER__THREADS": "2",
    }
    panic = pydicom.dcmread(h.RLE_PANIC, stop_before_pixels=True)
    good = _copy_into(str(panic.StudyInstanceUID), tmp_path / "good.dcm")
    with gateway_serve(env, tmp_path / "gateway.log"):
        refused = storescu(dicom_port, h.NEST_300)
        assert refused.returncode != 0 or "CannotUnderstand" in refused.stdout + refused.stderr
        result = storescu(dicom_port, h.RLE_PANIC, good)
        assert result.returncode == 0, result.stderr

        def processed(uid: str) -> dict[str, Any] | None:
            study = _api(http_port, f"/api/studies/{uid}")
            jobs = [j for j in study["jobs"] if j["kind"] == "process_study"]
            return study if jobs and jobs[-1]["status"] in ("done", "failed") else None

        study = wait_for("the panic study processed", lambda: processed(str(panic.StudyInstanceUID)), 90)
        [job] = [j for j in study["jobs"] if j["kind"] == "process_study"]
        assert (job["status"], job["attempts"], job["last_error"]) == ("done", 1, None)
        by_instance: dict[str, list[dict[str, Any]]] = {}
        for p in study["predictions"]:
            by_instance.setdefault(p["sop_instance_uid"], []).append(p)
        bad = by_instance[str(panic.SOPInstanceUID)]
        assert len(bad) == 2 and all(not p["assessable"] and "PanicException" in p["reason"] for p in bad)
        fine = by_instance[str(pydicom.dcmread(good, stop_before_pixels=True).SOPInstanceUID)]
        assert {p["model"] for p in fine if p["assessable"] and p["finding"]} == {"pneumonia", "covid19"}
        assert (
            len([r for r in study["reports"] if r["sop_class_uid"].startswith("1.2.840.10008.5.1.4.1.1.88.")])
            == 2
        )

        # Both worker threads are still at work: a later study is processed, and health says so.
        later = _copy_into(generate_uid(), tmp_path / "later.dcm")
        assert storescu(dicom_port, later).returncode == 0
        later_study = wait_for(
            "the later study processed",
            lambda: processed(str(pydicom.dcmread(later, stop_before_pixels=True).StudyInstanceUID)),
            90,
        )
        assert [j["status"] for j in later_study["jobs"] if j["kind"] == "process_study"] == ["done"]
        assert _api(http_port, "/healthz")["status"] == "ok"
        nested = pydicom.dcmread(h.NEST_300, stop_before_pixels=True)
        with pytest.raises(urllib.error.HTTPError):  # never stored, so never a study
            _api(http_port, f"/api/studies/{nested.StudyInstanceUID}")
