"""A tiny synthetic pneumonia training set (labels.csv in the shipped data's columns) for training tests."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np


def _chest_like(rng: np.random.Generator, sick: bool) -> np.ndarray:
    """A gray 160 px 'radiograph': two dark lung fields in a bright body; pneumonia adds bright blotches."""
    img = np.full((160, 160), 170, dtype=np.uint8)
    cv2.ellipse(img, (52, 80), (28, 55), 0, 0, 360, 60, -1)
    cv2.ellipse(img, (108, 80), (28, 55), 0, 0, 360, 60, -1)
    if sick:
        for _ in range(3):
            centre = (int(rng.integers(35, 125)), int(rng.integers(40, 120)))
            cv2.circle(img, centre, int(rng.integers(8, 16)), 150, -1)
    noisy = img.astype(np.float32) + rng.normal(0, 8, img.shape)
    return np.clip(cv2.GaussianBlur(noisy, (0, 0), 1.5), 0, 255).astype(np.uint8)


def write_tiny_pneumonia_data(root: Path, count: int = 40) -> Path:
    """``count`` PNGs under ``root/images/<label>/`` and ``root/labels.csv`` (path, label, subtype,
    patient_key; two images per patient); returns ``root``."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(count):
        label, subtype = ("normal", "normal") if i % 3 == 0 else ("pneumonia", ("bacteria", "virus")[i % 2])
        rel = f"images/{label}/img{i:03d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / rel), _chest_like(rng, label != "normal"))
        rows.append({"path": rel, "label": label, "subtype": subtype, "patient_key": f"P{i // 2:03d}"})
    with open(root / "labels.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root
