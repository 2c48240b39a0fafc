"""Fundus photographs: full field or optic-disc crop, where the optic disc is, and the disc-centred crop.

Everything works on a copy reduced to :data:`WORK_SIDE` px (long side) and takes float32 RGB in [0, 1].

* Field of view (FOV): pixels whose brightest channel exceeds a fifth of the 90th percentile (at least 0.03),
  closed, the largest component with holes filled. Its diameter is the larger extent of its bounding box, so
  a circle cut at top and bottom (EyePACS) still measures its true diameter.
* Kind: a full-field photograph has a black border: at least three of the four corner patches are dark (mean
  brightest channel below the FOV threshold); every full photograph of the shared data has four. An optic-disc
  crop is fundus to its edges, or black on one side where the disc lay near the edge of the field (two). A
  photograph without a black border (a narrower camera field, or a frame cut inside the field) is told from a
  crop by its brightest blob (:func:`disc_blob`): a hand-made crop is centred on a disc that spans about
  0.3-0.5 of its side; in a borderless photograph the disc lies off-centre (nasal) or is small. A borderless
  photograph's field of view is taken as :data:`BORDERLESS_FOV` x its long side (the field lost its black
  border somewhere below 80 % of a 45-degree field).
* Optic disc: the brightest blob inside the (eroded) FOV, weighted with vessel density (vessels converge
  on the disc). Brightness is the mean of red and green after a closing that erases vessels, minus the local
  background (illumination gradients and rim glare), blurred at the scale of a disc; vessel density is the
  green channel's black-hat, blurred at twice that scale. Score = z(brightness) + ``VESSEL_WEIGHT`` x
  z(vessel density); the disc centre is its arg-max. On fundus-disc-samples the centre falls inside the
  true disc on the share of images given in ``inference/cards/glaucoma.md``.
* Crop: a square of side ``CROP_FRACTION`` x FOV diameter (about 2.3 disc diameters, like the hand-made
  crops of ACRIMA and the original glaucoma service), zero-padded where it leaves the image.

No TensorFlow here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

InputKind = Literal["full", "disc"]

WORK_SIDE = 128
#: Disc diameter as a share of the FOV diameter (about 1/9 on 45-degree photographs).
DISC_FRACTION = 0.11
#: Side of the disc-centred crop as a share of the FOV diameter.
CROP_FRACTION = 0.25
VESSEL_WEIGHT = 0.5
_CORNER = 0.06
FULL_CORNERS = 3
#: A borderless image is a disc crop when its brightest blob lies within this share of the short side from the
#: centre and spans at least :data:`CROP_BLOB_SIZE` of it. Hand-made crops of fundus-disc-samples: 60/60 read
#: as crops; EyePACS photographs zoomed to 65 % / 70 % of the field: 56/57 and 54/57 read as photographs;
#: our own disc crops of them 56/57 (x1.0) and 53/57 (x1.3 wider) read as crops.
CROP_BLOB_OFFSET = 0.25
CROP_BLOB_SIZE = 0.25
#: Field-of-view diameter of a borderless photograph, times its long side.
BORDERLESS_FOV = 1.3


@dataclass(frozen=True)
class DiscLocation:
    """Where the optic disc is, in pixels of the original image."""

    kind: InputKind
    cx: float
    cy: float
    fov_diameter: float  # for a crop: the side of the image

    @property
    def crop_side(self) -> float:
        return CROP_FRACTION * self.fov_diameter if self.kind == "full" else self.fov_diameter

    def describe(self) -> str:
        if self.kind == "disc":
            return "input: optic-disc crop (used as given)"
        return (
            f"input: full-field photograph; optic disc located at ({self.cx:.0f}, {self.cy:.0f}) px, "
            f"FOV diameter {self.fov_diameter:.0f} px"
        )


def as_rgb(image: np.ndarray) -> np.ndarray:
    """float32 HxWx3 RGB in [0, 1] (gray is repeated, a single channel squeezed)."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] < 3:
        raise ValueError(f"expected HxW or HxWx3 image, got shape {img.shape}")
    return np.ascontiguousarray(img[..., :3])


