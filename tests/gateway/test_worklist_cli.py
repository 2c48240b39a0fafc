"""`gateway worklist rebuild`: studies processed before the worklist existed get their cases (subprocess, real
SQLite)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import delete, func, select

from core.db import make_engine, make_sessionmaker, transaction
from core.jobs import RENDER_STUDY
from core.migrate import upgrade
from core.tables import Job, ReviewCase, ReviewFinding
from tests.gateway.test_accounts_cli import _gateway
from tests.review_rows import add_study


def test_rebuild_restores_cases_and_queues_their_drawing(tmp_path: Path) -> None:
    (tmp_path / "var").mkdir()
    engine = make_engine(f"sqlite:///{tmp_path / 'var' / 'gateway.sqlite3'}")
    upgrade(engine)
    factory = make_sessionmaker(engine)
    with transaction(factory) as s:
        add_study(s, models={"pneumonia": {"pneumonia": 0.9}, "covid19": {}})
        add_study(s, models={"glaucoma": None}, modality="OP")
        s.execute(delete(ReviewFinding))
        s.execute(delete(ReviewCase))  # as before the worklist existed
    done = _gateway(tmp_path, "worklist", "rebuild")
    assert done.returncode == 0, done.stderr
    assert "2 cases on the worklist" in done.stdout
    with factory() as s:
        cases = {c.modality: c for c in s.scalars(select(ReviewCase))}
        assert set(cases) == {"DX", "OP"}
        assert cases["DX"].ai_positive and not cases["OP"].assessable
        assert s.scalar(select(func.count()).select_from(Job).where(Job.kind == RENDER_STUDY)) == 2
    again = _gateway(tmp_path, "worklist", "rebuild")  # idempotent: no second job, no second case
    assert again.returncode == 0
    with factory() as s:
        assert s.scalar(select(func.count()).select_from(ReviewCase)) == 2
        assert s.scalar(select(func.count()).select_from(Job).where(Job.kind == RENDER_STUDY)) == 2
    engine.dispose()
