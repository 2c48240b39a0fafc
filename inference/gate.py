"""Input-consistency gate: is this image the kind of picture the model was trained on?

A rule-based gate, then (chest models) :class:`FeatureGate`. The rule gate measures three things on a copy
reduced to at most 256 px:

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


# -- learned gate: SSIM to an average radiograph and Mahalanobis distance of network features ----------------


@dataclass(frozen=True)
class FeatureGate:
    """The statistical half of a chest model's gate, fitted on its training/validation images.

    * SSIM (:func:`ssim_to_reference`, as the COVID-19 service did) of the gray input at the reference's size
      with ``reference``, the average training radiograph; below ``ssim_min`` the input is rejected.
    * Mahalanobis distance of the network's embedding to the training embeddings (mean, Ledoit-Wolf
      precision); above ``mahalanobis_max`` the input is rejected.
    * Optionally a learned in-distribution classifier on the same embedding (standardised, logistic
      regression: radiographs vs synthetic and photographic non-radiographs); a score below ``classifier_min``
      is rejected.

    Both bounds are set on validation images so that few in-domain images are rejected (see the model card).
    Stored in the bundle as ``gate_stats.npz`` (see :meth:`save`, :meth:`load`).
    """

    reference: np.ndarray
    ssim_min: float
    feature_mean: np.ndarray
    feature_precision: np.ndarray
    mahalanobis_max: float
    scaler_mean: np.ndarray | None = None
    scaler_scale: np.ndarray | None = None
    classifier_coef: np.ndarray | None = None
    classifier_intercept: float = 0.0
    classifier_min: float = 0.0

    def check_ssim(self, image: np.ndarray) -> str | None:
        score = ssim_to_reference(image, self.reference)
        if score < self.ssim_min:
            return f"does not look like a chest radiograph (SSIM {score:.2f} < {self.ssim_min:.2f})"
        return None

    def check_features(self, features: np.ndarray) -> str | None:
        distance = float(mahalanobis(features[np.newaxis], self.feature_mean, self.feature_precision)[0])
        if distance > self.mahalanobis_max:
            return (
                "unlike the training radiographs "
                f"(feature distance {distance:.1f} > {self.mahalanobis_max:.1f})"
            )
        score = self.classifier_score(features[np.newaxis])
        if score is not None and score[0] < self.classifier_min:
            return (
                "not recognised as a chest radiograph "
                f"(in-distribution score {score[0]:.2f} < {self.classifier_min:.2f})"
            )
        return None

    def classifier_score(self, features: np.ndarray) -> np.ndarray | None:
        """P(radiograph) of N x D embeddings from the learned classifier, or None without one."""
        if self.classifier_coef is None or self.scaler_mean is None or self.scaler_scale is None:
            return None
        z = (np.asarray(features, dtype=np.float64) - self.scaler_mean) / self.scaler_scale
        return np.asarray(1.0 / (1.0 + np.exp(-(z @ self.classifier_coef + self.classifier_intercept))))

    def save(self, path: Any) -> None:
        arrays: dict[str, np.ndarray] = {
            "reference": self.reference.astype(np.float32),
            "ssim_min": np.asarray(self.ssim_min),
            "feature_mean": self.feature_mean.astype(np.float64),
            "feature_precision": self.feature_precision.astype(np.float32),
            "mahalanobis_max": np.asarray(self.mahalanobis_max),
        }
        if self.classifier_coef is not None:
            arrays["scaler_mean"] = np.asarray(self.scaler_mean, dtype=np.float64)
            arrays["scaler_scale"] = np.asarray(self.scaler_scale, dtype=np.float64)
            arrays["classifier_coef"] = self.classifier_coef.astype(np.float64)
            arrays["classifier_intercept"] = np.asarray(self.classifier_intercept)
            arrays["classifier_min"] = np.asarray(self.classifier_min)
        np.savez(path, **arrays)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: Any) -> FeatureGate:
        with np.load(path) as z:
            return cls(
                reference=z["reference"].astype(np.float32),
                ssim_min=float(z["ssim_min"]),
                feature_mean=z["feature_mean"],
                feature_precision=z["feature_precision"].astype(np.float64),
                mahalanobis_max=float(z["mahalanobis_max"]),
                **(
                    {}
                    if "classifier_coef" not in z
                    else {
                        "scaler_mean": z["scaler_mean"],
                        "scaler_scale": z["scaler_scale"],
                        "classifier_coef": z["classifier_coef"],
                        "classifier_intercept": float(z["classifier_intercept"]),
                        "classifier_min": float(z["classifier_min"]),
                    }
                ),
            )


def gray_at(image: np.ndarray, size: int) -> np.ndarray:
    """Float32 gray ``size`` x ``size`` (RGB averaged, INTER_AREA)."""
    img: np.ndarray = np.asarray(image, dtype=np.float32)
    if img.ndim == 3:
        img = img[..., :3].mean(axis=2) if img.shape[2] >= 3 else img[..., 0]
    return np.asarray(cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA), dtype=np.float32)


def ssim_to_reference(image: np.ndarray, reference: np.ndarray) -> float:
    """Structural similarity (skimage, data range 1) of the gray image at the reference's size."""
    from skimage.metrics import structural_similarity

    return float(structural_similarity(gray_at(image, reference.shape[0]), reference, data_range=1.0))


def fit_feature_stats(features: np.ndarray, *, ridge: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """Mean and precision matrix of N x D embeddings: Ledoit-Wolf covariance plus a ridge.

    The ridge (``ridge`` x the mean variance on the diagonal) bounds the precision of near-constant
    dimensions (dead ReLUs), which would otherwise turn float round-off between Keras and TFLite, or between
    uint8 and float input, into large distances.
    """
    from sklearn.covariance import LedoitWolf

    lw = LedoitWolf().fit(np.asarray(features, dtype=np.float64))
    cov = lw.covariance_
    cov = cov + ridge * float(np.trace(cov)) / len(cov) * np.eye(len(cov))
    return lw.location_, np.linalg.inv(cov)


def fit_classifier(
    positives: np.ndarray, negatives: np.ndarray, *, c: float = 0.01
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Standardised logistic regression, radiographs (1) vs non-radiographs (0), balanced classes.

    Returns ``(scaler_mean, scaler_scale, coef, intercept)`` for :class:`FeatureGate`.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x = np.concatenate([positives, negatives]).astype(np.float64)
    y = np.r_[np.ones(len(positives)), np.zeros(len(negatives))]
    scaler = StandardScaler().fit(x)
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    clf = LogisticRegression(C=c, class_weight="balanced", max_iter=3000).fit((x - scaler.mean_) / scale, y)
    return scaler.mean_, scale, clf.coef_[0], float(clf.intercept_[0])


def mahalanobis(features: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Mahalanobis distance of each row of N x D ``features``."""
    d = np.asarray(features, dtype=np.float64) - mean
    return np.sqrt(np.maximum(((d @ precision) * d).sum(axis=1), 0.0))
