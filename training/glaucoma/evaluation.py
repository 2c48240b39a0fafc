"""Figures for the glaucoma model card: external crops, localiser hit rate, gate false rejections and
out-of-domain passes, speed, a small localiser montage, and the card itself.

Sibling folders of the training data are used when present (``../fundus-disc-samples``,
``../chest-xray-pneumonia``, ``../../dicom``); synthetic out-of-domain images are generated here, seeded.
Everything derived (PNGs, the card) goes to the card's folder; no data image is copied.
"""

from __future__ import annotations

import csv
import logging
import time
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from inference.bundle import BundleModel
from inference.model import assess
from inference.optic_disc import DiscLocation, locate_disc
from inference.preprocess import load_any, load_image_file
from training.cards.metrics import (
    auc_ci,
    binary_metrics,
    wilson_ci,
)

logger = logging.getLogger(__name__)

DISC_SAMPLES = "fundus-disc-samples"
CHEST = "chest-xray-pneumonia"
N_SYNTHETIC = 40
N_CHEST = 200


def disc_samples_rows(data: Path) -> list[dict[str, str]]:
    path = data.parent / DISC_SAMPLES / "labels.csv"
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def localiser_figures(data: Path) -> dict[str, Any]:
    """Share of fundus-disc-samples photographs whose detected disc centre lies in the true disc (mask, else
    box), and how often full photographs and disc crops are told apart correctly."""
    root = data.parent / DISC_SAMPLES
    hits, n, full_ok, full_n, crop_ok, crop_n = 0, 0, 0, 0, 0, 0
    for row in disc_samples_rows(data):
        if row.get("onh"):
            crop_n += 1
            crop_ok += locate_disc(load_image_file(root / row["onh"])).kind == "disc"
        if not row.get("fundus"):
            continue
        loc = locate_disc(load_image_file(root / row["fundus"]))
        full_n += 1
        full_ok += loc.kind == "full"
        if row.get("od_mask"):
            mask: np.ndarray = np.asarray(cv2.imread(str(root / row["od_mask"]), cv2.IMREAD_GRAYSCALE)) > 0
            y = min(max(int(loc.cy), 0), mask.shape[0] - 1)
            x = min(max(int(loc.cx), 0), mask.shape[1] - 1)
            hits += bool(mask[y, x])
            n += 1
        elif row.get("od_x0"):
            box = [float(row[k]) for k in ("od_x0", "od_y0", "od_x1", "od_y1")]
            hits += box[0] <= loc.cx <= box[2] and box[1] <= loc.cy <= box[3]
            n += 1
    return {
        "disc_hit": wilson_ci(hits, n),
        "hits": hits,
        "n": n,
        "full_as_full": f"{full_ok}/{full_n}",
        "crop_as_crop": f"{crop_ok}/{crop_n}",
    }


def external_sets(
    data: Path, databases: dict[str, list[str]] | None = None
) -> dict[str, tuple[list[np.ndarray], np.ndarray]]:
    """Labelled disc crops (``onh``) and full photographs of the other databases in fundus-disc-samples
    (``databases``, when given, receives each set's database per image)."""
    root = data.parent / DISC_SAMPLES
    sets: dict[str, tuple[list[np.ndarray], list[int]]] = {"crops": ([], []), "full": ([], [])}
    for row in disc_samples_rows(data):
        label = {"glaucoma": 1, "non-glaucoma": 0}.get(row.get("label", ""))
        if label is None or row.get("database", "").startswith("EyePACS"):
            continue
        for key, column in (("crops", "onh"), ("full", "fundus")):
            if row.get(column):
                sets[key][0].append(load_image_file(root / row[column]))
                sets[key][1].append(label)
                if databases is not None:
                    databases.setdefault(key, []).append(_database(row.get("database", "")))
    return {k: (imgs, np.asarray(ys)) for k, (imgs, ys) in sets.items()}


def _database(name: str) -> str:
    """The source database of a fundus-disc-samples row, its splits joined (REFUGE1-train and -val are one
    camera, as are ODIR's three sets and DRISHTI's two)."""
    for prefix in ("REFUGE1", "OIA-ODIR", "DRISHTI-GS1"):
        if name.startswith(prefix):
            return prefix
    return name


