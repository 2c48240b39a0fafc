"""How the shipped chest models hold up when the radiographs are acquired or processed differently.

    .venv/bin/python bench/chest_shift.py [--model pneumonia|covid19] [--limit N]
        [--variations a,b,...] [--no-flip] [--json PATH] [--bundle FOLDER]

The validation split of the model's training data (``../shared/data``, read in place; selected as
:mod:`training.chest.recipe` selects it, with the seed in the bundle's ``model.json``) goes through the
served path, :meth:`BundleModel.check_input` (every gate stage) then :meth:`BundleModel.probabilities`
(calibrated), unmodified and under seeded variations a radiograph meets at another site: exposure (gamma),
window width, blur, quantum noise, collimation (a tighter field enlarged), a wider field (the chest smaller,
black around it), shift, rotation, JPEG compression, lower resolution, CLAHE and edge enhancement
(processing some CR/DR consoles apply). Per variation it prints how many images the gate refuses and the
model's figures on the ones it assesses: pneumonia AUC (and accuracy at the shipped threshold), covid19
3-class accuracy and macro one-vs-rest AUC.

The validation split itself is saturated (pneumonia AUC 0.998), so it cannot choose between versions; what
it can show is which acquisition differences cost the model and how much, and whether a proposed change
(here: test-time horizontal flips, ``--no-flip`` to skip) helps under those differences. With flips, every
assessed image is also run mirrored through the network (the gate is not asked again) and the figures of
the mirrored image and of the average of both are printed beside the plain ones.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data"
FOLDERS = {"pneumonia": "chest-xray-pneumonia", "covid19": "covid19-radiography"}
SEED = 0

from sklearn.metrics import roc_auc_score  # noqa: E402

from inference.bundle import BundleModel  # noqa: E402
from inference.metadata import METADATA_FILE  # noqa: E402
from inference.preprocess import load_image_file  # noqa: E402
from inference.registry import ModelRegistry  # noqa: E402
from training.chest.network import covid_split, covid_targets, pneumonia_split, pneumonia_targets  # noqa: E402
from training.data import DEFAULT_SEED, labels_csv, read_labels  # noqa: E402

Variation = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]


def _gray(image: np.ndarray) -> np.ndarray:
    x = np.asarray(image, dtype=np.float32)
    return cv2.cvtColor(x, cv2.COLOR_RGB2GRAY) if x.ndim == 3 else x


def gamma(x: np.ndarray, exponent: float, rng: np.random.Generator) -> np.ndarray:
    return np.power(np.clip(x, 0, 1), exponent)


def window(x: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    """Window width scaled by 1/``factor`` around the image mean (``factor`` > 1: more contrast)."""
    mean = float(x.mean())
    return np.clip(mean + (x - mean) * factor, 0, 1)


def blur(x: np.ndarray, sigma_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur, sigma as a fraction of the long side (1/224 = 1 px on a training radiograph)."""
    return np.asarray(cv2.GaussianBlur(x, (0, 0), sigma_fraction * max(x.shape[:2])), dtype=np.float32)


def noise(x: np.ndarray, sd: float, rng: np.random.Generator) -> np.ndarray:
    return np.clip(x + rng.normal(0.0, sd, x.shape).astype(np.float32), 0, 1)


