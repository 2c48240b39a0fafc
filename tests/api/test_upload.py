"""POST /api/upload through a running `gateway serve` (shipped models, a dcmtk storescp PACS): a JPEG fundus
photograph with EXIF metadata and a crop, a 16-bit PNG chest radiograph and a vendor's DICOM file become
instances of the pipeline (VL Photographic / Secondary Capture that dciodvfy passes, the typed demographics,
no EXIF value, the crop's pixels), are processed and reported to the PACS; bad input gets a clear 4xx and
stores nothing; the disc localiser proposes a crop; roles and CSRF are enforced."""

from __future__ import annotations

import io
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image

from tests import factories as f
from tests.accounts import bearer
from tests.peers import free_port, gateway_serve, storescp, wait_for
from tests.reporting.dciodvfy import dciodvfy

pytestmark = [pytest.mark.e2e]

SHARED = Path(__file__).resolve().parents[3] / "shared" / "dicom"
SECRET_MAKE = "LeakyCam-7731"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("upload")
    pacs_port = free_port()
    env = {
        "GATEWAY_DATA_DIR": str(root / "var"),
        "GATEWAY_DICOM__PORT": str(free_port()),
        "GATEWAY_HTTP__PORT": str(free_port()),
        "GATEWAY_COMPLETION__QUIET_SECONDS": "0.5",
        "GATEWAY_WORKER__PROCESSES": "1",
        "GATEWAY_DESTINATIONS": json.dumps(
            [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}]
        ),
    }
    with storescp(root / "pacs", pacs_port), gateway_serve(env, root / "gateway.log", timeout=180):
        yield {
            "env": env,
            "root": root,
            "url": f"http://127.0.0.1:{env['GATEWAY_HTTP__PORT']}",
            "headers": bearer(env, "radiologist"),
        }


def _jpeg_with_exif(pixels: np.ndarray) -> bytes:
    exif = Image.Exif()
    exif[0x010F] = SECRET_MAKE  # Make
    exif[0x0131] = "SecretSoftware 9"  # Software
    exif[0x013B] = "Dr Hidden Photographer"  # Artist
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=95, exif=exif.tobytes())
    return out.getvalue()


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def _post(served: dict[str, Any], files: list[tuple[str, bytes, str]], **fields: str) -> httpx.Response:
    return httpx.post(
        served["url"] + "/api/upload",
        files=[("files", file) for file in files],
        data=fields,
        headers=served["headers"],
        timeout=120,
    )


def _instances(served: dict[str, Any]) -> int:
    with sqlite3.connect(Path(served["env"]["GATEWAY_DATA_DIR"]) / "gateway.sqlite3") as db:
        count: int = db.execute("SELECT count(*) FROM instance").fetchone()[0]
    return count


def _stored(served: dict[str, Any], sop_uid: str) -> Path:
    (path,) = (Path(served["env"]["GATEWAY_DATA_DIR"]) / "storage").rglob(f"{sop_uid}.dcm")
    return path


