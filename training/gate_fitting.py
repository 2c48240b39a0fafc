"""Fitting the statistical gate stages from training embeddings (offline; serving only loads the results)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from inference.gates.fundus import FundusGate, KindStats, crop_features, ssim, ssim_view
from inference.optic_disc import DiscLocation, as_rgb, crop_at

SSIM_PERCENTILE = 0.5
DISTANCE_PERCENTILE = 99.5


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


def fit_kind_stats(views: Sequence[np.ndarray], feats: np.ndarray) -> KindStats:
    """Fundus gate statistics of one input kind (average view, SSIM and distance bounds)."""
    from sklearn.covariance import LedoitWolf

    mean_view = np.mean(np.stack(views), axis=0).astype(np.float32)
    scores = [ssim(v, mean_view) for v in views]
    lw = LedoitWolf().fit(feats)
    stats = KindStats(
        mean_view, float(np.percentile(scores, SSIM_PERCENTILE)), lw.location_, lw.precision_, 0.0
    )
    distances = [stats.distance(f) for f in feats]
    return KindStats(
        mean_view,
        stats.ssim_min,
        lw.location_,
        lw.precision_,
        float(np.percentile(distances, DISTANCE_PERCENTILE)),
    )


def fit_fundus_gate(
    full: Sequence[tuple[np.ndarray, DiscLocation]],
    crops: Sequence[np.ndarray],
    size: int,
    *,
    view: int = 1,
    cameras: Sequence[tuple[np.ndarray, DiscLocation]] = (),
) -> FundusGate:
    """Gate statistics from training photographs (with their disc locations) and disc crops.

    ``cameras``: the same photographs as other cameras would take them (:func:`training.camera.random_camera`,
    located again as served), added to the kind the localiser gives them; their disc crops also join the disc
    crops. ``view``: the SSIM view (:data:`inference.gates.fundus.VIEWS`).
    """
    full_items = list(full)
    crop_list = [as_rgb(c) for c in crops]
    for im, loc in cameras:
        if loc.kind == "full":
            full_items.append((im, loc))
            crop_list.append(crop_at(as_rgb(im), loc.cx, loc.cy, loc.crop_side, size))
        else:
            h, w = im.shape[:2]
            crop_list.append(crop_at(as_rgb(im), w / 2, h / 2, min(h, w), size))
    full_crops = [crop_at(as_rgb(im), loc.cx, loc.cy, loc.crop_side, size) for im, loc in full_items]
    full_stats = fit_kind_stats(
        [ssim_view(im, "full", view) for im, _ in full_items],
        np.stack([crop_features(c) for c in full_crops]),
    )
    disc_stats = fit_kind_stats(
        [ssim_view(c, "disc", view) for c in crop_list], np.stack([crop_features(c) for c in crop_list])
    )
    return FundusGate({"full": full_stats, "disc": disc_stats}, view=view)
