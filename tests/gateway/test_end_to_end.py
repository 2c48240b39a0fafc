"""End to end with real peers: dcmtk storescu -> `gateway serve` (subprocess) -> SR -> dcmtk storescp (PACS).

Covers: every shared vendor file routed or skipped with its reason, SRs that pass dciodvfy and reference the
sent instances, a destination that is down getting the SR once it comes up, a late instance superseding the
first SR, a re-send making no second report, and our own SR sent back in not being processed.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.errors import InvalidDicomError
from pydicom.uid import generate_uid

from tests import factories as f
from tests.accounts import port_headers
from tests.inference.tiny_models import make_tiny_bundles
from tests.peers import (
    SHARED_DICOM,
    create_database,
    free_port,
    gateway_serve,
    send_file,
    storescp,
    storescu,
    wait_for,
)
from tests.reporting.dciodvfy import assert_dciodvfy_clean

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


def _received_srs(folder: Path, prefix: str = SR_PREFIX) -> dict[str, pydicom.Dataset]:
    """Complete objects of a SOP class (prefix) the PACS stored; a file storescp is still writing is skipped
    until a later poll."""
    out: dict[str, pydicom.Dataset] = {}
    for path in folder.glob("*"):
        if path.is_file():
            try:
                ds = pydicom.dcmread(path)
                sop_class, sop_instance = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
            except (InvalidDicomError, EOFError, OSError, AttributeError, ValueError):
                continue
            if sop_class.startswith(prefix):
                out[sop_instance] = ds
    return out


def _referenced_uids(ds: pydicom.Dataset) -> set[str]:
    uids = set()

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            for ref in item.get("ReferencedSOPSequence", []):
                uids.add(str(ref.ReferencedSOPInstanceUID))
            walk(item.get("ContentSequence", []))

    walk(ds.ContentSequence)
    return uids


def _srs(study: dict[str, Any]) -> list[dict[str, Any]]:
    """The study's Structured Reports (not the Secondary Captures sent beside them)."""
    return [r for r in study["reports"] if r["sop_class_uid"].startswith(SR_PREFIX)]


def _texts(ds: pydicom.Dataset) -> list[str]:
    found: list[str] = []

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            if "TextValue" in item:
                found.append(str(item.TextValue))
            walk(item.get("ContentSequence", []))

    walk(ds.ContentSequence)
    return found


class Gateway:
    def __init__(self, dicom_port: int, http_port: int) -> None:
        self.dicom_port = dicom_port
        self.http_port = http_port

    def api(self, path: str) -> Any:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", headers=port_headers(self.http_port)
        )
        with urllib.request.urlopen(request, timeout=10) as rsp:
            return json.loads(rsp.read())

    def study(self, uid: str) -> dict[str, Any]:
        return self.api(f"/api/studies/{uid}")


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("e2e")
    bundles = make_tiny_bundles(root / "models")
    pacs_dir, later_dir = root / "pacs", root / "later"
    pacs_port, later_port = free_port(), free_port()
    dicom_port, http_port = free_port(), free_port()
    settings = {
        "GATEWAY_DATA_DIR": str(root / "var"),
        "GATEWAY_DICOM__PORT": str(dicom_port),
        "GATEWAY_HTTP__PORT": str(http_port),
        "GATEWAY_DICOM__ALLOWED_CALLING_AES": "MODALITY,PACS_QR",
        "GATEWAY_COMPLETION__QUIET_SECONDS": "0.5",
        "GATEWAY_COMPLETION__MAX_WAIT_SECONDS": "10",
        "GATEWAY_INFERENCE__MODEL_DIRS": str(bundles),
        "GATEWAY_WORKER__THREADS": "2",
        "GATEWAY_REPORTING__SECONDARY_CAPTURE": "true",
        "GATEWAY_WORKER__RETRY_BASE_SECONDS": "0.3",
        "GATEWAY_WORKER__RETRY_CAP_SECONDS": "1",
        "GATEWAY_DESTINATIONS": json.dumps(
            [
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port},
                {"name": "later", "ae_title": "LATER", "host": "127.0.0.1", "port": later_port},
            ]
        ),
    }
    if request.param == "postgres":
        settings["GATEWAY_DATABASE_URL"] = create_database(request.getfixturevalue("pg_admin_url"))
    with storescp(pacs_dir, pacs_port), gateway_serve(settings, root / "gateway.log"):
        yield {
            "gw": Gateway(dicom_port, http_port),
            "pacs": pacs_dir,
            "later": (later_dir, later_port),
            "root": root,
        }


