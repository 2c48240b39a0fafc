"""Sustained load: CR chest studies of 1-4 images at a steady rate through the whole pipeline (pynetdicom
senders -> `gateway serve` with the shipped chest models -> dcmtk storescp PACS) for --minutes; or, with
--find, rate steps of --step-minutes from --rate up by --step until the queue grows.

Per run: the queue (pending + running jobs, read from the gateway's SQLite database each second) and whether
it grows (slope over the second half of the run above 2 % of the rate, in studies/s, counting three jobs per
study), how far the senders fell behind the schedule, memory (RSS of serve and its children, from /proc)
at the start, end and peak, CPU seconds of the serve tree per study, and that nothing was lost: every
study acknowledged got exactly one SR per chest model at the PACS (one file per receipt) once the queue
drained.

Images are 512 x 512, 12 bits (about 0.5 MB each), so the rate measures the pipeline, not the disk.
Usage: python bench/sustained.py [--minutes 10] [--rate 5] [--find] [--tiny]
"""

from __future__ import annotations

import argparse
import logging
import queue
import random
import sqlite3
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from pydicom import Dataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

from core.dimse import reactor_held  # noqa: E402
from tests import factories as f  # noqa: E402
from tests.peers import free_port, wait_for  # noqa: E402
from tests.pipeline import CHEST_MODELS, CountingPacs, Gateway, gateway_env, process_tree  # noqa: E402

#: Jobs one study makes: process_study (which also draws what its case page shows) and one deliver per chest
#: model.
JOBS_PER_STUDY = 1 + len(CHEST_MODELS)


def cr_image(pixels: bytes, study_uid: str, series_uid: str, number: int) -> Dataset:
    ds = f.base_dataset(f.CR, "CR", study_uid=study_uid, series_uid=series_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.BodyPartExamined, ds.ViewPosition, ds.InstanceNumber = "CHEST", "PA", number
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 512
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels
    return ds


@dataclass
class Load:
    """Studies sent at ``rate`` per second by ``senders`` threads, one association per study."""

    port: int
    rate: float
    seconds: float
    senders: int = 4
    seed: int = 0
    acked: list[str] = field(default_factory=list)  # studies whose every instance got 0x0000
    failed: list[str] = field(default_factory=list)
    lag: list[float] = field(default_factory=list)  # seconds each study started behind its schedule

    def run(self, pixels: list[bytes]) -> None:
        from pynetdicom import AE

        rng = random.Random(self.seed)
        todo: queue.Queue[tuple[float, list[Dataset]] | None] = queue.Queue()
        lock = threading.Lock()

        def send() -> None:
            ae = AE(ae_title="MODALITY")
            ae.add_requested_context(f.CR, ExplicitVRLittleEndian)
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
            while (item := todo.get()) is not None:
                due, images = item
                with lock:
                    self.lag.append(max(0.0, time.monotonic() - due))
                assoc = ae.associate("127.0.0.1", self.port, ae_title="GATEWAY")
                ok = assoc.is_established
                for ds in images if ok else []:
                    with reactor_held(assoc):
                        rsp = assoc.send_c_store(ds)
                    ok = ok and "Status" in rsp and int(rsp.Status) == 0
                if assoc.is_established:
                    assoc.release()
                with lock:
                    (self.acked if ok else self.failed).append(str(images[0].StudyInstanceUID))

        threads = [threading.Thread(target=send, daemon=True) for _ in range(self.senders)]
        for t in threads:
            t.start()
        start = time.monotonic()
        for n in range(int(self.rate * self.seconds)):
            due = start + n / self.rate
            study, series = generate_uid(), generate_uid()
            images = [
                cr_image(pixels[rng.randrange(len(pixels))], study, series, i + 1)
                for i in range(rng.randint(1, 4))
            ]
            time.sleep(max(0.0, due - time.monotonic()))
            todo.put((due, images))
        for _ in threads:
            todo.put(None)
        for t in threads:
            t.join()


def queue_depth(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
        row = conn.execute("SELECT count(*) FROM job WHERE status IN ('pending', 'running')").fetchone()
    return int(row[0])


def cpu_seconds(pid: int) -> float:
    """utime + stime (and those of waited-for children) of ``pid``'s tree, in seconds."""
    import os

    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:15])
    return total / tick


def slope(samples: list[tuple[float, int]]) -> float:
    """Least-squares slope (per second) of (time, value) samples."""
    t = np.array([s[0] for s in samples])
    v = np.array([s[1] for s in samples], dtype=float)
    return float(np.polyfit(t, v, 1)[0]) if len(samples) > 2 else 0.0


@dataclass
class Step:
    rate: float
    seconds: float
    studies: int
    failed: int
    queue_slope: float  # jobs per second over the second half
    queue_end: int
    lag_p95: float
    cpu_per_study: float
    rss_start: int
    rss_end: int
    rss_peak: int

    @property
    def stable(self) -> bool:
        behind = self.lag_p95 > 2.0  # the senders could not keep the schedule (the listener is the limit)
        return not behind and self.queue_slope <= 0.02 * self.rate * JOBS_PER_STUDY and not self.failed

    def __str__(self) -> str:
        mb = 1 << 20
        return (
            f"{self.rate:.1f} studies/s for {self.seconds:.0f} s: {self.studies} studies acknowledged, "
            f"{self.failed} not; queue {self.queue_end} jobs at the end, "
            f"growing {self.queue_slope:+.2f} jobs/s; "
            f"sender lag p95 {self.lag_p95:.2f} s; serve CPU {self.cpu_per_study:.2f} s/study; RSS "
            f"{self.rss_start / mb:.0f} -> {self.rss_end / mb:.0f} MB (peak {self.rss_peak / mb:.0f} MB) "
            f"-> {'stable' if self.stable else 'NOT keeping up'}"
        )


