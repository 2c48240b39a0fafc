"""/readyz's models check (gateway.readiness.ModelCheck) on real bundles and the LiteRT interpreter: the
registry's active versions load; weights that no longer load make the gateway not ready, with the reason,
until they are put back."""

from __future__ import annotations

import shutil
from pathlib import Path

import requests
from sqlalchemy.orm import Session, sessionmaker

from api.main import create_app
from core.db import transaction
from core.heartbeat import record_heartbeat
from core.model_versions import sync_configured
from core.settings import InferenceSettings, Settings, StorageSettings
from core.storage import Storage
from core.tables import utcnow
from gateway.models import configured_bundles
from gateway.readiness import ModelCheck
from tests.peers import serving


def test_models_that_do_not_load_are_not_ready(
    factory: sessionmaker[Session], bundles: Path, tmp_path: Path
) -> None:
    models = shutil.copytree(bundles, tmp_path / "models")
    settings = Settings(
        data_dir=tmp_path / "var",
        storage=StorageSettings(reserve_bytes=0),
        inference=InferenceSettings(model_dirs=[models]),
    )
    with transaction(factory) as session:  # as `gateway serve` registers them
        sync_configured(session, configured_bundles(settings))
    check = ModelCheck(factory, settings)
    assert check() is None

    weights = models / "covid19" / "model.tflite"
    good = weights.read_bytes()
    weights.write_bytes(b"not a flatbuffer" * 64)
    Storage(settings.storage_dir).prepare()
    record_heartbeat(factory, worker_id="alive", started_at=utcnow(), current_job_id=None)
    with serving(create_app(factory, settings, checks={"models": check})) as url:
        rsp = requests.get(f"{url}/readyz", timeout=60)
        body = rsp.json()
        [reason] = body["reasons"]
        assert rsp.status_code == 503 and body["checks"]["models"] == reason
        assert reason.startswith(
            f"model covid19 0.0.1-test does not load from {models.resolve() / 'covid19'}: "
        )

        weights.write_bytes(good)  # put back: loaded again (the answer is kept per state of the files)
        rsp = requests.get(f"{url}/readyz", timeout=60)
        assert rsp.status_code == 200 and rsp.json()["checks"] == {"storage": "ok", "models": "ok"}

    shutil.rmtree(models / "pneumonia")
    assert check() == (
        f"model pneumonia 0.0.1-test does not load from {models.resolve() / 'pneumonia'}: "
        "No such file or directory"
    )