def test_vendor_files_become_valid_reports_at_the_pacs(env: dict[str, Any]) -> None:
    gw: Gateway = env["gw"]
    files = {
        name: SHARED_DICOM / name
        for name in ("cr_chest_jpegls.dcm", "dx_chest_small.dcm", "sc_fundus_j2k.dcm", "cr_hip_rle.dcm")
    }
    sources = {name: pydicom.dcmread(p, stop_before_pixels=True) for name, p in files.items()}
    result = storescu(gw.dicom_port, *files.values())
    assert result.returncode == 0, result.stderr

    expected = {
        "cr_chest_jpegls.dcm": {"pneumonia", "covid19"},
        "dx_chest_small.dcm": {"pneumonia", "covid19"},
        "sc_fundus_j2k.dcm": {"glaucoma"},
    }
    want = sum(len(v) for v in expected.values())
    received = wait_for(
        f"{want} SRs at the PACS", lambda: (r := _received_srs(env["pacs"])) and len(r) >= want and r
    )
    assert len(received) == want
    # Each Secondary Capture is sent after its SR: wait for those too before reading the folder.
    wait_for(f"{want} SCs at the PACS", lambda: len(_received_srs(env["pacs"], SC_CLASS)) >= want)
    for name, models in expected.items():
        src = sources[name]
        mine = [ds for ds in received.values() if ds.StudyInstanceUID == src.StudyInstanceUID]
        assert {ds.ManufacturerModelName for ds in mine} == models
        for ds in mine:
            assert ds.Manufacturer == "screening-gateway"
            assert ds.VerificationFlag == "UNVERIFIED"
            assert ds.PatientID == src.PatientID
            assert str(src.SOPInstanceUID) in _referenced_uids(ds)
            assert any("not a diagnosis" in t for t in _texts(ds))
    for path in env["pacs"].iterdir():
        assert_dciodvfy_clean(path)

    # Secondary Captures (heatmap + result burned in) travel with every SR, one per analysed image.
    captures = [
        pydicom.dcmread(p)
        for p in env["pacs"].iterdir()
        if pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID == SC_CLASS
    ]
    assert len(captures) == want
    for sc in captures:
        assert sc.BurnedInAnnotation == "YES" and "not a diagnosis" in sc.ImageComments
        assert sc.pixel_array.shape[2] == 3

    hip_uid = sources["cr_hip_rle.dcm"].StudyInstanceUID
    hip = wait_for("the hip study processed", lambda: (h := gw.study(hip_uid))["routing"] and h)
    assert [r["reason"] for r in hip["routing"]] == ["body part HIP"]
    assert hip["reports"] == [] and hip["predictions"] == []
    dx = gw.study(sources["dx_chest_small.dcm"].StudyInstanceUID)
    assert {p["model"] for p in dx["predictions"]} == {"pneumonia", "covid19"}
    assert {d["destination"]: d["status"] for r in dx["reports"] for d in r["deliveries"]}["pacs"] == "sent"
    listed = {s["study_instance_uid"] for s in gw.api("/api/studies")}
    assert {str(s.StudyInstanceUID) for s in sources.values()} <= listed


def test_health_and_unknown_study(env: dict[str, Any]) -> None:
    gw: Gateway = env["gw"]
    assert gw.api("/healthz") == {"status": "ok", "database": "ok"}
    with pytest.raises(urllib.error.HTTPError) as err:
        gw.api("/api/studies/1.2.3.4.5")
    assert err.value.code == 404 and b"not found" in err.value.read()


