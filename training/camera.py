"""Camera variation of fundus photographs: what another camera, operator or setting does to a photograph.

Used to fit the glaucoma gate's statistics on photographs as cameras vary (:func:`random_camera`, training
only) and by ``bench/glaucoma_gate.py`` to measure the served gate under fixed strengths (:data:`VARIATIONS`).
Each variation is ``f(rgb float32 in [0, 1], strength, rng) -> rgb``. Photometric ones act on the lit field
only (the black border of a camera stays black), as a camera's exposure and white balance would.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

Variation = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]


def _field(rgb: np.ndarray) -> np.ndarray:
    """Mask of the lit field of view (brightest channel above 0.04), HxWx1."""
    return (rgb.max(axis=2, keepdims=True) > 0.04).astype(np.float32)


def brightness(rgb: np.ndarray, gain: float, rng: np.random.Generator) -> np.ndarray:
    return np.clip(rgb * gain, 0, 1)


def contrast(rgb: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    mask = _field(rgb)
    mean = (rgb * mask).sum(axis=(0, 1)) / max(float(mask.sum()), 1.0)
    return np.clip((mean + (rgb - mean) * factor) * mask, 0, 1)


def gamma(rgb: np.ndarray, exponent: float, rng: np.random.Generator) -> np.ndarray:
    return np.power(np.clip(rgb, 0, 1), exponent)


def colour_temperature(rgb: np.ndarray, shift: float, rng: np.random.Generator) -> np.ndarray:
    """Per-channel gains: ``shift`` > 0 warmer (more red, less blue), < 0 cooler."""
    gains = np.array([1 + 0.5 * shift, 1.0, 1 - shift], dtype=np.float32)
    return np.clip(rgb * gains, 0, 1)


def blur(rgb: np.ndarray, sigma_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur, sigma as a fraction of the long side (1/512 = 1 px on a training photograph)."""
    sigma = sigma_fraction * max(rgb.shape[:2])
    return np.asarray(cv2.GaussianBlur(rgb, (0, 0), sigma), dtype=np.float32)


def vignetting(rgb: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Radial fall-off 1 - strength * (r / R)^2 around the image centre (R: half the short side)."""
    h, w = rgb.shape[:2]
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = ((x - w / 2) ** 2 + (y - h / 2) ** 2) / (min(h, w) / 2) ** 2
    return np.clip(rgb * np.clip(1 - strength * r2, 0, 1)[..., None], 0, 1)


def field_of_view(rgb: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A narrower camera field: the central ``fraction`` of the image enlarged back to the original size."""
    h, w = rgb.shape[:2]
    ch, cw = round(h * fraction), round(w * fraction)
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    out = cv2.resize(rgb[y0 : y0 + ch, x0 : x0 + cw], (w, h), interpolation=cv2.INTER_LINEAR)
    return np.asarray(out, dtype=np.float32)


def off_centre(rgb: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """The photograph shifted by ``fraction`` of its side in a seeded direction (black fill)."""
    h, w = rgb.shape[:2]
    angle = rng.uniform(0, 2 * np.pi)
    dx, dy = fraction * w * np.cos(angle), fraction * h * np.sin(angle)
    matrix = np.array([[1, 0, dx], [0, 1, dy]], dtype=np.float32)
    return np.asarray(cv2.warpAffine(rgb, matrix, (w, h), borderValue=0), dtype=np.float32)


def jpeg(rgb: np.ndarray, quality: float, rng: np.random.Generator) -> np.ndarray:
    bgr = cv2.cvtColor(np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    decoded = cv2.imdecode(data, cv2.IMREAD_COLOR)
    assert ok and decoded is not None
    return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB).astype(np.float32) / 255


def resolution(rgb: np.ndarray, side: float, rng: np.random.Generator) -> np.ndarray:
    """Resized to a long side of ``side`` px (area when shrinking, cubic when enlarging)."""
    h, w = rgb.shape[:2]
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    return np.clip(np.asarray(cv2.resize(rgb, size, interpolation=interpolation), dtype=np.float32), 0, 1)


#: name -> (function, strengths with their labels).
VARIATIONS: dict[str, tuple[Variation, dict[str, float]]] = {
    "brightness": (brightness, {"x0.6": 0.6, "x0.8": 0.8, "x1.25": 1.25, "x1.5": 1.5}),
    "contrast": (contrast, {"x0.6": 0.6, "x0.8": 0.8, "x1.25": 1.25, "x1.5": 1.5}),
    "gamma": (gamma, {"0.7": 0.7, "1.4": 1.4}),
    "colour": (colour_temperature, {"warm-.2": 0.2, "warm-.35": 0.35, "cool-.2": -0.2, "cool-.4": -0.4}),
    "blur": (blur, {"s1px": 1 / 512, "s2px": 2 / 512, "s4px": 4 / 512}),
    "vignetting": (vignetting, {"0.3": 0.3, "0.6": 0.6}),
    "fov": (field_of_view, {"80%": 0.8, "65%": 0.65}),
    "shift": (off_centre, {"10%": 0.10, "20%": 0.20}),
    "jpeg": (jpeg, {"q60": 60, "q30": 30}),
    "resolution": (resolution, {"384px": 384, "256px": 256, "1500px": 1500}),
}


#: Ranges :func:`random_camera` draws from, per variation (uniform; ``log`` ones uniform in the logarithm).
#: The fitted gate must accept a photograph anywhere in them: exposure and white balance of other cameras, a
#: slightly defocused or compressed photograph, another resolution, a smaller or shifted field.
RANGES: dict[str, tuple[float, float, bool]] = {
    "brightness": (0.6, 1.5, True),
    "contrast": (0.6, 1.5, True),
    "gamma": (0.7, 1.4, True),
    "colour": (-0.4, 0.35, False),
    "blur": (0.0, 4 / 512, False),
    "vignetting": (0.0, 0.6, False),
    "fov": (0.65, 1.0, False),
    "shift": (0.0, 0.2, False),
    "jpeg": (30, 95, False),
    "resolution": (256, 1500, True),
}
#: Chance that each variation is applied to a drawn camera.
APPLY = 0.35
#: The variations that keep every pixel where it was (exposure, white balance, optics, file): a disc location
#: found on the photograph still holds after them.
PHOTOMETRIC = ("vignetting", "blur", "colour", "brightness", "contrast", "gamma", "resolution", "jpeg")
ORDER = ("fov", "shift", *PHOTOMETRIC)


def draw(name: str, rng: np.random.Generator) -> float:
    low, high, log = RANGES[name]
    return float(np.exp(rng.uniform(np.log(low), np.log(high)))) if log else float(rng.uniform(low, high))


def random_camera(
    rgb: np.ndarray,
    rng: np.random.Generator,
    apply: float = APPLY,
    names: tuple[str, ...] = ORDER,
    *,
    keep_size: bool = False,
) -> np.ndarray:
    """The photograph as a random other camera might take it: each variation of ``names`` (default all of
    :data:`RANGES`) applied with chance ``apply`` at a random strength, in a fixed order (field, optics,
    sensor, file). With ``keep_size`` a ``resolution`` change is undone at the end (the pixels keep their
    place, so a disc location found on the photograph holds; the detail lost stays lost)."""
    out = np.asarray(rgb, dtype=np.float32)
    h, w = out.shape[:2]
    for name in ORDER:
        if name not in names:
            continue
        if rng.random() < apply:
            fn = VARIATIONS[name][0]
            out = np.asarray(fn(out, draw(name, rng), rng), dtype=np.float32)
    if keep_size and out.shape[:2] != (h, w):
        out = resolution(out, float(max(h, w)), rng)
    return out