def reduce(image: np.ndarray, side: int | None = None) -> tuple[np.ndarray, float]:
    """The image with its long side at most ``side`` (default :data:`WORK_SIDE`) px and the scale applied."""
    side = side or WORK_SIDE
    rgb = as_rgb(image)
    h, w = rgb.shape[:2]
    scale = min(1.0, side / max(h, w))
    if scale < 1.0:
        rgb = cv2.resize(
            rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA
        )
    return rgb, scale


def brightest(small: np.ndarray) -> np.ndarray:
    """Per-pixel maximum over R, G, B (faster than ``max(axis=2)`` on interleaved pixels)."""
    return np.maximum(np.maximum(small[..., 0], small[..., 1]), small[..., 2])


def fov_threshold(small: np.ndarray) -> float:
    return max(0.03, 0.2 * float(np.percentile(brightest(small), 90)))


def fov_mask(small: np.ndarray) -> np.ndarray:
    """Boolean mask of the field of view of a reduced RGB image."""
    raw = (brightest(small) > fov_threshold(small)).astype(np.uint8)
    k = max(3, round(min(raw.shape) * 0.02) | 1)
    closed = cv2.morphologyEx(raw, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(closed, connectivity=8)
    if count <= 1:
        return np.zeros(raw.shape, dtype=bool)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    mask = (labels == largest).astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(mask)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    return filled.astype(bool)


def dark_corners(small: np.ndarray) -> int:
    """How many of the four corner patches are black border."""
    h, w = small.shape[:2]
    ph, pw = max(1, round(h * _CORNER)), max(1, round(w * _CORNER))
    top = brightest(small)
    threshold = fov_threshold(small)
    patches = (top[:ph, :pw], top[:ph, -pw:], top[-ph:, :pw], top[-ph:, -pw:])
    return sum(float(p.mean()) < threshold for p in patches)


def disc_blob(small: np.ndarray) -> tuple[float, float]:
    """Diameter and distance from the image centre of the brightest blob, both as shares of the short side.

    Brightness is the mean of red and green after a closing that erases vessels, minus a wide background
    blur; the blob is the connected region above half-way between the median and the peak, around the peak.
    """
    h, w = small.shape[:2]
    side = min(h, w)
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    bright = cv2.morphologyEx((small[..., 0] + small[..., 1]) / 2, cv2.MORPH_CLOSE, k)
    local = cv2.GaussianBlur(bright - _coarse_blur(bright, side * 0.5), (0, 0), 2)
    y, x = np.unravel_index(int(np.argmax(local)), local.shape)
    peak, base = float(local[y, x]), float(np.median(local))
    above = (local > base + 0.5 * (peak - base)).astype(np.uint8)
    _, labels = cv2.connectedComponents(above)
    area = float((labels == labels[y, x]).sum())
    return 2 * float(np.sqrt(area / np.pi)) / side, float(np.hypot(x + 0.5 - w / 2, y + 0.5 - h / 2)) / side


def borderless_kind(small: np.ndarray) -> InputKind:
    """Kind of an image without a black border: "disc" for a disc-centred crop, else "full"."""
    size, offset = disc_blob(small)
    return "disc" if offset <= CROP_BLOB_OFFSET and size >= CROP_BLOB_SIZE else "full"


def input_kind(image: np.ndarray) -> InputKind:
    """ "full" for a full-field photograph (black border around a round field, or a borderless photograph),
    "disc" for a disc crop."""
    small, _ = reduce(image)
    return "full" if dark_corners(small) >= FULL_CORNERS else borderless_kind(small)


def locate_disc(image: np.ndarray) -> DiscLocation:
    """Kind of the input and, for a full photograph, the optic-disc centre (original pixel coordinates)."""
    small, scale = reduce(image)
    h, w = small.shape[:2]
    bordered = dark_corners(small) >= FULL_CORNERS
    if not bordered and borderless_kind(small) == "disc":
        return DiscLocation(kind="disc", cx=w / 2 / scale, cy=h / 2 / scale, fov_diameter=min(h, w) / scale)
    mask = fov_mask(small)
    if not mask.any():
        return DiscLocation(kind="full", cx=w / 2 / scale, cy=h / 2 / scale, fov_diameter=max(h, w) / scale)
    ys, xs = np.nonzero(mask)
    diameter = float(max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1))
    if not bordered:
        diameter = BORDERLESS_FOV * max(h, w)
    score = disc_score(small, mask, diameter)
    y, x = np.unravel_index(int(np.argmax(score)), score.shape)
    return DiscLocation(
        kind="full", cx=(x + 0.5) / scale, cy=(y + 0.5) / scale, fov_diameter=diameter / scale
    )