def test_destination_down_gets_the_report_once_it_comes_up(env: dict[str, Any]) -> None:
    gw: Gateway = env["gw"]
    later_dir, later_port = env["later"]
    uid = str(pydicom.dcmread(SHARED_DICOM / "sc_fundus_j2k.dcm", stop_before_pixels=True).StudyInstanceUID)

    def failing() -> bool:
        [report] = _srs(gw.study(uid))
        later = next(d for d in report["deliveries"] if d["destination"] == "later")
        return later["status"] == "pending" and later["attempts"] >= 2 and bool(later["last_error"])

    wait_for("failed attempts to the down destination", failing)
    [report] = _srs(gw.study(uid))
    with storescp(later_dir, later_port, ae_title="LATER"):
        wait_for(
            "the SR at the destination that came up",
            lambda: report["sop_instance_uid"] in _received_srs(later_dir),
            timeout=30,
        )

        def sent() -> bool:
            [now] = _srs(gw.study(uid))
            return {d["destination"]: d["status"] for d in now["deliveries"]} == {
                "pacs": "sent",
                "later": "sent",
            }

        wait_for("both deliveries marked sent", sent, timeout=10)


def test_late_instance_supersedes_and_resend_is_idempotent(env: dict[str, Any], tmp_path: Path) -> None:
    gw: Gateway = env["gw"]
    study_uid = generate_uid()
    first = f.save(f.chest_radiograph(study_uid=study_uid), tmp_path / "first.dcm")
    assert storescu(gw.dicom_port, first).returncode == 0

    def reports(n: int) -> list[dict[str, Any]] | None:
        got = [r for r in _srs(gw.study(study_uid)) if r["model"] == "pneumonia"]
        return (
            got
            if len(got) >= n
            and all(d["status"] == "sent" for r in got for d in r["deliveries"] if d["destination"] == "pacs")
            else None
        )

    [one] = wait_for("first report", lambda: reports(1))
    # The same instance again: stored once, the study is not reopened, no second report.
    assert storescu(gw.dicom_port, first).returncode == 0
    time.sleep(2.0)
    assert len(reports(1) or []) == 1 and gw.study(study_uid)["instances"] == 1

    late = f.save(f.chest_radiograph(study_uid=study_uid), tmp_path / "late.dcm")
    assert storescu(gw.dicom_port, late).returncode == 0
    old, new = wait_for("superseding report", lambda: reports(2))
    assert old["sop_instance_uid"] == one["sop_instance_uid"] and new["supersedes"] == one["sop_instance_uid"]
    sr = _received_srs(env["pacs"])[new["sop_instance_uid"]]
    assert [
        str(x.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for s in sr.PredecessorDocumentsSequence
        for x in s.ReferencedSeriesSequence
    ] == [one["sop_instance_uid"]]
    assert _referenced_uids(sr) >= {pydicom.dcmread(p).SOPInstanceUID for p in (first, late)}


def test_our_own_report_sent_back_is_not_processed(env: dict[str, Any]) -> None:
    gw: Gateway = env["gw"]
    ours = next(
        p for p in sorted(env["pacs"].iterdir()) if pydicom.dcmread(p).SOPClassUID.startswith(SR_PREFIX)
    )
    ds = pydicom.dcmread(ours)
    capture = next(
        p
        for p in sorted(env["pacs"].iterdir())
        if (c := pydicom.dcmread(p, stop_before_pixels=True)).SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
        and c.StudyInstanceUID == ds.StudyInstanceUID
    )
    before = gw.study(ds.StudyInstanceUID)
    # dcmtk 3.6.7's storescu does not know Comprehensive 3D SR Storage; pynetdicom does.
    assert send_file(gw.dicom_port, ours, calling="PACS_QR") == 0x0000
    assert send_file(gw.dicom_port, capture, calling="PACS_QR") == 0x0000

    def process_jobs(study: dict[str, Any]) -> list[dict[str, Any]]:
        return [j for j in study["jobs"] if j["kind"] == "process_study"]

    def processed() -> dict[str, Any] | None:
        study = gw.study(ds.StudyInstanceUID)
        done = (
            len(process_jobs(study)) > len(process_jobs(before))
            and process_jobs(study)[-1]["status"] == "done"
        )
        return study if done else None

    study = wait_for("the returned SR's study to be processed", processed)
    ours_routing = [
        r
        for r in study["routing"]
        if r["job_id"] == process_jobs(study)[-1]["id"]
        and r["series_instance_uid"]
        in {ds.SeriesInstanceUID, pydicom.dcmread(capture, stop_before_pixels=True).SeriesInstanceUID}
    ]
    assert len(ours_routing) == 2
    assert all(not r["routed"] and "loop prevention" in r["reason"] for r in ours_routing)
    assert len(study["reports"]) == len(before["reports"])
