"""Fuzzing the C-STORE validation and the pixel path: N mutated datasets, crashes and hangs counted.

Each case is a seed (the real vendor files of ../shared/dicom, small re-encodings of them, factory datasets)
with one to eight structure-aware mutations (tests/fuzz/mutate.py), run as the gateway runs a received
dataset: decoded as pynetdicom decodes it, validated as the C-STORE handler validates it, and when accepted
read by the pixel path and listed in an SR (tests/fuzz/target.py). Cases run in a forked child with a memory
cap, a per-case timeout and a resident-memory watch (tests/fuzz/runner.py).

Usage: python bench/fuzz.py [--cases 100000] [--seed 1] [--timeout 10] [--memory-mb 2048]
                            [--crash-dir /tmp/fuzz-crashes] [--no-minimise]
Prints cases/s, outcomes, crashes and hangs (per signature, with a minimal recipe) and exits 1 on any crash
or hang. Case i of seed N is the same recipe on every run: `--replay N:i` runs just that case and prints its
traceback. Crashing inputs are saved under --crash-dir (outside the repository) with recipe and traceback.

`--engine atheris [libFuzzer flags]` runs the same target and mutations coverage-guided (atheris, in the
[test] extra; tests/fuzz/libfuzzer.py) in this process: it stops at the first crash and writes the input
under --crash-dir; `--replay-input FILE` runs such a file (or any saved input) in the isolated child.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

# One thread per codec and BLAS: the cases run one at a time in one child process.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# tests.fuzz.runner and tests.fuzz.seeds are imported in the functions below: the atheris engine must
# import pydicom and the gateway's packages itself, inside its instrumentation.


def _progress(report: Any) -> None:
    rate = report.cases / report.seconds if report.seconds else 0.0
    print(
        f"{report.cases} cases, {rate:.1f}/s, {report.crash_count} crashes "
        f"({len(report.crashes)} signatures), {report.hang_count} hangs",
        flush=True,
    )


def _replay(spec: str, timeout: float, memory_mb: int) -> int:
    from tests.fuzz.campaign import draw
    from tests.fuzz.runner import Crash, Runner
    from tests.fuzz.seeds import all_seeds

    seed, index = (int(part) for part in spec.split(":"))
    seeds = all_seeds()
    case = draw(seeds, seed, index)
    print(json.dumps({"seed": case.seed, "ops": case.ops}))
    with Runner(seeds, timeout=timeout, memory_mb=memory_mb) as runner:
        result = runner.run(case)
    if isinstance(result, Crash):
        print(result.signature)
        print(result.traceback or result.message)
        return 1
    print(result)
    return 0


def _replay_input(path: Path, timeout: float, memory_mb: int) -> int:
    """A libFuzzer input: one byte naming the transfer syntax (index in the listener's list), then P-DATA."""
    from dicom_listener.server import TRANSFER_SYNTAXES
    from tests.fuzz.runner import Case, Crash, Runner
    from tests.fuzz.seeds import Seed

    data = path.read_bytes()
    transfer_syntax = str(TRANSFER_SYNTAXES[data[0] % len(TRANSFER_SYNTAXES)]) if data else ""
    seed = Seed("input", transfer_syntax, transfer_syntax, data[1:])
    with Runner([seed], timeout=timeout, memory_mb=memory_mb) as runner:
        result = runner.run(Case(0, seed.name, []))
    if isinstance(result, Crash):
        print(result.signature)
        print(result.traceback or result.message)
        return 1
    print(result)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per case before it is a hang")
    parser.add_argument("--memory-mb", type=int, default=2048, help="resident memory of the child per case")
    parser.add_argument("--crash-dir", type=Path, default=Path("/tmp/fuzz-crashes"))
    parser.add_argument("--no-minimise", action="store_true")
    parser.add_argument("--progress-every", type=int, default=1000)
    parser.add_argument("--json", type=Path, help="also write the summary here")
    parser.add_argument("--replay", metavar="SEED:INDEX", help="run one case and print its traceback")
    parser.add_argument("--replay-input", type=Path, metavar="FILE", help="run one libFuzzer input")
    parser.add_argument(
        "--engine",
        choices=["mutate", "atheris"],
        default="mutate",
        help="mutate: the seeded loop, every case isolated and counted (default); atheris: coverage-guided "
        "libFuzzer in this process, stops at the first crash",
    )
    args, extra = parser.parse_known_args()
    if extra and args.engine != "atheris":
        parser.error(f"unrecognised arguments: {' '.join(extra)} (libFuzzer flags go with --engine atheris)")
    if args.replay:
        return _replay(args.replay, args.timeout, args.memory_mb)
    if args.replay_input:
        return _replay_input(args.replay_input, args.timeout, args.memory_mb)
    if args.engine == "atheris":
        from tests.fuzz.libfuzzer import run

        run(
            cases=args.cases,
            seed=args.seed,
            timeout=args.timeout,
            memory_mb=args.memory_mb,
            crash_dir=args.crash_dir,
            extra=extra,
        )
        return 0

    from tests.fuzz.campaign import fuzz
    from tests.fuzz.seeds import all_seeds

    started = time.monotonic()
    seeds = all_seeds()
    print(f"{len(seeds)} seeds built in {time.monotonic() - started:.1f} s; crashes go to {args.crash_dir}")
    report = fuzz(
        seeds,
        cases=args.cases,
        seed=args.seed,
        timeout=args.timeout,
        memory_mb=args.memory_mb,
        crash_dir=args.crash_dir,
        minimise=not args.no_minimise,
        progress=_progress,
        progress_every=args.progress_every,
    )
    summary = {"seed": args.seed, **report.summary()}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    for signature, info in summary["signatures"].items():
        print(f"{info['cases']:6d}  {signature}")
        print(f"        {info['seed']} {json.dumps(info['ops'])[:400]}")
    print(
        f"cases {report.cases}  cases/s {summary['cases_per_s']}  crashes {report.crash_count}  "
        f"hangs {report.hang_count}  signatures {len(report.crashes)}  outcomes {dict(report.outcomes)}"
    )
    return 1 if report.crashes else 0


if __name__ == "__main__":
    sys.exit(main())
