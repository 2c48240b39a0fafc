"""Coverage-guided engine: atheris (libFuzzer) over the same target and the same structure-aware mutations.

``python bench/fuzz.py --engine atheris`` runs it. An input is one byte naming the declared transfer syntax
(an index into the listener's list) followed by the P-DATA bytes; the corpus starts from the seeds. pydicom,
pynetdicom, highdicom and our packages are instrumented, so inputs reaching new code are kept and mutated
further. libFuzzer runs the cases in this process: the first crash (an exception other than a refusal, a
signal, more than ``-rss_limit_mb``, longer than ``-timeout``) stops the run and is written under the
artifact prefix (``crash_dir``, which also keeps the growing corpus); the seeded mutation loop
(tests/fuzz/runner.py) is the one that counts crashes per class.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

_INSTRUMENTED = ["pydicom", "pynetdicom", "highdicom", "core", "inference", "reporting"]


def run(*, cases: int, seed: int, timeout: float, memory_mb: int, crash_dir: Path, extra: list[str]) -> None:
    """Run libFuzzer for ``cases`` inputs (never returns: libFuzzer exits the process)."""
    import atheris

    with atheris.instrument_imports(include=_INSTRUMENTED):
        from tests.fuzz import target
    from pydicom.uid import UID

    from dicom_listener.server import TRANSFER_SYNTAXES
    from tests.fuzz.mutate import mutation
    from tests.fuzz.recipe import apply
    from tests.fuzz.seeds import Seed, all_seeds

    syntaxes = [str(ts) for ts in TRANSFER_SYNTAXES]
    workdir = crash_dir / "work"
    workdir.mkdir(parents=True, exist_ok=True)

    def split(data: bytes) -> tuple[str, bytes]:
        return (syntaxes[data[0] % len(syntaxes)], data[1:]) if data else (syntaxes[0], b"")

    def test_one_input(data: bytes) -> None:
        transfer_syntax, stream = split(data)
        try:
            target.run_case(transfer_syntax, stream, workdir)
        except target.CaseCrash as crash:
            raise crash.error from None  # libFuzzer reports the original exception and its traceback

    def mutator(data: bytes, max_size: int, mutation_seed: int) -> bytes:
        rng = random.Random(mutation_seed)
        transfer_syntax, stream = split(data)
        if rng.random() < 0.2 or UID(transfer_syntax).is_deflated:
            return bytes(atheris.Mutate(data, max_size))  # libFuzzer's own byte-level mutations
        op = mutation(Seed("input", transfer_syntax, transfer_syntax, stream), stream, rng)
        if op is None:
            return data
        if op[0] == "ts":
            return bytes([syntaxes.index(op[1])]) + stream
        return (data[:1] + apply(stream, op, transfer_syntax))[:max_size]

    corpus = (
        crash_dir / "corpus"
    )  # libFuzzer adds the inputs that reach new code: a later run goes on from them
    corpus.mkdir(exist_ok=True)
    for s in all_seeds():
        if not s.deflated:  # libFuzzer's byte mutations cover the deflated streams
            (corpus / s.name.replace("/", "_")).write_bytes(bytes([syntaxes.index(s.encoding)]) + s.stream)
    args: list[Any] = [
        sys.argv[0],
        str(corpus),
        f"-runs={cases}",
        f"-seed={seed}",
        f"-timeout={max(int(timeout), 1)}",
        f"-rss_limit_mb={memory_mb}",
        f"-artifact_prefix={crash_dir}/",
        f"-max_len={4 << 20}",
        *extra,
    ]
    atheris.Setup(args, test_one_input, custom_mutator=mutator)
    atheris.Fuzz()
