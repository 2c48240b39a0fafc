"""The verification sample over HTTP: AI-negative cases drawn for review are listed first and marked, in the
worklist JSON and on the page (`gateway serve` on a database with cases written as the worker writes them)."""

from __future__ import annotations

from pathlib import Path

import requests

from core.db import make_engine, make_sessionmaker, transaction
from tests.accounts import issue_token
from tests.api.conftest import api_server
from tests.review_rows import add_study


def test_sampled_negative_cases_come_first_marked(tmp_path: Path) -> None:
    with api_server(tmp_path) as api:
        url = f"sqlite:///{api.data_dir / 'gateway.sqlite3'}"
        engine = make_engine(url)
        with transaction(make_sessionmaker(engine)) as s:
            negative: dict[str, dict[str, float] | None] = {"pneumonia": {}, "covid19": {}}
            drawn = [add_study(s, models=negative, sample_share=1.0).study_instance_uid for _ in range(2)]
            left = add_study(s, models=negative, sample_share=0.0).study_instance_uid
            positive = add_study(
                s, models={"pneumonia": {"pneumonia": 0.95}, "covid19": {}}, sample_share=1.0
            ).study_instance_uid
        engine.dispose()
        headers = {"Authorization": f"Bearer {issue_token(url, 'radiologist')}"}
        data = requests.get(f"{api.url}/api/worklist?status=any", headers=headers, timeout=30).json()
        items = {i["study_instance_uid"]: i for i in data["items"]}
        assert {u for u, i in items.items() if i["sampled"]} == set(drawn)  # a positive case is never drawn
        assert {u for u, i in items.items() if i["priority"] == 0} == {*drawn, positive}
        assert data["items"][-1]["study_instance_uid"] == left
        page = requests.get(f"{api.url}/worklist?status=any", headers=headers, timeout=30)
        assert page.status_code == 200, page.text[:500]
        assert page.text.count(">random check</span>") == 2
