"""Live agreement (core.agreement and GET /api/models/{name}/performance) against a hand computation: six
glaucoma studies decided by a radiologist, and a shadow version's predictions on three of them."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy.orm import Session, sessionmaker

from api.main import create_app
from api.routes.models import trend_lines
from core.accounts import create_token, create_user
from core.agreement import DriftBand, kappa, performance, wilson
from core.db import transaction
from core.decisions import Answer, report_images, save_review
from core.settings import Settings
from core.tables import ModelVersion, Prediction, Report
from tests.peers import free_port, wait_port
from tests.review_rows import add_study

#: (AI probability of glaucoma, the radiologist's label)
CASES = [
    (0.9, "glaucoma"),  # TP, confirmed
    (0.9, "glaucoma"),  # TP, confirmed
    (0.9, "no_glaucoma"),  # FP, corrected
    (0.1, "no_glaucoma"),  # TN, confirmed
    (0.1, "glaucoma"),  # FN, corrected
    (0.1, "not_assessable"),  # left out of the decided images
]
#: shadow version 2.0 on cases 0, 2, 4: glaucoma, no glaucoma, glaucoma (all three right)
SHADOW = {0: 0.8, 2: 0.2, 4: 0.8}


def _seed(factory: sessionmaker[Session]) -> str:
    with transaction(factory) as session:
        user = create_user(
            session, username="reader", role="radiologist", password="long enough pw", actor="t"
        )
        for n, (p, label) in enumerate(CASES):
            study = add_study(session, models={"glaucoma": {"glaucoma": p}}, modality="OP")
            report = session.query(Report).filter(Report.study_id == study.id).one()
            (image,) = report_images(session, report)
            reason = "blurred" if label == "not_assessable" else None
            answer = Answer(sop_instance_uid=image.sop_instance_uid, label=label, reason=reason)
            save_review(
                session, report=report, user=user, answers=[answer], base_version=0, actor="user:reader"
            )
            if n in SHADOW:
                q = SHADOW[n]
                session.add(
                    Prediction(
                        study_id=study.id,
                        instance_id=image.instance_id,
                        model_name="glaucoma",
                        model_version="2.0",
                        finding="glaucoma",
                        probability=q,
                        threshold=0.42,
                        label="present" if q >= 0.42 else "absent",
                        assessable=True,
                        shadow=True,
                    )
                )
        _, token = create_token(session, user, [], days=1, actor="t")
    return token


def _check(result: dict[str, Any]) -> None:
    (version,) = result["versions"]
    assert version["version"] == "1.0.0" and version["images"] == 6 and version["decided"] == 5
    assert version["counts"] == {"tp": 2, "fp": 1, "fn": 1, "tn": 1}
    # po = 3/5, pe = (3*3 + 2*2)/25 = 13/25: kappa = (15/25 - 13/25) / (12/25) = 1/6
    assert version["kappa"]["value"] == pytest.approx(1 / 6)
    assert version["sensitivity"]["value"] == pytest.approx(2 / 3)
    assert (version["sensitivity"]["low"], version["sensitivity"]["high"]) == pytest.approx(
        (0.2077, 0.9385), abs=1e-4
    )
    assert version["specificity"]["value"] == pytest.approx(1 / 2)
    assert version["ppv"]["value"] == pytest.approx(2 / 3) and version["npv"]["value"] == pytest.approx(1 / 2)
    assert version["confirmation_rate"]["value"] == pytest.approx(3 / 6)
    assert version["override_rate"]["value"] == pytest.approx(2 / 6)
    assert sum(w["images"] for w in version["weekly"]) == 6
    (shadow,) = result["shadow"]
    assert shadow["version"] == "2.0" and shadow["images"] == 3
    assert shadow["shadow"]["counts"] == {"tp": 2, "fp": 0, "fn": 0, "tn": 1}
    assert shadow["active_on_the_same_images"]["counts"] == {"tp": 1, "fp": 1, "fn": 1, "tn": 0}


def test_figures_equal_a_hand_computation(factory: sessionmaker[Session]) -> None:
    _seed(factory)
    with factory() as session:
        _check(performance(session, "glaucoma"))


@pytest.fixture
def server(factory: sessionmaker[Session], tmp_path: Path) -> Iterator[str]:
    port = free_port()
    app = create_app(factory, Settings(data_dir=tmp_path / "var"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_port(port, 30)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_the_endpoint_answers_the_same(factory: sessionmaker[Session], server: str) -> None:
    token = _seed(factory)
    headers = {"Authorization": f"Bearer {token}"}
    response = httpx.get(f"{server}/api/models/glaucoma/performance", headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    _check(response.json())
    assert httpx.get(f"{server}/api/models/glaucoma/performance", timeout=30).status_code == 401
    assert (
        httpx.get(f"{server}/api/models/nosuch/performance", headers=headers, timeout=30).status_code == 404
    )


def test_kappa_and_wilson_edges() -> None:
    assert kappa([])["value"] is None and wilson(0, 0)["value"] is None
    assert kappa([("a", "a"), ("a", "a")])["value"] is None  # one label on both sides
    assert kappa([("a", "a"), ("b", "b")])["value"] == pytest.approx(1.0)


def test_the_page_shows_the_figures_and_the_weekly_trend(factory: sessionmaker[Session], server: str) -> None:
    token = _seed(factory)
    response = httpx.get(
        f"{server}/models/glaucoma/performance", headers={"Authorization": f"Bearer {token}"}, timeout=30
    )
    assert response.status_code == 200, response.text
    html = response.text
    assert "never a diagnosis" in html.lower() or "not a diagnosis" in html.lower()
    assert "TP 2 · FP 1 · FN 1 · TN 1" in html
    sensitivity = '0.67 <span class="ci">(0.21–0.94)</span> <span class="count">2/3</span>'
    assert sensitivity in html
    assert "0.17" in html  # kappa 1/6
    assert html.count('<polyline class="line') >= 2 and "Version 1.0.0" in html and "Shadow versions" in html
    assert httpx.get(f"{server}/models/glaucoma/performance", timeout=30).status_code in (401, 303)
    headers = {"Authorization": f"Bearer {token}"}
    assert httpx.get(f"{server}/models/nosuch/performance", headers=headers, timeout=30).status_code == 404


def test_trend_lines_break_where_a_week_has_no_value() -> None:
    weekly = [
        {"week": "2026-W01", "images": 3, "kappa": 0.5, "sensitivity": 1.0, "specificity": None},
        {"week": "2026-W02", "images": 2, "kappa": -0.2, "sensitivity": None, "specificity": 0.5},
        {"week": "2026-W03", "images": 4, "kappa": 1.0, "sensitivity": 0.5, "specificity": 0.75},
    ]
    t = trend_lines(weekly)
    assert len(t["lines"]["kappa"]) == 1 and len(t["lines"]["kappa"][0].split()) == 3
    assert [len(s.split()) for s in t["lines"]["sensitivity"]] == [1, 1]  # broken at week 2
    assert [len(s.split()) for s in t["lines"]["specificity"]] == [2]
    bottom = t["grid"][0]["y"]  # the 0 line
    assert t["lines"]["kappa"][0].split()[1].endswith(f",{bottom:.1f}")  # kappa < 0 drawn at 0
    assert [w["label"] for w in t["weeks"]] == ["2026-W01", "2026-W02", "2026-W03"]


def _version(session: Session, version: str, reference: dict[str, Any] | None, status: str) -> None:
    session.add(
        ModelVersion(
            name="glaucoma",
            version=version,
            digest="0" * 64,
            path="/nowhere",
            source="made",
            data_summary={},
            metrics={"reference": reference} if reference else {},
            status=status,
            changed_by="t",
        )
    )


def test_drift_against_the_reference_figures(factory: sessionmaker[Session]) -> None:
    """1.0.0 answered the six cases (probabilities 0.9 x3, 0.1 x3) and one image it found not assessable:
    1/7 not assessable (reference 0 %: beyond the 5-point band), mean probability 3.0/6 = 0.5 (reference
    0.35: beyond 0.10). The shadow 2.0 answered three (0.8, 0.2, 0.8: mean 0.6, reference 0.55: within)."""
    _seed(factory)
    with transaction(factory) as session:
        add_study(session, models={"glaucoma": None}, modality="OP")
        _version(
            session, "1.0.0", {"not_assessable_share": 0.0, "mean_probability": {"glaucoma": 0.35}}, "active"
        )
        _version(
            session, "2.0", {"not_assessable_share": 0.0, "mean_probability": {"glaucoma": 0.55}}, "shadow"
        )
    with factory() as session:
        drift = {d["version"]: d for d in performance(session, "glaucoma", DriftBand(min_images=3))["drift"]}
        few = {d["version"]: d for d in performance(session, "glaucoma", DriftBand(min_images=5))["drift"]}
    old, new = drift["1.0.0"], drift["2.0"]
    assert old["images"] == 7 and old["not_assessable_share"] == pytest.approx(1 / 7)
    assert old["mean_probability"] == {"glaucoma": pytest.approx(0.5)}
    assert old["status"] == "drift" and len(old["warnings"]) == 2
    assert "14.3% of live images against 0.0%" in old["warnings"][0]
    assert "0.500 live against 0.350" in old["warnings"][1]
    assert new["images"] == 3 and new["mean_probability"] == {"glaucoma": pytest.approx(0.6)}
    assert new["status"] == "ok" and new["warnings"] == []
    assert few["2.0"]["status"] == "too few images" and few["1.0.0"]["status"] == "drift"
    with transaction(factory) as session:
        session.query(ModelVersion).filter(ModelVersion.version == "2.0").delete()
    with factory() as session:
        (unmeasured,) = [d for d in performance(session, "glaucoma")["drift"] if d["version"] == "2.0"]
    assert unmeasured["status"] == "no reference" and unmeasured["reference"] is None
