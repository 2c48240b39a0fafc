"""Fault scenarios over the whole pipeline (drivers in tests/pipeline.py), sized by the caller: the test suite
runs short versions (tests/gateway/test_faults.py), ``bench/faults.py`` the long ones.

Each scenario returns a :class:`FaultRun`: the problems found (empty when the service behaved) and figures.
"""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.peers import create_database, free_port, postgres_server, wait_for
from tests.pipeline import (
    CHEST_MODELS,
    OUT_OF_RESOURCES,
    CountingPacs,
    Gateway,
    Senders,
    StallingPacs,
    StudyFiles,
    duplicate_receipts,
    gateway_env,
    instance_problems,
    make_studies,
    postgres_down,
    report_problems,
    reports_complete,
)


@dataclass
class FaultRun:
    name: str
    problems: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{self.name}: {'OK' if not self.problems else f'{len(self.problems)} PROBLEMS'}"]
        lines += [f"  {k}: {v}" for k, v in self.figures.items()]
        lines += [f"  problem: {p}" for p in self.problems[:30]]
        return "\n".join(lines)


def _failed_jobs(gateway: Gateway, studies: Sequence[StudyFiles]) -> list[str]:
    out = []
    for study in studies:
        record = gateway.get(f"/api/studies/{study.uid}") or {"jobs": []}
        out += [
            f"study {study.uid}: job {j['id']} ({j['kind']}) failed: {j['last_error']}"
            for j in record["jobs"]
            if j["status"] == "failed"
        ]
    return out


def _settle_and_check(
    run: FaultRun,
    gateway: Gateway,
    pacs: CountingPacs,
    studies: Sequence[StudyFiles],
    senders: Senders | None,
    *,
    timeout: float,
    settle: float,
    kills: Sequence[float] = (),
) -> None:
    """Wait for every SR (``timeout``), then ``settle`` seconds more so that a late duplicate shows; check."""
    start = time.monotonic()
    try:
        wait_for("every SR at the PACS", lambda: reports_complete(pacs, studies, CHEST_MODELS), timeout)
    except AssertionError as exc:
        run.problems.append(str(exc))
    run.figures["seconds until every SR was at the PACS"] = round(time.monotonic() - start, 1)
    time.sleep(settle)
    acked = senders.ledger.acked if senders else {s: st.uid for st in studies for s in st.sop_uids}
    run.problems += instance_problems(gateway, studies, acked)
    run.problems += report_problems(pacs, studies, CHEST_MODELS, kills=kills)
    run.problems += _failed_jobs(gateway, studies)


