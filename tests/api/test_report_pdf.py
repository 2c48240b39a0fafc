"""The PDF result (GET /studies/{uid}/report.pdf) of studies processed by `gateway serve` with the shipped
models, one of them corrected by a radiologist: read back with pdftotext (findings, probabilities,
thresholds, model versions, the gate's reason, the decision, the notice) and pdfimages (the image and its
heatmaps are in it); WeasyPrint fetches nothing but data: URIs (a local HTTP server and a file are never
read); only signed-in readers get it."""

from __future__ import annotations

import http.server
import io
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from core.labels import SUBTYPE_CAUTION
from reporting.pdf import render_pdf
from tests import factories as f
from tests.peers import free_port, wait_for
from tests.review_site import Site, _ready, decide, review_site

pytestmark = [pytest.mark.e2e]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with review_site(tmp_path_factory.mktemp("pdf")) as site:
        yield site


def _text(pdf: bytes, tmp: Path) -> str:
    path = tmp / "r.pdf"
    path.write_bytes(pdf)
    tool = shutil.which("pdftotext")
    assert tool, "pdftotext not found: install poppler-utils"
    out = subprocess.run([tool, "-layout", str(path), "-"], capture_output=True, text=True, check=True)
    return " ".join(out.stdout.split())


def _images(pdf: bytes, tmp: Path) -> int:
    path = tmp / "i.pdf"
    path.write_bytes(pdf)
    tool = shutil.which("pdfimages")
    assert tool
    listing = subprocess.run([tool, "-list", str(path)], capture_output=True, text=True, check=True).stdout
    return len([line for line in listing.splitlines()[2:] if line.strip()])


def test_the_pdf_shows_findings_decision_and_notice(site: Site, tmp_path: Path) -> None:
    uid = site.studies["chest"]
    other = decide(site, uid, correct=True)
    case = site.get(f"/api/cases/{uid}").json()

    response = site.get(f"/studies/{uid}/report.pdf")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/pdf"
    pdf = response.content
    assert pdf.startswith(b"%PDF")
    keep = os.environ.get("GATEWAY_TEST_ARTIFACTS")
    if keep:
        (Path(keep) / "report.pdf").write_bytes(pdf)
    text = _text(pdf, tmp_path)
    assert "not a diagnosis" in text and "AI screening result" in text
    for model in case["models"]:
        assert f"{model['name']} {model['version']}" in text
        for img in model["images"]:
            for finding in img["findings"]:
                assert f"{finding['probability']:.3f}" in text and f"{finding['threshold']:.3f}" in text
    assert f"Radiologist: {other['title']} (corrected)" in text
    # the pneumonia model's bacterial/viral subtype carries its caution, on the PDF and the case page
    chest = [m for m in case["models"] if m["name"] == "pneumonia"]
    pneumonia = [i for m in chest for i in m["images"] if i["assessable"]]
    assert pneumonia, "the chest study needs an assessed pneumonia result"
    assert "Bacterial vs viral subtype is unreliable" in " ".join(text.split())
    assert chest[0]["cautions"] == [SUBTYPE_CAUTION]
    page = site.get(f"/cases/{uid}")
    assert page.status_code == 200 and SUBTYPE_CAUTION in page.text
    assert "<script>" in text  # the patient name (an XSS payload) is text in the PDF, as on the page
    assert _images(pdf, tmp_path) >= 3  # the image and a heatmap per chest model

    fundus = site.get(f"/studies/{site.studies['fundus']}/report.pdf")
    assert fundus.status_code == 200
    assert "Not reviewed by a radiologist yet" in _text(fundus.content, tmp_path)


def test_not_assessable_shows_the_gate_reason(site: Site, tmp_path: Path) -> None:
    """A colour fundus photograph uploaded as a chest radiograph: the chest models' gates refuse it."""
    out = io.BytesIO()
    Image.fromarray(f.fundus_rgb(size=512, index=2)).save(out, "PNG")
    response = httpx.post(
        f"{site.url}/api/upload",
        files=[("files", ("eye.png", out.getvalue(), "image/png"))],
        data={"kind": "chest"},
        headers=site.radiologist,
        timeout=60,
    )
    assert response.status_code == 201, response.text
    uid = response.json()["studies"][0]["study_instance_uid"]
    wait_for("the refused study's case", partial(_ready, site, uid), timeout=120)
    case = site.get(f"/api/cases/{uid}").json()
    refused = [i for m in case["models"] for i in m["images"] if not i["assessable"]]
    assert refused, case
    text = _text(site.get(f"/studies/{uid}/report.pdf").content, tmp_path)
    assert f"Not assessable: {' '.join(refused[0]['reason'].split())}" in text


def test_only_readers_get_the_pdf(site: Site) -> None:
    uid = site.studies["chest"]
    assert httpx.get(f"{site.url}/studies/{uid}/report.pdf", timeout=30).status_code in (401, 303)
    assert site.get("/studies/1.2.3.4/report.pdf").status_code == 404


class _Counter(http.server.BaseHTTPRequestHandler):
    hits = 0

    def do_GET(self) -> None:
        type(self).hits += 1
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_the_renderer_fetches_nothing_but_data_uris(tmp_path: Path) -> None:
    port = free_port()
    server = http.server.HTTPServer(("127.0.0.1", port), _Counter)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG not really")
    try:
        context = {
            "study_uid": "1.2.3",
            "header": {"patient_name": "Test", "description": f"http://127.0.0.1:{port}/leak"},
            "generated": "now",
            "images": [
                {
                    "number": 1,
                    "modality": "DX",
                    "display": f"http://127.0.0.1:{port}/image.png",
                    "heatmaps": {"x": secret.as_uri()},
                    "results": [],
                }
            ],
        }
        pdf = render_pdf(context)
    finally:
        server.shutdown()
    assert pdf.startswith(b"%PDF") and _Counter.hits == 0
