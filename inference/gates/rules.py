"""Input-consistency gate: is this image the kind of picture the model was trained on?

The rule-based stage, the first of every model's gate (:mod:`inference.gates.features` is the next for the
chest models). It measures three things on a copy reduced to at most 256 px:

* gray-level standard deviation (RGB averaged): below ``blank_std`` (0.02 of full scale) the image is blank;
* colour: mean HSV saturation, (max - min) / max over R, G, B, of the foreground pixels (brightest channel
  above ``foreground`` = 0.08, so the black border of a fundus photo and noise in dark areas do not count).
  Gray images, also gray stored as RGB, measure 0; on the shared data every fundus photograph measures
  >= 0.11 (EyePACS) and the median is 0.59, every chest radiograph 0. Bound ``colour_saturation`` = 0.08;
* aspect ratio, long side / short side: a radiograph beyond 1:2.5 is a strip, a stitched or a cropped image.

Chest models reject blank images, colour images ("colour photograph, not a radiograph") and aspect ratios
beyond 1:2.5. Fundus models reject blank images and gray ones ("grayscale image, not a colour fundus
photograph"). Bounds can be overridden per model in the bundle's ``model.json`` ``"gate"`` object.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import cv2
import numpy as np

MEASURE_SIDE = 256


@dataclass(frozen=True)
class GateBounds:
    """Bounds of the rule-based gate; the defaults are documented in the module docstring."""

    colour_saturation: float = 0.08
    foreground: float = 0.08
    blank_std: float = 0.02
    max_aspect: float = 2.5

    @classmethod
    def from_mapping(cls, values: dict[str, Any] | None) -> GateBounds:
        """Bounds from a ``model.json`` ``"gate"`` object; unknown keys are an error, not silently ignored."""
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(values) - known):
            raise ValueError(f"unknown gate parameter(s) {unknown}; known: {sorted(known)}")
        return cls(**{key: float(value) for key, value in values.items()})


@dataclass(frozen=True)
class ImageMeasures:
    """What the gate looks at."""

    gray_std: float
    saturation: float
    aspect: float


def measure(image: np.ndarray, *, foreground: float = GateBounds.foreground) -> ImageMeasures:
    """Gray-level SD, foreground saturation and aspect ratio of a float image in [0, 1]."""
    img: np.ndarray = np.asarray(image, dtype=np.float32)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    h, w = img.shape[:2]
    if min(h, w) == 0:
        return ImageMeasures(gray_std=0.0, saturation=0.0, aspect=float("inf"))
    aspect = max(h, w) / min(h, w)
    scale = MEASURE_SIDE / max(h, w)
    if scale < 1:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    if img.ndim == 2:
        return ImageMeasures(gray_std=float(img.std()), saturation=0.0, aspect=aspect)
    # Per-channel slices, not reductions over the last axis of length 3 (several times slower in numpy).
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    brightest, darkest = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    mask = brightest > foreground
    saturation = float(((brightest - darkest)[mask] / brightest[mask]).mean()) if mask.any() else 0.0
    gray_std = float(((r + g + b) / np.float32(3)).std())
    return ImageMeasures(gray_std=gray_std, saturation=saturation, aspect=aspect)


def is_colour(image: np.ndarray, bounds: GateBounds | None = None) -> bool:
    """True when the image carries real colour (a photograph), False for gray and gray stored as RGB."""
    bounds = bounds or GateBounds()
    return measure(image, foreground=bounds.foreground).saturation > bounds.colour_saturation


def check_consistency(image: np.ndarray, kind: str, bounds: GateBounds | None = None) -> str | None:
    """None when ``image`` fits a model of ``kind`` ("chest" or "fundus"), else the reason it does not."""
    bounds = bounds or GateBounds()
    m = measure(image, foreground=bounds.foreground)
    if m.gray_std < bounds.blank_std:
        return f"blank image (gray-level SD {m.gray_std:.3f} < {bounds.blank_std:g})"
    if kind == "chest":
        if m.saturation > bounds.colour_saturation:
            return (
                "colour photograph, not a radiograph "
                f"(saturation {m.saturation:.2f} > {bounds.colour_saturation:g})"
            )
        if m.aspect > bounds.max_aspect:
            return f"aspect ratio 1:{m.aspect:.2f} beyond 1:{bounds.max_aspect:g}"
        return None
    if kind == "fundus":
        if m.saturation <= bounds.colour_saturation:
            return (
                "grayscale image, not a colour fundus photograph "
                f"(saturation {m.saturation:.2f} <= {bounds.colour_saturation:g})"
            )
        return None
    raise ValueError(f"unknown modality kind {kind!r}")
