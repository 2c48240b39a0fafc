"""The model registry through `gateway serve`: the configured bundles are registered active on start; a new
bundle is added as a candidate; promotion is refused without the gate and done when forced with a reason;
the next study's SR names the new version without restarting the workers; the old version is retired; the
same over the API (admin only); the database refuses a second active version of a model."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy.exc import IntegrityError

from core.db import make_engine, make_sessionmaker, transaction
from core.model_versions import Bundle, add, find
from tests import factories as f
from tests.accounts import bearer, database_url
from tests.inference.tiny_models import make_tiny_bundles
from tests.peers import free_port, gateway_command, gateway_serve, send_file, storescp, wait_for

pytestmark = [pytest.mark.e2e]

NEW_VERSION = "0.0.2-retrained"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("registry")
    bundles = make_tiny_bundles(root / "models")
    env = {
        "GATEWAY_DATA_DIR": str(root / "var"),
        "GATEWAY_DICOM__PORT": str(free_port()),
        "GATEWAY_HTTP__PORT": str(free_port()),
        "GATEWAY_COMPLETION__QUIET_SECONDS": "0.5",
        "GATEWAY_INFERENCE__MODEL_DIRS": str(bundles),
        "GATEWAY_WORKER__PROCESSES": "1",
    }
    pacs_port = free_port()
    env["GATEWAY_DESTINATIONS"] = json.dumps(
        [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}]
    )
    with storescp(root / "pacs", pacs_port), gateway_serve(env, root / "gateway.log", timeout=180):
        yield {
            "env": env,
            "root": root,
            "bundles": bundles,
            "url": f"http://127.0.0.1:{env['GATEWAY_HTTP__PORT']}",
        }


def _send_chest(served: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """Send a chest study; its API record once its processing job is done."""
    ds = f.chest_radiograph(study_uid=generate_uid(), series_uid=generate_uid())
    path = f.save(ds, tmp_path / f"{ds.SOPInstanceUID}.dcm")
    assert send_file(int(served["env"]["GATEWAY_DICOM__PORT"]), path, calling="MODALITY") == 0
    headers = bearer(served["env"], "admin")

    def reported() -> dict[str, Any] | None:
        rsp = httpx.get(f"{served['url']}/api/studies/{ds.StudyInstanceUID}", headers=headers, timeout=10)
        if rsp.status_code != 200:
            return None
        study: dict[str, Any] = rsp.json()
        models = {r["model"] for r in study["reports"]}
        done = any(j["kind"] == "process_study" and j["status"] == "done" for j in study["jobs"])
        return study if {"pneumonia", "covid19"} <= models and done else None

    found: dict[str, Any] = wait_for("both chest reports", reported, timeout=90)
    return found


def _pneumonia_version(served: dict[str, Any], tmp_path: Path) -> str:
    """Send a chest study; the version its pneumonia report was made with (as the API lists it)."""
    ds = f.chest_radiograph(study_uid=generate_uid(), series_uid=generate_uid())
    path = f.save(ds, tmp_path / f"{ds.SOPInstanceUID}.dcm")
    assert send_file(int(served["env"]["GATEWAY_DICOM__PORT"]), path, calling="MODALITY") == 0
    headers = bearer(served["env"], "admin")

    def reported() -> str | None:
        rsp = httpx.get(f"{served['url']}/api/studies/{ds.StudyInstanceUID}", headers=headers, timeout=10)
        if rsp.status_code != 200:
            return None
        versions = [r["version"] for r in rsp.json()["reports"] if r["model"] == "pneumonia"]
        return versions[0] if versions else None

    version: str = wait_for("the pneumonia report", reported, timeout=90)
    return version


def test_promotion_takes_effect_without_a_restart(served: dict[str, Any], tmp_path: Path) -> None:
    env = served["env"]
    listed = gateway_command(env, "models", "list")
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines()]
    configured = {r[0]: r for r in rows if r[3] == "configured"}
    assert {"pneumonia", "covid19", "glaucoma"} <= set(configured)
    assert all(r[2] == "active" for r in configured.values())
    old = configured["pneumonia"][1]
    assert _pneumonia_version(served, tmp_path) == old

    candidate = tmp_path / "pneumonia-new"
    shutil.copytree(served["bundles"] / "pneumonia", candidate)
    meta = json.loads((candidate / "model.json").read_text())
    meta["version"] = NEW_VERSION
    (candidate / "model.json").write_text(json.dumps(meta))
    added = gateway_command(env, "models", "add", str(candidate))
    assert added.returncode == 0, added.stderr
    assert f"pneumonia {NEW_VERSION}: candidate" in added.stdout
    installed = Path(env["GATEWAY_DATA_DIR"]) / "models" / "pneumonia" / NEW_VERSION
    assert (installed / "model.json").is_file()

    refused = gateway_command(env, "models", "promote", "pneumonia", NEW_VERSION)
    assert refused.returncode == 2 and "gate" in refused.stderr
    assert gateway_command(env, "models", "promote", "pneumonia", NEW_VERSION, "--force").returncode == 2
    done = gateway_command(env, "models", "promote", "pneumonia", NEW_VERSION, "--force", "--reason", "test")
    assert done.returncode == 0, done.stderr

    assert _pneumonia_version(served, tmp_path) == NEW_VERSION  # the same worker process, no restart
    status = {
        tuple(r[:3])
        for r in (line.split() for line in gateway_command(env, "models", "list").stdout.splitlines())
    }
    assert ("pneumonia", NEW_VERSION, "active") in status and ("pneumonia", old, "retired") in status
    shown = json.loads(gateway_command(env, "models", "show", "pneumonia", NEW_VERSION).stdout)
    actions = [h["action"] for h in shown["history"]]
    assert actions == ["model.register", "model.promote"] and shown["history"][1]["reason"] == "forced: test"
    active_again = gateway_command(env, "models", "retire", "pneumonia", NEW_VERSION)
    assert active_again.returncode == 1 and "active version" in active_again.stderr


def test_a_shadow_version_is_stored_never_reported(served: dict[str, Any], tmp_path: Path) -> None:
    env = served["env"]
    shadow = tmp_path / "covid-shadow"
    shutil.copytree(served["bundles"] / "covid19", shadow)
    meta = json.loads((shadow / "model.json").read_text())
    meta["version"] = "0.0.9-shadow"
    (shadow / "model.json").write_text(json.dumps(meta))
    assert gateway_command(env, "models", "add", str(shadow)).returncode == 0
    started = gateway_command(env, "models", "shadow", "covid19", "0.0.9-shadow")
    assert started.returncode == 0, started.stderr

    study = _send_chest(served, tmp_path)
    covid = [r for r in study["reports"] if r["model"] == "covid19"]
    assert covid and all(r["version"] != "0.0.9-shadow" for r in covid)
    assert all(p["version"] != "0.0.9-shadow" for p in study["predictions"])
    shadowed = study["shadow_predictions"]
    assert shadowed and {p["model"] for p in shadowed} == {"covid19"}
    assert {p["version"] for p in shadowed} == {"0.0.9-shadow"}
    assert {p["finding"] for p in shadowed if p["assessable"]} <= {"covid19", "viral_pneumonia"}

    # the PACS got the active versions' SRs only
    def at_pacs() -> list[Path]:
        found = []
        for path in (served["root"] / "pacs").glob("*"):
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:
                continue
            if ds.StudyInstanceUID == study["study_instance_uid"]:
                found.append(path)
        return found

    wait_for("both chest SRs at the PACS", lambda: len(at_pacs()) >= 2, 60)
    assert not any(b"0.0.9-shadow" in p.read_bytes() for p in (served["root"] / "pacs").glob("*"))
    assert gateway_command(env, "models", "retire", "covid19", "0.0.9-shadow").returncode == 0


def test_registry_over_the_api_is_for_admins(served: dict[str, Any]) -> None:
    url, env = served["url"], served["env"]
    assert httpx.get(f"{url}/api/models", headers=bearer(env, "radiologist"), timeout=10).status_code == 403
    admin = bearer(env, "admin")
    listed = httpx.get(f"{url}/api/models", headers=admin, timeout=10).json()
    glaucoma = next(m for m in listed if m["name"] == "glaucoma" and m["status"] == "active")
    base = f"{url}/api/models/glaucoma/versions/{glaucoma['version']}"
    assert httpx.post(base, json={"status": "retired"}, headers=admin, timeout=10).status_code == 409
    unknown = httpx.post(f"{url}/api/models/glaucoma/versions/9.9", json={"status": "retired"}, headers=admin)
    assert unknown.status_code == 404
    no_gate = httpx.post(base, json={"status": "active"}, headers=admin, timeout=10)
    assert no_gate.status_code == 409 and "gate" in no_gate.json()["detail"]


def test_one_active_version_per_model_in_the_database(served: dict[str, Any]) -> None:
    engine = make_engine(database_url(served["env"]))
    try:
        factory = make_sessionmaker(engine)
        bundle = Bundle("covid19", "9.9.9-extra", "0" * 64, "/nowhere", "made")
        with pytest.raises(IntegrityError), transaction(factory) as session:
            row = add(session, bundle, actor="test")
            row.status = "active"  # beside the active one, bypassing set_status
            session.flush()
        with factory() as session:
            assert find(session, "covid19", "9.9.9-extra") is None  # rolled back
    finally:
        engine.dispose()