def disc_score(small: np.ndarray, mask: np.ndarray, diameter: float) -> np.ndarray:
    """Optic-disc likelihood map (arbitrary units, -inf outside the eroded FOV)."""
    disc = max(3.0, DISC_FRACTION * diameter)
    m8 = mask.astype(np.uint8)
    erode = max(3, round(0.04 * diameter) | 1)
    inner = cv2.erode(m8, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (erode, erode))).astype(bool)
    if not inner.any():
        inner = mask
    vessel_k = max(3, round(disc * 0.35) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (vessel_k, vessel_k))
    red, green = small[..., 0], small[..., 1]
    bright = cv2.morphologyEx((red + green) / 2, cv2.MORPH_CLOSE, kernel)
    # fill outside the FOV with the FOV mean so the border does not pull the background down near the rim
    mean = float(bright[mask].mean())
    bright = np.where(mask, bright, mean).astype(np.float32)
    background = _coarse_blur(bright, disc * 2.0)
    local = cv2.GaussianBlur(bright - background, (0, 0), sigmaX=disc / 3)
    green_filled = np.where(mask, green, float(green[mask].mean())).astype(np.float32)
    vessels = cv2.morphologyEx(green_filled, cv2.MORPH_BLACKHAT, kernel)
    density = cv2.GaussianBlur(vessels, (0, 0), sigmaX=disc * 0.75)
    score = _z(local, inner) + VESSEL_WEIGHT * _z(density, inner)
    return np.where(inner, score, -np.inf).astype(np.float32)


def _coarse_blur(values: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a wide sigma, computed at 1/4 resolution (the result is smooth anyway)."""
    h, w = values.shape
    small = cv2.resize(values, (max(1, w // 4), max(1, h // 4)), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), sigmaX=max(0.5, sigma / 4))
    return np.asarray(cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR), dtype=np.float32)


def _z(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    inside = values[mask]
    sd = float(inside.std())
    return (values - float(inside.mean())) / (sd if sd > 1e-8 else 1.0)


def crop_disc(image: np.ndarray, size: int, location: DiscLocation | None = None) -> np.ndarray:
    """The disc-centred square (``size`` x ``size`` x 3, float32): located for a full photograph, the
    centred square of a crop."""
    rgb = as_rgb(image)
    loc = location or locate_disc(rgb)
    return crop_at(rgb, loc.cx, loc.cy, loc.crop_side, size)


def crop_at(rgb: np.ndarray, cx: float, cy: float, side: float, size: int) -> np.ndarray:
    """Square of ``side`` px centred on (cx, cy), resampled to ``size`` px; zero outside the image."""
    scale = size / max(side, 1.0)
    if scale < 0.5:  # shrink first (INTER_AREA) so the warp does not alias
        h, w = rgb.shape[:2]
        pre = 2 * scale
        rgb = cv2.resize(rgb, (max(1, round(w * pre)), max(1, round(h * pre))), interpolation=cv2.INTER_AREA)
        cx, cy, side, scale = cx * pre, cy * pre, side * pre, 0.5
    matrix = np.array([[scale, 0.0, size / 2 - cx * scale], [0.0, scale, size / 2 - cy * scale]])
    out = cv2.warpAffine(rgb, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    return np.asarray(out, dtype=np.float32)


def place_on_image(patch: np.ndarray, shape: tuple[int, ...], location: DiscLocation) -> np.ndarray:
    """Map a map computed on the disc crop back onto the original image (zero elsewhere), HxW float32."""
    h, w = shape[:2]
    side = location.crop_side
    size = patch.shape[0]
    scale = size / max(side, 1.0)
    matrix = np.array(
        [[1 / scale, 0.0, location.cx - side / 2], [0.0, 1 / scale, location.cy - side / 2]], dtype=np.float64
    )
    out = cv2.warpAffine(patch.astype(np.float32), matrix, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)
    return np.asarray(out, dtype=np.float32)
