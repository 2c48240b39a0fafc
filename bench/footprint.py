"""The service's peak RSS and cold start, through the CLI and dcmtk only: ``bench/inference.py --footprint``
(see that module's docstring for what is measured)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "dicom"
T = TypeVar("T")
R = TypeVar("R")
Proc = subprocess.Popen[bytes]

DCMTK = Path("/usr/bin")  # by path: the venv's pynetdicom installs scripts with the same names
FOOTPRINT_TIMEOUT = 180.0
STUDY_FILE = SHARED / "cr_chest_jpegls.dcm"
STORESCU_TS = "-xu"  # propose JPEG-LS near-lossless, the sample's transfer syntax
sys.path.insert(0, str(REPO))
from tests.accounts import bearer  # noqa: E402


@dataclass
class Gateway:
    """One `gateway` run's ports and folders (all under a fresh temporary root)."""

    root: Path
    dicom_port: int
    http_port: int
    pacs_port: int
    quiet_seconds: float

    @property
    def pacs_dir(self) -> Path:
        return self.root / "pacs"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def env(self, threads: int) -> dict[str, str]:
        """The process environment: this checkout first on the path, GATEWAY_* set here only."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        pacs = [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": self.pacs_port}]
        env.update(
            PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
            GATEWAY_DATA_DIR=str(self.root / "var"),
            GATEWAY_DICOM__HOST="127.0.0.1",
            GATEWAY_DICOM__PORT=str(self.dicom_port),
            GATEWAY_HTTP__PORT=str(self.http_port),
            GATEWAY_DESTINATIONS=json.dumps(pacs),
            GATEWAY_COMPLETION__QUIET_SECONDS=str(self.quiet_seconds),
            GATEWAY_WORKER__THREADS=str(threads),
            GATEWAY_LOG_LEVEL="INFO",
        )
        return env


@dataclass
class Arrival:
    """Seconds from a start time to the study's first SR and to all of its SRs at the PACS."""

    first: float
    all: float
    reports: int


@dataclass
class ServeRun:
    ready: float
    cold: Arrival
    warm: Arrival
    peak_mb: float


@dataclass
class WorkerRun:
    serve_peak_mb: float
    cold: Arrival
    warm: Arrival
    worker_peak_mb: float


def dcmtk(tool: str) -> str:
    path = DCMTK / tool
    if not path.is_file():
        raise SystemExit(f"{path} not found: install the Debian package dcmtk")
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(what: str, check: Callable[[], T | None], procs: Sequence[Proc] = ()) -> T:
    """Poll ``check`` until it returns something truthy; fail when a process dies or after the timeout."""
    deadline = time.monotonic() + FOOTPRINT_TIMEOUT
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{shlex.join(map(str, proc.args))} exited with {proc.returncode} ({what})"
                )
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {FOOTPRINT_TIMEOUT:.0f} s waiting for {what}")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def echo_ok(port: int) -> bool:
    """The gateway's DICOM listener answers a C-ECHO."""
    cmd = [dcmtk("echoscu"), "-to", "5", "-aet", "BENCH", "-aec", "GATEWAY", "127.0.0.1", str(port)]
    return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0


def new_study(folder: Path) -> tuple[Path, str]:
    """A copy of the sample chest CR with new study/series/instance UIDs (dcmodify); (path, study UID)."""
    study_uid, series_uid, sop_uid = (f"2.25.{uuid.uuid4().int}" for _ in range(3))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{sop_uid}.dcm"
    shutil.copyfile(STUDY_FILE, path)
    tags = {"0020,000d": study_uid, "0020,000e": series_uid, "0008,0018": sop_uid}
    edits = [arg for tag, uid in tags.items() for arg in ("-m", f"({tag})={uid}")]
    subprocess.run([dcmtk("dcmodify"), "-nb", *edits, str(path)], check=True, capture_output=True, timeout=60)
    return path, study_uid


def send(port: int, path: Path) -> None:
    cmd = [dcmtk("storescu"), STORESCU_TS, "-aet", "MODALITY", "-aec", "GATEWAY", "127.0.0.1", str(port)]
    result = subprocess.run([*cmd, str(path)], capture_output=True, text=True, timeout=FOOTPRINT_TIMEOUT)
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed ({result.returncode}): {result.stderr.strip()}")


def sr_files(folder: Path) -> set[str]:
    """Files storescp wrote for Structured Reports (SRc.<SOP Instance UID>, SRe..., SRt...)."""
    return {p.name for p in folder.glob("SR*")} if folder.is_dir() else set()


