"""A fuzzing campaign: cases 0..N-1 of one seed run through a Runner, crashes grouped, saved and minimised.

Case ``index`` of run ``seed`` is drawn from ``random.Random(f"{seed}:{index}")``: the same recipe on every
run and machine (``bench/fuzz.py --replay SEED:INDEX``). Crashes are grouped by signature (kind, stage,
exception type, innermost frame); the first inputs of each are saved under ``crash_dir`` with recipe and
traceback, and each new signature's recipe is minimised (operations dropped while the crash stays the same).
"""

from __future__ import annotations

import json
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.fuzz.mutate import generate
from tests.fuzz.recipe import Op, build_case
from tests.fuzz.runner import Case, Crash, Runner
from tests.fuzz.seeds import FAMILY_WEIGHTS, Seed

_SAVED_PER_SIGNATURE = 3
_MINIMISE_ATTEMPTS = 24


@dataclass
class Report:
    cases: int = 0
    seconds: float = 0.0
    outcomes: Counter[str] = field(default_factory=Counter)
    crashes: Counter[str] = field(default_factory=Counter)  # cases per signature
    first: dict[str, tuple[Case, Crash]] = field(default_factory=dict)
    minimal: dict[str, list[Op]] = field(default_factory=dict)

    @property
    def crash_count(self) -> int:
        return sum(n for sig, n in self.crashes.items() if not sig.startswith("hang:"))

    @property
    def hang_count(self) -> int:
        return sum(n for sig, n in self.crashes.items() if sig.startswith("hang:"))

    def summary(self) -> dict[str, Any]:
        return {
            "cases": self.cases,
            "seconds": round(self.seconds, 1),
            "cases_per_s": round(self.cases / self.seconds, 1) if self.seconds else 0.0,
            "crashes": self.crash_count,
            "hangs": self.hang_count,
            "outcomes": dict(self.outcomes),
            "signatures": {
                sig: {"cases": n, "seed": self.first[sig][0].seed, "ops": self.minimal.get(sig)}
                for sig, n in self.crashes.most_common()
            },
        }


def draw(seeds: Sequence[Seed], seed: int, index: int) -> Case:
    """Case ``index`` of run ``seed``: the same recipe on every run and machine."""
    rng = random.Random(f"{seed}:{index}")
    family = rng.choices(list(FAMILY_WEIGHTS), weights=list(FAMILY_WEIGHTS.values()))[0]
    pool = [s for s in seeds if s.name.startswith(f"{family}/")] or list(seeds)
    chosen = rng.choice(pool)
    return Case(index, chosen.name, generate(chosen, rng))


def fuzz(
    seeds: Sequence[Seed],
    *,
    cases: int,
    seed: int,
    timeout: float = 10.0,
    memory_mb: int = 2048,
    crash_dir: Path | None = None,
    minimise: bool = True,
    stop_on_crash: bool = False,
    progress: Callable[[Report], None] | None = None,
    progress_every: int = 1000,
) -> Report:
    """Run ``cases`` cases of run ``seed``; save and minimise what crashes (or stop at the first)."""
    report = Report()
    started = time.monotonic()
    with Runner(seeds, timeout=timeout, memory_mb=memory_mb) as runner:
        for index in range(cases):
            case = draw(seeds, seed, index)
            result = runner.run(case)
            report.cases += 1
            if isinstance(result, Crash):
                signature = result.signature
                report.crashes[signature] += 1
                if signature not in report.first:
                    report.first[signature] = (case, result)
                    if minimise:
                        report.minimal[signature] = minimise_case(runner, case, signature)
                if crash_dir is not None and report.crashes[signature] <= _SAVED_PER_SIGNATURE:
                    first = report.first[signature][0]
                    minimal = Case(first.index, first.seed, report.minimal.get(signature) or first.ops)
                    save_crash(crash_dir, case, result, runner.seeds[case.seed], minimal)
                if stop_on_crash:
                    break
            else:
                report.outcomes[result.status] += 1
            report.seconds = time.monotonic() - started
            if progress is not None and report.cases % progress_every == 0:
                progress(report)
    report.seconds = time.monotonic() - started
    return report


def minimise_case(runner: Runner, case: Case, signature: str) -> list[Op]:
    """Drop operations one at a time while the same crash still happens (a few attempts at most)."""
    ops = list(case.ops)
    attempts = 0 if signature.startswith(("hang:", "memory:")) else _MINIMISE_ATTEMPTS
    changed = True
    while changed and len(ops) > 1 and attempts > 0:
        changed = False
        for i in range(len(ops)):
            if attempts == 0:
                break
            attempts -= 1
            trial = ops[:i] + ops[i + 1 :]
            result = runner.run(Case(case.index, case.seed, trial))
            if isinstance(result, Crash) and result.signature == signature:
                ops = trial
                changed = True
                break
    return ops


def save_crash(folder: Path, case: Case, crash: Crash, seed: Seed, minimal: Case | None = None) -> Path:
    """``<folder>/<signature>/case-<index>.json`` (recipe, crash, traceback), ``.ts`` + ``.bin`` (input).

    ``minimal`` is the smallest recipe known for the signature (it may start from another seed).
    """
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", crash.signature)[:150]
    target = folder / slug
    target.mkdir(parents=True, exist_ok=True)
    record = {
        "seed": case.seed,
        "seed_digest": seed.digest,
        "index": case.index,
        "ops": case.ops,
        "minimal": {"seed": minimal.seed, "ops": minimal.ops} if minimal else None,
        "crash": crash.__dict__,
    }
    path = target / f"case-{case.index}.json"
    path.write_text(json.dumps(record, indent=1))
    if not any(op[0] == "bomb" for op in case.ops):
        transfer_syntax, stream = build_case(seed, case.ops)
        (target / f"case-{case.index}.ts").write_text(transfer_syntax)
        (target / f"case-{case.index}.bin").write_bytes(stream)
    return path
