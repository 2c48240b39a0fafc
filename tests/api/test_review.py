"""Review over HTTP against a running site (`gateway serve` with workers, the shipped models, a dcmtk PACS):
the worklist JSON, a case with its images and heatmaps, decisions with versions, retries and conflicts, and
the verified SRs they become at the PACS (dciodvfy clean, VERIFIED, naming their predecessors)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
import pytest

from tests.accounts import bearer, issue_token
from tests.peers import wait_for
from tests.reporting.dciodvfy import assert_dciodvfy_clean
from tests.review_site import VIEWER_TEMPLATE, XSS_NAME, Site, review_site

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with review_site(tmp_path_factory.mktemp("review")) as site:
        yield site


def _case(site: Site, name: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    response = site.get(f"/api/cases/{site.studies[name]}", headers)
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_worklist_in_priority_order_with_filters_and_counts(site: Site) -> None:
    data = site.get("/api/worklist", status="any").json()
    assert data["total"] == 3 and {i["study_instance_uid"] for i in data["items"]} == set(
        site.studies.values()
    )
    keys = [(i["priority"], i["received_at"]) for i in data["items"]]
    assert keys == sorted(keys)  # positive or uncertain first, then oldest
    for item in data["items"]:
        positive = any(f["label"] == "present" or f["uncertain"] for f in item["findings"])
        assert item["priority"] == (0 if positive else 1) and item["sampled"] is False
    assert sum(data["counts"]["status"].values()) == 3
    assert data["counts"]["model"] == {"pneumonia": 2, "covid19": 2, "glaucoma": 1}
    fundus = site.get("/api/worklist", status="any", model="glaucoma").json()
    assert [i["study_instance_uid"] for i in fundus["items"]] == [site.studies["fundus"]]
    dated = site.get("/api/worklist", status="any", date_from="2024-02-01", date_to="2024-02-29").json()
    assert [i["study_instance_uid"] for i in dated["items"]] == [site.studies["chest2"]]
    bad = site.get("/api/worklist", ai_label="maybe")
    assert bad.status_code == 422 and "ai_label" in bad.text


def test_case_has_header_images_heatmaps_and_is_claimed(site: Site) -> None:
    case = _case(site, "chest")
    assert case["header"]["patient_name"] == XSS_NAME  # as text; the page escapes it
    assert case["header"]["accession"] == "ACC-XSS" and case["header"]["study_date"] == "2024-01-05"
    assert case["viewer_url"] == VIEWER_TEMPLATE.format(study_uid=site.studies["chest"])
    assert [m["name"] for m in case["models"]] == ["covid19", "pneumonia"]
    (image,) = case["images"]
    for kind, url in [
        ("display", image["display_url"]),
        ("thumb", image["thumb_url"]),
        *image["heatmaps"].items(),
    ]:
        response = site.get(url)
        assert response.status_code == 200, (kind, response.text)
        pixels = cv2.imdecode(np.frombuffer(response.content, np.uint8), cv2.IMREAD_UNCHANGED)
        assert pixels is not None and max(pixels.shape[:2]) <= 2048, kind
    assert set(image["heatmaps"]) == {"covid19", "pneumonia"}
    other = site.studies["fundus"]
    assert site.get(image["display_url"].replace(site.studies["chest"], other)).status_code == 404
    # the page escapes the patient name and the description it read from the DICOM file
    html = site.get(f"/cases/{site.studies['chest']}").text
    assert "<script>window.pwned" not in html and "&lt;script&gt;window.pwned++&lt;/script&gt;" in html
    assert "<img src=x" not in html and "<b>bold</b>" not in html
    assert "&lt;img src=x onerror=&#34;window.pwned=2&#34;&gt;&lt;b&gt;bold&lt;/b&gt; chest" in html
    # a second radiologist sees who has it
    uid = site.studies["chest"]
    assert _case(site, "chest")["claimed_by"] is None  # reading a case does not claim it
    second = {"Authorization": f"Bearer {issue_token(site.db, 'radiologist')}"}
    assert site.post(f"/api/cases/{uid}/claim", {}).status_code == 200
    seen = _case(site, "chest", second)
    assert seen["claimed_by"] is not None
    taken = site.post(f"/api/cases/{uid}/claim", {}, headers=second)
    assert taken.status_code == 409 and "being reviewed by" in taken.json()["detail"]
    listed = site.get("/api/worklist", headers=second, status="in_review").json()
    assert site.studies["chest"] in [i["study_instance_uid"] for i in listed["items"]]
    audit = site.get("/api/audit", headers=bearer(site.env), study_uid=site.studies["chest"]).json()
    actions = {e["action"] for e in audit["events"]}
    assert {"study.view", "image.fetch"} <= actions


def _decide(site: Site, case: dict[str, Any], model: str, labels: list[str], base: int, **kw: Any) -> Any:
    m = next(x for x in case["models"] if x["name"] == model)
    answers = [
        {
            "sop_instance_uid": i["sop_instance_uid"],
            "label": label,
            **({"reason": kw.pop("reason")} if "reason" in kw else {}),
        }
        for i, label in zip(m["images"], labels, strict=True)
    ]
    return site.post(
        f"/api/cases/{case['study_instance_uid']}/reviews",
        {"model": model, "base_version": base, "answers": answers, **kw},
        headers=kw.pop("headers", None),
    )


def _verified_at_pacs(site: Site, uid: str) -> pydicom.Dataset:
    def arrived() -> pydicom.Dataset | None:
        return site.pacs_objects().get(uid)

    ds: pydicom.Dataset = wait_for(f"verified SR {uid} at the PACS", arrived, timeout=90)
    return ds


def test_decisions_versions_retries_conflicts_and_verified_srs(site: Site, tmp_path: Path) -> None:
    case = _case(site, "chest2")
    pneumonia = next(m for m in case["models"] if m["name"] == "pneumonia")
    ai = [i["ai_label"] for i in pneumonia["images"]]
    other = "viral_pneumonia" if ai[1] != "viral_pneumonia" else "bacterial_pneumonia"
    first = _decide(site, case, "pneumonia", [ai[0], other], 0, comment="second image differs")
    assert first.status_code == 201, first.text
    saved = first.json()
    assert saved["version"] == 1 and saved["created"]
    retry = _decide(site, case, "pneumonia", [ai[0], other], 0, comment="second image differs")
    assert retry.status_code == 200 and retry.json()["version"] == 1 and not retry.json()["created"]
    conflict = _decide(site, case, "pneumonia", [ai[0], ai[1]], 0)
    assert conflict.status_code == 409 and "reload" in conflict.json()["detail"]
    assert _decide(site, case, "pneumonia", ["glaucoma", ai[1]], 1).status_code == 422
    missing = site.post(
        f"/api/cases/{case['study_instance_uid']}/reviews",
        {
            "model": "pneumonia",
            "base_version": 1,
            "answers": [{"sop_instance_uid": pneumonia["images"][0]["sop_instance_uid"], "label": ai[0]}],
        },
    )
    assert missing.status_code == 422 and "no answer" in missing.json()["detail"]
    revised = _decide(site, case, "pneumonia", ["not_assessable", other], 1, reason="rotated", flagged=True)
    assert revised.status_code == 201 and revised.json()["version"] == 2

    ai_uid = pneumonia["report_uid"]
    v1 = _verified_at_pacs(site, saved["verified_report"])
    v2 = _verified_at_pacs(site, revised.json()["verified_report"])
    for ds in (v1, v2):
        assert str(ds.SOPClassUID).startswith(SR_PREFIX)
        assert ds.VerificationFlag == "VERIFIED" and ds.CompletionFlag == "COMPLETE"
        assert ds.VerifyingObserverSequence[0].VerifyingOrganization
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert_dciodvfy_clean(path)
    assert _predecessors(v1) == {ai_uid}
    assert _predecessors(v2) == {ai_uid, saved["verified_report"]}
    texts = _texts(v2)
    assert any("rotated" in t for t in texts) and any("second reader" in t.lower() for t in texts)

    after = _case(site, "chest2")
    history = [h for h in after["history"] if h["model"] == "pneumonia"]
    assert [h["version"] for h in history] == [2, 1]
    assert history[0]["verified_sr"] == revised.json()["verified_report"]
    assert after["status"] == "unreviewed"  # covid19 not decided yet
    covid = next(m for m in after["models"] if m["name"] == "covid19")
    done = _decide(site, after, "covid19", [i["ai_label"] for i in covid["images"]], 0)
    assert done.status_code == 201
    assert _case(site, "chest2")["status"] == "flagged"


def _predecessors(ds: pydicom.Dataset) -> set[str]:
    return {
        str(sop.ReferencedSOPInstanceUID)
        for study in ds.PredecessorDocumentsSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }


def _texts(ds: pydicom.Dataset) -> list[str]:
    out: list[str] = []

    def walk(items: Any) -> None:
        for item in items:
            if "TextValue" in item:
                out.append(str(item.TextValue))
            walk(item.get("ContentSequence", []))

    walk(ds.ContentSequence)
    return out


def test_roles(site: Site) -> None:
    uid = site.studies["fundus"]
    for role in ("data", "admin"):
        headers = bearer(site.env, role)
        assert site.get("/api/worklist", headers).status_code == 403, role
        assert site.get(f"/api/cases/{uid}", headers).status_code == 403, role
    assert site.get("/api/worklist", {}).status_code == 401
    card = site.get("/models/glaucoma/card")
    assert card.status_code == 200 and "Research decision support" in card.text
    assert site.get("/models/..%2Fetc/card").status_code == 404
