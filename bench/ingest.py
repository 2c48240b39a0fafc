"""C-STORE ingest with durable acknowledgement: the gateway's listener against peers, same files, same run.

Peers, each receiving the same instances from dcmtk storescu over loopback:
  bare      a minimal pynetdicom SCP that writes encoded_dataset() with fsync + rename (the upper bound
            for a pynetdicom service),
  gateway   our listener (validation, storage, SQLite row committed before the acknowledgement),
  orthanc   Orthanc (Debian package, 1.10) with its SQLite index and SyncStorageArea, when installed.

Usage: python bench/ingest.py [--instances 300] [--associations 2]
Prints instances/s for each and the gateway's ratio to Orthanc and to the bare handler.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.db import make_engine, make_sessionmaker  # noqa: E402
from core.migrate import upgrade  # noqa: E402
from core.settings import DicomSettings, Settings  # noqa: E402
from core.storage import Storage, write_atomic  # noqa: E402
from dicom_listener.server import TRANSFER_SYNTAXES, serve  # noqa: E402
from tests.peers import SHARED_DICOM, free_port, stop, wait_port  # noqa: E402


def make_instances(folder: Path, count: int) -> list[Path]:
    """``count`` distinct instances (new UIDs) of the small real DX file, in studies of 4 images."""
    folder.mkdir(parents=True, exist_ok=True)
    source = pydicom.dcmread(SHARED_DICOM / "dx_chest_small.dcm")
    paths = []
    for i in range(count):
        if i % 4 == 0:
            study, series = generate_uid(), generate_uid()
        source.StudyInstanceUID, source.SeriesInstanceUID = study, series
        source.SOPInstanceUID = source.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = folder / f"{i:05d}.dcm"
        source.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def send(port: int, files: list[Path], associations: int) -> float:
    """Seconds for ``associations`` parallel storescu processes to send ``files``."""
    chunks = [files[i::associations] for i in range(associations)]

    def one(chunk: list[Path]) -> None:
        # storescu reads its file list from the command line; keep it short with a scan directory.
        with tempfile.TemporaryDirectory() as d:
            for p in chunk:
                os.symlink(p, Path(d) / p.name)
            proc = subprocess.run(
                ["/usr/bin/storescu", "-aec", "BENCH", "+sd", "+r", "127.0.0.1", str(port), d],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-500:])

    start = time.perf_counter()
    with ThreadPoolExecutor(associations) as pool:
        list(pool.map(one, chunks))
    return time.perf_counter() - start


def bare_server(folder: Path) -> tuple[object, int]:
    folder.mkdir(parents=True, exist_ok=True)

    def handle(event: evt.Event) -> int:
        write_atomic(folder / f"{event.request.AffectedSOPInstanceUID}.dcm", event.encoded_dataset())
        return 0

    ae = AE(ae_title="BENCH")
    for ctx in AllStoragePresentationContexts:
        ae.add_supported_context(ctx.abstract_syntax, TRANSFER_SYNTAXES)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, handle)])
    return server, server.server_address[1]


def orthanc_server(folder: Path) -> tuple[subprocess.Popen[bytes], int] | None:
    exe = shutil.which("Orthanc")
    if exe is None:
        return None
    dicom_port, http_port = free_port(), free_port()
    config = {
        "Name": "bench",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "DicomAet": "BENCH",
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "DicomAlwaysAllowStore": True,
        "DicomCheckCalledAet": False,
        "SyncStorageArea": True,
        "StorageCompression": False,
        "Plugins": [],
        "ConcurrentJobs": 2,
        "LogExportedResources": False,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "orthanc.json").write_text(json.dumps(config))
    proc = subprocess.Popen(
        [exe, str(folder / "orthanc.json")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_port(dicom_port, 60, proc)
    return proc, dicom_port


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--associations", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="best of N rounds per peer")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=REPO / "var" if (REPO / "var").exists() else None) as tmp:
        root = Path(tmp)
        files = make_instances(root / "in", args.instances)
        rates: dict[str, float] = {}

        def measure(name: str, start: object) -> None:
            best = 0.0
            for r in range(args.rounds):
                port, close = start(root / f"{name}{r}")
                try:
                    seconds = send(port, files, args.associations)
                finally:
                    close()
                best = max(best, len(files) / seconds)
            rates[name] = best
            print(f"{name:8s} {best:8.1f} instances/s", flush=True)

        def start_bare(folder: Path) -> tuple[int, object]:
            server, port = bare_server(folder)
            return port, server.shutdown  # type: ignore[attr-defined]

        def start_gateway(folder: Path) -> tuple[int, object]:
            engine = make_engine(f"sqlite:///{folder / 'db.sqlite3'}")
            upgrade(engine)
            storage = Storage(folder / "storage")
            storage.prepare()
            listener = serve(
                Settings(dicom=DicomSettings(host="127.0.0.1", port=0, ae_title="BENCH")),
                storage,
                make_sessionmaker(engine),
            )

            def close() -> None:
                listener.shutdown()
                engine.dispose()

            return listener.port, close

        def start_orthanc(folder: Path) -> tuple[int, object]:
            started = orthanc_server(folder)
            assert started is not None
            proc, port = started
            return port, lambda: stop(proc)

        print(
            f"{len(files)} instances ({files[0].stat().st_size // 1024} KiB each), "
            f"{args.associations} parallel associations, {os.cpu_count()} CPUs, best of {args.rounds}"
        )
        measure("bare", start_bare)
        measure("gateway", start_gateway)
        if shutil.which("Orthanc"):
            measure("orthanc", start_orthanc)
        else:
            print("orthanc  not installed (apt-get install orthanc): no comparison")
        print(f"gateway/bare    = {rates['gateway'] / rates['bare']:.2f}")
        if "orthanc" in rates:
            print(f"gateway/orthanc = {rates['gateway'] / rates['orthanc']:.2f}  (target >= 1.5)")
            print(f"bare/orthanc    = {rates['bare'] / rates['orthanc']:.2f}")


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
