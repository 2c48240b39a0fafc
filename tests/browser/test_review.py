"""In a real browser, against `gateway serve` with its workers and a dcmtk PACS: a radiologist works the
worklist, views a case (window/level, heatmap, help), decides with the keyboard, corrects and revises a label;
the verified SR reaches the PACS and passes dciodvfy; other roles and cross-origin posts are refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from core.labels import label_title
from tests.browser.pages import sign_in
from tests.peers import wait_for
from tests.reporting.dciodvfy import assert_dciodvfy_clean
from tests.review_site import XSS_NAME, Site, review_site

pytestmark = [pytest.mark.e2e]

SR_CLASSES = "1.2.840.10008.5.1.4.1.1.88."
#: The pixels the canvas shows, to tell whether a control changed the picture.
CANVAS = "document.querySelector('canvas#view').toDataURL()"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with review_site(tmp_path_factory.mktemp("review")) as site:
        yield site


def _case_json(page: Any, site: Site, uid: str) -> dict[str, Any]:
    response = page.request.get(f"{site.url}/api/cases/{uid}")
    assert response.status == 200, response.text()
    return dict(response.json())


def _open_case(page: Any, site: Site, uid: str) -> None:
    page.goto(f"{site.url}/cases/{uid}")
    page.wait_for_selector('canvas#view[data-ready="1"]')


def _choices(page: Any, image: int, model: str) -> tuple[str, dict[str, str]]:
    """The AI's label of ``model`` on an image, and the digit key of each of its labels."""
    fieldset = page.locator(f'.image-decisions[data-index="{image}"] fieldset[data-model="{model}"]')
    keys = {
        r.get_attribute("value"): r.get_attribute("data-key")
        for r in fieldset.locator("input[data-key]").all()
    }
    return str(fieldset.get_attribute("data-ai")), keys


def _save(page: Any) -> None:
    with page.expect_navigation():
        page.click("#save")
    page.wait_for_selector('canvas#view[data-ready="1"]')


def _history(page: Any) -> list[list[str]]:
    return [row.locator("td").all_inner_texts() for row in page.locator("#history tbody tr").all()]


def test_worklist_lists_filters_counts_and_orders_cases(browser: Any, site: Site, artifacts: Path) -> None:
    page = sign_in(browser, site, full_name="Wanda Worklist")
    response = page.goto(f"{site.url}/worklist")
    assert response is not None and response.status == 200
    assert page.locator("#total").inner_text().startswith("3 cases")
    # positive or uncertain first (the chest studies, oldest first), then the fundus photograph
    accessions = page.locator("table.worklist tbody td:nth-child(4)").all_inner_texts()
    assert accessions == ["ACC-XSS", "ACC-TWO", "ACC-EYE"]
    classes = [
        (row.get_attribute("class") or "").strip() for row in page.locator("table.worklist tbody tr").all()
    ]
    assert classes == ["priority", "priority", ""]
    assert page.locator("tbody tr.priority .flag").count() == 2
    options = page.locator("select[name=model] option").all_inner_texts()
    assert {"glaucoma (1)", "pneumonia (2)", "covid19 (2)"} <= set(options)
    assert "unreviewed (3)" in page.locator("select[name=status] option").all_inner_texts()
    page.screenshot(path=str(artifacts / "worklist.png"), full_page=True)

    page.select_option("select[name=model]", "glaucoma")
    page.click("#filters button[type=submit]")
    page.wait_for_url("**/worklist?*model=glaucoma*")
    assert page.locator("#total").inner_text().startswith("1 case.")
    assert page.locator("table.worklist tbody td:nth-child(4)").all_inner_texts() == ["ACC-EYE"]
    assert "glaucoma" in page.locator("table.worklist tbody .chip").inner_text()
    page.context.close()