def field(x: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """``fraction`` < 1: the central part (tighter collimation) enlarged back; > 1: the image shrunk into a
    black frame ``fraction`` times its size (a wider field, the chest smaller)."""
    h, w = x.shape[:2]
    if fraction < 1:
        ch, cw = round(h * fraction), round(w * fraction)
        y0, x0 = (h - ch) // 2, (w - cw) // 2
        return np.asarray(cv2.resize(x[y0 : y0 + ch, x0 : x0 + cw], (w, h)), dtype=np.float32)
    big = np.zeros((round(h * fraction), round(w * fraction)), dtype=np.float32)
    y0, x0 = (big.shape[0] - h) // 2, (big.shape[1] - w) // 2
    big[y0 : y0 + h, x0 : x0 + w] = x
    return np.asarray(cv2.resize(big, (w, h), interpolation=cv2.INTER_AREA), dtype=np.float32)


def shift(x: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Shifted by ``fraction`` of the side in a seeded direction (black fill)."""
    h, w = x.shape[:2]
    angle = rng.uniform(0, 2 * np.pi)
    matrix = np.array(
        [[1, 0, fraction * w * np.cos(angle)], [0, 1, fraction * h * np.sin(angle)]], np.float32
    )
    return np.asarray(cv2.warpAffine(x, matrix, (w, h), borderValue=0), dtype=np.float32)


def rotate(x: np.ndarray, degrees: float, rng: np.random.Generator) -> np.ndarray:
    """Rotated by ``degrees`` either way (seeded), black fill."""
    h, w = x.shape[:2]
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), degrees * float(rng.choice([-1.0, 1.0])), 1.0)
    return np.asarray(cv2.warpAffine(x, matrix, (w, h), borderValue=0), dtype=np.float32)


def jpeg(x: np.ndarray, quality: float, rng: np.random.Generator) -> np.ndarray:
    ok, data = cv2.imencode(".jpg", _uint8(x), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    decoded = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)
    assert ok and decoded is not None
    return decoded.astype(np.float32) / 255.0


def resolution(x: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Acquired at ``fraction`` of the resolution, then shown at the original size."""
    h, w = x.shape[:2]
    small = cv2.resize(x, (round(w * fraction), round(h * fraction)), interpolation=cv2.INTER_AREA)
    return np.asarray(cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR), dtype=np.float32)


def clahe(x: np.ndarray, clip: float, rng: np.random.Generator) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation (8 x 8 tiles), as some consoles process images."""
    out = cv2.createCLAHE(clipLimit=clip, tileGridSize=(8, 8)).apply(_uint8(x))
    return out.astype(np.float32) / 255.0


def edges(x: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    """Edge enhancement (unsharp mask, sigma 1.5 % of the long side)."""
    smooth = cv2.GaussianBlur(x, (0, 0), 0.015 * max(x.shape[:2]))
    return np.clip(x + amount * (x - smooth), 0, 1)


def _uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


#: name -> (function, {label: strength}); each labelled strength is one group of the report.
VARIATIONS: dict[str, tuple[Variation, dict[str, float]]] = {
    "gamma": (gamma, {"0.7": 0.7, "1.4": 1.4}),
    "window": (window, {"x0.75": 0.75, "x1.3": 1.3}),
    "blur": (blur, {"1 px": 1 / 224, "2 px": 2 / 224}),
    "noise": (noise, {"sd 0.03": 0.03}),
    "field": (field, {"85%": 0.85, "115%": 1.15}),
    "shift": (shift, {"6%": 0.06}),
    "rotate": (rotate, {"7 deg": 7.0}),
    "jpeg": (jpeg, {"q30": 30}),
    "resolution": (resolution, {"40%": 0.4}),
    "clahe": (clahe, {"clip 2": 2.0}),
    "edges": (edges, {"x1": 1.0}),
}


def variation_rng(name: str, path: str) -> np.random.Generator:
    """Seeded per (variation, image), so a subset or another order gives the same images."""
    return np.random.default_rng([SEED, zlib.crc32(name.encode()), zlib.crc32(path.encode())])


def validation_set(model: BundleModel, limit: int | None) -> tuple[Path, list[str], np.ndarray]:
    """Folder, paths and labels of the validation split, as the chest recipe splits the model's data.

    Labels: pneumonia 0/1, covid19 the class index (0 normal, 1 covid19, 2 viral_pneumonia)."""
    name = model.info.name
    csv_path = labels_csv(DATA / FOLDERS[name])
    rows = read_labels(csv_path)
    training = json.loads((model.path / METADATA_FILE).read_text()).get("training", {})
    seed = int(training.get("seed", DEFAULT_SEED))
    if name == "pneumonia":
        y = pneumonia_targets(rows)
        _, va = pneumonia_split(rows, y, seed)
        labels = y[va, 0].astype(np.int64)
    else:
        classes = covid_targets(rows)
        _, va = covid_split(classes, seed)
        labels = classes[va]
    paths = [rows[i]["path"] for i in va]
    if limit is not None and limit < len(paths):  # spread over the split (it is ordered by class)
        pick = np.unique(np.linspace(0, len(paths) - 1, limit).round().astype(int))
        paths, labels = [paths[i] for i in pick], labels[pick]
    return csv_path.parent, paths, labels


def figures(name: str, threshold: float, y: np.ndarray, p: np.ndarray) -> dict[str, float | None]:
    """pneumonia: AUC and accuracy at the threshold; covid19: 3-class accuracy and macro OvR AUC."""
    if len(y) == 0:
        return {"auc": None, "accuracy": None}
    if name == "pneumonia":
        score = p[:, 0]
        auc = float(roc_auc_score(y, score)) if len(set(y.tolist())) == 2 else None
        return {"auc": auc, "accuracy": float(np.mean((score >= threshold) == (y == 1)))}
    p = p[:, :3] / p[:, :3].sum(axis=1, keepdims=True)
    auc = (
        float(roc_auc_score(y, p, multi_class="ovr", labels=[0, 1, 2])) if len(set(y.tolist())) == 3 else None
    )
    return {"auc": auc, "accuracy": float(np.mean(p.argmax(axis=1) == y))}


def run_group(
    model: BundleModel, threshold: float, images: Sequence[np.ndarray], y: np.ndarray, flip: bool
) -> dict[str, Any]:
    """Gate, then calibrated outputs of the assessed images (and of their mirror images with ``flip``)."""
    reasons = [model.check_input(image) for image in images]
    kept = [i for i, reason in enumerate(reasons) if reason is None]
    p = model.probabilities([images[i] for i in kept])
    row: dict[str, Any] = {"n": len(images), "refused": len(images) - len(kept)}
    row |= figures(model.info.name, threshold, y[kept], p)
    if flip and kept:
        mirrored = model.probabilities([np.ascontiguousarray(images[i][:, ::-1]) for i in kept])
        row["auc mirrored"] = figures(model.info.name, threshold, y[kept], mirrored)["auc"]
        row["auc averaged"] = figures(model.info.name, threshold, y[kept], (p + mirrored) / 2)["auc"]
    return row


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    columns = ["n", "refused", "auc", "accuracy", "auc mirrored", "auc averaged"]
    columns = [c for c in columns if any(c in r for r in rows.values())]
    lines = [f"{'group':18s}" + "".join(f"{c:>14s}" for c in columns)]
    for group, row in rows.items():
        cells = [row.get(c) for c in columns]
        lines.append(
            f"{group:18s}"
            + "".join(
                f"{'-':>14s}" if v is None else f"{v:>14d}" if isinstance(v, int) else f"{v:>14.4f}"
                for v in cells
            )
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", choices=sorted(FOLDERS), default="pneumonia")
    parser.add_argument(
        "--limit", type=int, default=None, help="validation images (default: the whole split)"
    )
    parser.add_argument("--variations", default=",".join(VARIATIONS), help="comma-separated; '' for none")
    parser.add_argument("--no-flip", action="store_true", help="skip the mirrored runs")
    parser.add_argument("--json", type=Path, default=None, help="write the table here")
    parser.add_argument(
        "--bundle", type=Path, default=None, help="a bundle folder (default: the shipped one)"
    )
    args = parser.parse_args(argv)
    variations = [v for v in args.variations.split(",") if v]
    if unknown := sorted(set(variations) - set(VARIATIONS)):
        parser.error(f"unknown variation(s) {unknown}; known: {', '.join(VARIATIONS)}")
    model = BundleModel(args.bundle) if args.bundle else ModelRegistry().get(args.model)
    if not isinstance(model, BundleModel) or model.info.name not in FOLDERS:
        parser.error(f"no chest bundle for {args.model}")
    threshold = 0.5  # covid19 takes the class with the highest probability
    if model.info.name == "pneumonia":
        threshold = next(o.threshold for o in model.metadata.outputs if o.index == 0)

    started = time.monotonic()
    root, paths, y = validation_set(model, args.limit)
    originals = [_gray(load_image_file(root / rel)) for rel in paths]
    groups: dict[str, dict[str, Any]] = {
        "unmodified": run_group(model, threshold, originals, y, not args.no_flip)
    }
    for name in variations:
        fn, strengths = VARIATIONS[name]
        for label, strength in strengths.items():
            group = f"{name} {label}"
            images = [
                np.asarray(fn(image.copy(), strength, variation_rng(group, rel)), dtype=np.float32)
                for image, rel in zip(originals, paths, strict=True)
            ]
            groups[group] = run_group(model, threshold, images, y, not args.no_flip)
    varied = [r for g, r in groups.items() if g != "unmodified"]
    seconds = time.monotonic() - started
    name, version = model.info.name, model.info.version
    print(f"{name} {version}: {len(paths)} validation images, {len(groups)} groups, {seconds:.0f} s")
    print(format_table(groups))
    if varied:
        refused = sum(r["refused"] for r in varied)
        total = sum(r["n"] for r in varied)
        print(f"varied: refused {refused}/{total} ({100 * refused / total:.1f} %)", end="")
        for key in ("auc", "auc averaged"):
            values = [r[key] for r in varied if r.get(key) is not None]
            if values:
                print(f"; {key} mean {np.mean(values):.4f}, worst {min(values):.4f}", end="")
        print()
    result = {
        "model": model.info.name,
        "version": model.info.version,
        "images": len(paths),
        "seconds": round(seconds, 1),
        "groups": groups,
    }
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
