"""The whole pipeline as a black box, for the fault tests and the pipeline benchmarks.

`gateway serve` runs in its own process group, so it can be killed as a whole (SIGKILL of every process it
started, as a power cut would); a dcmtk storescp PACS keeps one file per receipt (``+uf``), so an SR stored
twice is seen twice; pynetdicom senders record the status of every instance; what the service holds is read
back through ``GET /api/studies`` and its storage folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests import factories as f
from tests.accounts import bearer
from tests.peers import REPO, _pg_bindir, dcmtk, free_port, stop, wait_for, wait_port

#: The chest models every chest study is routed to (GATEWAY_ROUTING__CHEST_MODELS default).
CHEST_MODELS = ("pneumonia", "covid19")

#: Statuses a sender may see; 0xA700 (out of resources) is the transient refusal a sender retries.
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700


def gateway_env(root: Path, pacs_port: int, **settings: str) -> dict[str, str]:
    """Environment of a `gateway serve` under ``root`` that delivers to the PACS on ``pacs_port``."""
    return {
        "GATEWAY_DATA_DIR": str(root / "var"),
        "GATEWAY_DICOM__PORT": str(free_port()),
        "GATEWAY_HTTP__PORT": str(free_port()),
        "GATEWAY_DESTINATIONS": json.dumps(
            [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}]
        ),
        "GATEWAY_LOG_LEVEL": "INFO",
        **settings,
    }


# ---------------------------------------------------------------------------------------------- processes


def process_tree(pid: int) -> list[int]:
    """``pid`` and every live descendant (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def tree_rss(pid: int) -> int:
    """Resident memory (bytes) of ``pid`` and its descendants."""
    total = 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Gateway:
    """`gateway serve` as a subprocess in its own session: started, killed (whole tree) and started again on
    the same data, each run logging to ``logs/serve-<n>.log``."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.runs = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def dicom_port(self) -> int:
        return int(self.env["GATEWAY_DICOM__PORT"])

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.env['GATEWAY_HTTP__PORT']}"

    @property
    def storage_dir(self) -> Path:
        return Path(self.env["GATEWAY_DATA_DIR"]) / "storage"

    @property
    def log_path(self) -> Path:
        return self.logs / f"serve-{self.runs}.log"

    def start(self, timeout: float = 180.0) -> None:
        """Start and wait until both the DICOM and the HTTP port accept connections."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.runs += 1
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve"],
                env={**os.environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                start_new_session=True,
            )
        wait_port(self.dicom_port, timeout, self.proc)
        wait_port(int(self.env["GATEWAY_HTTP__PORT"]), timeout, self.proc)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the serve process and everything it started, and wait until all are gone."""
        assert self.proc is not None
        tree = process_tree(self.proc.pid)
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in tree:  # a child that left the process group is still ours
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(30)
        wait_for("the killed gateway's processes to exit", lambda: not any(_alive(p) for p in tree), 30)

    def stop(self) -> None:
        """SIGTERM (a clean shutdown), SIGKILL of the whole tree if that takes more than 30 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        tree = process_tree(self.proc.pid)
        self.proc.send_signal(signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            self.proc.wait(30)
        if any(_alive(p) for p in tree):
            self.kill()

    def rss(self) -> int:
        return tree_rss(self.proc.pid) if self.proc is not None and self.alive() else 0

    @cached_property
    def headers(self) -> dict[str, str]:
        """Authorization of an admin's token, made once the gateway has created its database."""
        return bearer(self.env)

    def get(self, path: str, timeout: float = 30.0) -> Any:
        """JSON of ``GET path`` (with an admin's token); None for 404."""
        try:
            request = urllib.request.Request(self.http + path, headers=self.headers)
            with urllib.request.urlopen(request, timeout=timeout) as rsp:
                return json.loads(rsp.read())
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    def log_tail(self, chars: int = 4000) -> str:
        texts = [p.read_text(errors="replace") for p in sorted(self.logs.glob("serve-*.log"))]
        return "\n".join(texts)[-chars:]

    def __enter__(self) -> Gateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------- the PACS


@dataclass(frozen=True)
class Receipt:
    """One object the PACS received (one file: storescp ``+uf`` never overwrites)."""

    study_uid: str
    sop_uid: str
    modality: str
    model: str  # ManufacturerModelName of our SRs: the model's name
    references: frozenset[str]  # SOP Instance UIDs the SR names as evidence
    received_at: float  # wall clock (the file's mtime)


class CountingPacs:
    """dcmtk storescp writing one file per C-STORE it accepts, read back as :class:`Receipt` rows."""

    def __init__(self, out_dir: Path, port: int) -> None:
        self.out_dir = out_dir
        self.port = port
        self._proc: subprocess.Popen[bytes] | None = None
        self._seen: dict[Path, Receipt] = {}

    def start(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen(
            [dcmtk("storescp"), "-aet", "PACS", "-od", str(self.out_dir), "+xa", "+uf", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, proc=self._proc)

    def stop(self) -> None:
        if self._proc is not None:
            stop(self._proc)
            self._proc = None

    def receipts(self) -> list[Receipt]:
        """Everything received so far (a file still being written is read on a later call)."""
        for path in sorted(self.out_dir.iterdir()):
            if path in self._seen or not path.is_file():
                continue
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                refs = frozenset(
                    str(r.ReferencedSOPInstanceUID)
                    for item in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
                    for s in item.ReferencedSeriesSequence
                    for r in s.ReferencedSOPSequence
                )
                self._seen[path] = Receipt(
                    str(ds.StudyInstanceUID),
                    str(ds.SOPInstanceUID),
                    str(ds.Modality),
                    str(ds.get("ManufacturerModelName", "")),
                    refs,
                    path.stat().st_mtime,
                )
            except Exception:  # half-written: storescp is still writing it
                continue
        return list(self._seen.values())

    def reports(self) -> Counter[tuple[str, str]]:
        """SRs received per (study, model)."""
        return Counter((r.study_uid, r.model) for r in self.receipts() if r.modality == "SR")

    def __enter__(self) -> CountingPacs:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class StallingPacs:
    """A PACS that accepts the association and the C-STORE request, then stalls: it neither stores nor
    answers until :meth:`release` (then it answers 0xA700 without storing). As a PACS whose archive hangs."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stalled = threading.Event()  # a C-STORE is being held
        self.requests = 0
        self._release = threading.Event()
        self._server: Any = None

    def _handle_store(self, event: Any) -> int:
        self.requests += 1
        self.stalled.set()
        self._release.wait()
        return OUT_OF_RESOURCES

    def __enter__(self) -> StallingPacs:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        ae = AE(ae_title="PACS")
        ae.supported_contexts = AllStoragePresentationContexts
        ae.network_timeout = ae.dimse_timeout = ae.acse_timeout = 600
        self._server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._handle_store)]
        )
        return self

    def release(self) -> None:
        self._release.set()

    def __exit__(self, *exc: object) -> None:
        self.release()
        self._server.shutdown()


# ---------------------------------------------------------------------------------------------- studies


@dataclass(frozen=True)
class StudyFiles:
    uid: str
    paths: tuple[Path, ...]
    sop_uids: tuple[str, ...]


def make_chest_study(
    folder: Path, images: int, *, size: int = 256, modality: str = "DX", index: int = 0
) -> StudyFiles:
    """One chest study of ``images`` instances (one series) written under ``folder``.

    ``size`` 256 is the factory's DX (12-bit, 128 KiB); other sizes are CR-like, 12-bit in 16."""
    study_uid, series_uid = generate_uid(), generate_uid()
    paths, sops = [], []
    for number in range(1, images + 1):
        if modality == "DX" and size == 256:
            ds = f.chest_radiograph(study_uid=study_uid, series_uid=series_uid)
        else:
            ds = f.base_dataset(f.CR, "CR", study_uid=study_uid, series_uid=series_uid)
            ds.BodyPartExamined = "CHEST"
            ds.ViewPosition = "PA"
            gray = f.chest_gray(size, index=(index + number) % 8).astype(np.uint16) * 16
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.Rows = ds.Columns = size
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
            ds.PixelData = gray.tobytes()
        ds.InstanceNumber = number
        paths.append(f.save(ds, folder / study_uid / f"{number}.dcm", ExplicitVRLittleEndian))
        sops.append(str(ds.SOPInstanceUID))
    return StudyFiles(study_uid, tuple(paths), tuple(sops))


def make_studies(root: Path, counts: Sequence[int], **kw: Any) -> list[StudyFiles]:
    """One study per entry of ``counts`` (its number of images)."""
    return [make_chest_study(root, n, index=i, **kw) for i, n in enumerate(counts)]


# ---------------------------------------------------------------------------------------------- senders


def send_study(
    port: int, paths: Sequence[Path], *, timeout: float = 15.0, interval: float = 0.0
) -> dict[Path, int] | None:
    """C-STORE ``paths`` in one pynetdicom association; the status of each file that got a response (a broken
    association leaves the rest without one), or None when no association was established.

    pynetdicom notices a peer that died while a dataset was being sent only when ``timeout`` runs out, so
    it is short: the study is sent again well within the gateway's completion wait. ``interval``: seconds
    between two C-STOREs (a modality's pace)."""
    from pynetdicom import AE

    from core.dimse import reactor_held

    metas = {p: pydicom.filereader.read_file_meta_info(p) for p in paths}
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    for ctx in sorted({(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in metas.values()}):
        ae.add_requested_context(*ctx)
    statuses: dict[Path, int] = {}
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="GATEWAY")
    except OSError:
        return None
    if not assoc.is_established:
        return None
    try:
        for n, path in enumerate(paths):
            if n and interval:
                time.sleep(interval)
            if not assoc.is_established:
                break
            with reactor_held(assoc):
                rsp = assoc.send_c_store(path)
            if "Status" in rsp:
                statuses[path] = int(rsp.Status)
    except (OSError, RuntimeError):  # the gateway died under us
        pass
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


@dataclass
class Ledger:
    """What the senders saw: per instance whether it got 0x0000, and every status count."""

    acked: dict[str, str] = field(default_factory=dict)  # SOP Instance UID -> Study Instance UID
    statuses: Counter[int] = field(default_factory=Counter)
    refused_associations: int = 0  # nobody listening (the gateway was restarting) or rejected
    broken_associations: int = 0  # established, but ended before every file got a response
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, study: StudyFiles, sent: Sequence[Path], statuses: dict[Path, int] | None) -> None:
        by_path = dict(zip(study.paths, study.sop_uids, strict=True))
        with self.lock:
            if statuses is None:
                self.refused_associations += 1
                return
            for path, status in statuses.items():
                self.statuses[status] += 1
                if status == SUCCESS:
                    self.acked[by_path[path]] = study.uid
            if len(statuses) < len(sent):
                self.broken_associations += 1


class Senders:
    """``threads`` pynetdicom senders sharing ``studies``; each sends one study per association and sends its
    unacknowledged instances again (0xA700, aborted association, gateway down) until all got 0x0000.
    ``rate``: instances per second of all senders together (default: as fast as the gateway takes them)."""

    def __init__(
        self,
        port: int,
        studies: Sequence[StudyFiles],
        *,
        threads: int = 4,
        retry_seconds: float = 0.3,
        rate: float | None = None,
    ) -> None:
        self.port = port
        self._interval = threads / rate if rate else 0.0
        self.studies = list(studies)
        self.ledger = Ledger()
        self._retry = retry_seconds
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(self.studies[i::threads],), daemon=True)
            for i in range(threads)
        ]

    def _run(self, studies: list[StudyFiles]) -> None:
        for study in studies:
            while not self._stop.is_set():
                todo = [
                    p for p, s in zip(study.paths, study.sop_uids, strict=True) if s not in self.ledger.acked
                ]
                if not todo:
                    break
                self.ledger.record(study, todo, send_study(self.port, todo, interval=self._interval))
                if any(s not in self.ledger.acked for s in study.sop_uids):
                    self._stop.wait(self._retry)

    def start(self) -> Senders:
        for t in self._threads:
            t.start()
        return self

    def done(self) -> bool:
        return not any(t.is_alive() for t in self._threads)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)