def kill_rounds(
    root: Path,
    models_dir: Path,
    *,
    rounds: int,
    studies: int,
    per_study: int,
    senders: int = 4,
    rate: float | None = None,
    up_seconds: tuple[float, float] = (1.0, 6.0),
    seed: int = 0,
    timeout: float = 600.0,
) -> FaultRun:
    """``gateway serve`` SIGKILLed (the whole process tree) ``rounds`` times, each after a random uptime,
    while senders deliver ``studies`` x ``per_study`` instances in parallel (``rate`` instances/s in all)
    and the workers process them. The first kill comes once a third of the instances are acknowledged, so
    at least one lands in ingest."""
    run = FaultRun(f"kill: {rounds} SIGKILLs during ingest of {studies * per_study} instances")
    rng = random.Random(seed)
    files = make_studies(root / "in", [per_study] * studies)
    pacs_port = free_port()
    env = gateway_env(
        root,
        pacs_port,
        GATEWAY_INFERENCE__MODEL_DIRS=str(models_dir),
        GATEWAY_COMPLETION__QUIET_SECONDS="1",
        # A study whose association died with the process is resent within a restart; it must not be
        # completed (and reported) with part of its instances before then.
        GATEWAY_COMPLETION__MAX_WAIT_SECONDS="60",
        GATEWAY_WORKER__LEASE_SECONDS="5",
        # Whole-service kills are no poisoned job's doing: a job must survive any number of them.
        GATEWAY_WORKER__MAX_TAKEOVERS=str(rounds + 1),
        GATEWAY_WORKER__RETRY_BASE_SECONDS="1",
        GATEWAY_WORKER__RETRY_CAP_SECONDS="5",
    )
    kills_during_ingest = 0
    kills: list[float] = []
    with ExitStack() as stack:
        pacs = stack.enter_context(CountingPacs(root / "pacs", pacs_port))
        gateway = stack.enter_context(Gateway(env, root / "logs"))
        gateway.start()
        sending = Senders(gateway.dicom_port, files, threads=senders, rate=rate).start()
        stack.callback(sending.stop)
        total = studies * per_study
        wait_for("a third of the instances stored", lambda: len(sending.ledger.acked) >= total // 3, 300)
        for n in range(rounds):
            if n:
                time.sleep(rng.uniform(*up_seconds))
            kills_during_ingest += not sending.done()
            gateway.kill()
            kills.append(time.time())
            gateway.start()
        try:
            wait_for("the senders to finish", sending.done, timeout)
        except AssertionError as exc:
            run.problems.append(str(exc))
        _settle_and_check(run, gateway, pacs, files, sending, timeout=timeout, settle=8.0, kills=kills)
        ledger = sending.ledger
        run.figures.update(
            {
                "kills (during ingest)": f"{rounds} ({kills_during_ingest})",
                "instances acknowledged 0x0000": f"{len(ledger.acked)} of {total}",
                "responses by status": {f"0x{k:04X}": v for k, v in sorted(ledger.statuses.items())},
                "associations cut by a kill": ledger.broken_associations,
                "associations refused (gateway restarting)": ledger.refused_associations,
                "SRs received by the PACS": len(pacs.receipts()),
                "SRs received again (stored by the PACS just before a kill, sent again)": duplicate_receipts(
                    pacs
                ),
            }
        )
        gateway.stop()
    return run


def kill_mid_job(root: Path, *, images: int = 24) -> FaultRun:
    """Kill the service while a study's second model runs (the first model's SR written, its delivery held
    by a PACS that stalls), start it again, kill it again while the PACS holds an SR's C-STORE without
    answering (an archive that hangs); then the PACS recovers and the service restarts: each SR arrives once
    per model. Shipped chest models, so inference takes real time."""
    run = FaultRun("mid-job: SIGKILL during inference, then during delivery")
    (study,) = make_studies(root / "in", [images], size=512, modality="CR")
    pacs_port = free_port()
    env = gateway_env(
        root,
        pacs_port,
        GATEWAY_COMPLETION__QUIET_SECONDS="0.5",
        GATEWAY_WORKER__LEASE_SECONDS="4",
        GATEWAY_WORKER__RETRY_BASE_SECONDS="1",
        GATEWAY_WORKER__RETRY_CAP_SECONDS="4",
    )
    with Gateway(env, root / "logs") as gateway:
        with StallingPacs(pacs_port) as stalling:
            gateway.start()
            senders = Senders(gateway.dicom_port, [study], threads=1).start()
            wait_for("the study to be acknowledged", senders.done, 120)

            def second_model_running() -> bool:
                record = gateway.get(f"/api/studies/{study.uid}", timeout=5) or {"jobs": [], "reports": []}
                states = {j["status"] for j in record["jobs"] if j["kind"] == "process_study"}
                if "done" in states:
                    raise AssertionError("inference finished before the kill: use more images")
                return "running" in states and len(record["reports"]) == 1

            wait_for("the first SR, the second model running", second_model_running, 180)
            gateway.kill()
            run.figures["C-STOREs held at the kill during inference"] = stalling.requests
            stalling.stalled.clear()
            gateway.start()
            wait_for("a delivery held by the stalled PACS", stalling.stalled.is_set, 180)
            gateway.kill()
            run.figures["C-STOREs held by the stalled PACS in all"] = stalling.requests
        with CountingPacs(root / "pacs", pacs_port) as pacs:
            gateway.start()
            _settle_and_check(run, gateway, pacs, [study], None, timeout=180, settle=8.0)
            run.figures["SRs received by the PACS"] = len(pacs.receipts())
    return run


def pacs_outage(
    root: Path,
    models_dir: Path,
    *,
    down_seconds: float,
    studies: int,
    retry_base: float | None = None,
    retry_cap: float | None = None,
    trickle_seconds: float = 0.0,
    recovery_goal: float = 60.0,
) -> FaultRun:
    """The PACS is down (nothing listens on its port) for ``down_seconds`` while studies arrive (``studies``
    at once, plus one every ``trickle_seconds``); then it comes back: every SR must be there within
    ``recovery_goal`` seconds, none twice. Retry settings are the defaults unless given."""
    run = FaultRun(f"PACS down for {down_seconds:.0f} s")
    pacs_port = free_port()
    settings = {
        "GATEWAY_INFERENCE__MODEL_DIRS": str(models_dir),
        "GATEWAY_COMPLETION__QUIET_SECONDS": "0.5",
    }
    if retry_base is not None:
        settings["GATEWAY_WORKER__RETRY_BASE_SECONDS"] = str(retry_base)
    if retry_cap is not None:
        settings["GATEWAY_WORKER__RETRY_CAP_SECONDS"] = str(retry_cap)
    env = gateway_env(root, pacs_port, **settings)
    files = make_studies(root / "in", [2] * studies)
    with Gateway(env, root / "logs") as gateway:
        gateway.start()
        down_at = time.monotonic()
        senders = Senders(gateway.dicom_port, files, threads=2).start()
        wait_for("the studies to be acknowledged", senders.done, 120)
        sent = list(files)
        up_at = down_at + down_seconds
        while (left := up_at - time.monotonic()) > 0:
            time.sleep(min(trickle_seconds or left, left))
            if trickle_seconds and up_at - time.monotonic() > 1:
                more = make_studies(root / "in", [1])
                wait_for(
                    "a study to be acknowledged", Senders(gateway.dicom_port, more, threads=1).start().done
                )
                sent += more
        attempts = [
            d["attempts"]
            for s in files  # the first ones: reported long before the PACS returns
            for r in (gateway.get(f"/api/studies/{s.uid}") or {"reports": []})["reports"]
            for d in r["deliveries"]
        ]
        run.figures["delivery attempts made while the PACS was down"] = sum(attempts)
        if not attempts or min(attempts) < 1:
            run.problems.append("not every report had been tried while the PACS was down")
        with CountingPacs(root / "pacs", pacs_port) as pacs:
            _settle_and_check(run, gateway, pacs, sent, None, timeout=max(900.0, 2 * recovery_goal), settle=5)
            recovered = run.figures.pop("seconds until every SR was at the PACS")
            run.figures["studies"] = len(sent)
            run.figures["seconds from the PACS's return to the last SR stored"] = recovered
            run.figures["SRs received by the PACS"] = len(pacs.receipts())
            if recovered > recovery_goal:
                run.problems.append(
                    f"last SR {recovered} s after the PACS came back (goal {recovery_goal} s)"
                )
    return run


def postgres_restart(
    root: Path,
    models_dir: Path,
    *,
    studies: int,
    per_study: int,
    down_seconds: float,
    senders: int = 3,
    restarts: int = 1,
    short_timers: bool = True,
) -> FaultRun:
    """PostgreSQL stopped (fast shutdown: every connection dropped) for ``down_seconds``, ``restarts`` times,
    while senders deliver ``studies`` x ``per_study`` instances and workers process them. The service must
    carry on by itself (no restart of it): every acknowledged instance stored, every study reported once.
    ``short_timers``: a 10 s lease and 1-5 s retries (else the defaults, as users run it)."""
    run = FaultRun(f"PostgreSQL restarted {restarts}x for {down_seconds:.0f} s under load")
    base = Path("/tmp") / f"gw-pg-faults-{root.name}-{time.monotonic_ns()}"  # readable by the postgres user
    shutil.rmtree(base, ignore_errors=True)
    files = make_studies(root / "in", [per_study] * studies)
    pacs_port = free_port()
    try:
        with postgres_server(base) as admin_url:
            url = create_database(admin_url)
            timers = {
                "GATEWAY_WORKER__LEASE_SECONDS": "10",
                "GATEWAY_WORKER__RETRY_BASE_SECONDS": "1",
                "GATEWAY_WORKER__RETRY_CAP_SECONDS": "5",
            }
            env = gateway_env(
                root,
                pacs_port,
                GATEWAY_DATABASE_URL=url,
                GATEWAY_INFERENCE__MODEL_DIRS=str(models_dir),
                GATEWAY_COMPLETION__QUIET_SECONDS="1",
                GATEWAY_COMPLETION__MAX_WAIT_SECONDS="60",
                **(timers if short_timers else {}),
            )
            with CountingPacs(root / "pacs", pacs_port) as pacs, Gateway(env, root / "logs") as gateway:
                gateway.start()
                sending = Senders(gateway.dicom_port, files, threads=senders).start()
                total = studies * per_study
                for n in range(restarts):
                    target = total * (n + 1) // (restarts + 1)
                    while len(sending.ledger.acked) < target and not sending.done():
                        time.sleep(0.1)
                    with postgres_down(base, admin_url):
                        time.sleep(down_seconds)
                    if not gateway.alive():
                        run.problems.append("gateway serve exited while PostgreSQL was down")
                        return run
                try:
                    wait_for("the senders to finish", sending.done, 600)
                except AssertionError as exc:
                    run.problems.append(str(exc))
                _settle_and_check(run, gateway, pacs, files, sending, timeout=900, settle=5)
                if not gateway.alive():
                    run.problems.append("gateway serve exited")
                ledger = sending.ledger
                run.figures.update(
                    {
                        "instances acknowledged 0x0000": f"{len(ledger.acked)} of {total}",
                        "0xA700 answers (retried by the senders)": ledger.statuses[OUT_OF_RESOURCES],
                        "responses by status": {f"0x{k:04X}": v for k, v in sorted(ledger.statuses.items())},
                        "associations that ended early": ledger.broken_associations,
                        "associations refused": ledger.refused_associations,
                        "SRs received by the PACS": len(pacs.receipts()),
                    }
                )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return run
