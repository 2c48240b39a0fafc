"""Out-of-domain probe images for gate figures: what a chest (or fundus) model must refuse.

Real: the hip CR of ``shared/dicom`` (whole, and crops of it that look like other joints) and fundus
photographs (colour, and converted to gray so that the colour rule cannot catch them). Synthetic, seeded:
noise, smooth noise, document-like pages, knee-like drawings, gradients. Nothing here is written to disk.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from inference.preprocess import load_dicom_image, load_image_file


def probe_images(shared: Path | None = None, *, seed: int = 0, n: int = 10) -> dict[str, list[np.ndarray]]:
    """Float32 [0, 1] images by category; the real ones only when ``shared`` (the shared folder) has them."""
    rng = np.random.default_rng(seed)
    probes: dict[str, list[np.ndarray]] = {
        "noise": [rng.random((256, 256), dtype=np.float32) for _ in range(n)],
        "smooth noise": [_smooth_noise(rng) for _ in range(n)],
        "document": [document(rng) for _ in range(n)],
        "knee-like drawing": [knee_like(rng) for _ in range(n)],
        "gradient": [_gradient(rng) for _ in range(n)],
    }
    if shared is not None:
        hip_path = Path(shared) / "dicom" / "cr_hip_rle.dcm"
        if hip_path.is_file():
            hip = load_dicom_image(hip_path)
            probes["hip CR (shared/dicom)"] = [hip]
            probes["crops of the hip CR"] = _crops(hip, rng, n)
        fundus_dir = Path(shared) / "data" / "fundus-glaucoma" / "images"
        photos = sorted(fundus_dir.rglob("*.jpg"))[:n] if fundus_dir.is_dir() else []
        if photos:
            colour = [load_image_file(p) for p in photos]
            probes["fundus photo"] = colour
            probes["fundus photo, gray"] = [c.mean(axis=2).astype(np.float32) for c in colour]
    return probes


def document(rng: np.random.Generator, size: int = 512) -> np.ndarray:
    """A white page with lines of black text (cv2.putText)."""
    page = np.full((size, int(size * 0.75)), 255, dtype=np.uint8)
    words = ["Patient", "report", "findings", "normal", "dose", "mg", "2024", "page", "signed", "clinic"]
    y = 40
    while y < size - 20:
        line = " ".join(rng.choice(words, size=int(rng.integers(3, 7))))
        cv2.putText(page, line, (20, y), cv2.FONT_HERSHEY_SIMPLEX, 0.6, 0, 1, cv2.LINE_AA)
        y += int(rng.integers(22, 34))
    return page.astype(np.float32) / 255.0


def knee_like(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """Two bright bone-like shapes with a joint gap on a dark background, blurred and noisy."""
    img = np.zeros((size, size), dtype=np.float32)
    cx = size // 2 + int(rng.integers(-20, 20))
    gap = size // 2 + int(rng.integers(-15, 15))
    cv2.rectangle(img, (cx - 35, 0), (cx + 35, gap - 30), 0.75, -1)
    cv2.ellipse(img, (cx, gap - 30), (60, 28), 0, 0, 180, 0.8, -1)
    cv2.rectangle(img, (cx - 40, gap + 35), (cx + 40, size), 0.7, -1)
    cv2.ellipse(img, (cx, gap + 35), (62, 22), 0, 180, 360, 0.75, -1)
    cv2.ellipse(img, (cx, size // 2), (110, size // 2), 0, 0, 360, 0.25, 12)  # soft tissue outline
    blurred = cv2.GaussianBlur(img, (0, 0), 3)
    return np.clip(blurred + rng.normal(0, 0.03, img.shape), 0, 1).astype(np.float32)


def _smooth_noise(rng: np.random.Generator) -> np.ndarray:
    img = cv2.GaussianBlur(rng.random((256, 256), dtype=np.float32), (0, 0), 8)
    return _unit(img)


def _gradient(rng: np.random.Generator) -> np.ndarray:
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:256, 0:256].astype(np.float32) / 255.0
    return _unit(np.cos(angle) * xx + np.sin(angle) * yy) * 0.8 + 0.1


def _unit(img: np.ndarray) -> np.ndarray:
    lo, hi = float(img.min()), float(img.max())
    return ((img - lo) / (hi - lo if hi > lo else 1.0)).astype(np.float32)


def _crops(image: np.ndarray, rng: np.random.Generator, n: int) -> list[np.ndarray]:
    h, w = image.shape[:2]
    out = []
    for _ in range(n):
        side = int(min(h, w) * rng.uniform(0.35, 0.7))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        out.append(image[y : y + side, x : x + side])
    return out


def training_negatives(shared: Path | None = None, *, seed: int = 1000, n: int = 40) -> list[np.ndarray]:
    """Non-radiographs to train the gate's in-distribution classifier.

    Disjoint from :func:`probe_images` where it can be: other seeds, fundus photographs from the 21st on (the
    probes use the first ten), and nothing from the hip CR, so the hip figures stay an honest test.
    """
    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    for _ in range(n):
        out.append(rng.random((256, 256), dtype=np.float32))
        out.append(np.clip(rng.normal(0.5, rng.uniform(0.05, 0.3), (256, 256)), 0, 1).astype(np.float32))
        out.append(
            _unit(cv2.GaussianBlur(rng.random((256, 256), dtype=np.float32), (0, 0), rng.uniform(2, 16)))
        )
        out.append(document(rng))
        out.append(knee_like(rng))
        out.append(_gradient(rng))
    if shared is not None:
        fundus_dir = Path(shared) / "data" / "fundus-glaucoma" / "images"
        photos = sorted(fundus_dir.rglob("*.jpg"))[20 : 20 + 3 * n] if fundus_dir.is_dir() else []
        for path in photos:
            gray = load_image_file(path).mean(axis=2).astype(np.float32)
            out.append(gray)
            out.extend(_crops(gray, rng, 1))
    return out
