"""C-STORE ingest of CR-sized instances by 1, 4 and 8 parallel dcmtk storescu: the gateway against peers.

Instances: the real chest CR in ../shared/dicom (JPEG-LS), decoded once, padded to 2000 x 1880 16-bit and
written uncompressed (Explicit VR Little Endian, ~7.5 MB each) with new UIDs, in studies of --study-size
images, into a temp folder made at run time. Each sender is a thread that runs one dcmtk /usr/bin/storescu
per study (one association per study, as modalities send), the studies split round-robin among senders.

Targets, each started fresh (empty data folder, removed afterwards) for every measurement:
  gateway   `gateway serve` as users run it: a subprocess with its receiver and worker processes on,
            SQLite, default settings but ports and data folder (measured once its receivers are ready and its
            workers have started); the chest studies it completes meanwhile are processed by the shipped
            models, after the burst (workers hold compute jobs back while the host receives faster than
            GATEWAY_WORKER__INGEST_FIRST_MB_PER_S, for up to GATEWAY_WORKER__INGEST_FIRST_MAX_SECONDS); the
            CPU of its child processes, receivers and workers, is shown apart
  listener  the same with GATEWAY_WORKER__PROCESSES=0: the listener (and HTTP API) alone
  orthanc   Orthanc 1.10 (Debian), SQLite index, SyncStorageArea (fsync), no plugins
  bare      a bare pynetdicom SCP (pynetdicom's defaults: 16 KiB PDUs) in a subprocess with the same
            durability as the gateway: encoded_dataset() to a temp file, fsync, rename, fsync of the folder,
            one SQLite row committed (WAL, synchronous=FULL) per instance
  storescp  dcmtk storescp --fork (no fsync: the C++ ceiling)

Targets are interleaved (a rotating order per sender count and round) so a noisy machine hurts all alike;
--repeat N takes the median of N rounds. Prints instances/s, MB/s, CPU ms per instance of the target process
and of its child processes (the gateway's workers, storescp's forks), and the ratios gateway/orthanc (goal
>= 1.5 with 1 sender, >= 1.2 with 4 and 8) and gateway/bare (goal >= 0.8), for the listener alone too.
Disk: the inputs (count x 7.5 MB) plus one target's copy at a time, in --tmp.

Usage: python bench/ingest_cr.py [--count 300] [--senders 1,4,8] [--repeat 3] [--targets gateway,orthanc]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.peers import SHARED_DICOM, free_port, stop, wait_port  # noqa: E402

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ROWS, COLUMNS = 2000, 1880
TARGET_NAMES = ("gateway", "listener", "orthanc", "bare", "storescp")


def make_instances(folder: Path, count: int, study_size: int) -> list[list[Path]]:
    """``count`` uncompressed CR chest instances with new UIDs, grouped in studies of ``study_size``."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(SHARED_DICOM / "cr_chest_jpegls.dcm")
    pixels = ds.pixel_array
    pad = ((0, max(0, ROWS - pixels.shape[0])), (0, max(0, COLUMNS - pixels.shape[1])))
    pixels = np.ascontiguousarray(np.pad(pixels, pad, mode="edge")[:ROWS, :COLUMNS])
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OW"
    ds.Rows, ds.Columns = pixels.shape
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    studies: list[list[Path]] = []
    for i in range(count):
        if i % study_size == 0:
            ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
            ds.PatientID = f"BENCH{len(studies):04d}"
            ds.AccessionNumber = f"A{len(studies):06d}"
            studies.append([])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = len(studies[-1]) + 1
        path = folder / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        studies[-1].append(path)
    return studies


