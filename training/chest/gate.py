"""The chest models' gate, fitted after training: SSIM reference, embedding statistics, in-distribution
classifier (:class:`inference.gates.features.FeatureGate`) and the domain classifier."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from inference.bundle import reduce_image
from inference.gates.features import FeatureGate, gray_at, mahalanobis, ssim_to_reference
from inference.preprocess import load_dicom_image, to_model_input
from training.data import labels_csv, load_images, read_labels
from training.domain_gate import DomainFit, epochs_for, fit_domain_gate, partial_views
from training.export import predict_with_features
from training.gate_fitting import fit_classifier, fit_feature_stats
from training.probes import training_negatives
from training.recipes import TrainConfig

logger = logging.getLogger(__name__)

GATE_FILE = "gate_stats.npz"
REFERENCE_SIZE = 64
#: SSIM bound: half the SSIM of the 0.5th percentile of validation radiographs. The SSIM of an input with
#: the average PA radiograph is a coarse test, meant to catch pages, noise and other gross misfits; the
#: later stages do the rest.
SSIM_QUANTILE, SSIM_FACTOR = 0.005, 0.5
#: Embedding-distance bound: the 99.9th percentile of validation (<= 0.1 % of in-domain images rejected).
DISTANCE_QUANTILE = 0.001
#: Real frontal chest DICOMs of other vendors the gate must accept (see :func:`_fit_gate`). The lateral
#: ``dx_chest_small.dcm`` is not one: the models read frontal views, so the gate must refuse it (model card).
REFERENCE_CHEST_DICOMS = ("cr_chest_jpegls.dcm",)
LATERAL_CHEST_DICOM = "dx_chest_small.dcm"
#: Layers whose global-average-pooled activations form the gate's embedding (low- to high-level).
GATE_LAYERS = ("b1a_relu", "b2b_relu", "b3b_relu", "last_conv_relu")
#: Per synthetic kind, negatives for the domain classifier (6 kinds, plus gray fundus photographs and crops).
DOMAIN_NEGATIVES = 120
#: Data folder -> the other chest data set whose images also define "a chest radiograph" for the gate.
SIBLING_DATA = {
    "chest-xray-pneumonia": "covid19-radiography",
    "covid19-radiography": "chest-xray-pneumonia",
}  # each statistical check may reject at most this share of validation images


def fit_gate(
    config: TrainConfig,
    net: Any,
    x_tr: np.ndarray,
    x_va: np.ndarray,
    feats_tr: np.ndarray,
    feats_va: np.ndarray,
) -> tuple[FeatureGate, DomainFit]:
    """SSIM reference and feature statistics from the training images, bounds from validation; then the
    domain classifier (:mod:`inference.gates.domain`) on the same radiographs.

    The gate asks "is this a chest radiograph?", not "is this a child from Guangzhou?": the other chest
    dataset beside ``config.data`` (:data:`SIBLING_DATA`), when present, joins both sides (80 % to the
    statistics, 20 % to the bounds, seeded), so adults pass the pediatric model's gate and vice versa.
    """
    size = input_size(net)
    sibling = _sibling_images(config, size)
    if sibling is not None:
        order = np.random.default_rng(config.seed).permutation(len(sibling))
        cut = int(0.8 * len(order))
        s_tr, s_va = sibling[np.sort(order[:cut])], sibling[np.sort(order[cut:])]
        x_tr, x_va = np.concatenate([x_tr, s_tr]), np.concatenate([x_va, s_va])
        feats_tr = np.concatenate([feats_tr, predict_with_features(net, s_tr, layers=GATE_LAYERS)[1]])
        feats_va = np.concatenate([feats_va, predict_with_features(net, s_va, layers=GATE_LAYERS)[1]])
    reference = np.mean([gray_at(img.astype(np.float32) / 255.0, REFERENCE_SIZE) for img in x_tr], axis=0)
    reference = reference.astype(np.float32)
    ssim = np.array([ssim_to_reference(img.astype(np.float32) / 255.0, reference) for img in x_va])
    mean, precision = fit_feature_stats(feats_tr)
    distances = mahalanobis(feats_va, mean, precision)
    negatives = training_negatives(shared_root(config.data), seed=config.seed)
    x_neg = np.stack(
        [np.rint(to_model_input(img, size, 1)[..., 0] * 255).astype(np.uint8) for img in negatives]
    )
    feats_neg = predict_with_features(net, x_neg, layers=GATE_LAYERS)[1]
    scaler_mean, scaler_scale, coef, intercept = fit_classifier(feats_tr, feats_neg)
    partial = FeatureGate(reference, 0.0, mean, precision, 0.0, scaler_mean, scaler_scale, coef, intercept)
    scores = partial.classifier_score(feats_va)
    assert scores is not None
    logger.info("gate classifier: %d radiographs vs %d negatives", len(feats_tr), len(feats_neg))
    ssim_min = SSIM_FACTOR * float(np.quantile(ssim, SSIM_QUANTILE))
    distance_max = float(np.quantile(distances, 1 - DISTANCE_QUANTILE))
    score_min = float(np.quantile(scores, DISTANCE_QUANTILE))
    # The real frontal chest DICOM of another vendor (shared/dicom) must pass: the bounds give way to it with
    # a margin, so it is a calibration example, not an independent test of the gate.
    for image in reference_chests(shared_root(config.data)):
        x = to_model_input(reduce_image(image), size, 1)
        ssim_min = min(ssim_min, 0.9 * ssim_to_reference(x, reference))
        x8 = np.rint(x[np.newaxis, ..., 0] * 255).astype(np.uint8)
        feats = predict_with_features(net, x8, layers=GATE_LAYERS)[1]
        distance_max = max(distance_max, 1.05 * float(mahalanobis(feats, mean, precision)[0]))
        score = partial.classifier_score(feats)
        assert score is not None
        score_min = min(score_min, 0.5 * float(score[0]))
    domain = _fit_domain(config, x_tr, x_va)
    return FeatureGate(
        reference=reference,
        ssim_min=ssim_min,
        feature_mean=mean,
        feature_precision=precision,
        mahalanobis_max=distance_max,
        scaler_mean=scaler_mean,
        scaler_scale=scaler_scale,
        classifier_coef=coef,
        classifier_intercept=intercept,
        classifier_min=score_min,
    ), domain


def _fit_domain(config: TrainConfig, x_tr: np.ndarray, x_va: np.ndarray) -> DomainFit:
    """The whole-chest-radiograph classifier: these radiographs vs partial views and non-radiographs."""
    negatives = training_negatives(shared_root(config.data), seed=config.seed + 1, n=DOMAIN_NEGATIVES)
    order = np.random.default_rng(config.seed + 1).permutation(len(negatives))
    cut = int(0.8 * len(order))
    # Partial views of the radiographs (one for every two) join each side's negatives.
    rng = np.random.default_rng(config.seed)
    fit = fit_domain_gate(
        x_tr,
        x_va,
        [negatives[i] for i in order[:cut]] + partial_views(x_tr, rng, len(x_tr) // 2),
        [negatives[i] for i in order[cut:]] + partial_views(x_va, rng, len(x_va) // 2),
        seed=config.seed,
        epochs=epochs_for(config.epochs),
        must_pass=[reduce_image(image) for image in reference_chests(shared_root(config.data))],
    )
    logger.info(
        "domain classifier: %d radiographs vs %d negatives; bound %.4f", *fit.n_train, fit.spec.min_score
    )
    return fit


def reference_chests(shared: Path | None) -> list[np.ndarray]:
    """The real chest radiographs of ``shared/dicom`` (other vendors than the training data), if present."""
    if shared is None:
        return []
    paths = [shared / "dicom" / name for name in REFERENCE_CHEST_DICOMS]
    return [load_dicom_image(p) for p in paths if p.is_file()]


def shared_root(data: Path) -> Path | None:
    """The shared folder (``<shared>/data/<set>/labels.csv``) when it has ``dicom/`` beside ``data/``."""
    root = labels_csv(data).parent.parent.parent
    return root if (root / "dicom").is_dir() else None


def input_size(net: Any) -> int:
    """The square input side of a trained network."""
    return int(net.input_shape[1])


def _sibling_images(config: TrainConfig, size: int) -> np.ndarray | None:
    data_dir = labels_csv(config.data).parent
    name = SIBLING_DATA.get(data_dir.name)
    if name is None or not (data_dir.parent / name / "labels.csv").is_file():
        return None
    rows = read_labels(data_dir.parent / name / "labels.csv")
    logger.info("gate statistics also from %d images of %s", len(rows), name)
    return load_images(data_dir.parent / name, [r["path"] for r in rows], size)


def gate_report(
    model: Any, groups: dict[str, Sequence[np.ndarray]]
) -> dict[str, tuple[int, int, dict[str, int]]]:
    """Per group: (passed, total, rejection reasons by kind) through ``model.check_input``."""
    out = {}
    for group, images in groups.items():
        passed, reasons = 0, dict[str, int]()
        for image in images:
            reason = model.check_input(image)
            if reason is None:
                passed += 1
            else:
                kind = reason.split(" (")[0]
                reasons[kind] = reasons.get(kind, 0) + 1
        out[group] = (passed, len(images), reasons)
    return out
