"""The upload page in a real browser, against `gateway serve` with its workers and a dcmtk PACS: a JPEG
fundus photograph whose proposed optic-disc crop the user moves, then its result on the page; a PNG chest
radiograph and its result; a text file and a 60 MB file refused with their messages."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image

from tests import factories as f
from tests.browser.pages import sign_in
from tests.review_site import Site, review_site

pytestmark = [pytest.mark.e2e]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with review_site(tmp_path_factory.mktemp("upload-page")) as site:
        yield site


def _write(path: Path, pixels: np.ndarray, fmt: str) -> Path:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt)
    path.write_bytes(out.getvalue())
    return path


def _stored(site: Site, study_uid: str) -> pydicom.Dataset:
    (path,) = _study_files(site, study_uid)
    return pydicom.dcmread(path)


def _study_files(site: Site, study_uid: str) -> list[Path]:
    """The study's uploaded images (not the reports made of them)."""
    out = []
    for p in (site.data_dir / "storage").rglob("*.dcm"):
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        if ds.StudyInstanceUID == study_uid and ds.Modality == "XC":
            out.append(p)
    return out


def test_upload_a_fundus_photograph_with_a_moved_crop(
    browser: Any, site: Site, artifacts: Path, tmp_path: Path
) -> None:
    photo = _write(tmp_path / "eye.jpg", f.fundus_rgb(size=640, index=5), "JPEG")
    page = sign_in(browser, site, full_name="Ulla Uploader", viewport=(1300, 1100))
    page.click("nav a[href='/upload']")
    page.wait_for_selector("#upload-form")
    page.check("input[name=kind][value=fundus]")
    page.set_input_files("#files", str(photo))
    page.wait_for_selector(".crop-box:not([hidden])")
    page.wait_for_selector("input.use-crop:checked")  # the localiser's proposal
    proposal = page.request.post(
        f"{site.url}/api/upload/disc",
        multipart={"file": {"name": "eye.jpg", "mimeType": "image/jpeg", "buffer": photo.read_bytes()}},
        headers={"X-CSRF-Token": page.get_attribute("#upload-form", "data-csrf")},
    ).json()
    box = page.locator(".crop-box").bounding_box()
    shown = page.locator(".stage img").bounding_box()
    scale = 640 / shown["width"]
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] / 2 - 40, box["y"] + box["height"] / 2 - 30, steps=5)
    page.mouse.up()
    page.fill("input[name=patient_id]", "PID-BROWSER")
    page.fill("input[name=patient_name]", "Browser^Betty")
    page.select_option("select[name=laterality]", "R")
    page.screenshot(path=str(artifacts / "upload-fundus-crop.png"), full_page=True)
    page.click("#send")
    page.wait_for_selector(".case-link", timeout=120_000)
    page.screenshot(path=str(artifacts / "upload-fundus-result.png"), full_page=True)
    assert "glaucoma" in page.inner_text("#result")
    assert "not a diagnosis" in page.inner_text("#result")

    study_uid = page.get_attribute(".case-link", "href").rsplit("/", 1)[-1]
    ds = _stored(site, study_uid)
    assert ds.PatientID == "PID-BROWSER" and ds.ImageLaterality == "R"
    assert ds.Rows == ds.Columns == proposal["size"]
    moved = ds.DerivationDescription.rsplit("at (", 1)[1].rstrip(")").split(", ")
    x, y = int(moved[0]), int(moved[1])
    assert x == pytest.approx(max(0, proposal["x"] - 40 * scale), abs=3)
    assert y == pytest.approx(max(0, proposal["y"] - 30 * scale), abs=3)


def test_upload_a_chest_png_and_see_its_result(
    browser: Any, site: Site, artifacts: Path, tmp_path: Path
) -> None:
    chest = _write(tmp_path / "chest.png", f.chest_gray(size=512, index=4), "PNG")
    page = sign_in(browser, site, full_name="Ulla Uploader", viewport=(1300, 1100))
    page.goto(f"{site.url}/upload")
    page.check("input[name=kind][value=chest]")
    page.set_input_files("#files", str(chest))
    assert page.locator(".crop-box").count() == 0  # no crop for a radiograph
    page.click("#send")
    page.wait_for_selector(".case-link", timeout=120_000)
    text = page.inner_text("#result")
    assert "pneumonia" in text and "covid19" in text
    page.screenshot(path=str(artifacts / "upload-chest-result.png"), full_page=True)


def test_a_text_file_and_a_60_mb_file_get_their_messages(
    browser: Any, site: Site, artifacts: Path, tmp_path: Path
) -> None:
    page = sign_in(browser, site, full_name="Ulla Uploader", viewport=(1300, 1100))
    page.goto(f"{site.url}/upload")
    page.check("input[name=kind][value=chest]")
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image\n" * 50)
    page.set_input_files("#files", str(notes))
    page.click("#send")
    page.wait_for_selector("#message.error")
    assert "Not uploaded" in page.inner_text("#message") and "notes.txt" in page.inner_text("#message")

    page.click("button.remove")
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(60 << 20))
    page.set_input_files("#files", str(big))
    assert "larger than the limit" in page.inner_text("#file-list")
    page.click("#send")
    page.locator("#message", has_text="50 MB").wait_for(timeout=60_000)
    page.screenshot(path=str(artifacts / "upload-too-large.png"), full_page=True)
    assert "Not uploaded" in page.inner_text("#message")
