"""Which genuine fundus photographs does the shipped glaucoma model's input-consistency gate refuse, and why?

    .venv/bin/python bench/glaucoma_gate.py [--limit N] [--variations a,b,...] [--json PATH] [--no-samples]
        [--bundle FOLDER]

The model is loaded as ``gateway predict`` loads it (:class:`inference.registry.ModelRegistry`, shipped
bundle ``glaucoma``) and every image goes through :meth:`BundleModel.check_input`, the served gate: rule gate,
SSIM to the average image, colour/texture Mahalanobis distance, embedding Mahalanobis distance, domain
classifier, in that order (the first refusal is the verdict). The refusing check, its value and its bound
are parsed from the served reason. Beside the verdict every stage is measured once more with the public
functions of :mod:`inference.gates` on a separate adapter, so passing images show their margin too and an
image refused by an early check shows whether later checks would also have refused it (``also``).

Inputs (research-only data of ``../shared/data``, read in place, nothing written into the repository):

1. the validation split of ``fundus-glaucoma``, selected as :mod:`training.glaucoma.recipe` selects it
   (binary labels, :func:`training.data.split_indices` with the bundle's training seed), unmodified and
   under seeded camera variations (:data:`VARIATIONS`, 2-4 strengths each);
2. ``fundus-disc-samples``: full photographs (column ``fundus``) per ``database`` (19 other cameras), and
   the ``onh`` disc crops as one group.

Margin = value / bound: below 1 refuses for SSIM, domain score and saturation (lower bounds), above 1 for
the distances (upper bounds). ``--json`` writes every per-image record.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data"
GLAUCOMA_DATA = DATA / "fundus-glaucoma"
SAMPLES_DATA = DATA / "fundus-disc-samples"
SEED = 0

from inference.bundle import BundleModel, reduce_image  # noqa: E402
from inference.gates.domain import DomainGate  # noqa: E402
from inference.gates.fundus import FundusDiscAdapter, crop_features, ssim, ssim_view  # noqa: E402
from inference.gates.rules import measure  # noqa: E402
from inference.metadata import METADATA_FILE, TFLITE_FILE  # noqa: E402
from inference.preprocess import load_image_file  # noqa: E402
from inference.registry import ModelRegistry  # noqa: E402
from inference.runners import TfliteRunner  # noqa: E402
from training.camera import VARIATIONS  # noqa: E402
from training.data import DEFAULT_SEED, labels_csv, read_labels, split_indices  # noqa: E402
from training.glaucoma.recipe import binary_label  # noqa: E402

# ---------------------------------------------------------------------------------------------------------
# The served verdict, parsed. Each pattern: check name, regex with (value, bound).

REASONS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("rule-blank", re.compile(r"gray-level SD ([-\d.]+) < ([-\d.]+)")),
    ("rule-gray", re.compile(r"saturation ([-\d.]+) <= ([-\d.]+)")),
    ("ssim", re.compile(r"SSIM ([-\d.]+) with the average < ([-\d.]+)")),
    ("colour", re.compile(r"Mahalanobis distance ([-\d.]+) > ([-\d.]+)")),
    ("embedding", re.compile(r"network feature distance ([-\d.]+) > ([-\d.]+)")),
    ("domain", re.compile(r"domain classifier score ([-\d.]+) < ([-\d.]+)")),
)


def parse_reason(reason: str) -> tuple[str, float | None, float | None]:
    """(check, value, bound) of a served refusal; ("other", None, None) when no pattern matches."""
    for check, pattern in REASONS:
        if match := pattern.search(reason):
            return check, float(match.group(1)), float(match.group(2))
    return "other", None, None


@dataclass
class Record:
    """One image through the gate."""

    group: str  # e.g. "validation", "brightness x0.6", "db HRF", "onh crops"
    path: str
    shape: tuple[int, ...]
    passed: bool
    reason: str | None = None
    check: str | None = None  # the served refusal's check
    value: float | None = None
    bound: float | None = None
    kind: str = ""  # "full" or "disc", as the localiser decided
    measures: dict[str, float] = field(default_factory=dict)  # every stage, measured here
    also: list[str] = field(default_factory=list)  # every stage that would refuse, in served order

    @property
    def margin(self) -> float | None:
        """Value / bound of the served refusal, from the unrounded measure when there is one."""
        key = {"rule-blank": "gray_std", "rule-gray": "saturation"}.get(self.check or "", self.check or "")
        value, bound = self.measures.get(key, self.value), self.measures.get(f"{key}_bound", self.bound)
        return None if value is None or not bound else value / bound


class GateAudit:
    """The served model plus a separate measurement of every gate stage."""

    def __init__(self, model: BundleModel) -> None:
        self.model = model
        meta = model.metadata
        self.adapter = FundusDiscAdapter(model.path, meta.input_size)
        self.runner = TfliteRunner(model.path / TFLITE_FILE)
        self.domain = DomainGate(model.path, meta.domain_gate) if meta.domain_gate is not None else None

    def measure(self, image: np.ndarray) -> tuple[str, dict[str, float], list[str]]:
        """Localiser kind, every stage's value and bound, and the stages that would refuse."""
        bounds, gate = self.model.metadata.gate, self.adapter.gate
        work = self.adapter.working_image(image)
        location, crop = self.adapter.analyse(image)
        rules = measure(reduce_image(work), foreground=bounds.foreground)
        stats = gate.stats[location.kind]
        m = {
            "gray_std": rules.gray_std,
            "gray_std_bound": bounds.blank_std,
            "saturation": rules.saturation,
            "saturation_bound": bounds.colour_saturation,
            "ssim": ssim(ssim_view(work, location.kind, gate.view), stats.mean_view),
            "ssim_bound": stats.ssim_min,
            "colour": stats.distance(crop_features(crop)),
            "colour_bound": stats.distance_max,
        }
        if gate.embedding is not None:
            features = self.runner(crop[np.newaxis]).features
            assert features is not None
            m["embedding"] = gate.embedding.distance(features[0])
            m["embedding_bound"] = gate.embedding.distance_max
        if self.domain is not None:
            m["domain"] = self.domain.score(reduce_image(work))
            m["domain_bound"] = self.domain.spec.min_score
        refusing = [
            name
            for name, refused in (
                ("rule-blank", m["gray_std"] < m["gray_std_bound"]),
                ("rule-gray", m["saturation"] <= m["saturation_bound"]),
                ("ssim", m["ssim"] < m["ssim_bound"]),
                ("colour", m["colour"] > m["colour_bound"]),
                ("embedding", m.get("embedding", 0.0) > m.get("embedding_bound", np.inf)),
                ("domain", m.get("domain", 1.0) < m.get("domain_bound", -np.inf)),
            )
            if refused
        ]
        return location.kind, m, refusing

    def record(self, group: str, path: str, image: np.ndarray) -> Record:
        try:
            reason = self.model.check_input(image)
        except Exception as exc:  # as inference.model.assess reports it
            reason = f"input check failed: {type(exc).__name__}: {exc}"
        kind, measures, refusing = self.measure(image)
        rec = Record(group, path, tuple(image.shape), reason is None, reason, kind=kind)
        rec.measures, rec.also = {k: round(float(v), 5) for k, v in measures.items()}, refusing
        if reason is not None:
            rec.check, rec.value, rec.bound = parse_reason(reason)
        return rec