def test_case_page_shows_header_as_text_and_drives_the_viewer(
    browser: Any, site: Site, artifacts: Path
) -> None:
    page = sign_in(browser, site)
    _open_case(page, site, site.studies["chest"])
    assert "<script>" in XSS_NAME and XSS_NAME in page.locator("#patient-name").inner_text()  # as text
    assert "<b>bold</b> chest" in page.locator("#study-description").inner_text()
    assert page.locator("#patient script, #patient img, #patient b").count() == 0
    assert page.evaluate("window.pwned") is None  # and never run

    before = page.evaluate(CANVAS)
    page.keyboard.press("Space")  # heatmap off
    assert not page.locator("#heatmap-toggle").is_checked()
    off = page.evaluate(CANVAS)
    assert off != before
    page.click("#heatmap-toggle")  # and on again
    assert page.evaluate(CANVAS) == before

    page.click("button[data-preset=contrast]")
    contrast = page.evaluate(CANVAS)
    assert contrast != before
    assert "W 128 / L 128" in page.locator("#readout").inner_text()
    box = page.locator("canvas#view").bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] / 2 + 120, box["y"] + box["height"] / 2 + 40, steps=5)
    page.mouse.up()
    assert page.evaluate(CANVAS) != contrast
    assert "W 248 / L 148" in page.locator("#readout").inner_text()

    assert page.locator("#help").is_hidden()
    page.keyboard.press("?")
    assert page.locator("#help").is_visible()
    page.keyboard.press("Escape")
    assert page.locator("#help").is_hidden()
    # the pneumonia subtype's caution stands beside its findings, visible
    caution = page.locator("fieldset[data-model=pneumonia] .caution").first
    assert caution.is_visible() and "unreliable" in caution.inner_text()
    page.screenshot(path=str(artifacts / "case.png"), full_page=True)
    page.context.close()


def test_keyboard_decisions_corrections_and_revisions(browser: Any, site: Site, artifacts: Path) -> None:
    page = sign_in(browser, site, full_name="Kim Keys")
    first, two = site.studies["chest"], site.studies["chest2"]
    _open_case(page, site, first)
    assert _case_json(page, site, first)["history"] == []
    page.keyboard.press("a")  # confirm all: the AI's label for each model
    for fieldset in page.locator("fieldset.finding").all():
        checked = fieldset.locator("input[type=radio]:checked")
        assert checked.get_attribute("value") == fieldset.get_attribute("data-ai")
    page.keyboard.press("Enter")  # save and next
    page.wait_for_url(f"{site.url}/cases/{two}*")
    case = _case_json(page, site, first)
    assert case["status"] == "reviewed"
    assert sorted((h["model"], h["version"]) for h in case["history"]) == [("covid19", 1), ("pneumonia", 1)]
    assert all(h["changes"][0].startswith("confirmed ") for h in case["history"])

    page.wait_for_selector('canvas#view[data-ready="1"]')
    visible = page.locator(".image-decisions:visible h2")
    assert page.locator(".thumb.current").get_attribute("data-index") == "0"
    assert visible.all_inner_texts() == ["Image 1 of 2"]
    image_1 = page.evaluate(CANVAS)
    ai, keys = _choices(page, 0, "covid19")
    covid = page.locator('.image-decisions[data-index="0"] fieldset[data-model="covid19"]')
    assert covid.locator("label.choice", has_text="(AI)").all_inner_texts() == [
        covid.locator(f"label.choice:has(input[value={ai}])").inner_text()
    ]
    corrected = next(label for label in keys if label != ai)
    page.keyboard.press(keys[corrected])  # correct the AI on image 1
    assert covid.locator("input:checked").get_attribute("value") == corrected
    pneumonia, pneumonia_keys = _choices(page, 0, "pneumonia")
    page.keyboard.press(pneumonia_keys[pneumonia])
    page.keyboard.press("j")
    page.locator("#readout", has_text="image 2 of 2").wait_for()
    assert page.locator(".thumb.current").get_attribute("data-index") == "1"
    assert visible.all_inner_texts() == ["Image 2 of 2"]
    assert page.evaluate(CANVAS) != image_1
    for model in ("covid19", "pneumonia"):  # the AI's labels on image 2
        label, keys_2 = _choices(page, 1, model)
        page.keyboard.press(keys_2[label])
    page.keyboard.press("w")  # window/level changed on image 2 ...
    page.keyboard.press("k")
    page.locator("#readout", has_text="W 128 / L 128 · zoom 1.00× · image 1 of 2").wait_for()
    assert visible.all_inner_texts() == ["Image 1 of 2"]
    assert page.evaluate(CANVAS) != image_1  # ... applies to image 1 too
    page.keyboard.press("r")
    assert page.evaluate(CANVAS) == image_1
    _save(page)
    rows = _history(page)
    assert sorted((r[2], r[3]) for r in rows) == [("covid19", "1"), ("pneumonia", "1")]
    covid_row = next(r[4] for r in rows if r[2] == "covid19")
    assert f"corrected image 1: {label_title('covid19', corrected)}; confirmed image 2: " in covid_row

    revised = next(label for label in keys if label not in (ai, corrected))
    page.keyboard.press(keys[revised])  # revise the correction
    _save(page)
    rows = _history(page)
    assert len(rows) == 3, rows
    was = label_title("covid19", corrected)
    assert rows[0][2:5] == ["covid19", "2", f"image 1: {label_title('covid19', revised)} (was {was})"]
    page.screenshot(path=str(artifacts / "case-history.png"), full_page=True)
    page.context.close()


