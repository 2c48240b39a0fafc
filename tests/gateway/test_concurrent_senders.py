"""Concurrency: one 50-instance study sent 5 times over by 20 senders at once is stored once per instance,
one file each, and gets exactly one SR per model at the PACS."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.inference.tiny_models import make_tiny_bundles
from tests.peers import free_port
from tests.pipeline import CountingPacs, Gateway, gateway_env, make_chest_study, send_study

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

INSTANCES = 50
COPIES = 5
SENDERS = 20


def test_same_study_from_20_senders_is_stored_once_and_reported_once(tmp_path: Path) -> None:
    study = make_chest_study(tmp_path / "in", INSTANCES)
    # Each copy is split among 4 senders (20 in all, 250 C-STOREs), all started at once: every instance
    # arrives 5 times, on 5 associations, often at the same moment.
    per_copy = SENDERS // COPIES
    shares = [list(study.paths[k::per_copy]) for _ in range(COPIES) for k in range(per_copy)]
    pacs_port = free_port()
    env = gateway_env(
        tmp_path,
        pacs_port,
        GATEWAY_INFERENCE__MODEL_DIRS=str(make_tiny_bundles(tmp_path / "models")),
        GATEWAY_COMPLETION__QUIET_SECONDS="2",
        GATEWAY_COMPLETION__MAX_WAIT_SECONDS="10",
        GATEWAY_DICOM__MAXIMUM_ASSOCIATIONS=str(SENDERS),
    )
    statuses: Counter[int] = Counter()
    lock = threading.Lock()

    def sender(paths: list[Path]) -> None:
        result = send_study(gateway.dicom_port, paths, timeout=60)
        with lock:
            if result is None:
                statuses[-1] += 1
            else:
                statuses.update(result.values())

    with CountingPacs(tmp_path / "pacs", pacs_port) as pacs, Gateway(env, tmp_path / "logs") as gateway:
        gateway.start()
        threads = [threading.Thread(target=sender, args=(share,)) for share in shares]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert statuses == Counter({0x0000: INSTANCES * COPIES}), statuses

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(pacs.reports()) < 2:
            time.sleep(0.5)
        time.sleep(3)  # a second SR for the same study and model would arrive now
        assert pacs.reports() == Counter({(study.uid, "pneumonia"): 1, (study.uid, "covid19"): 1}), (
            gateway.log_tail()
        )
        detail = gateway.get(f"/api/studies/{study.uid}")
        stored = {i["sop_instance_uid"] for s in detail["series"] for i in s["instances"]}
        assert stored == set(study.sop_uids)
        files = [p for p in (gateway.storage_dir / "instances").rglob("*") if p.is_file()]
        assert len(files) == INSTANCES
        assert not [p for p in (gateway.storage_dir / "tmp").iterdir()]
        assert Counter(r["model"] for r in detail["reports"]) == Counter({"pneumonia": 1, "covid19": 1})
