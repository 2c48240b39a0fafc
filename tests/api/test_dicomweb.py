"""STOW-RS against `gateway serve`, with dicomweb-client as the real client."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from tests import factories as f
from tests.accounts import bearer
from tests.inference.tiny_models import make_tiny_bundles
from tests.peers import free_port, gateway_serve, storescp

pytestmark = [pytest.mark.e2e]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("stow")
    pacs_port, http_port = free_port(), free_port()
    env = {
        "GATEWAY_DATA_DIR": str(root / "var"),
        "GATEWAY_DICOM__PORT": str(free_port()),
        "GATEWAY_HTTP__PORT": str(http_port),
        "GATEWAY_COMPLETION__QUIET_SECONDS": "0.5",
        "GATEWAY_INFERENCE__MODEL_DIRS": str(make_tiny_bundles(root / "models")),
        "GATEWAY_DESTINATIONS": json.dumps(
            [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}]
        ),
    }
    with storescp(root / "pacs", pacs_port), gateway_serve(env, root / "gateway.log"):
        yield {"url": f"http://127.0.0.1:{http_port}", "pacs": root / "pacs", "headers": bearer(env)}


def _client(gateway: dict[str, Any]) -> DICOMwebClient:
    return DICOMwebClient(url=f"{gateway['url']}/dicomweb", headers=gateway["headers"])


def test_store_instances_and_get_reports(gateway: dict[str, Any]) -> None:
    study_uid = pydicom.uid.generate_uid()
    datasets = [f.chest_radiograph(study_uid=study_uid) for _ in range(2)]
    response = _client(gateway).store_instances(datasets)
    refs = {str(item.ReferencedSOPInstanceUID) for item in response.ReferencedSOPSequence}
    assert refs == {str(ds.SOPInstanceUID) for ds in datasets}
    assert "FailedSOPSequence" not in response
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with requests.get(
            f"{gateway['url']}/api/studies/{study_uid}", headers=gateway["headers"], timeout=10
        ) as rsp:
            study = rsp.json()
        if len(study["reports"]) == 2 and all(
            d["status"] == "sent" for r in study["reports"] for d in r["deliveries"]
        ):
            break
        time.sleep(0.25)
    assert {r["model"] for r in study["reports"]} == {"pneumonia", "covid19"}
    assert {i["source"] for s in study["series"] for i in s["instances"]} == {"stow"}


def test_partial_failure_lists_the_rejected_instance(gateway: dict[str, Any]) -> None:
    good = f.chest_radiograph()
    bad = f.chest_radiograph()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bad.StudyInstanceUID = "../../etc"
    response = _client(gateway).store_instances([good, bad])
    assert [str(i.ReferencedSOPInstanceUID) for i in response.ReferencedSOPSequence] == [
        str(good.SOPInstanceUID)
    ]
    [failed] = response.FailedSOPSequence
    assert failed.ReferencedSOPInstanceUID == bad.SOPInstanceUID and failed.FailureReason == 0xC000


def _post(gateway: dict[str, Any], body: bytes, content_type: str) -> requests.Response:
    return requests.post(
        f"{gateway['url']}/dicomweb/studies",
        data=body,
        headers={**gateway["headers"], "Content-Type": content_type},
        timeout=30,
    )


def test_all_failed_is_409_and_bad_requests_are_4xx(gateway: dict[str, Any], tmp_path: Path) -> None:
    boundary = "b0undary"
    part = b"--b0undary\r\nContent-Type: application/dicom\r\n\r\nnot dicom at all\r\n--b0undary--\r\n"
    rsp = _post(gateway, part, f'multipart/related; type="application/dicom"; boundary={boundary}')
    assert rsp.status_code == 409
    assert rsp.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
    assert _post(gateway, b"x", "application/json").status_code == 415
    other = b"--b0undary\r\nContent-Type: text/plain\r\n\r\nhello\r\n--b0undary--\r\n"
    assert _post(gateway, other, f"multipart/related; boundary={boundary}").status_code == 415
    # truncated pixel data is refused like over DIMSE
    path = f.save(f.chest_radiograph(), tmp_path / "x.dcm")
    data = path.read_bytes()[: path.stat().st_size // 2]
    body = b"--b0undary\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n--b0undary--\r\n"
    assert (
        _post(gateway, body, f'multipart/related; type="application/dicom"; boundary={boundary}').status_code
        == 409
    )


def test_resend_is_stored_once(gateway: dict[str, Any]) -> None:
    ds = f.chest_radiograph()
    for _ in range(2):
        response = _client(gateway).store_instances([ds])
        assert len(response.ReferencedSOPSequence) == 1
    with requests.get(
        f"{gateway['url']}/api/studies/{ds.StudyInstanceUID}", headers=gateway["headers"], timeout=10
    ) as rsp:
        assert rsp.json()["instances"] == 1
