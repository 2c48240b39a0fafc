"""Faults, short versions (the long ones: bench/faults.py): `gateway serve` killed at random moments during
ingest, killed mid-inference and mid-delivery, the PACS down then back, PostgreSQL restarted under load.
After each: every acknowledged instance stored and readable, no temp files, one SR per study and model at
the PACS, none received twice."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import faults
from tests.inference.tiny_models import make_tiny_bundles

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bundles(tmp_path_factory.mktemp("models"))


def test_sigkill_during_ingest_loses_nothing(tmp_path: Path, tiny_models: Path) -> None:
    run = faults.kill_rounds(tmp_path, tiny_models, rounds=3, studies=6, per_study=10, senders=3, seed=9)
    assert not run.problems, f"{run}\n{_log(tmp_path)}"
    assert run.figures["associations cut by a kill"] >= 1, run  # a kill did hit ingest


def test_sigkill_mid_inference_and_mid_delivery_delivers_each_sr_once(tmp_path: Path) -> None:
    run = faults.kill_mid_job(tmp_path)
    assert not run.problems, f"{run}\n{_log(tmp_path)}"
    assert run.figures["C-STOREs held by the stalled PACS in all"] >= 1


def test_pacs_outage_everything_delivered_soon_after_recovery_never_twice(
    tmp_path: Path, tiny_models: Path
) -> None:
    cap = 4.0
    run = faults.pacs_outage(
        tmp_path, tiny_models, down_seconds=20, studies=3, retry_base=1, retry_cap=cap, recovery_goal=cap + 6
    )
    assert not run.problems, f"{run}\n{_log(tmp_path)}"
    assert run.figures["delivery attempts made while the PACS was down"] >= 2 * 3 * 2  # each SR retried


@pytest.mark.postgres
def test_postgres_restart_under_load_loses_nothing(
    tmp_path: Path, tiny_models: Path, pg_admin_url: str
) -> None:
    del pg_admin_url  # only for its skip/fail rule; this test restarts a server of its own
    run = faults.postgres_restart(tmp_path, tiny_models, studies=6, per_study=8, down_seconds=4)
    assert not run.problems, f"{run}\n{_log(tmp_path)}"


def _log(root: Path) -> str:
    texts = [p.read_text(errors="replace") for p in sorted((root / "logs").glob("serve-*.log"))]
    return "\n".join(texts)[-6000:]
