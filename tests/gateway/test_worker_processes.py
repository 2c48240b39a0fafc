"""`gateway serve` (subprocess) runs its workers as supervised child processes: a worker SIGKILLed (as by the
OOM killer) or dying of its memory limit takes neither the DICOM listener nor the HTTP API with it, is
logged and replaced; workers stop with serve, and die with it when serve itself is SIGKILLed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from pydicom.errors import InvalidDicomError
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from core.tables import WorkerHeartbeat
from tests import factories as f
from tests.accounts import bearer
from tests.inference.tiny_models import make_tiny_bundles
from tests.peers import dcmtk, free_port, gateway_serve, storescp, storescu, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bundles(tmp_path_factory.mktemp("models"))


def _env(tmp_path: Path, models: Path, **extra: str) -> dict[str, str]:
    return {
        "GATEWAY_DATA_DIR": str(tmp_path / "var"),
        "GATEWAY_DICOM__PORT": str(free_port()),
        "GATEWAY_HTTP__PORT": str(free_port()),
        "GATEWAY_COMPLETION__QUIET_SECONDS": "0.5",
        "GATEWAY_COMPLETION__MAX_WAIT_SECONDS": "10",
        "GATEWAY_INFERENCE__MODEL_DIRS": str(models),
        "GATEWAY_ROUTING__CHEST_MODELS": "pneumonia",  # one SR per study
        "GATEWAY_WORKER__HEARTBEAT_SECONDS": "0.5",
        "GATEWAY_WORKER__HEARTBEAT_TIMEOUT_SECONDS": "3",
        **extra,
    }


def _ready(env: dict[str, str]) -> tuple[int, dict[str, Any]]:
    rsp = requests.get(f"http://127.0.0.1:{env['GATEWAY_HTTP__PORT']}/readyz", timeout=10)
    return rsp.status_code, rsp.json()


def _worker_pids(env: dict[str, str], count: int, exclude: Sequence[int] = ()) -> list[int]:
    """Wait until /readyz is ready with ``count`` live workers, none of them in ``exclude``; their pids."""

    def check() -> list[int] | None:
        code, body = _ready(env)
        pids = sorted(w["pid"] for w in body["workers"])
        return pids if code == 200 and len(pids) == count and not set(pids) & set(exclude) else None

    return list(wait_for(f"{count} live workers", check, timeout=90))


def _echo(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [dcmtk("echoscu"), "-aet", "MODALITY", "-aec", "GATEWAY", "127.0.0.1", env["GATEWAY_DICOM__PORT"]],
        capture_output=True,
        text=True,
        timeout=30,
    )


def _send_study(env: dict[str, str], folder: Path, instances: int = 2) -> str:
    uid = generate_uid()
    files = [f.save(f.chest_radiograph(study_uid=uid), folder / f"{i}.dcm") for i in range(instances)]
    result = storescu(int(env["GATEWAY_DICOM__PORT"]), *files)
    assert result.returncode == 0, result.stderr
    return uid


def _srs_by_study(pacs: Path) -> dict[str, int]:
    """SRs the PACS holds, counted by study (a file storescp is still writing is skipped)."""
    counts: dict[str, int] = {}
    for path in pacs.glob("*"):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            if str(ds.SOPClassUID).startswith(SR_PREFIX):
                counts[str(ds.StudyInstanceUID)] = counts.get(str(ds.StudyInstanceUID), 0) + 1
        except (InvalidDicomError, EOFError, OSError, AttributeError, ValueError):
            continue
    return counts


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, ...); None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def _parent(pid: int) -> int:
    fields = _stat(pid)
    assert fields is not None, f"process {pid} is gone"
    return int(fields[1])


def _nice(pid: int) -> int:
    fields = _stat(pid)
    assert fields is not None, f"process {pid} is gone"
    return int(fields[16])  # /proc/PID/stat field 19 (nice), counted from the state (field 3)


def _address_space_limit(pid: int) -> int | None:
    """The soft RLIMIT_AS of ``pid`` in bytes; None when unlimited."""
    with open(f"/proc/{pid}/limits") as limits:
        line = next(x for x in limits if x.startswith("Max address space"))
    soft = line.split()[3]
    return None if soft == "unlimited" else int(soft)


def test_a_killed_worker_is_replaced_while_the_listener_keeps_working(models: Path, tmp_path: Path) -> None:
    pacs_port = free_port()
    pacs = tmp_path / "pacs"
    env = _env(
        tmp_path,
        models,
        GATEWAY_DESTINATIONS=json.dumps(
            [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}]
        ),
    )
    log = tmp_path / "gateway.log"
    with storescp(pacs, pacs_port), gateway_serve(env, log) as serve:
        pids = _worker_pids(env, 2)
        for pid in pids:
            assert _parent(pid) == serve.pid
            assert _address_space_limit(pid) == 4096 << 20  # the default GATEWAY_WORKER__MEMORY_LIMIT_MB
            assert _nice(pid) == _nice(serve.pid) + 10  # the default GATEWAY_WORKER__NICE
        assert _address_space_limit(serve.pid) != 4096 << 20  # the listener and API are not limited

        os.kill(pids[0], signal.SIGKILL)
        # While the worker is dead and being replaced, the listener answers and stores.
        assert _echo(env).returncode == 0
        during = _send_study(env, tmp_path / "during")
        now = _worker_pids(env, 2, exclude=[pids[0]])
        [replacement] = set(now) - set(pids)
        assert pids[1] in now and _parent(replacement) == serve.pid
        assert not _alive(pids[0])
        assert re.search(
            rf"process {pids[0]} killed by signal SIGKILL after [0-9.]+ s; restarting", log.read_text()
        )

        after = _send_study(env, tmp_path / "after")
        assert _echo(env).returncode == 0
        counts = wait_for(
            "an SR for each study at the PACS",
            lambda: (c := _srs_by_study(pacs)).get(during) and c.get(after) and c,
            timeout=90,
        )
        assert counts == {during: 1, after: 1}
        assert serve.poll() is None


def test_a_restarted_worker_leaves_the_files_serve_is_receiving_alone(models: Path, tmp_path: Path) -> None:
    """storage/tmp holds the instances serve is writing; a worker (re)starting meanwhile must not clean it up
    (it did: the C-STORE whose temp file a new worker removed was refused with 0xA700)."""
    env = _env(tmp_path, models, GATEWAY_WORKER__PROCESSES="1")
    in_flight = tmp_path / "var" / "storage" / "tmp" / ".incoming-in-flight"
    with gateway_serve(env, tmp_path / "gateway.log"):
        [first] = _worker_pids(env, 1)
        in_flight.write_bytes(b"an instance being received")
        os.kill(first, signal.SIGKILL)
        _worker_pids(env, 1, exclude=[first])  # the replacement is up: it has prepared its storage
        assert in_flight.exists()
    with gateway_serve(env, tmp_path / "again.log"):  # serve, starting, removes what a crash left
        assert not in_flight.exists()


def test_workers_die_with_serve_and_stop_with_it(models: Path, tmp_path: Path) -> None:
    env = _env(tmp_path, models, GATEWAY_WORKER__PROCESSES="1")
    with gateway_serve(env, tmp_path / "first.log") as serve:
        [orphan] = _worker_pids(env, 1)
        serve.send_signal(signal.SIGKILL)
        serve.wait(10)
        wait_for("the worker to die with serve", lambda: not _alive(orphan), timeout=15)

    log = tmp_path / "second.log"
    with gateway_serve(env, log) as serve:
        [worker] = _worker_pids(env, 1, exclude=[orphan])
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(30) == 0
    assert not _alive(worker)
    text = log.read_text()
    assert f"worker process {worker} stopped (exited with code 0)" in text
    engine = create_engine(f"sqlite:///{tmp_path / 'var' / 'gateway.sqlite3'}")
    with Session(engine) as session:
        rows = session.scalars(select(WorkerHeartbeat.pid)).all()
    engine.dispose()
    # The stopped worker removed its row; the SIGKILLed one could not (its row goes stale, then is forgotten).
    assert rows == [orphan]


def test_workers_over_their_memory_limit_die_alone(models: Path, tmp_path: Path) -> None:
    # 32 MB of address space is less than the interpreter already holds: every worker dies at start.
    env = _env(tmp_path, models, GATEWAY_WORKER__PROCESSES="1", GATEWAY_WORKER__MEMORY_LIMIT_MB="32")
    log = tmp_path / "gateway.log"
    deaths = re.compile(
        r"worker slot 0: process \d+ (?:exited with code|killed by signal) \S+ after [0-9.]+ s; "
        r"restarting it in ([0-9.]+) s"
    )
    with gateway_serve(env, log) as serve:
        delays = wait_for(
            "two deaths", lambda: len(d := deaths.findall(log.read_text())) >= 2 and d, timeout=90
        )
        assert delays[:2] == ["1.0", "2.0"]  # a worker that keeps dying young is restarted ever later

        assert _echo(env).returncode == 0
        uid = _send_study(env, tmp_path / "study", instances=1)
        http = f"http://127.0.0.1:{env['GATEWAY_HTTP__PORT']}"
        assert requests.get(f"{http}/healthz", timeout=10).json() == {"status": "ok", "database": "ok"}
        assert (
            requests.get(f"{http}/api/studies/{uid}", headers=bearer(env), timeout=10).json()["instances"]
            == 1
        )
        code, body = _ready(env)
        assert code == 503 and body["reasons"] == ["no worker heartbeat in the last 3 s"]
        assert serve.poll() is None
