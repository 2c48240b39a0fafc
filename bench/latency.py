"""Study complete -> SR stored at the PACS: p50/p95/max over N studies (target p95 <= 2 s).

Runs `gateway serve` as a subprocess with a dcmtk storescp as the PACS, sends N single-image chest studies
with storescu (one every --interval seconds) and reads from the API, per study, when it was complete
(completed_at) and when the PACS acknowledged its SRs (delivered_at of the last delivery).

Models: the shipped ones when present, else the tiny test bundles (then the figure measures the pipeline,
not a trained network). Usage: python bench/latency.py [--studies 30] [--interval 0.5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402

from inference.registry import ModelRegistry  # noqa: E402
from tests import factories as f  # noqa: E402
from tests.peers import free_port, gateway_serve, storescp, storescu  # noqa: E402


def _delivered(http: str, uid: str) -> dict | None:
    """The study's API record once every delivery of every report is done, else None."""
    with urllib.request.urlopen(f"{http}/api/studies/{uid}", timeout=10) as rsp:
        study = json.loads(rsp.read())
    delivered = [d["delivered_at"] for r in study["reports"] for d in r["deliveries"]]
    return study if study["completed_at"] and delivered and all(delivered) else None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=30)
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--quiet-seconds", type=float, default=2.0, help="GATEWAY_COMPLETION__QUIET_SECONDS")
    parser.add_argument("--workdir", type=Path, help="keep data, log and received SRs here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        env = {
            "GATEWAY_DATA_DIR": str(root / "var"),
            "GATEWAY_DICOM__PORT": str(free_port()),
            "GATEWAY_HTTP__PORT": str(free_port()),
            "GATEWAY_COMPLETION__QUIET_SECONDS": str(args.quiet_seconds),
            "GATEWAY_LOG_LEVEL": "INFO" if args.workdir else "WARNING",
        }
        shipped = ModelRegistry().names()
        if shipped:
            models = f"shipped models {', '.join(shipped)}"
        else:
            from tests.inference.tiny_models import make_tiny_bundles

            env["GATEWAY_INFERENCE__MODEL_DIRS"] = str(make_tiny_bundles(root / "models"))
            models = "tiny test bundles (no trained models shipped yet)"
        pacs_port = free_port()
        env["GATEWAY_DESTINATIONS"] = json.dumps(
            [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}]
        )
        files = [f.save(f.chest_radiograph(), root / "in" / f"{i}.dcm") for i in range(args.studies)]
        uids = [str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in files]
        http = f"http://127.0.0.1:{env['GATEWAY_HTTP__PORT']}"
        with storescp(root / "pacs", pacs_port), gateway_serve(env, root / "gateway.log"):
            # Warm-up study: model loading (TensorFlow import) is start-up cost, not per-study latency.
            warm = f.save(f.chest_radiograph(), root / "warm.dcm")
            storescu(int(env["GATEWAY_DICOM__PORT"]), warm)
            warm_uid = str(pydicom.dcmread(warm, stop_before_pixels=True).StudyInstanceUID)
            while not _delivered(http, warm_uid):
                time.sleep(0.2)
            for path in files:
                storescu(int(env["GATEWAY_DICOM__PORT"]), path)
                time.sleep(args.interval)
            latencies: list[float] = []
            phases: list[tuple[float, float]] = []
            deadline = time.monotonic() + 120
            pending = list(uids)
            while pending and time.monotonic() < deadline:
                for uid in list(pending):
                    study = _delivered(http, uid)
                    if study:
                        delivered = [d["delivered_at"] for r in study["reports"] for d in r["deliveries"]]
                        done = max(datetime.fromisoformat(d) for d in delivered)
                        complete = datetime.fromisoformat(study["completed_at"])
                        written = max(datetime.fromisoformat(r["created_at"]) for r in study["reports"])
                        latencies.append((done - complete).total_seconds())
                        phases.append(
                            ((written - complete).total_seconds(), (done - written).total_seconds())
                        )
                        pending.remove(uid)
                time.sleep(0.2)
        if pending:
            print(f"{len(pending)} studies never reached the PACS")
        worst = sorted(zip(latencies, phases, strict=True))[-3:]
        print(
            "slowest (total: complete->written, written->stored):",
            "; ".join(f"{t:.2f}: {a:.2f}, {b:.2f}" for t, (a, b) in worst),
        )
        latencies.sort()
        p95 = latencies[max(0, round(0.95 * len(latencies)) - 1)]
        print(f"{len(latencies)} studies, {models}")
        print(
            f"complete -> SR stored at PACS: p50 {statistics.median(latencies):.3f} s, p95 {p95:.3f} s, "
            f"max {latencies[-1]:.3f} s (target p95 <= 2 s)"
        )


if __name__ == "__main__":
    main()