# ---------------------------------------------------------------------------------------------- checks


def stored_instances(storage_dir: Path) -> dict[str, Path]:
    """SOP Instance UID -> file, for every instance file in the gateway's storage (reports excluded)."""
    out = {}
    for path in (storage_dir / "instances").rglob("*.dcm"):
        out[path.stem] = path
    return out


def temp_files(storage_dir: Path) -> list[Path]:
    """Files a write left behind: anything in storage/tmp, and any ``.incoming-*`` anywhere."""
    leftovers = [p for p in storage_dir.rglob(".incoming-*")]
    tmp = storage_dir / "tmp"
    if tmp.is_dir():
        leftovers += [p for p in tmp.iterdir() if p not in leftovers]
    return leftovers


def instance_problems(gateway: Gateway, studies: Iterable[StudyFiles], acked: dict[str, str]) -> list[str]:
    """Every acknowledged instance listed by the API and readable from storage with all its pixel bytes."""
    problems = []
    files = stored_instances(gateway.storage_dir)
    for study in studies:
        record = gateway.get(f"/api/studies/{study.uid}")
        listed = (
            {i["sop_instance_uid"] for s in record["series"] for i in s["instances"]} if record else set()
        )
        for sop in study.sop_uids:
            if sop not in acked:
                continue
            if sop not in listed:
                problems.append(f"{sop}: acknowledged but not listed by the API")
            path = files.get(sop)
            if path is None:
                problems.append(f"{sop}: acknowledged but no file")
                continue
            try:
                ds = pydicom.dcmread(path)
                expected = ds.Rows * ds.Columns * ds.SamplesPerPixel * int(ds.get("NumberOfFrames", 1))
                expected *= ds.BitsAllocated // 8
                if str(ds.SOPInstanceUID) != sop or len(ds.PixelData) != expected:
                    problems.append(f"{sop}: pixel data {len(ds.PixelData)} bytes, expected {expected}")
            except Exception as exc:  # whatever it is, it is a problem to report
                problems.append(f"{sop}: unreadable ({type(exc).__name__}: {exc})")
    known = {sop for study in studies for sop in study.sop_uids}
    problems += [f"instance file {p} of nothing sent" for sop, p in files.items() if sop not in known]
    problems += [f"temp file left: {p}" for p in temp_files(gateway.storage_dir)]
    return problems