def _processed(served: dict[str, Any], study_uid: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        r = httpx.get(f"{served['url']}/api/studies/{study_uid}", headers=served["headers"], timeout=10)
        if r.status_code != 200:
            return None
        study: dict[str, Any] = r.json()
        ok = any(j["kind"] == "process_study" and j["status"] == "done" for j in study["jobs"])
        return study if ok and study["reports"] else None

    found: dict[str, Any] = wait_for(f"study {study_uid} processed", done, timeout=120)
    return found


def test_a_fundus_jpeg_with_a_crop_becomes_a_clean_vl_photograph(served: dict[str, Any]) -> None:
    photo = f.fundus_rgb(size=512, index=3)
    response = _post(
        served,
        [("eye.jpg", _jpeg_with_exif(photo), "image/jpeg")],
        kind="fundus",
        patient_id="PID-U1",
        patient_name="Upload^Ursula",
        birth_date="1961-04-05",
        sex="F",
        laterality="L",
        accession_number="ACC-UP1",
        crops=json.dumps([{"x": 100, "y": 60, "size": 300}]),
    )
    assert response.status_code == 201, response.text
    (study,) = response.json()["studies"]
    (instance,) = study["instances"]
    assert study["case_url"] == f"/cases/{study['study_instance_uid']}"
    path = _stored(served, instance["sop_instance_uid"])
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == pydicom.uid.VLPhotographicImageStorage and ds.Modality == "XC"
    assert (ds.PatientID, str(ds.PatientName), ds.PatientBirthDate, ds.PatientSex) == (
        "PID-U1",
        "Upload^Ursula",
        "19610405",
        "F",
    )
    assert ds.ImageLaterality == "L" and ds.AccessionNumber == "ACC-UP1"
    assert ds.Manufacturer == "screening-gateway image upload" and ds.LossyImageCompression == "01"
    assert (ds.Rows, ds.Columns, ds.SamplesPerPixel) == (300, 300, 3)
    assert "300 x 300 pixels at (100, 60)" in ds.DerivationDescription
    decoded = np.asarray(Image.open(io.BytesIO(_jpeg_with_exif(photo))).convert("RGB"))
    assert np.array_equal(ds.pixel_array, decoded[60:360, 100:400])  # the crop, losslessly
    raw = path.read_bytes()
    for secret in (SECRET_MAKE, "SecretSoftware", "Hidden Photographer"):
        assert secret.encode() not in raw
    assert not [line for line in dciodvfy(path) if line.startswith("Error")]

    study_data = _processed(served, study["study_instance_uid"])
    assert {r["model"] for r in study_data["reports"]} == {"glaucoma"}


def test_a_png_chest_radiograph_is_reported_to_the_pacs(served: dict[str, Any]) -> None:
    gray = (f.chest_gray(size=512, index=2).astype(np.uint16) * 16).astype(np.uint16)
    response = _post(served, [("chest.png", _png(gray), "image/png")], kind="chest")
    assert response.status_code == 201, response.text
    (study,) = response.json()["studies"]
    path = _stored(served, study["instances"][0]["sop_instance_uid"])
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert (ds.Modality, ds.BodyPartExamined, ds.BitsAllocated, ds.LossyImageCompression) == (
        "DX",
        "CHEST",
        16,
        "00",
    )
    assert np.array_equal(ds.pixel_array, gray)
    assert not [line for line in dciodvfy(path) if line.startswith("Error")]
    processed = _processed(served, study["study_instance_uid"])
    assert {r["model"] for r in processed["reports"]} == {"pneumonia", "covid19"}

    def at_pacs() -> bool:
        found = 0
        for p in (served["root"] / "pacs").glob("*"):
            try:
                sr = pydicom.dcmread(p, stop_before_pixels=True)
            except Exception:
                continue
            found += sr.StudyInstanceUID == study["study_instance_uid"] and sr.Modality == "SR"
        return found >= 2

    wait_for("both SRs at the PACS", at_pacs, timeout=60)


def test_a_vendor_dicom_file_is_stored_as_sent(served: dict[str, Any]) -> None:
    data = (SHARED / "dx_chest_small.dcm").read_bytes()
    response = _post(served, [("dx.dcm", data, "application/dicom")])
    assert response.status_code == 201, response.text
    (study,) = response.json()["studies"]
    source = pydicom.dcmread(io.BytesIO(data))
    assert study["study_instance_uid"] == source.StudyInstanceUID
    stored = pydicom.dcmread(_stored(served, str(source.SOPInstanceUID)))
    assert stored.PixelData == source.PixelData


@pytest.mark.parametrize(
    ("files", "fields", "status", "words"),
    [
        (
            [("notes.txt", b"just some text, not an image\n" * 10, "text/plain")],
            {"kind": "chest"},
            415,
            "JPEG",
        ),
        ([("x.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 200, "image/png")], {"kind": "chest"}, 415, "x.png"),
        ([("c.png", b"", "image/png")], {}, 422, "kind"),
        ([("c.png", b"x", "image/png")], {"kind": "chest", "birth_date": "1961-13-40"}, 422, "birth date"),
        ([("c.png", b"x", "image/png")], {"kind": "chest", "crops": "[1, 2]"}, 422, "crops"),
    ],
)
def test_bad_input_is_refused_with_a_message(
    served: dict[str, Any],
    files: list[tuple[str, bytes, str]],
    fields: dict[str, str],
    status: int,
    words: str,
) -> None:
    before = _instances(served)
    response = _post(served, files, **fields)
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]
    assert _instances(served) == before


def test_a_decompression_bomb_and_an_oversized_file_store_nothing(served: dict[str, Any]) -> None:
    before = _instances(served)
    bomb = _png(np.zeros((8000, 8000), dtype=np.uint8))  # 64 MP in a small file
    good = _png(f.chest_gray(size=256))
    response = _post(served, [("good.png", good, "image/png"), ("bomb.png", bomb, "image/png")], kind="chest")
    assert response.status_code == 413 and "bomb.png" in response.json()["detail"], response.text
    big = b"\x89PNG\r\n\x1a\n" + bytes(60 << 20)
    response = _post(served, [("big.png", big, "image/png")], kind="chest")
    assert response.status_code == 413 and "50 MB" in response.json()["detail"], response.text
    sr = next((SHARED / "sr").glob("*.dcm"))
    response = _post(served, [("report.dcm", sr.read_bytes(), "application/dicom")])
    assert response.status_code == 415 and "not an image" in response.json()["detail"], response.text
    assert _instances(served) == before  # the good file of the refused upload was not stored either


def test_the_disc_localiser_proposes_a_crop(served: dict[str, Any]) -> None:
    photo = f.fundus_rgb(size=512, index=1)
    response = httpx.post(
        served["url"] + "/api/upload/disc",
        files={"file": ("eye.png", _png(photo), "image/png")},
        headers=served["headers"],
        timeout=60,
    )
    assert response.status_code == 200, response.text
    crop = response.json()
    assert (crop["width"], crop["height"]) == (512, 512)
    assert 32 <= crop["size"] <= 512 and 0 <= crop["x"] <= 512 - crop["size"]
    assert 0 <= crop["y"] <= 512 - crop["size"]


def test_only_uploaders_with_a_csrf_token(served: dict[str, Any]) -> None:
    png = _png(f.chest_gray(size=64))
    data_team = httpx.post(
        served["url"] + "/api/upload",
        files=[("files", ("c.png", png, "image/png"))],
        data={"kind": "chest"},
        headers=bearer(served["env"], "data"),
        timeout=30,
    )
    assert data_team.status_code == 403
    anonymous = httpx.post(
        served["url"] + "/api/upload", files=[("files", ("c.png", png, "image/png"))], timeout=30
    )
    assert anonymous.status_code == 401