def study_reports_done(http: str, study_uid: str, headers: dict[str, str]) -> int:
    """Number of the study's reports once all its jobs (processing and deliveries) are done, else 0."""
    try:
        request = urllib.request.Request(f"{http}/api/studies/{study_uid}", headers=headers)
        with urllib.request.urlopen(request, timeout=10) as rsp:
            study = json.loads(rsp.read())
    except (OSError, ValueError):  # not listening yet, study unknown yet (404), half-written answer
        return 0
    jobs = study.get("jobs", [])
    failed = [j for j in jobs if j.get("status") == "failed"]
    if failed:
        raise RuntimeError(f"study {study_uid}: job failed: {failed[0].get('last_error')}")
    reports = study.get("reports", [])
    return len(reports) if jobs and reports and all(j.get("status") == "done" for j in jobs) else 0


def wait_reports(
    gw: Gateway, study_uid: str, before: set[str], start: float, procs: Sequence[Proc]
) -> Arrival:
    """Seconds from ``start`` to the first new SR file and to all the study's SRs at the PACS."""
    wait_until("the first SR at the PACS", lambda: len(sr_files(gw.pacs_dir) - before), procs)
    first_at = time.monotonic() - start

    def all_there() -> int:
        n = study_reports_done(gw.http, study_uid, bearer({"GATEWAY_DATA_DIR": str(gw.root / "var")}))
        return n if n and len(sr_files(gw.pacs_dir) - before) >= n else 0

    reports = wait_until("all the study's SRs at the PACS", all_there, procs)
    return Arrival(first_at, time.monotonic() - start, reports)


def descendants(pid: int) -> list[int]:
    """Child processes, recursively, from /proc/<pid>/task/*/children."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return children + [d for c in children for d in descendants(c)]


def vm_hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def peak_rss_mb(pid: int) -> float:
    """VmHWM of the process plus that of its child processes (if any), in MB (MiB)."""
    return sum(vm_hwm_kb(p) for p in [pid, *descendants(pid)]) / 1024


@contextmanager
def running(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[Proc]:
    """A subprocess writing to ``log``; SIGTERM, then SIGKILL after 20 s, on the way out."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def gateway_cmd(command: str) -> list[str]:
    """`gateway <command>` of this checkout (``python -m gateway`` with the repo on PYTHONPATH, cwd REPO)."""
    return [sys.executable, "-m", "gateway", command]


@contextmanager
def pacs(gw: Gateway) -> Iterator[Proc]:
    gw.pacs_dir.mkdir(parents=True, exist_ok=True)
    cmd = [dcmtk("storescp"), "-aet", "PACS", "-od", str(gw.pacs_dir), "+xa", str(gw.pacs_port)]
    with running(cmd, gw.root / "storescp.log") as proc:
        wait_until("storescp listening", lambda: port_open(gw.pacs_port), [proc])
        yield proc


def new_gateway(root: Path, quiet_seconds: float) -> Gateway:
    return Gateway(root, free_port(), free_port(), free_port(), quiet_seconds)


def serve_run(root: Path, quiet_seconds: float) -> ServeRun:
    """`gateway serve` (embedded default) from process start to two studies' SRs at the PACS."""
    gw = new_gateway(root, quiet_seconds)
    (first, first_uid), (second, second_uid) = new_study(root / "in"), new_study(root / "in")
    with pacs(gw) as scp:
        start = time.monotonic()
        with running(gateway_cmd("serve"), root / "serve.log", gw.env(threads=2)) as serve:
            procs = [serve, scp]
            wait_until("the listener to answer C-ECHO", lambda: echo_ok(gw.dicom_port), procs)
            ready = time.monotonic() - start
            send(gw.dicom_port, first)
            cold = wait_reports(gw, first_uid, set(), start, procs)
            before, sent = sr_files(gw.pacs_dir), time.monotonic()
            send(gw.dicom_port, second)
            warm = wait_reports(gw, second_uid, before, sent, procs)
            return ServeRun(ready, cold, warm, peak_rss_mb(serve.pid))


