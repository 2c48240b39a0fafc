"""The PDF result and the administration of stored studies in a real browser, against `gateway serve` with
its workers and a dcmtk PACS: a radiologist downloads a case's PDF (read back with pdftotext, page 1 drawn
with pdftoppm); an administrator finds a study, downloads its DICOM files as a ZIP and deletes it after the
confirmation page (its files are gone from storage); a radiologist cannot reach the admin pages."""

from __future__ import annotations

import shutil
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.browser.pages import sign_in
from tests.review_site import Site, review_site

pytestmark = [pytest.mark.e2e]

ADMIN_PAGES = ("/admin/studies", "/admin/deliveries", "/admin/users", "/admin/tokens", "/admin/audit")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with review_site(tmp_path_factory.mktemp("admin-page")) as site:
        yield site


def _poppler(name: str) -> str:
    tool = shutil.which(name)
    assert tool, f"{name} not found: install poppler-utils"
    return tool


def test_download_the_pdf_from_the_case_page(
    browser: Any, site: Site, artifacts: Path, tmp_path: Path
) -> None:
    uid = site.studies["chest2"]
    case = site.get(f"/api/cases/{uid}").json()
    page = sign_in(browser, site, full_name="Pia Pdf")
    page.goto(f"{site.url}/cases/{uid}")
    with page.expect_download() as download_info:
        page.click("#pdf-link")
    download = download_info.value
    assert download.suggested_filename.endswith(".pdf")
    pdf = tmp_path / "result.pdf"
    download.save_as(pdf)
    text = subprocess.run(
        [_poppler("pdftotext"), "-layout", str(pdf), "-"], capture_output=True, text=True, check=True
    ).stdout
    words = " ".join(text.split())
    assert "not a diagnosis" in words and "AI screening result" in words
    for model in case["models"]:
        assert f"{model['name']} {model['version']}" in words
        for image in model["images"]:
            for finding in image["findings"]:
                assert f"{finding['probability']:.3f}" in words
    subprocess.run(
        [_poppler("pdftoppm"), "-png", "-r", "60", "-f", "1", "-l", "1", str(pdf), str(artifacts / "report")],
        check=True,
    )
    (png,) = artifacts.glob("report-*1.png")
    assert png.stat().st_size > 10_000  # an image and its heatmaps drawn, not an empty page


def test_a_radiologist_cannot_reach_the_admin_pages(browser: Any, site: Site, artifacts: Path) -> None:
    page = sign_in(browser, site)
    assert page.locator("nav a[href='/admin/studies']").count() == 0
    for path in ADMIN_PAGES:
        response = page.goto(f"{site.url}{path}")
        assert response is not None and response.status == 403, path
        assert "does not allow" in page.inner_text("main"), path
    page.screenshot(path=str(artifacts / "admin-refused.png"))


def test_admin_finds_downloads_and_deletes_a_study(
    browser: Any, site: Site, artifacts: Path, tmp_path: Path
) -> None:
    uid = site.studies["chest2"]
    storage = site.data_dir / "storage"
    folders = [storage / folder / uid for folder in ("instances", "reports", "renditions")]
    assert all(folder.is_dir() for folder in folders)
    page = sign_in(browser, site, role="admin")
    page.click("nav a[href='/admin/studies']")
    page.fill("input[name=accession_number]", "ACC-TWO")
    page.click("#study-search button[type=submit]")
    rows = page.locator("#studies tbody tr")
    rows.first.wait_for()
    assert rows.count() == 1
    assert "TEST-001" in rows.first.inner_text() and "DX" in rows.first.inner_text()
    page.screenshot(path=str(artifacts / "admin-studies.png"), full_page=True)
    rows.first.locator("a").click()
    page.wait_for_selector("#zip-link")
    assert "Two Images" in page.inner_text("main")
    page.screenshot(path=str(artifacts / "admin-study.png"), full_page=True)

    with page.expect_download() as download_info:
        page.click("#zip-link")
    archive = tmp_path / "study.zip"
    download_info.value.save_as(archive)
    with zipfile.ZipFile(archive) as z:
        modalities = sorted(str(pydicom.dcmread(z.open(n)).Modality) for n in z.namelist())
    assert modalities.count("DX") == 2 and "SR" in modalities

    page.click("#delete-link")
    page.wait_for_selector("#confirm-delete")
    assert "cannot be undone" in page.inner_text("main")
    page.screenshot(path=str(artifacts / "admin-study-delete.png"), full_page=True)
    page.click("#confirm-delete")
    page.wait_for_selector("p.message")
    assert f"study {uid} deleted" in page.inner_text("p.message")
    assert not any(folder.exists() for folder in folders)
    page.fill("input[name=study_uid]", uid)
    page.click("#study-search button[type=submit]")
    page.wait_for_selector("#studies td.muted")
    assert site.get(f"/api/cases/{uid}").status_code == 404