def run_step(
    gateway: Gateway, db: Path, rate: float, seconds: float, pixels: list[bytes], seed: int
) -> tuple[Step, list[str]]:
    """One rate for ``seconds``; the step's figures and the studies acknowledged."""
    assert gateway.proc is not None
    load = Load(gateway.dicom_port, rate, seconds, seed=seed)
    sender = threading.Thread(target=load.run, args=(pixels,), daemon=True)
    samples: list[tuple[float, int]] = []
    rss = [gateway.rss()]
    cpu0 = cpu_seconds(gateway.proc.pid)
    start = time.monotonic()
    sender.start()
    while sender.is_alive():
        time.sleep(1.0)
        samples.append((time.monotonic() - start, queue_depth(db)))
        rss.append(gateway.rss())
    half = [s for s in samples if s[0] >= seconds / 2]
    cpu = cpu_seconds(gateway.proc.pid) - cpu0
    return Step(
        rate=rate,
        seconds=seconds,
        studies=len(load.acked),
        failed=len(load.failed),
        queue_slope=slope(half),
        queue_end=samples[-1][1] if samples else 0,
        lag_p95=sorted(load.lag)[max(0, round(0.95 * len(load.lag)) - 1)] if load.lag else 0.0,
        cpu_per_study=cpu / max(1, len(load.acked)),
        rss_start=rss[0],
        rss_end=rss[-1],
        rss_peak=max(rss),
    ), load.acked


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="duration (one rate)")
    parser.add_argument("--rate", type=float, default=5.0, help="studies per second (--find: the first step)")
    parser.add_argument("--find", action="store_true", help="step the rate up until the queue grows")
    parser.add_argument("--step", type=float, default=1.0, help="--find: rate increment")
    parser.add_argument("--step-minutes", type=float, default=2.0, help="--find: duration of each step")
    parser.add_argument("--tiny", action="store_true", help="tiny untrained models instead of the shipped")
    parser.add_argument("--quiet-seconds", type=float, default=2.0, help="GATEWAY_COMPLETION__QUIET_SECONDS")
    parser.add_argument("--workdir", type=Path, help="keep data, logs and received SRs here")
    args = parser.parse_args()
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # refused associations are expected
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        pacs_port = free_port()
        settings = {
            "GATEWAY_COMPLETION__QUIET_SECONDS": str(args.quiet_seconds),
            "GATEWAY_LOG_LEVEL": "WARNING",
        }
        if args.tiny:
            from tests.inference.tiny_models import make_tiny_bundles

            settings["GATEWAY_INFERENCE__MODEL_DIRS"] = str(make_tiny_bundles(root / "models"))
        env = gateway_env(root, pacs_port, **settings)
        db = root / "var" / "gateway.sqlite3"
        pixels = [(f.chest_gray(512, index=i).astype(np.uint16) * 16).tobytes() for i in range(8)]
        acked: list[str] = []
        steps: list[Step] = []
        with CountingPacs(root / "pacs", pacs_port) as pacs, Gateway(env, root / "logs") as gateway:
            gateway.start()
            run_step(gateway, db, 1.0, 3.0, pixels, seed=-1)  # warm-up: models load on first use
            wait_for("the warm-up to drain", lambda: queue_depth(db) == 0, 300)
            rate = args.rate
            while True:
                seconds = (args.step_minutes if args.find else args.minutes) * 60
                step, sent = run_step(gateway, db, rate, seconds, pixels, seed=len(steps))
                steps.append(step)
                acked += sent
                print(step, flush=True)
                drain = time.monotonic()
                wait_for("the queue to drain", lambda: queue_depth(db) == 0, 1800)
                print(f"  queue drained {time.monotonic() - drain:.1f} s after the last study", flush=True)
                if not args.find or not step.stable:
                    break
                rate += args.step
            time.sleep(3)
            per = pacs.reports()
        lost = [uid for uid in acked if any(per[(uid, m)] != 1 for m in CHEST_MODELS)]
        stable = [s.rate for s in steps if s.stable]
        print(
            f"{len(acked)} studies acknowledged, {len(lost)} without exactly one SR per chest model "
            f"({', '.join(CHEST_MODELS)}{', tiny models' if args.tiny else ', shipped models'})"
        )
        if args.find:
            print(
                f"highest rate at which the queue did not grow: {max(stable) if stable else 'none'} studies/s"
            )
        growth = (steps[-1].rss_end - steps[0].rss_start) / (1 << 20)
        print(f"memory growth of the serve tree over the run: {growth:+.0f} MB")
        sys.exit(1 if lost else 0)


if __name__ == "__main__":
    main()