# ---------------------------------------------------------------------------------------------------------
# Inputs


def validation_paths(model: BundleModel, limit: int | None) -> list[str]:
    """Paths of the validation split, as training.glaucoma.recipe.train splits fundus-glaucoma."""
    rows = read_labels(labels_csv(GLAUCOMA_DATA))
    labelled = [(row["path"], binary_label(row.get("label", ""))) for row in rows]
    kept = [(p, y) for p, y in labelled if y is not None]
    y = np.asarray([label for _, label in kept], dtype=np.int64)
    training = json.loads((model.path / METADATA_FILE).read_text()).get("training", {})
    seed, val_fraction = int(training.get("seed", DEFAULT_SEED)), float(training.get("val_fraction", 0.2))
    _, va = split_indices(y, val_fraction=val_fraction, seed=seed)
    paths = [kept[i][0] for i in va]
    return paths[:limit] if limit is not None else paths


def sample_paths() -> list[tuple[str, str]]:
    """(group, path) of the fundus-disc-samples: full photographs per database, then the disc crops."""
    rows = read_labels(labels_csv(SAMPLES_DATA))
    full = sorted({(f"db {r['database']}", r["fundus"]) for r in rows if r.get("fundus")})
    crops = sorted({("onh crops", r["onh"]) for r in rows if r.get("onh")})
    return full + crops