def camera_refusals(model: BundleModel, images: Sequence[np.ndarray]) -> dict[str, tuple[int, int]]:
    """(refused, n) of ``images`` under each fixed camera variation of :data:`training.camera.VARIATIONS`
    (unmodified first), through the served gate (seeded per image and variation)."""
    from training.camera import VARIATIONS

    out: dict[str, tuple[int, int]] = {
        "unmodified": (sum(model.check_input(im) is not None for im in images), len(images))
    }
    for name, (fn, strengths) in VARIATIONS.items():
        for label, strength in strengths.items():
            refused = 0
            for i, im in enumerate(images):
                seed = [i, zlib.crc32(f"{name} {label}".encode())]
                varied = fn(im.copy(), strength, np.random.default_rng(seed))
                refused += model.check_input(np.asarray(varied, dtype=np.float32)) is not None
            out[f"{name} {label}"] = (refused, len(images))
    return out


def score(model: BundleModel, images: Sequence[np.ndarray], y: np.ndarray) -> dict[str, Any]:
    """AUC (95 % CI) and threshold metrics on the images the gate accepts; how many it rejects."""
    assessed = assess(model, list(images))
    kept = [i for i, a in enumerate(assessed) if a.assessable]
    out: dict[str, Any] = {"n": len(y), "rejected": len(y) - len(kept)}
    probs = np.array([assessed[i].findings[0].probability for i in kept])
    if len(set(y[kept].tolist())) == 2:
        out["auc"] = auc_ci(y[kept], probs)
        out.update(binary_metrics(y[kept], probs, model.metadata.outputs[0].threshold))
    # the network alone, gate bypassed, so a gate rejection does not hide the model's behaviour
    raw = model.probabilities(list(images))[:, 0]
    if len(set(y.tolist())) == 2:
        out["auc_ungated"] = auc_ci(y, raw)
    out["y"], out["p"] = y, raw
    return out


