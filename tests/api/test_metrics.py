"""GET /metrics of the real app on a real port, over SQLite and PostgreSQL: who may read it (a token with the
metrics scope, or no credentials from this host), the database's figures as rows come and go, the scrape
when the database is down, and STOW-RS counted. The DICOM listener's and the workers' figures, across the
processes of `gateway serve`: tests/gateway/test_metrics_e2e.py."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from pydicom import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api.main import create_app
from api.routes.metrics import is_loopback
from core.db import make_engine, make_sessionmaker, transaction
from core.heartbeat import record_heartbeat
from core.settings import HttpSettings, Settings, StorageSettings
from core.storage import Storage
from core.tables import Delivery, Job, Report, Review, utcnow
from tests import factories as f
from tests.accounts import issue_token
from tests.peers import free_port, serving
from tests.review_rows import add_study
from tests.scrape import Samples, scrape

#: A client elsewhere, as uvicorn reports it when a proxy on this host says so (X-Forwarded-For from
#: 127.0.0.1 is believed, as in `gateway serve`).
ELSEWHERE = {"X-Forwarded-For": "203.0.113.9"}
RESERVE = 123 << 20


def _settings(tmp_path: Path, **http: Any) -> Settings:
    return Settings(
        data_dir=tmp_path / "var",
        storage=StorageSettings(reserve_bytes=RESERVE),
        http=HttpSettings(**http),
    )


@contextmanager
def _api(factory: sessionmaker[Session], settings: Settings) -> Iterator[str]:
    Storage(settings.storage_dir).prepare()
    with serving(create_app(factory, settings)) as url:
        yield url


def _url(factory: sessionmaker[Session]) -> str:
    return factory.kw["bind"].url.render_as_string(hide_password=False)


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_a_token_with_the_metrics_scope_or_this_host(factory: sessionmaker[Session], tmp_path: Path) -> None:
    url = _url(factory)
    scraper = issue_token(url, "admin", ["metrics"])
    no_scope = issue_token(url, "admin", ["studies:read"])
    data_team = issue_token(url, "data")
    with _api(factory, _settings(tmp_path)) as base:
        assert scrape(base).get("gateway_database_up") == 1.0  # no credentials, from loopback
        assert scrape(base, {**ELSEWHERE, **_bearer(scraper)}).get("gateway_database_up") == 1.0

        rsp = requests.get(f"{base}/metrics", headers=ELSEWHERE, timeout=30)
        assert rsp.status_code == 401 and rsp.headers["www-authenticate"] == "Bearer"
        assert rsp.json()["detail"] == (
            "/metrics needs a bearer token with the metrics scope, or a request from this host itself"
        )
        # credentials are judged when given, from this host too
        for token, held in ((no_scope, "studies:read"), (data_team, "export")):
            rsp = requests.get(f"{base}/metrics", headers=_bearer(token), timeout=30)
            assert rsp.status_code == 403, rsp.text
            assert rsp.json()["detail"] == f"/metrics needs the metrics scope; this token has {held}"
        bad = requests.get(f"{base}/metrics", headers=_bearer("sgw_000000000000_" + "A" * 43), timeout=30)
        assert bad.status_code == 401 and bad.json()["detail"] == "invalid, expired or revoked token"

        openmetrics = requests.get(
            f"{base}/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}, timeout=30
        )
        assert openmetrics.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
        assert openmetrics.text.endswith("# EOF\n")

    with _api(factory, _settings(tmp_path, metrics_from_loopback=False)) as base:
        assert requests.get(f"{base}/metrics", timeout=30).status_code == 401
        assert scrape(base, _bearer(scraper)).get("gateway_database_up") == 1.0


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.3.2.1", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.7", False),
        ("::ffff:10.0.0.7", False),
        ("fe80::1%eth0", False),
        ("testclient", False),
        ("", False),
        (None, False),
    ],
)
def test_loopback_is_this_host_only(host: str | None, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def _fill(factory: sessionmaker[Session]) -> tuple[int, int]:
    """Two studies (one image the chest models assessed, two pneumonia's gate rejected), deliveries, jobs
    and decisions; returns the first study's id and its pneumonia report's."""
    now = utcnow()
    with transaction(factory) as s:
        assessed = add_study(s, models={"pneumonia": {}, "covid19": {}})
        rejected = add_study(s, models={"pneumonia": None}, images=2)
        sizes = [(100, "dimse"), (200, "dimse"), (50, "stow")]
        instances = [i for study in (assessed, rejected) for i in study.series[0].instances]
        for instance, (size, source) in zip(instances, sizes, strict=True):
            instance.size, instance.source = size, source
        report = s.scalars(
            select(Report).where(Report.study_id == assessed.id, Report.model_name == "pneumonia")
        ).one()
        s.add(Delivery(report_id=report.id, destination="pacs", status="sent"))
        s.add(Delivery(report_id=report.id, destination="archive", status="failed"))
        s.add(Job(kind="process_study", status="pending", created_at=now - timedelta(seconds=120)))
        s.add(Job(kind="process_study", status="pending", created_at=now))
        s.add(Job(kind="deliver", status="running"))
        s.add(Job(kind="deliver", status="failed"))
        s.add(Job(kind="deliver", status="done"))
        for review_id, version, actions in ((10, 1, ["confirmed"]), (20, 2, ["corrected", "not assessable"])):
            s.add(_review(review_id, assessed.id, report.id, version, actions))
        return assessed.id, report.id


def _review(review_id: int, study_id: int, report_id: int, version: int, actions: list[str]) -> Review:
    answers = [{"sop_instance_uid": f"1.2.3.1.{n}", "action": a} for n, a in enumerate(actions)]
    return Review(
        id=review_id,
        study_id=study_id,
        report_id=report_id,
        model_name="pneumonia",
        model_version="1.0.0",
        version=version,
        username="alice",
        answers=answers,
    )


def _decisions(samples: Samples) -> dict[str, float]:
    return {dict(k)["action"]: v for k, v in samples.labelled("gateway_decisions").items()}


def test_the_database_figures(factory: sessionmaker[Session], tmp_path: Path) -> None:
    study_id, report_id = _fill(factory)
    record_heartbeat(factory, worker_id="alive", started_at=utcnow(), current_job_id=None)
    with _api(factory, _settings(tmp_path)) as base:
        m = scrape(base)
        assert m.types["gateway_jobs"] == "gauge" and m.get("gateway_database_up") == 1.0
        assert m.get("gateway_jobs", kind="process_study", status="pending") == 2
        assert m.get("gateway_jobs", kind="deliver", status="running") == 1
        assert m.get("gateway_jobs", kind="deliver", status="failed") == 1
        assert m.get("gateway_jobs", kind="deliver", status="done") is None  # history, not queue
        assert m.get("gateway_jobs", kind="render_study", status="pending") == 0
        assert 120 <= m.value("gateway_job_oldest_pending_seconds", kind="process_study") < 180
        assert m.get("gateway_job_oldest_pending_seconds", kind="deliver") == 0

        assert m.get("gateway_deliveries", destination="pacs", status="sent") == 1
        assert m.get("gateway_deliveries", destination="pacs", status="failed") == 0
        assert m.get("gateway_deliveries", destination="archive", status="failed") == 1

        assert m.get("gateway_assessed_images", model="pneumonia", version="1.0.0") == 1  # three findings
        assert m.get("gateway_gate_rejections", model="pneumonia", version="1.0.0") == 2
        assert m.get("gateway_assessed_images", model="covid19", version="1.0.0") == 1
        assert m.get("gateway_gate_rejections", model="covid19", version="1.0.0") is None

        assert m.get("gateway_stored_instances", source="dimse") == 2
        assert m.get("gateway_stored_instance_bytes", source="dimse") == 300
        assert m.get("gateway_stored_instance_bytes", source="stow") == 50
        assert m.get("gateway_storage_reserve_bytes") == RESERVE
        assert 0 < m.value("gateway_storage_free_bytes") <= m.value("gateway_storage_size_bytes")
        assert m.get("gateway_workers_alive") == 1

        assert _decisions(m) == {"confirmed": 1, "corrected": 1, "not_assessable": 1}
        with transaction(factory) as s:  # read from where the last scrape stopped
            s.add(_review(30, study_id, report_id, 3, ["confirmed"]))
        assert _decisions(scrape(base)) == {"confirmed": 2, "corrected": 1, "not_assessable": 1}
        with transaction(factory) as s:  # committed below the last id read (PostgreSQL's sequences allow it)
            s.add(_review(15, study_id, report_id, 4, ["corrected"]))
        assert _decisions(scrape(base)) == {"confirmed": 2, "corrected": 2, "not_assessable": 1}


def test_without_a_database_the_scrape_still_answers(tmp_path: Path) -> None:
    engine = make_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/gateway")
    try:
        with _api(make_sessionmaker(engine), _settings(tmp_path)) as base:
            m = scrape(base)
    finally:
        engine.dispose()
    assert m.get("gateway_database_up") == 0.0
    assert "gateway_jobs" not in m.types and m.get("gateway_storage_reserve_bytes") == RESERVE
    assert m.types["gateway_instances_received"] == "counter"


def _part10(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_stow_requests_and_parts_are_counted(factory: sessionmaker[Session], tmp_path: Path) -> None:
    boundary = "metrics-test"
    parts = [_part10(f.chest_radiograph()), b"not DICOM at all"]
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n" for p in parts
    )
    headers = {
        **_bearer(issue_token(_url(factory), "admin")),
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
    }
    with _api(factory, _settings(tmp_path, stow_threads=1)) as base:
        before = scrape(base)  # the counters of this test process, which other tests moved too
        body += f"--{boundary}--\r\n".encode()
        rsp = requests.post(f"{base}/dicomweb/studies", data=body, headers=headers, timeout=60)
        assert rsp.status_code == 202, rsp.text
        empty = requests.post(f"{base}/dicomweb/studies", data=b"", headers=headers, timeout=60)
        after = scrape(base)
    assert empty.status_code == 400

    def moved(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    assert moved("gateway_instances_received_total", protocol="stow", status="0x0000") == 1
    assert moved("gateway_instances_received_total", protocol="stow", status="0xC000") == 1
    assert moved("gateway_stow_requests_total", status="202") == 1
    assert moved("gateway_stow_requests_total", status="400") == 1
    assert after.get("gateway_stored_instances", source="stow") == 1
