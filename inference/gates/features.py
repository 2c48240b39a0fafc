"""The learned stage of a chest model's gate: SSIM to an average radiograph and Mahalanobis distance of the
network's embedding (fitted offline by :mod:`training.gate_fitting`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np


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


def mahalanobis(features: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Mahalanobis distance of each row of N x D ``features``."""
    d = np.asarray(features, dtype=np.float64) - mean
    return np.sqrt(np.maximum(((d @ precision) * d).sum(axis=1), 0.0))