def variation_rng(name: str, path: str) -> np.random.Generator:
    """Seeded per (variation, image), so a subset or another order gives the same images."""
    return np.random.default_rng([SEED, zlib.crc32(name.encode()), zlib.crc32(path.encode())])


def run_validation(
    audit: GateAudit, paths: Sequence[str], variations: Sequence[str], progress: bool
) -> Iterable[Record]:
    for n, rel in enumerate(paths, 1):
        original = load_image_file(GLAUCOMA_DATA / rel)
        yield audit.record("validation", rel, original)
        for name in variations:
            fn, strengths = VARIATIONS[name]
            for label, strength in strengths.items():
                image = fn(original.copy(), strength, variation_rng(f"{name} {label}", rel))
                yield audit.record(f"{name} {label}", rel, image.astype(np.float32))
        if progress and n % 10 == 0:
            print(f"  {n}/{len(paths)} validation images", file=sys.stderr, flush=True)


def run_samples(audit: GateAudit) -> Iterable[Record]:
    for group, rel in sample_paths():
        yield audit.record(group, rel, load_image_file(SAMPLES_DATA / rel))


# ---------------------------------------------------------------------------------------------------------
# Report


def summarise(records: Sequence[Record]) -> list[dict[str, Any]]:
    """One row per group, in first-seen order: counts, refusals by check, median margin per check."""
    groups: dict[str, list[Record]] = defaultdict(list)
    for rec in records:
        groups[rec.group].append(rec)
    rows = []
    for group, recs in groups.items():
        refused = [r for r in recs if not r.passed]
        checks = Counter(r.check for r in refused)
        margins = {
            check: float(np.median([r.margin for r in refused if r.check == check and r.margin is not None]))
            for check in checks
            if any(r.check == check and r.margin is not None for r in refused)
        }
        rows.append(
            {
                "group": group,
                "n": len(recs),
                "refused": len(refused),
                "rate": len(refused) / len(recs),
                "checks": dict(checks.most_common()),
                "median_margin": margins,
                "also": dict(Counter(c for r in refused for c in r.also).most_common()),
                "disc_kind": sum(r.kind == "disc" for r in recs),
            }
        )
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Refusals per group: served check (median value/bound), then every stage that would refuse."""
    head = (
        f"{'group':<26} {'n':>4} {'refused':>7} {'rate':>6} {'as disc':>7}  served check (median value/bound)"
    )
    lines = [head, "-" * len(head)]
    for row in rows:
        margins = row["median_margin"]
        served = ", ".join(f"{c} {k} ({margins.get(c, float('nan')):.2f})" for c, k in row["checks"].items())
        also = ", ".join(f"{c} {k}" for c, k in row["also"].items())
        counts = f"{row['n']:>4} {row['refused']:>7} {100 * row['rate']:>5.1f}% {row['disc_kind']:>7}"
        lines.append(f"{row['group']:<26} {counts}  {served}" + (f"  | all failing: {also}" if also else ""))
    return "\n".join(lines)


#: Gate stage (its measure's key) -> True when its bound is a lower bound.
STAGES = {
    "saturation": True,
    "ssim": True,
    "colour": False,
    "embedding": False,
    "domain": True,
}


def near_misses(records: Sequence[Record], sets: dict[str, Callable[[Record], bool]]) -> str:
    """Per set of images and stage: worst margin (value/bound), how many lie within 10 % inside the bound
    and how many beyond it; shows which stage sets the refusal rate of genuine photographs."""
    head = f"{'images':<22} {'n':>5}  " + "  ".join(f"{s + ' worst/near/out':>24}" for s in STAGES)
    lines = [head, "-" * len(head)]
    for name, keep in sets.items():
        chosen = [r for r in records if keep(r)]
        cells = []
        for stage, lower in STAGES.items():
            m = np.array(
                [r.measures[stage] / r.measures[f"{stage}_bound"] for r in chosen if stage in r.measures]
            )
            if m.size == 0:
                cells.append(f"{'-':>24}")
                continue
            worst = float(m.min() if lower else m.max())
            near = int(((m < 1.1) & (m >= 1)).sum() if lower else ((m > 0.9) & (m <= 1)).sum())
            out = int((m < 1).sum() if lower else (m > 1).sum())
            cells.append(f"{f'{worst:.2f} / {near} / {out}':>24}")
        lines.append(f"{name:<22} {len(chosen):>5}  " + "  ".join(cells))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--limit", type=int, default=None, help="validation images (default: the whole split)"
    )
    parser.add_argument("--variations", default=",".join(VARIATIONS), help="comma-separated; '' for none")
    parser.add_argument("--json", type=Path, default=None, help="write every per-image record here")
    parser.add_argument("--no-samples", action="store_true", help="skip fundus-disc-samples")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument(
        "--bundle", type=Path, default=None, help="a glaucoma bundle folder (default: the shipped one)"
    )
    args = parser.parse_args(argv)
    variations = [v for v in args.variations.split(",") if v]
    if unknown := sorted(set(variations) - set(VARIATIONS)):
        parser.error(f"unknown variation(s) {unknown}; known: {', '.join(VARIATIONS)}")

    model = BundleModel(args.bundle) if args.bundle else ModelRegistry().get("glaucoma")
    if not isinstance(model, BundleModel):
        parser.error("the shipped glaucoma bundle is missing")
    audit = GateAudit(model)
    started = time.monotonic()
    paths = validation_paths(model, args.limit)
    records = list(run_validation(audit, paths, variations, not args.quiet))
    if not args.no_samples:
        records += list(run_samples(audit))
    seconds = time.monotonic() - started
    rows = summarise(records)
    agree = sum((not r.passed) == bool(r.also) and (r.passed or r.check == r.also[0]) for r in records)
    print(f"glaucoma {model.info.version}: {len(records)} gate runs in {seconds:.0f} s")
    print(format_table(rows))
    print(f"served verdict and first refusing stage measured here agree on {agree}/{len(records)} images")
    print("\nmargins of every stage (value/bound; worst, within 10 % of the bound, beyond it):")
    sets: dict[str, Callable[[Record], bool]] = {
        "validation unmodified": lambda r: r.group == "validation",
        "validation varied": lambda r: (
            r.group not in ("validation", "onh crops") and not r.group.startswith("db ")
        ),
        "other databases": lambda r: r.group.startswith("db "),
        "onh crops": lambda r: r.group == "onh crops",
    }
    print(near_misses(records, sets))
    result = {
        "model": model.info.name,
        "version": model.info.version,
        "seconds": round(seconds, 1),
        "summary": rows,
        "records": [asdict(r) | {"margin": r.margin} for r in records],
    }
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
        print(f"per-image records: {args.json}")
    return result


if __name__ == "__main__":
    main()