def worker_run(root: Path, quiet_seconds: float) -> WorkerRun:
    """A `gateway worker` process started on a study waiting to be processed; `serve` runs 0 threads."""
    gw = new_gateway(root, quiet_seconds)
    (first, first_uid), (second, second_uid) = new_study(root / "in"), new_study(root / "in")
    with (
        pacs(gw) as scp,
        running(gateway_cmd("serve"), root / "serve.log", gw.env(threads=0)) as serve,
    ):
        wait_until("the listener to answer C-ECHO", lambda: echo_ok(gw.dicom_port), [serve, scp])
        send(gw.dicom_port, first)
        time.sleep(quiet_seconds + 0.2)  # past its quiet time: the worker's first sweep completes it
        start = time.monotonic()
        with running(gateway_cmd("worker"), root / "worker.log", gw.env(threads=0)) as worker:
            procs = [serve, scp, worker]
            cold = wait_reports(gw, first_uid, set(), start, procs)
            before, sent = sr_files(gw.pacs_dir), time.monotonic()
            send(gw.dicom_port, second)
            warm = wait_reports(gw, second_uid, before, sent, procs)
            return WorkerRun(peak_rss_mb(serve.pid), cold, warm, peak_rss_mb(worker.pid))


def in_temp_dir(run: Callable[[Path, float], R], quiet_seconds: float) -> R:
    """One run in a fresh temporary root; the gateway's logs are shown when it fails."""
    with tempfile.TemporaryDirectory(prefix="footprint-") as tmp:
        try:
            return run(Path(tmp), quiet_seconds)
        except Exception:
            for log in sorted(Path(tmp).glob("*.log")):
                tail = log.read_text(errors="replace").splitlines()[-30:]
                print(f"--- {log.name} (last lines)", *tail, sep="\n", file=sys.stderr)
            raise


def row(label: str, values: Sequence[float], unit: str) -> str:
    fmt = "{:.0f}" if unit == "MB" else "{:.2f}"
    each = ", ".join(fmt.format(v) for v in values)
    return f"  {label:<46} {fmt.format(statistics.median(values)):>7} {unit:<2} [{each}]"


def footprint(runs: int, quiet_seconds: float) -> None:
    for tool in ("storescp", "storescu", "echoscu", "dcmodify"):
        dcmtk(tool)
    serve = [in_temp_dir(serve_run, quiet_seconds) for _ in range(runs)]
    worker = [in_temp_dir(worker_run, quiet_seconds) for _ in range(runs)]
    n = {r.cold.reports for r in serve + worker} | {r.warm.reports for r in serve + worker}
    print(
        f"footprint: {STUDY_FILE.name} as new single-image studies, {'/'.join(map(str, sorted(n)))} SRs "
        f"per study, quiet time {quiet_seconds:g} s, {runs} runs on fresh processes: median [each run]"
    )
    print("gateway serve (embedded default: listener + API + 2 worker threads), times from process start:")
    print(row("listener ready (C-ECHO answered)", [r.ready for r in serve], "s"))
    print(row("study 1 -> first SR at PACS (cold start)", [r.cold.first for r in serve], "s"))
    print(row("study 1 -> all SRs at PACS", [r.cold.all for r in serve], "s"))
    print(row("study 2 sent -> first SR (warm)", [r.warm.first for r in serve], "s"))
    print(row("study 2 sent -> all SRs (warm)", [r.warm.all for r in serve], "s"))
    print(row("peak RSS (VmHWM, after both studies)", [r.peak_mb for r in serve], "MB"))
    print("gateway worker (next to a serve with 0 worker threads; study 1 is in and quiet before it starts):")
    print(row("worker start -> first SR at PACS (cold start)", [r.cold.first for r in worker], "s"))
    print(row("worker start -> all SRs at PACS", [r.cold.all for r in worker], "s"))
    print(row("study 2 sent -> first SR (warm)", [r.warm.first for r in worker], "s"))
    print(row("study 2 sent -> all SRs (warm)", [r.warm.all for r in worker], "s"))
    print(row("worker peak RSS (VmHWM)", [r.worker_peak_mb for r in worker], "MB"))
    print(row("serve (0 worker threads) peak RSS (VmHWM)", [r.serve_peak_mb for r in worker], "MB"))

    def med(values: Iterable[float]) -> float:
        return statistics.median(values)

    print(
        f"footprint: serve peak RSS {med(r.peak_mb for r in serve):.0f} MB, "
        f"listener ready {med(r.ready for r in serve):.1f} s, "
        f"first study -> SR {med(r.cold.first for r in serve):.1f} s (cold), "
        f"second study -> SR {med(r.warm.first for r in serve):.1f} s (warm); "
        f"worker-only peak RSS {med(r.worker_peak_mb for r in worker):.0f} MB, "
        f"cold start {med(r.cold.first for r in worker):.1f} s "
        f"(serve with 0 threads {med(r.serve_peak_mb for r in worker):.0f} MB)"
    )