def reports_complete(pacs: CountingPacs, studies: Iterable[StudyFiles], models: Sequence[str]) -> bool:
    have = pacs.reports()
    return all(have[(s.uid, m)] >= 1 for s in studies for m in models)


def report_problems(
    pacs: CountingPacs,
    studies: Iterable[StudyFiles],
    models: Sequence[str],
    *,
    kills: Sequence[float] = (),
    window: float = 2.0,
) -> list[str]:
    """Exactly one SR per study and model at the PACS, naming every instance of the study, received once.

    Received twice is allowed only when the first receipt came less than ``window`` seconds before one of the
    ``kills`` (wall-clock times): the PACS had stored it and the gateway died before recording that, so it
    sent the same SR again. No sender can rule that out without asking the PACS (which storescp cannot
    answer); the PACS gets the same SOP Instance again, never a second report.
    """
    receipts = [r for r in pacs.receipts() if r.modality == "SR"]
    problems = []
    for sop, times in _receipt_times(receipts).items():
        explained = len(times) == 2 and any(0 <= k - times[0] < window for k in kills)
        if len(times) > 1 and not explained:
            problems.append(f"SR {sop} received {len(times)} times")
    distinct = {(r.study_uid, r.model, r.sop_uid, r.references) for r in receipts}
    per = Counter((study, model) for study, model, _, _ in distinct)
    for study in studies:
        for model in models:
            n = per[(study.uid, model)]
            if n != 1:
                problems.append(f"study {study.uid}: {n} different {model} SRs")
            refs = {r for s, m, _, r in distinct if s == study.uid and m == model}
            if n and refs != {frozenset(study.sop_uids)}:
                problems.append(f"study {study.uid}: {model} SR does not name exactly the study's instances")
    return problems


