"""Nothing acknowledged is lost: the gateway is killed (SIGKILL) right after acknowledging a study and
restarted on the same data; the study is still processed and its SR reaches the PACS."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pydicom
import pytest

from tests import factories as f
from tests.inference.tiny_models import make_tiny_bundles
from tests.peers import free_port, gateway_serve, storescp, storescu

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_acknowledged_study_survives_a_crash(tmp_path: Path) -> None:
    pacs_port = free_port()
    env = {
        "GATEWAY_DATA_DIR": str(tmp_path / "var"),
        "GATEWAY_DICOM__PORT": str(free_port()),
        "GATEWAY_HTTP__PORT": str(free_port()),
        "GATEWAY_COMPLETION__QUIET_SECONDS": "3",
        "GATEWAY_COMPLETION__MAX_WAIT_SECONDS": "5",
        "GATEWAY_INFERENCE__MODEL_DIRS": str(make_tiny_bundles(tmp_path / "models")),
        "GATEWAY_DESTINATIONS": json.dumps(
            [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}]
        ),
    }
    study = [
        f.save(f.chest_radiograph(study_uid="1.2.826.0.1.3680043.8.498.1"), tmp_path / f"{i}.dcm")
        for i in range(3)
    ]
    with gateway_serve(env, tmp_path / "first.log") as proc:
        result = storescu(int(env["GATEWAY_DICOM__PORT"]), *study)
        assert result.returncode == 0, result.stderr
        proc.send_signal(signal.SIGKILL)  # before the quiet period is over: no job ran yet
        proc.wait(10)
    assert " complete: job" not in (tmp_path / "first.log").read_text()  # no study job was queued

    with storescp(tmp_path / "pacs", pacs_port), gateway_serve(env, tmp_path / "second.log"):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            srs = [p for p in (tmp_path / "pacs").glob("*") if p.name.startswith("SR")]
            if len(srs) == 2:  # pneumonia and covid19
                break
            time.sleep(0.2)
    assert len(srs) == 2, (tmp_path / "second.log").read_text()[-3000:]
    sent = {str(pydicom.dcmread(p).SOPInstanceUID) for p in study}
    for sr in srs:
        ds = pydicom.dcmread(sr)
        refs = {
            str(r.ReferencedSOPInstanceUID)
            for item in ds.CurrentRequestedProcedureEvidenceSequence
            for s in item.ReferencedSeriesSequence
            for r in s.ReferencedSOPSequence
        }
        assert refs == sent
