"""GATEWAY_REPORTING__ENCAPSULATED_PDF=true against `gateway serve` with the shipped models and a dcmtk PACS:
the PACS receives, with the SRs, an Encapsulated PDF of the result in the study (dciodvfy: no errors; its PDF
read back with pdftotext), and after a radiologist's decision a new one that shows the decision; the worklist
and the case page never take it for a model's result."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from reporting.encapsulated import ENCAPSULATED_PDF
from tests.peers import wait_for
from tests.reporting.dciodvfy import assert_dciodvfy_clean
from tests.review_site import Site, decide, review_site

pytestmark = [pytest.mark.e2e]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with review_site(tmp_path_factory.mktemp("result-pdf"), REPORTING__ENCAPSULATED_PDF="true") as site:
        yield site


def _documents(site: Site, study_uid: str) -> list[pydicom.Dataset]:
    return sorted(
        (
            ds
            for ds in site.pacs_objects().values()
            if ds.SOPClassUID == ENCAPSULATED_PDF and ds.StudyInstanceUID == study_uid
        ),
        key=lambda ds: str(ds.InstanceCreationTime),
    )


def _text(ds: pydicom.Dataset, tmp: Path) -> str:
    tool = shutil.which("pdftotext")
    assert tool, "pdftotext not found: install poppler-utils"
    path = tmp / f"{ds.SOPInstanceUID}.pdf"
    path.write_bytes(bytes(ds.EncapsulatedDocument)[: int(ds.EncapsulatedDocumentLength)])
    out = subprocess.run([tool, "-layout", str(path), "-"], capture_output=True, text=True, check=True).stdout
    return " ".join(out.split())


def test_the_pacs_gets_the_pdf_with_the_srs_and_again_after_a_decision(site: Site, tmp_path: Path) -> None:
    uid = site.studies["chest"]
    (document,) = wait_for("the Encapsulated PDF at the PACS", lambda: _documents(site, uid), timeout=60)
    source = pydicom.dcmread(next((site.data_dir / "storage" / "instances" / uid).rglob("*.dcm")))
    assert (document.PatientID, document.AccessionNumber) == (source.PatientID, source.AccessionNumber)
    assert document.PatientName == source.PatientName and document.Modality == "DOC"
    assert document.MIMETypeOfEncapsulatedDocument == "application/pdf"
    referenced = {str(r.ReferencedSOPInstanceUID) for r in document.SourceInstanceSequence}
    assert str(source.SOPInstanceUID) in referenced
    srs = [ds for ds in site.pacs_objects().values() if ds.Modality == "SR" and ds.StudyInstanceUID == uid]
    assert {str(ds.SOPInstanceUID) for ds in srs} <= referenced
    path = tmp_path / "document.dcm"
    document.save_as(path)
    assert_dciodvfy_clean(path)
    text = _text(document, tmp_path)
    assert "not a diagnosis" in text and "Not reviewed by a radiologist yet" in text
    case = site.get(f"/api/cases/{uid}").json()
    for model in case["models"]:
        assert f"{model['name']} {model['version']}" in text
    assert sorted(m["name"] for m in case["models"]) == ["covid19", "pneumonia"]  # not "pdf"

    other = decide(site, uid, correct=True)
    both = wait_for("the PDF with the decision", lambda: len(_documents(site, uid)) == 2, timeout=60)
    assert both
    newer = next(ds for ds in _documents(site, uid) if ds.SOPInstanceUID != document.SOPInstanceUID)
    assert newer.SeriesInstanceUID == document.SeriesInstanceUID
    assert f"Radiologist: {other['title']} (corrected)" in _text(newer, tmp_path)