def duplicate_receipts(pacs: CountingPacs) -> int:
    """How many SR receipts repeated an SR the PACS already had."""
    times = _receipt_times([r for r in pacs.receipts() if r.modality == "SR"])
    return sum(len(t) - 1 for t in times.values())


def _receipt_times(receipts: Iterable[Receipt]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for r in receipts:
        out.setdefault(r.sop_uid, []).append(r.received_at)
    return {sop: sorted(t) for sop, t in out.items()}


def _pg_ctl(data: Path, *args: str) -> None:
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    subprocess.run(
        [*prefix, str(_pg_bindir() / "pg_ctl"), "-D", str(data), *args], check=True, capture_output=True
    )


@contextmanager
def postgres_down(base: Path, url: str) -> Iterator[None]:
    """PostgreSQL (started by :func:`tests.peers.postgres_server` in ``base``) stopped for the ``with`` block
    (fast shutdown: clients are disconnected), then started again on the same port and data."""
    from sqlalchemy.engine import make_url

    port = make_url(url).port
    data = base / "pgdata"
    _pg_ctl(data, "-m", "fast", "-w", "stop")
    try:
        yield
    finally:
        _pg_ctl(
            data,
            "-l",
            str(base / "pg.log"),
            "-w",
            "-o",
            f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            "start",
        )
