"""Real external peers for tests: PostgreSQL, dcmtk storescp/storescu, the gateway itself as a subprocess."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom

from core.dimse import reactor_held
from core.storage import Storage
from dicom_listener.server import receive_into

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DICOM = SHARED / "dicom"

#: storescu proposes only uncompressed syntaxes unless told; one flag per compressed transfer syntax.
STORESCU_FLAGS = {
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.57": "-xs",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.1.99": "-xd",
}


@contextmanager
def receiving_into(storage: Storage) -> Iterator[None]:
    """An in-process listener receives into ``storage``'s tmp/ as `gateway serve` does (``receive_into``
    sets tempfile's process-wide folder and prefix); restored afterwards."""
    saved = tempfile.tempdir, tempfile.template
    receive_into(storage)
    try:
        yield
    finally:
        tempfile.tempdir, tempfile.template = saved


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Poll ``check`` until it returns something truthy (returned); fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def require_tool(name: str, package: str) -> str:
    """Path of an external tool; a missing one fails the test (never a silent skip)."""
    path = shutil.which(name)
    if path is None:
        raise AssertionError(f"{name} not found: install the Debian package {package} (see README)")
    return path


def dcmtk(name: str) -> str:
    """A dcmtk tool by its full path: pynetdicom installs console scripts of the same names (storescu,
    storescp, echoscu...) into the virtual environment, which may come first on PATH."""
    path = Path("/usr/bin") / name
    if not path.exists():
        raise AssertionError(f"{path} not found: install the Debian package dcmtk (see README)")
    return str(path)


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback TCP port nothing listens on, below the kernel's ephemeral range: a port the kernel picks
    (bind to 0) comes from that range, where the outgoing connections of the test's own senders may take it
    before the server under test binds it ("Address already in use" seen in the suite). Never the same
    port twice in one run."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = random.randrange(10000, max(10001, low))
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listening on port {port} after {timeout}s")


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def storescu(
    port: int, *files: Path, calling: str = "MODALITY", called: str = "GATEWAY"
) -> subprocess.CompletedProcess[str]:
    """Send files with dcmtk storescu, one association per transfer syntax; returns the last result."""
    exe = dcmtk("storescu")
    by_ts: dict[str, list[str]] = {}
    for f in files:
        ts = str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        by_ts.setdefault(STORESCU_FLAGS.get(ts, "-x="), []).append(str(f))
    result: subprocess.CompletedProcess[str] | None = None
    for flag, names in by_ts.items():
        result = subprocess.run(
            [exe, flag, "-aet", calling, "-aec", called, "127.0.0.1", str(port), *names],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            return result
    assert result is not None
    return result


def send_file(port: int, path: Path, *, calling: str = "PYNETDICOM", called: str = "GATEWAY") -> int:
    """C-STORE one file with pynetdicom as SCU, bytes as they are on disk; returns the status.

    The command's SOP Class/Instance UIDs come from the file meta, so malformed files travel unchanged.
    """
    from pynetdicom import AE
    from pynetdicom import _config as pynetdicom_config

    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    meta = pydicom.filereader.read_file_meta_info(path)
    ae = AE(ae_title=calling)
    ae.add_requested_context(str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, "association rejected"
    try:
        with reactor_held(assoc):
            return int(assoc.send_c_store(path).Status)
    finally:
        assoc.release()


@contextmanager
def storescp(out_dir: Path, port: int | None = None, ae_title: str = "PACS") -> Iterator[int]:
    """A dcmtk storescp acting as the PACS: writes what it receives to ``out_dir``."""
    exe = dcmtk("storescp")
    port = port or free_port()
    out_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [exe, "-aet", ae_title, "-od", str(out_dir), "+xa", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_port(port, proc=proc)
        yield port
    finally:
        stop(proc)


@contextmanager
def postgres_server(base: Path) -> Iterator[str]:
    """Start a throw-away PostgreSQL cluster on a free loopback port; yields an admin URL."""
    bindir = _pg_bindir()
    data = base / "pgdata"
    port = free_port()
    as_root = os.geteuid() == 0
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    base.mkdir(parents=True, exist_ok=True)
    if as_root:
        shutil.chown(base, "postgres")
    subprocess.run(
        [*prefix, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync"],
        check=True,
        capture_output=True,
    )
    log = base / "pg.log"
    subprocess.run(
        [
            *prefix,
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(log),
            "-w",
            "-o",
            f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True
        )


def _pg_bindir() -> Path:
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists():
            return candidate
    raise FileNotFoundError("PostgreSQL server binaries not found (Debian package postgresql)")


def create_database(admin_url: str) -> str:
    """A fresh empty database on the server; returns its URL."""
    import sqlalchemy as sa

    name = "t_" + uuid.uuid4().hex[:12]
    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return admin_url.rsplit("/", 1)[0] + "/" + name


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """An ASGI ``app`` served by uvicorn on a free loopback port, in a thread of this process, with uvicorn's
    defaults as `gateway serve` runs it (X-Forwarded-For believed from 127.0.0.1); yields its base URL."""
    import threading

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for("the API to start", lambda: server.started, timeout=30)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


#: HTTP port -> the GATEWAY_* settings of the `gateway serve` started on it (tests.accounts.port_headers).
SERVED: dict[int, dict[str, str]] = {}


@contextmanager
def gateway_serve(
    env: dict[str, str], log_path: Path, timeout: float = 90.0
) -> Iterator[subprocess.Popen[bytes]]:
    """`gateway serve` as a subprocess, ready once both its DICOM and HTTP ports accept connections."""
    full_env = {**os.environ, **env}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve"],
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        try:
            wait_port(int(env["GATEWAY_DICOM__PORT"]), timeout, proc)
            wait_port(int(env["GATEWAY_HTTP__PORT"]), timeout, proc)
            SERVED[int(env["GATEWAY_HTTP__PORT"])] = env
            yield proc
        finally:
            stop(proc, 20)


@contextmanager
def orthanc_server(
    base: Path,
    *,
    webhook_url: str = "",
    secret: str = "",
    http_port: int | None = None,
    dicom_port: int | None = None,
    stable_age: int = 1,
) -> Iterator[tuple[int, int]]:
    """A real Orthanc (Debian package) with our plugin, on loopback ports; yields (http_port, dicom_port).

    Storage and index live in ``base``, so stopping and starting again on the same ``base`` keeps the data.
    """
    exe = require_tool("Orthanc", "orthanc")
    plugin = Path("/usr/share/orthanc/plugins/libOrthancPython.so")
    if not plugin.exists():
        raise AssertionError("Orthanc's Python plugin not found: install the Debian package orthanc-python")
    http_port, dicom_port = http_port or free_port(), dicom_port or free_port()
    base.mkdir(parents=True, exist_ok=True)
    config = json.loads((REPO / "orthanc" / "orthanc.json").read_text())
    config.pop("//", None)
    config.update(
        {
            "Name": "test-pacs",
            "StorageDirectory": str(base / "storage"),
            "IndexDirectory": str(base / "index"),
            "HttpPort": http_port,
            "DicomPort": dicom_port,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False,
            "StableAge": stable_age,
            "PythonScript": str(REPO / "orthanc" / "plugin" / "screening_gateway.py"),
        }
    )
    config["Plugins"] = [str(plugin)]
    config["ScreeningGateway"] = {"WebhookUrl": webhook_url, "Secret": secret, "Timeout": 5}
    (base / "orthanc.json").write_text(json.dumps(config, indent=2))
    with open(base / "orthanc.log", "ab") as log:
        proc = subprocess.Popen([exe, str(base / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_port(http_port, 60, proc)
            wait_port(dicom_port, 60, proc)
            yield http_port, dicom_port
        finally:
            stop(proc)


def gateway_command(
    env: dict[str, str], *args: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """``gateway ARGS`` as a subprocess with the GATEWAY_* settings ``env`` (the rest of the environment
    kept); its output as text, never raising on a failure exit."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=REPO,
        env={**os.environ, **env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