def _referenced_uids(ds: pydicom.Dataset) -> set[str]:
    """Every ReferencedSOPInstanceUID under the Predecessor Documents Sequence."""
    out: set[str] = set()
    for study in ds.get("PredecessorDocumentsSequence", []):
        for series in study.get("ReferencedSeriesSequence", []):
            out.update(str(sop.ReferencedSOPInstanceUID) for sop in series.get("ReferencedSOPSequence", []))
    return out


def test_verified_reports_reach_the_pacs_and_are_valid(browser: Any, site: Site) -> None:
    page = sign_in(browser, site)
    uid = site.studies["chest"]
    case = _case_json(page, site, uid)
    assert case["history"], "run after the keyboard decisions test"
    ai_reports = {m["report_uid"] for m in case["models"]}

    def verified() -> dict[str, pydicom.Dataset] | None:
        """AI report UID -> the verified SR in the PACS that succeeds it, once there is one for each."""
        found = {
            ai: ds
            for ds in site.pacs_objects().values()
            if str(ds.SOPClassUID).startswith(SR_CLASSES) and ds.get("VerificationFlag") == "VERIFIED"
            for ai in _referenced_uids(ds) & ai_reports
        }
        return found if set(found) == ai_reports else None

    found = wait_for("the verified SRs in the PACS", verified, timeout=60)
    history = _case_json(page, site, uid)["history"]
    page.context.close()
    assert {h["verified_sr"] for h in history} == {str(ds.SOPInstanceUID) for ds in found.values()}
    for ds in found.values():
        assert ds.StudyInstanceUID == uid
        assert ds.get("CompletionFlag") == "COMPLETE"
        assert_dciodvfy_clean(Path(ds.filename))


def test_other_roles_are_refused(browser: Any, site: Site) -> None:
    page = sign_in(browser, site, role="data")
    response = page.goto(f"{site.url}/cases/{site.studies['fundus']}")
    assert response is not None and response.status == 403
    assert "does not allow this" in page.locator("main").inner_text()
    assert page.locator("canvas#view").count() == 0
    page.context.close()
    page = sign_in(browser, site)
    response = page.goto(f"{site.url}/admin/users")
    assert response is not None and response.status == 403
    assert "does not allow this" in page.locator("main").inner_text()
    page.context.close()


def test_cross_origin_review_post_is_refused(browser: Any, site: Site) -> None:
    page = sign_in(browser, site)
    uid = site.studies["fundus"]
    _open_case(page, site, uid)
    (model,) = _case_json(page, site, uid)["models"]
    form = {
        "csrf_token": page.locator("#decision input[name=csrf_token]").get_attribute("value"),
        "q": "",
        f"label.glaucoma.{model['images'][0]['sop_instance_uid']}": "glaucoma",
        "base.glaucoma": "0",
        "go": "stay",
    }
    url = f"{site.url}/cases/{uid}/review"
    for headers in (
        {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
        {"Origin": "https://evil.example"},
        {"Sec-Fetch-Site": "cross-site"},
    ):
        response = page.request.post(url, headers=headers, form=form, max_redirects=0)
        assert response.status == 403, (headers, response.status)
    assert _case_json(page, site, uid)["history"] == []
    # the very same form from the page's own origin is saved: the refusal was the origin's
    response = page.request.post(
        url, headers={"Origin": site.url, "Sec-Fetch-Site": "same-origin"}, form=form, max_redirects=0
    )
    assert response.status == 303
    assert [h["version"] for h in _case_json(page, site, uid)["history"]] == [1]
    page.context.close()
