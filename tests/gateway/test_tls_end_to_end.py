"""DICOM TLS end to end: dcmtk storescu +tls -> `gateway serve` (TLS port) -> SR over TLS -> dcmtk
storescp +tls that requires our client certificate. Certificates are made at test time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from tests.certificates import make_pki
from tests.inference.tiny_models import make_tiny_bundles
from tests.peers import REPO, SHARED_DICOM, free_port, gateway_serve, stop, wait_for, wait_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


def _srs(folder: Path) -> list[str]:
    found = []
    for path in folder.iterdir():
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # storescp may still be writing it
            continue
        if str(ds.SOPClassUID).startswith(SR_PREFIX):
            found.append(str(ds.SOPInstanceUID))
    return found


def test_tls_in_and_out(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    pacs_dir = tmp_path / "pacs"
    pacs_dir.mkdir()
    pacs_port, dicom_port, tls_port, http_port = free_port(), free_port(), free_port(), free_port()
    destination = {
        "name": "pacs",
        "ae_title": "PACS",
        "host": "localhost",
        "port": pacs_port,
        "tls": True,
        "tls_ca_certificates": str(pki.ca),
        "tls_certificate": str(pki.client.certificate),
        "tls_private_key": str(pki.client.key),
    }
    settings = {
        "GATEWAY_DATA_DIR": str(tmp_path / "var"),
        "GATEWAY_DICOM__PORT": str(dicom_port),
        "GATEWAY_DICOM__TLS_PORT": str(tls_port),
        "GATEWAY_DICOM__TLS_CERTIFICATE": str(pki.server.certificate),
        "GATEWAY_DICOM__TLS_PRIVATE_KEY": str(pki.server.key),
        "GATEWAY_DICOM__TLS_CA_CERTIFICATES": str(pki.ca),
        "GATEWAY_DICOM__TLS_REQUIRE_CLIENT_CERTIFICATE": "true",
        "GATEWAY_HTTP__PORT": str(http_port),
        "GATEWAY_COMPLETION__QUIET_SECONDS": "0.5",
        "GATEWAY_COMPLETION__MAX_WAIT_SECONDS": "5",
        "GATEWAY_INFERENCE__MODEL_DIRS": str(make_tiny_bundles(tmp_path / "models")),
        "GATEWAY_WORKER__THREADS": "1",
        "GATEWAY_DESTINATIONS": json.dumps([destination]),
    }
    server_tls = ["+tls", str(pki.server.key), str(pki.server.certificate), "-rc", "+cf", str(pki.ca)]
    client_tls = ["+tls", str(pki.client.key), str(pki.client.certificate), "+cf", str(pki.ca)]
    storescp = ["/usr/bin/storescp", *server_tls, "-aet", "PACS", "-od", str(pacs_dir), str(pacs_port)]
    pacs = subprocess.Popen(storescp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(pacs_port, proc=pacs)
        with gateway_serve(settings, tmp_path / "gateway.log"):
            wait_port(tls_port)
            storescu = ["/usr/bin/storescu", "-aet", "MODALITY", "-aec", "GATEWAY", *client_tls, "127.0.0.1"]
            sent = subprocess.run(
                [*storescu, str(tls_port), str(SHARED_DICOM / "dx_chest_small.dcm")],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert sent.returncode == 0, sent.stderr
            srs = wait_for("the SRs at the TLS PACS", lambda: len(_srs(pacs_dir)) >= 2 and _srs(pacs_dir), 90)
    finally:
        stop(pacs)
    assert len(srs) == 2  # pneumonia and covid19 on the chest radiograph


def test_a_key_that_does_not_load_stops_serve_with_its_name(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    env = {
        **os.environ,
        "GATEWAY_DATA_DIR": str(tmp_path / "var"),
        "GATEWAY_DICOM__PORT": str(free_port()),
        "GATEWAY_DICOM__TLS_PORT": str(free_port()),
        "GATEWAY_DICOM__TLS_CERTIFICATE": str(pki.server.certificate),
        "GATEWAY_DICOM__TLS_PRIVATE_KEY": str(pki.client.key),  # not the certificate's key
        "GATEWAY_HTTP__PORT": str(free_port()),
        "GATEWAY_WORKER__THREADS": "0",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "serve"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "GATEWAY_DICOM__TLS_PRIVATE_KEY" in proc.stderr and "cannot load" in proc.stderr