def synthetic_ood(seed: int = 0, n: int = N_SYNTHETIC) -> dict[str, list[np.ndarray]]:
    """Seeded out-of-domain pictures: colour noise, document-like pages, natural-photo-like scenes."""
    rng = np.random.default_rng(seed)
    noise, docs, scenes = [], [], []
    for i in range(n):
        size = int(rng.choice([256, 384, 512]))
        if i % 2:
            noise.append(rng.random((size, size, 3), dtype=np.float32))
        else:
            base = rng.random(3).astype(np.float32)
            noise.append(np.clip(base + rng.normal(0, 0.2, (size, size, 3)).astype(np.float32), 0, 1))
        page = np.full((size * 4 // 3, size, 3), 245, dtype=np.uint8)
        for line in range(90, page.shape[0] - 20, 18):
            x0, x1 = 20, int(rng.integers(size // 2, size - 20))
            page[line : line + 8, x0:x1] = int(rng.choice([10, 50]))
        cv2.rectangle(page, (20, 20), (120, 70), tuple(int(v) for v in rng.integers(0, 256, 3)), thickness=-1)
        cv2.putText(page, "REPORT", (130, 60), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (200, 30, 30), 2)
        docs.append(page.astype(np.float32) / 255)
        yy = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
        sky, ground = rng.random(3).astype(np.float32), rng.random(3).astype(np.float32)
        scene = np.where(yy < rng.uniform(0.3, 0.7), sky * (1 - 0.5 * yy), ground * (0.5 + 0.5 * yy))
        scene = np.broadcast_to(scene, (size, size, 3)).copy()
        for _ in range(6):
            centre = (int(rng.integers(0, size)), int(rng.integers(0, size)))
            axes = (int(rng.integers(10, size // 3)), int(rng.integers(10, size // 3)))
            colour = tuple(float(v) for v in rng.random(3))
            cv2.ellipse(scene, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1)
        scenes.append(
            np.clip(cv2.GaussianBlur(scene, (0, 0), 2) + rng.normal(0, 0.02, scene.shape), 0, 1).astype(
                np.float32
            )
        )
    return {"colour/gray noise": noise, "document-like pages": docs, "natural-photo-like scenes": scenes}


def real_ood(data: Path, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """Chest radiographs (a seeded sample) and the shared DICOM files that are not fundus photographs."""
    out: dict[str, list[np.ndarray]] = {}
    chest = data.parent / CHEST / "labels.csv"
    if chest.is_file():
        with open(chest, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        pick = np.random.default_rng(seed).choice(len(rows), size=min(N_CHEST, len(rows)), replace=False)
        out["chest X-rays (pneumonia set)"] = [
            load_image_file(chest.parent / rows[i]["path"]) for i in sorted(pick)
        ]
    dicom = data.parent.parent / "dicom"
    files = [dicom / n for n in ("cr_hip_rle.dcm", "dx_chest_small.dcm", "cr_chest_jpegls.dcm")]
    if found := [load_any(p) for p in files if p.is_file()]:
        out["DICOM hip CR + chest DX/CR"] = found
    return out


def gate_table(
    model: BundleModel, in_domain: Mapping[str, Sequence[np.ndarray]], data: Path
) -> tuple[str, dict[str, Any]]:
    """Markdown rows: in-domain false rejections and out-of-domain passes per set, with Wilson CIs."""
    rows, figures = [], {}
    ood = {**real_ood(data), **synthetic_ood()}
    for group, sets in (("in-domain (should pass)", in_domain), ("out-of-domain (should be rejected)", ood)):
        for name, images in sets.items():
            assessed = assess(model, list(images))
            rejected = [a.reason or "" for a in assessed if not a.assessable]
            bad = len(rejected) if group.startswith("in") else len(images) - len(rejected)
            est = wilson_ci(bad, len(images))
            reasons = sorted({r.split(" (")[0].removeprefix("not assessable: ") for r in rejected})
            what = "wrongly rejected" if group.startswith("in") else "wrongly passed"
            rows.append(
                f"| {group} | {name} | {len(images)} | {bad} {what} ({est}) | {'; '.join(reasons[:3])} |"
            )
            figures[name] = {"n": len(images), "wrong": bad}
    head = "| group | set | n | errors | rejection reasons seen |\n|---|---|---|---|---|\n"
    return head + "\n".join(rows), figures


def speed(model: BundleModel, image: np.ndarray, repeats: int = 50) -> tuple[float, float]:
    """Median and fastest ms/image at batch 1 from decoded pixels: rule gate, localiser, SSIM + Mahalanobis
    gates, network (the fastest run shows the cost without other jobs competing for the CPU)."""
    assess(model, [image.copy()])
    times = []
    for _ in range(repeats):
        fresh = image.copy()  # a new object: nothing cached from the previous call
        t = time.perf_counter()
        assess(model, [fresh])
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times)), 1000 * float(np.min(times))


def montage(
    path: Path, images: Sequence[np.ndarray], locations: Sequence[DiscLocation], tile: int = 96
) -> Path:
    """Small JPEG-compressed PNG grid, detected disc centre and crop square drawn (a derived figure)."""
    tiles = []
    for image, loc in zip(images, locations, strict=True):
        h, w = image.shape[:2]
        s = tile / max(h, w)
        t = np.zeros((tile, tile, 3), dtype=np.uint8)
        small = cv2.resize(
            (image * 255).astype(np.uint8), (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA
        )
        t[: small.shape[0], : small.shape[1]] = small
        c = (round(loc.cx * s), round(loc.cy * s))
        half = round(loc.crop_side * s / 2)
        cv2.rectangle(t, (c[0] - half, c[1] - half), (c[0] + half, c[1] + half), (0, 255, 255), 1)
        cv2.drawMarker(t, c, (0, 255, 0), cv2.MARKER_CROSS, 8, 1)
        tiles.append(t)
    while len(tiles) % 6:
        tiles.append(np.zeros_like(tiles[0]))
    grid = np.vstack([np.hstack(tiles[i : i + 6]) for i in range(0, len(tiles), 6)])
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    return path
