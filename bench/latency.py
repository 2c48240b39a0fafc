"""Turnaround: last instance of a study -> its SRs stored at the PACS, p50/p95/max over N studies, reported
beyond the completion quiet time (target p95 <= 0.5 s beyond it).

Runs `gateway serve` as a subprocess with a dcmtk storescp as the PACS, sends N single-image chest studies
with storescu (one every --interval seconds) and reads from the API, per study, when its last instance was
stored (last_received_at), when it was complete (completed_at) and when the PACS acknowledged the last of
its SRs (delivered_at). A study counts once both chest models (pneumonia, covid19) have an SR at the PACS;
the PACS's files are counted too (one file per receipt: exactly one per study and model).

Models: the shipped ones when present, else the tiny test bundles (then the figure measures the pipeline,
not a trained network). Usage: python bench/latency.py [--studies 100] [--interval 0.5] [--quiet-seconds 2]
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
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402

from inference.registry import ModelRegistry  # noqa: E402
from tests import factories as f  # noqa: E402
from tests.accounts import port_headers  # noqa: E402
from tests.peers import free_port, gateway_serve, storescu  # noqa: E402
from tests.pipeline import CHEST_MODELS, CountingPacs  # noqa: E402


def _delivered(http: str, uid: str) -> dict[str, Any] | None:
    """The study's API record once every chest model's SR is delivered everywhere, else None."""
    headers = port_headers(int(http.rsplit(":", 1)[1]))
    with urllib.request.urlopen(
        urllib.request.Request(f"{http}/api/studies/{uid}", headers=headers), timeout=10
    ) as rsp:
        study = json.loads(rsp.read())
    if not study["completed_at"] or not set(CHEST_MODELS) <= {r["model"] for r in study["reports"]}:
        return None
    delivered = [d["delivered_at"] for r in study["reports"] for d in r["deliveries"]]
    return study if delivered and all(delivered) else None


def _seconds(later: str, earlier: str) -> float:
    return (datetime.fromisoformat(later) - datetime.fromisoformat(earlier)).total_seconds()


def _percentiles(values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[max(0, round(0.95 * len(ordered)) - 1)]
    return f"p50 {statistics.median(ordered):.3f} s, p95 {p95:.3f} s, max {ordered[-1]:.3f} s"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=100)
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
        if set(CHEST_MODELS) <= set(shipped):
            models = f"shipped models {', '.join(CHEST_MODELS)}"
        else:
            from tests.inference.tiny_models import make_tiny_bundles

            env["GATEWAY_INFERENCE__MODEL_DIRS"] = str(make_tiny_bundles(root / "models"))
            models = "tiny test bundles (the chest models are not shipped)"
        pacs_port = free_port()
        env["GATEWAY_DESTINATIONS"] = json.dumps(
            [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}]
        )
        files = [f.save(f.chest_radiograph(), root / "in" / f"{i}.dcm") for i in range(args.studies)]
        uids = [str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in files]
        http = f"http://127.0.0.1:{env['GATEWAY_HTTP__PORT']}"
        with CountingPacs(root / "pacs", pacs_port) as pacs, gateway_serve(env, root / "gateway.log"):
            # Warm-up study: model loading is start-up cost, not per-study latency.
            warm = f.save(f.chest_radiograph(), root / "warm.dcm")
            storescu(int(env["GATEWAY_DICOM__PORT"]), warm)
            warm_uid = str(pydicom.dcmread(warm, stop_before_pixels=True).StudyInstanceUID)
            while not _delivered(http, warm_uid):
                time.sleep(0.2)
            for path in files:
                storescu(int(env["GATEWAY_DICOM__PORT"]), path)
                time.sleep(args.interval)
            total: list[float] = []
            beyond: list[float] = []
            sweep: list[float] = []
            written: list[float] = []
            stored: list[float] = []
            deadline = time.monotonic() + 120
            pending = list(uids)
            while pending and time.monotonic() < deadline:
                for uid in list(pending):
                    study = _delivered(http, uid)
                    if not study:
                        continue
                    done = max(d["delivered_at"] for r in study["reports"] for d in r["deliveries"])
                    last, complete = study["last_received_at"], study["completed_at"]
                    report = max(r["created_at"] for r in study["reports"])
                    total.append(_seconds(done, last))
                    beyond.append(total[-1] - args.quiet_seconds)
                    sweep.append(_seconds(complete, last) - args.quiet_seconds)
                    written.append(_seconds(report, complete))
                    stored.append(_seconds(done, report))
                    pending.remove(uid)
                time.sleep(0.2)
            time.sleep(1)
            per_model = pacs.reports()
        if pending:
            print(f"{len(pending)} studies never reached the PACS")
        wrong = {k: n for k, n in per_model.items() if k[0] in uids and n != 1}
        print(f"{len(total)} single-image chest studies, one every {args.interval} s, {models}")
        received = sum(per_model[(u, m)] for u in uids for m in CHEST_MODELS)
        print(
            f"PACS: {received} SRs for {len(uids)} studies, "
            f"{len(wrong)} study/model pairs with other than exactly one SR"
        )
        print(f"last instance -> last SR stored at the PACS: {_percentiles(total)}")
        print(f"  beyond the {args.quiet_seconds} s quiet time: {_percentiles(beyond)} (target p95 <= 0.5 s)")
        print(
            f"  phases (p50 / p95): completion sweep after the quiet time {_p(sweep)}, "
            f"complete -> both SRs written {_p(written)}, written -> stored at the PACS {_p(stored)}"
        )


def _p(values: list[float]) -> str:
    ordered = sorted(values)
    return f"{statistics.median(ordered):.3f} / {ordered[max(0, round(0.95 * len(ordered)) - 1)]:.3f} s"


if __name__ == "__main__":
    main()
