"""Faults, long versions (the test suite runs short ones: tests/gateway/test_faults.py).

  kill      `gateway serve` SIGKILLed (whole process tree) after a random 1-6 s of uptime, --rounds times
            (20), while 4 pynetdicom senders deliver 500 instances (50 studies x 10) at --rate (8/s in all);
            then: every instance that got 0x0000 listed by the API and readable with all its pixel bytes, no
            temp files, exactly one SR per study and model at a dcmtk storescp PACS (one file per receipt: a
            duplicate counts twice, unless its first copy arrived just before a kill: see tests/pipeline.py)
  midjob    killed while the second chest model runs, then while a stalled PACS holds an SR's C-STORE;
            --repeat times (3); each SR arrives once per model
  outage    the PACS down (nothing listening) for --minutes (10) while studies arrive, then back: the last
            SR must be stored within a minute of its return, none twice; retry settings are the defaults
            unless --retry-base/--retry-cap
  postgres  PostgreSQL stopped for --down-seconds (20) --restarts times (3) while 500 instances arrive and
            workers run, default lease and retry settings; the service must carry on alone (senders retry
            the 0xA700 answers, counted)

Each prints its figures and problems and exits 1 if any scenario found a problem. The kill, outage and
postgres scenarios use tiny untrained models (they measure the pipeline, not the networks); midjob the
shipped chest models. Usage: python bench/faults.py {kill,midjob,outage,postgres,all} [options]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests import faults  # noqa: E402
from tests.inference.tiny_models import make_tiny_bundles  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("scenario", choices=["kill", "midjob", "outage", "postgres", "all"])
    parser.add_argument("--rounds", type=int, default=20, help="kill: SIGKILLs")
    parser.add_argument("--studies", type=int, default=50, help="kill, postgres: studies")
    parser.add_argument("--per-study", type=int, default=10, help="kill, postgres: instances per study")
    parser.add_argument("--rate", type=float, default=8.0, help="kill: instances per second, all senders")
    parser.add_argument("--seed", type=int, default=0, help="kill: random kill moments")
    parser.add_argument("--repeat", type=int, default=3, help="midjob: repetitions")
    parser.add_argument("--minutes", type=float, default=10.0, help="outage: PACS down this long")
    parser.add_argument("--retry-base", type=float, help="outage: GATEWAY_WORKER__RETRY_BASE_SECONDS")
    parser.add_argument("--retry-cap", type=float, help="outage: GATEWAY_WORKER__RETRY_CAP_SECONDS")
    parser.add_argument("--down-seconds", type=float, default=20.0, help="postgres: each outage")
    parser.add_argument("--restarts", type=int, default=3, help="postgres: outages")
    parser.add_argument("--workdir", type=Path, help="keep data, logs and received SRs here")
    args = parser.parse_args()
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # refused associations are expected
    wanted = ["kill", "midjob", "outage", "postgres"] if args.scenario == "all" else [args.scenario]
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        models = make_tiny_bundles(root / "models") if set(wanted) - {"midjob"} else root
        for name in wanted:
            start = time.monotonic()
            runs = []
            if name == "kill":
                runs.append(
                    faults.kill_rounds(
                        root / "kill",
                        models,
                        rounds=args.rounds,
                        studies=args.studies,
                        per_study=args.per_study,
                        rate=args.rate,
                        seed=args.seed,
                    )
                )
            elif name == "midjob":
                runs += [faults.kill_mid_job(root / f"midjob-{n}") for n in range(args.repeat)]
            elif name == "outage":
                runs.append(
                    faults.pacs_outage(
                        root / "outage",
                        models,
                        down_seconds=args.minutes * 60,
                        studies=20,
                        trickle_seconds=30.0,
                        retry_base=args.retry_base,
                        retry_cap=args.retry_cap,
                        recovery_goal=60.0,
                    )
                )
            else:
                runs.append(
                    faults.postgres_restart(
                        root / "postgres",
                        models,
                        studies=args.studies,
                        per_study=args.per_study,
                        down_seconds=args.down_seconds,
                        restarts=args.restarts,
                        short_timers=False,
                    )
                )
            for run in runs:
                print(run, flush=True)
                failed |= bool(run.problems)
            print(f"  ({name}: {time.monotonic() - start:.0f} s)", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