def send(port: int, studies: list[list[Path]], senders: int) -> float:
    """Seconds for ``senders`` parallel threads, each running one storescu per study, to send all."""
    shares = [studies[i::senders] for i in range(senders)]

    def one(share: list[list[Path]]) -> None:
        for files in share:
            proc = subprocess.run(
                [STORESCU, "-aet", "MODALITY", "-aec", "BENCH", "127.0.0.1", str(port), *map(str, files)],
                capture_output=True,
                text=True,
                timeout=600,
            )
            if proc.returncode != 0 or "Failed" in proc.stderr:
                output = (proc.stdout + proc.stderr)[-800:]
                raise RuntimeError(f"storescu failed ({proc.returncode}): {output}")

    start = time.perf_counter()
    with ThreadPoolExecutor(senders) as pool:
        list(pool.map(one, shares))
    return time.perf_counter() - start


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User + system CPU seconds of a process (with its waited-for children: storescp --fork), and of its
    live children (the gateway's worker processes), from /proc."""

    def stat(path: Path) -> list[str]:
        return path.read_text().rsplit(")", 1)[1].split()

    tick = os.sysconf("SC_CLK_TCK")
    own = sum(int(v) for v in stat(Path(f"/proc/{pid}/stat"))[11:15]) / tick
    children = 0.0
    for path in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat(path)
        except OSError:  # gone meanwhile
            continue
        if fields[1] == str(pid):
            children += sum(int(v) for v in fields[11:15]) / tick
    return own, children


@contextmanager
def process(argv: list[str], log: Path, port: int, env: dict[str, str] | None = None) -> Iterator[int]:
    """A target server process; yields its pid once ``port`` accepts connections."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        try:
            wait_port(port, 120, proc)
            yield proc.pid
        finally:
            stop(proc, 30)


def gateway(folder: Path, port: int, *, workers: int | None) -> Iterator[int]:
    http_port = free_port()
    env = {
        **os.environ,
        "GATEWAY_DATA_DIR": str(folder / "var"),
        "GATEWAY_DICOM__PORT": str(port),
        "GATEWAY_DICOM__AE_TITLE": "BENCH",
        "GATEWAY_HTTP__PORT": str(http_port),
        "PYTHONPATH": str(REPO),
    }
    if workers is not None:
        env["GATEWAY_WORKER__PROCESSES"] = str(workers)
    with process([sys.executable, "-m", "gateway", "serve"], folder / "gateway.log", port, env) as pid:
        wait_port(http_port, 120)
        wait_receivers(folder / "gateway.log", int(env.get("GATEWAY_DICOM__RECEIVER_PROCESSES", "2")))
        wait_workers(folder / "gateway.log", int(env.get("GATEWAY_WORKER__PROCESSES", "2")))
        yield pid


def wait_receivers(log: Path, count: int, timeout: float = 60) -> None:
    """Until ``count`` receiver processes said they are ready (before that, the listener runs associations
    itself: not what the benchmark measures)."""
    deadline = time.monotonic() + timeout
    while log.read_text(errors="replace").count(" ready") < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{count} receiver processes not ready within {timeout:g} s")
        time.sleep(0.1)


def wait_workers(log: Path, count: int, timeout: float = 60) -> None:
    """Until ``count`` worker processes have started (imported their libraries: seconds of CPU that a
    gateway running for a while has long spent), and a second more for their first polls."""
    deadline = time.monotonic() + timeout
    while (
        len(re.findall(r"INFO gateway\.worker: worker \S+ started", log.read_text(errors="replace"))) < count
    ):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{count} worker processes not started within {timeout:g} s")
        time.sleep(0.1)
    if count:
        time.sleep(1.0)


def orthanc(folder: Path, port: int) -> Iterator[int]:
    config = {
        "Name": "bench",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "DicomAet": "BENCH",
        "DicomPort": port,
        "HttpPort": free_port(),
        "RemoteAccessAllowed": False,
        "DicomAlwaysAllowStore": True,
        "DicomCheckCalledAet": False,
        "SyncStorageArea": True,
        "StorageCompression": False,
        "Plugins": [],
        "LogExportedResources": False,
    }
    (folder / "orthanc.json").write_text(json.dumps(config))
    exe = shutil.which("Orthanc") or "Orthanc"
    with process([exe, str(folder / "orthanc.json")], folder / "orthanc.log", port) as pid:
        yield pid


def bare(folder: Path, port: int) -> Iterator[int]:
    argv = [sys.executable, __file__, "--serve-bare", str(folder / "store"), "--port", str(port)]
    with process(argv, folder / "bare.log", port) as pid:
        yield pid


def storescp(folder: Path, port: int) -> Iterator[int]:
    (folder / "store").mkdir()
    argv = [STORESCP, "--fork", "-aet", "BENCH", "-od", str(folder / "store"), str(port)]
    with process(argv, folder / "storescp.log", port) as pid:
        yield pid


TARGETS: dict[str, Callable[[Path, int], Iterator[int]]] = {
    "gateway": lambda folder, port: gateway(folder, port, workers=None),
    "listener": lambda folder, port: gateway(folder, port, workers=0),
    "orthanc": orthanc,
    "bare": bare,
    "storescp": storescp,
}


#: Where each target writes instance files, under its folder.
STORES = {
    "gateway": "var/storage/instances",
    "listener": "var/storage/instances",
    "orthanc": "storage",
    "bare": "store",
    "storescp": "store",
}


def received(folder: Path) -> int:
    """Instance files a target stored (over 1 MB: Orthanc keeps small JSON attachments beside them)."""
    return sum(1 for p in folder.rglob("*") if p.is_file() and p.stat().st_size > 1_000_000)


@dataclass
class Run:
    target: str
    senders: int
    seconds: float
    #: CPU seconds of the target process, and of its child processes (gateway workers, storescp forks).
    cpu: float
    child_cpu: float
    #: Reports the gateway wrote while (and just after) receiving.
    reports: int | None = None


def measure(target: str, root: Path, studies: list[list[Path]], senders: int) -> Run:
    """Start ``target`` on an empty folder, send every study, stop it, check and remove what it stored."""
    folder = Path(tempfile.mkdtemp(prefix=f"{target}-", dir=root))
    port = free_port()
    count = sum(map(len, studies))
    try:
        with contextmanager(TARGETS[target])(folder, port) as pid:
            # Write back what the machine still holds dirty (the inputs just made, the previous target's
            # files): otherwise the first fsyncs of whichever target comes next wait for it.
            os.sync()
            own0, children0 = cpu_seconds(pid)
            seconds = send(port, studies, senders)
            own1, children1 = cpu_seconds(pid)
        got = received(folder / STORES[target])
        if got != count:
            raise RuntimeError(f"{target}: {got} of {count} instances stored")
        reports = None
        if (folder / "var" / "gateway.sqlite3").exists():
            with closing(sqlite3.connect(folder / "var" / "gateway.sqlite3")) as db:
                reports = int(db.execute("SELECT count(*) FROM report").fetchone()[0])
    except BaseException:
        for log in folder.glob("*.log"):
            lines = [line for line in log.read_text().splitlines() if " INFO " not in line][-30:]
            print(f"  {target} failed; {log.name} (but INFO lines):", *lines, sep="\n")
        raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return Run(target, senders, seconds, own1 - own0, max(0.0, children1 - children0), reports)


def describe(run: Run, count: int, mbytes: float) -> str:
    line = (
        f"{count / run.seconds:6.1f} inst/s {mbytes / run.seconds:5.0f} MB/s  "
        f"cpu {run.cpu * 1000 / count:5.1f} ms/inst"
    )
    if run.child_cpu * 1000 / count >= 0.5:
        line += f" + children {run.child_cpu * 1000 / count:5.1f}"
    if run.reports is not None:
        line += f", {run.reports} reports meanwhile"
    return line


def serve_bare(store: Path, port: int) -> None:
    """The bare durable handler: encoded_dataset() -> temp file, fsync, rename; one SQLite commit each."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.events import Event

    from core.storage import write_atomic
    from dicom_listener.server import TRANSFER_SYNTAXES

    store.mkdir(parents=True, exist_ok=True)
    db = store.parent / "index.sqlite3"
    local = threading.local()

    def connection() -> sqlite3.Connection:
        if not hasattr(local, "conn"):
            conn = sqlite3.connect(db, isolation_level=None, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("CREATE TABLE IF NOT EXISTS instance (uid TEXT PRIMARY KEY, path TEXT, size INT)")
            local.conn = conn
        return local.conn

    def handle(event: Event) -> int:
        uid = str(cast(C_STORE, event.request).AffectedSOPInstanceUID)
        path = write_atomic(store / f"{uid}.dcm", event.encoded_dataset())
        conn = connection()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT OR IGNORE INTO instance VALUES (?, ?, ?)", (uid, str(path), path.stat().st_size))
        conn.execute("COMMIT")
        return 0

    connection()
    ae = AE(ae_title="BENCH")
    ae.maximum_associations = 16
    for ctx in AllStoragePresentationContexts:
        assert ctx.abstract_syntax is not None
        ae.add_supported_context(ctx.abstract_syntax, TRANSFER_SYNTAXES)
    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=[(evt.EVT_C_STORE, handle)])


def report(runs: list[Run], count: int, mbytes: float, targets: list[str], senders: list[int]) -> None:
    print(f"\nmedians: {count} instances of {mbytes / count:.2f} MB, {os.cpu_count()} CPUs")
    print(f"{'senders':>7}  {'target':9} {'inst/s':>7} {'MB/s':>6} {'cpu ms/inst':>12} {'children':>8}")
    ratios = []
    for n in senders:
        rates: dict[str, float] = {}
        for t in targets:
            mine = [r for r in runs if r.target == t and r.senders == n]
            rates[t] = statistics.median(count / r.seconds for r in mine)
            cpu = statistics.median(r.cpu for r in mine) * 1000 / count
            children = statistics.median(r.child_cpu for r in mine) * 1000 / count
            print(
                f"{n:>7}  {t:9} {rates[t]:7.1f} {rates[t] * mbytes / count:6.0f} {cpu:12.1f}"
                + (f" {children:8.1f}" if children >= 0.5 else "")
            )
        for ours in ("gateway", "listener"):
            for peer, goal in (("orthanc", 1.5 if n == 1 else 1.2), ("bare", 0.8)):
                if ours in rates and peer in rates:
                    ratio = rates[ours] / rates[peer]
                    ratios.append(
                        f"{n:>7}  {ours}/{peer:8} {ratio:5.2f}  (goal >= {goal}: "
                        f"{'met' if ratio >= goal else 'NOT met'})"
                    )
    print("\nratios (medians)", *ratios, sep="\n", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=300, help="instances (default 300)")
    parser.add_argument("--study-size", type=int, default=4, help="instances per study (default 4)")
    parser.add_argument("--senders", default="1,4,8", help="parallel storescu counts (default 1,4,8)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds; the median is reported")
    parser.add_argument("--targets", default=",".join(TARGET_NAMES), help="comma-separated (default: all)")
    parser.add_argument("--tmp", type=Path, default=None, help="temp folder (default: the system's)")
    parser.add_argument("--serve-bare", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_bare:
        serve_bare(args.serve_bare, args.port)
        return
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}; choose from {','.join(TARGET_NAMES)}")
    if "orthanc" in targets and shutil.which("Orthanc") is None:
        parser.error("Orthanc not installed (Debian package orthanc)")
    sender_counts = [int(n) for n in args.senders.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-ingest-cr-", dir=args.tmp) as tmp:
        root = Path(tmp)
        studies = make_instances(root / "in", args.count, args.study_size)
        count = sum(map(len, studies))
        mbytes = sum(p.stat().st_size for s in studies for p in s) / 1e6
        print(
            f"{count} instances in {len(studies)} studies, {mbytes / count:.2f} MB each ({mbytes:.0f} MB), "
            f"senders {sender_counts}, {args.repeat} round(s), targets {targets}, {os.cpu_count()} CPUs",
            flush=True,
        )
        runs: list[Run] = []
        for r in range(args.repeat):
            for i, n in enumerate(sender_counts):
                shift = (r + i) % len(targets)
                for target in targets[shift:] + targets[:shift]:
                    run = measure(target, root, studies, n)
                    runs.append(run)
                    print(f"round {r + 1} senders {n} {target:9s} {describe(run, count, mbytes)}", flush=True)
        report(runs, count, mbytes, targets, sender_counts)


if __name__ == "__main__":
    main()
