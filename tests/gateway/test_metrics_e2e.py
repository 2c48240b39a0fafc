"""GET /metrics of a real `gateway serve` (subprocess, one receiver and one worker process) while dcmtk
storescu and pynetdicom send it a study, a refused association and a mismatched instance, STOW-RS adds an
instance and the study's SRs go to a dcmtk storescp PACS: the counters of the receiver, the worker and the API
process come back summed in one scrape, parsed by prometheus-client, with the labels they were counted under;
/readyz checks storage, listener and models."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from tests import factories as f
from tests.accounts import bearer
from tests.peers import free_port, gateway_serve, send_file, storescp, storescu, wait_for
from tests.scrape import Samples, scrape

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

VERSION = "0.0.1-test"  # of the tiny bundles
CHEST_MODELS = ("covid19", "pneumonia")


def _blank(study_uid: str) -> pydicom.Dataset:
    """A chest radiograph whose pixels are all alike: every chest model's gate rejects it."""
    ds = f.chest_radiograph(study_uid=study_uid)
    ds.PixelData = bytes(len(ds.PixelData))
    return ds


def _mismatched(path: Path) -> Path:
    """A file whose meta (what send_file puts in the command) names another SOP Instance UID."""
    ds = pydicom.dcmread(path)
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(path)
    return path


def _stow_body(ds: pydicom.Dataset, boundary: str) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    return head + buffer.getvalue() + f"\r\n--{boundary}--\r\n".encode()


def test_a_study_through_serve_moves_the_metrics(bundles: Path, tmp_path: Path) -> None:
    pacs_port, dicom_port, http_port = free_port(), free_port(), free_port()
    env = {
        "GATEWAY_DATA_DIR": str(tmp_path / "var"),
        "GATEWAY_DICOM__PORT": str(dicom_port),
        "GATEWAY_HTTP__PORT": str(http_port),
        "GATEWAY_DICOM__ALLOWED_CALLING_AES": "MODALITY,PYNETDICOM",
        "GATEWAY_DICOM__RECEIVER_PROCESSES": "1",
        "GATEWAY_WORKER__PROCESSES": "1",
        "GATEWAY_COMPLETION__QUIET_SECONDS": "0.5",
        "GATEWAY_INFERENCE__MODEL_DIRS": str(bundles),
        "GATEWAY_STORAGE__RESERVE_BYTES": str(1 << 20),
        "GATEWAY_DESTINATIONS": json.dumps(
            [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}]
        ),
    }
    base = f"http://127.0.0.1:{http_port}"
    with storescp(tmp_path / "pacs", pacs_port), gateway_serve(env, tmp_path / "gateway.log"):
        ready = wait_for(
            "/readyz 200 (a worker up)",
            lambda: (r := requests.get(f"{base}/readyz", timeout=30)).status_code == 200 and r.json(),
            timeout=120,
        )
        assert ready["checks"] == {"storage": "ok", "listener": "ok", "models": "ok"}, ready

        study = generate_uid()
        sent = [f.save(f.chest_radiograph(study_uid=study), tmp_path / "a.dcm")]
        sent.append(f.save(_blank(study), tmp_path / "blank.dcm"))
        result = storescu(dicom_port, *sent, calling="MODALITY")
        assert result.returncode == 0, result.stderr
        assert storescu(dicom_port, sent[0], calling="STRANGER").returncode != 0  # calling AE not allowed
        mismatch = _mismatched(f.save(f.chest_radiograph(), tmp_path / "mismatch.dcm"))
        assert send_file(dicom_port, mismatch) == 0xA900

        boundary = "e2e-metrics"
        stow = requests.post(
            f"{base}/dicomweb/studies",
            data=_stow_body(f.chest_radiograph(body_part="HIP"), boundary),  # routed to no model
            headers={
                **bearer(env),
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            },
            timeout=60,
        )
        assert stow.status_code == 200, stow.text

        def delivered() -> Samples | None:
            m = scrape(base)
            done = m.value("gateway_deliveries", destination="pacs", status="sent") == len(CHEST_MODELS)
            idle = m.value("gateway_dicom_associations_open") == 0 and not any(
                m.value("gateway_jobs", kind="process_study", status=s) for s in ("pending", "running")
            )
            return m if done and idle else None

        m: Samples = wait_for("both SRs sent to the PACS", delivered, timeout=180)

        # the receiver process's C-STOREs and the listening process's associations
        received = m.labelled("gateway_instances_received_total")
        assert received == {
            frozenset({("protocol", "dimse"), ("status", "0x0000")}): 2,
            frozenset({("protocol", "dimse"), ("status", "0xA900")}): 1,
            frozenset({("protocol", "stow"), ("status", "0x0000")}): 1,
        }
        assert m.get("gateway_dicom_associations_accepted_total") == 2
        assert m.labelled("gateway_dicom_associations_refused_total") == {
            frozenset({("reason", "calling_ae")}): 1  # the readiness probes of the listener are not counted
        }
        assert m.get("gateway_stow_requests_total", status="200") == 1

        # the worker process's inference times, per model and version
        for model in CHEST_MODELS:
            labels = {"model": model, "version": VERSION}
            assert m.get("gateway_inference_seconds_count", **labels) == 1
            assert m.get("gateway_inference_seconds_bucket", le="+Inf", **labels) == 1
            assert 0 < m.value("gateway_inference_seconds_sum", **labels) < 120
            assert m.get("gateway_assessed_images", **labels) == 1
            assert m.get("gateway_gate_rejections", **labels) == 1  # the blank image
        assert m.types["gateway_inference_seconds"] == "histogram"

        # the database's figures
        assert m.get("gateway_stored_instances", source="dimse") == 2
        assert m.get("gateway_stored_instances", source="stow") == 1
        stored = sum(p.stat().st_size for p in (tmp_path / "var" / "storage" / "instances").rglob("*.dcm"))
        assert (
            m.value("gateway_stored_instance_bytes", source="dimse")
            + m.value("gateway_stored_instance_bytes", source="stow")
            == stored
        )
        assert m.get("gateway_jobs", kind="process_study", status="pending") == 0
        assert m.get("gateway_jobs", kind="process_study", status="failed") == 0
        assert m.get("gateway_workers_alive") == 1 and m.get("gateway_database_up") == 1
        assert m.get("gateway_storage_reserve_bytes") == 1 << 20 and m.value("gateway_storage_free_bytes") > 0

        # the values came from files of several processes (serve, its receiver, its worker)
        pids = {p.stem.rsplit("_", 1)[1] for p in (tmp_path / "var" / "metrics").glob("*.db")}
        assert len(pids) >= 3, pids

        # who may read it: uvicorn believes X-Forwarded-For from 127.0.0.1, as from a proxy on this host
        elsewhere = {"X-Forwarded-For": "198.51.100.4"}
        assert requests.get(f"{base}/metrics", headers=elsewhere, timeout=30).status_code == 401
        assert scrape(base, {**elsewhere, **bearer(env, "admin")}).get("gateway_database_up") == 1
        assert requests.get(f"{base}/metrics", headers=bearer(env, "data"), timeout=30).status_code == 403

        ready = requests.get(f"{base}/readyz", timeout=30).json()
        assert ready["checks"] == {"storage": "ok", "listener": "ok", "models": "ok"}
    log = (tmp_path / "gateway.log").read_text()
    assert "dropped" not in log  # the listener probes are quiet
