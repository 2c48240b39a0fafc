"""After training a chest model: calibration, thresholds, gate, TFLite, bundle, figures and model card.

Also :func:`evaluate_bundle`, the serving-path evaluation behind ``gateway evaluate pneumonia|covid19``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from inference import evaluate as E
from inference import train as T
from inference.bundle import reduce_image
from inference.chest import COVID_CLASSES, VAL_FRACTION, WIDTH
from inference.domain_gate import DomainFit, epochs_for, export, fit_domain_gate, partial_views
from inference.gate import (
    FeatureGate,
    fit_classifier,
    fit_feature_stats,
    gray_at,
    mahalanobis,
    ssim_to_reference,
)
from inference.outliers import training_negatives
from inference.preprocess import load_any, load_dicom_image, to_model_input

logger = logging.getLogger(__name__)

#: Bumped whenever a model's weights or gate change: every SR names the version, and its UID depends on it.
VERSIONS = {"pneumonia": "1.0.1", "covid19": "1.3.0"}
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


# -- metrics (shared by the card and gateway evaluate) -------------------------------------------------------


def pneumonia_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, Any]:
    """``y`` N x 3 targets [pneumonia, bacterial, viral]; ``p`` N x 3 calibrated outputs."""
    m: dict[str, Any] = {"images": len(y), "pneumonia AUC": E.auc_ci(y[:, 0], p[:, 0])}
    for k, v in E.binary_metrics(y[:, 0], p[:, 0], threshold).items():
        m[f"pneumonia {k} (threshold {threshold:.3f})"] = v
    m["pneumonia ECE"] = E.expected_calibration_error(y[:, 0], p[:, 0])
    pos = y[:, 0] == 1
    if pos.any() and 0 < y[pos, 2].sum() < pos.sum():
        m["subtype AUC, viral vs bacterial (pneumonia images)"] = E.auc_ci(y[pos, 2], p[pos, 2])
        m["subtype accuracy at 0.5 (pneumonia images)"] = E.accuracy_ci(y[pos, 2], p[pos, 2] >= 0.5)
    return m


def covid_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, Any]:
    """``y`` class indices (normal, covid19, viral_pneumonia); ``p`` N x 3 calibrated softmax."""
    m: dict[str, Any] = {"images": len(y), "3-class accuracy (arg-max)": E.accuracy_ci(y, p.argmax(axis=1))}
    for c, name in enumerate(COVID_CLASSES):
        m[f"AUC {name} vs rest"] = E.auc_ci(y == c, p[:, c])
    for c, name in list(enumerate(COVID_CLASSES))[1:]:
        for k, v in E.binary_metrics(y == c, p[:, c], 0.5).items():
            m[f"{name} {k} (threshold 0.5)"] = v
    m["ECE (top class)"] = E.expected_calibration_error(p.argmax(axis=1) == y, p.max(axis=1))
    return m


# -- pneumonia -----------------------------------------------------------------------------------------------


def finish_pneumonia(
    config: T.TrainConfig, net: Any, history: dict, rows: list, x: np.ndarray, y: np.ndarray, tr: Any, va: Any
) -> Path:
    raw, feats_va = T.predict_with_features(net, x[va], layers=GATE_LAYERS)
    _, feats_tr = T.predict_with_features(net, x[tr], layers=GATE_LAYERS)
    yv = y[va]
    t_pn = E.fit_temperature(E.logit(raw[:, 0]), yv[:, 0])
    pos = yv[:, 0] == 1
    t_sub = E.fit_temperature(np.log(np.clip(raw[pos, 1:], 1e-7, 1)), yv[pos, 2].astype(int))
    cal = raw.copy()
    cal[:, 0] = E.apply_temperature(E.logit(raw[:, 0]), t_pn)
    cal[:, 1:] = E.apply_temperature(np.log(np.clip(raw[:, 1:], 1e-7, 1)), t_sub)
    threshold = E.youden_threshold(yv[:, 0], cal[:, 0])
    gate, domain = _fit_gate(config, net, x[tr], x[va], feats_tr, feats_va)
    metadata = {
        "name": "pneumonia",
        "version": VERSIONS["pneumonia"],
        "display_name": "Pneumonia with bacterial/viral subtype (chest X-ray)",
        "kind": "chest",
        "input_size": input_size(net),
        "channels": 1,
        "outputs": [
            {"finding": "pneumonia", "index": 0, "threshold": round(threshold, 4)},
            {"finding": "bacterial_pneumonia", "index": 1, "threshold": 0.5, "requires": "pneumonia"},
            {"finding": "viral_pneumonia", "index": 2, "threshold": 0.5, "requires": "pneumonia"},
        ],
        "calibration": [{"columns": [0], "temperature": t_pn}, {"columns": [1, 2], "temperature": t_sub}],
        "feature_gate": GATE_FILE,
        "feature_layers": list(GATE_LAYERS),
        "domain_gate": domain.spec.as_dict(),
        "training": _training_record(config, history, len(tr), len(va), grouped=True, size=input_size(net)),
    }
    bundle = _write(config, net, metadata, gate, domain)
    metrics = pneumonia_metrics(yv, cal, threshold)
    metrics["pneumonia ECE before temperature scaling"] = E.expected_calibration_error(yv[:, 0], raw[:, 0])
    fig_dir = config.card_path.parent
    figures = {
        "ROC": E.plot_roc(
            fig_dir / "pneumonia_roc.png",
            {"pneumonia": (yv[:, 0], cal[:, 0]), "viral vs bacterial": (yv[pos, 2], cal[pos, 2])},
            points={f"threshold {threshold:.3f}": _operating_point(yv[:, 0], cal[:, 0], threshold)},
        ),
        "Calibration": E.plot_calibration(
            fig_dir / "pneumonia_calibration.png",
            {"raw": (yv[:, 0], raw[:, 0]), f"T={t_pn:.2f}": (yv[:, 0], cal[:, 0])},
        ),
    }
    from inference import chest_report

    chest_report.write_pneumonia_card(config, bundle, metrics, figures, metadata, rows, va)
    return bundle


# -- covid19 -------------------------------------------------------------------------------------------------


def finish_covid19(
    config: T.TrainConfig, net: Any, history: dict, rows: list, x: np.ndarray, y: np.ndarray, tr: Any, va: Any
) -> Path:
    raw, feats_va = T.predict_with_features(net, x[va], layers=GATE_LAYERS)
    _, feats_tr = T.predict_with_features(net, x[tr], layers=GATE_LAYERS)
    yv = y[va]
    logp = np.log(np.clip(raw, 1e-7, 1))
    temperature = E.fit_temperature(logp, yv)
    cal = E.apply_temperature(logp, temperature)
    gate, domain = _fit_gate(config, net, x[tr], x[va], feats_tr, feats_va)
    metadata = {
        "name": "covid19",
        "version": VERSIONS["covid19"],
        "display_name": "COVID-19 / viral pneumonia / normal (chest X-ray)",
        "kind": "chest",
        "input_size": input_size(net),
        "channels": 1,
        "outputs": [
            {"finding": "covid19", "index": 1, "threshold": 0.5},
            {"finding": "viral_pneumonia", "index": 2, "threshold": 0.5},
        ],
        "calibration": [{"columns": [0, 1, 2], "temperature": temperature}],
        "feature_gate": GATE_FILE,
        "feature_layers": list(GATE_LAYERS),
        "domain_gate": domain.spec.as_dict(),
        "training": _training_record(config, history, len(tr), len(va), grouped=False, size=input_size(net)),
    }
    bundle = _write(config, net, metadata, gate, domain)
    metrics = covid_metrics(yv, cal)
    metrics["ECE (top class) before temperature scaling"] = E.expected_calibration_error(
        raw.argmax(axis=1) == yv, raw.max(axis=1)
    )
    fig_dir = config.card_path.parent
    figures = {
        "ROC": E.plot_roc(
            fig_dir / "covid19_roc.png", {name: (yv == c, cal[:, c]) for c, name in enumerate(COVID_CLASSES)}
        ),
        "Calibration": E.plot_calibration(
            fig_dir / "covid19_calibration.png",
            {name: (yv == c, cal[:, c]) for c, name in enumerate(COVID_CLASSES)},
        ),
    }
    from inference import chest_report

    chest_report.write_covid_card(config, bundle, metrics, figures, metadata, rows, va, yv, cal)
    return bundle


# -- evaluation of a bundle on labelled images ---------------------------------------------------------------


def evaluate_bundle(name: str, bundle_dir: Path, data: Path) -> dict[str, Any]:
    """Serving-path metrics (gate, preprocessing, calibrated outputs) on a labelled CSV or folder.

    ``data``: a labels CSV (``path`` relative to it, ``label``; pneumonia also ``subtype``), a folder holding
    ``labels.csv``, or a folder of class subfolders (``NORMAL``/``PNEUMONIA`` with "virus"/"bacteria" in the
    file names, or ``normal``/``covid19``/``viral_pneumonia``). Images the gate rejects are counted, not
    scored.
    """
    from inference.base import assess
    from inference.bundle import KerasBundleModel

    model = KerasBundleModel(Path(bundle_dir))
    paths, labels, subtypes = _labelled(Path(data))
    probs, kept, rejected = [], [], {}
    for start in range(0, len(paths), 64):
        chunk = paths[start : start + 64]
        for offset, a in enumerate(assess(model, [load_any(p) for p in chunk])):
            i = start + offset
            if a.assessable:
                kept.append(i)
                probs.append({f.name: f.probability for f in a.findings})
            else:
                rejected[str(paths[i])] = a.reason
    result: dict[str, Any] = {"model": name, "version": model.info.version, "n": len(paths)}
    result.update({"assessable": len(kept), "rejected": rejected})
    if not kept:
        return result
    if name == "pneumonia":
        y = np.zeros((len(kept), 3))
        for j, i in enumerate(kept):
            if labels[i] != "normal":
                y[j, 0], y[j, 1 if subtypes[i] == "bacteria" else 2] = 1, 1
        p = np.array([[r["pneumonia"], r["bacterial_pneumonia"], r["viral_pneumonia"]] for r in probs])
        metrics = (
            pneumonia_metrics(y, p, model.metadata.outputs[0].threshold) if 0 < y[:, 0].sum() < len(y) else {}
        )
    else:
        yc = np.array([COVID_CLASSES.index(labels[i]) for i in kept])
        pc = np.array([[r["covid19"], r["viral_pneumonia"]] for r in probs])
        p = np.column_stack([1 - pc.sum(axis=1), pc])
        metrics = covid_metrics(yc, p) if len(set(yc.tolist())) == 3 else {}
    result.update({k: (v.as_dict() if isinstance(v, E.Estimate) else v) for k, v in metrics.items()})
    return result


def _labelled(data: Path) -> tuple[list[Path], list[str], list[str]]:
    if data.is_file() or (data / "labels.csv").is_file():
        csv_path = T.labels_csv(data)
        rows = T.read_labels(csv_path)
        return (
            [csv_path.parent / r["path"] for r in rows],
            [r["label"].strip().lower() for r in rows],
            [(r.get("subtype") or "").strip().lower() for r in rows],
        )
    aliases = {
        "pneumonia": "pneumonia",
        "covid": "covid19",
        "covid-19": "covid19",
        "viral pneumonia": "viral_pneumonia",
    }
    paths, labels, subtypes = [], [], []
    for folder in sorted(p for p in data.iterdir() if p.is_dir()):
        label = aliases.get(folder.name.lower(), folder.name.lower())
        for f in sorted(folder.rglob("*")):
            if f.suffix.lower() in {".png", ".jpg", ".jpeg", ".dcm"}:
                paths.append(f)
                labels.append(label)
                subtypes.append("virus" if "virus" in f.name.lower() else "bacteria")
    return paths, labels, subtypes


# -- helpers -------------------------------------------------------------------------------------------------


def _fit_gate(
    config: T.TrainConfig,
    net: Any,
    x_tr: np.ndarray,
    x_va: np.ndarray,
    feats_tr: np.ndarray,
    feats_va: np.ndarray,
) -> tuple[FeatureGate, DomainFit]:
    """SSIM reference and feature statistics from the training images, bounds from validation; then the
    domain classifier (:mod:`inference.domain_gate`) on the same radiographs.

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
        feats_tr = np.concatenate([feats_tr, T.predict_with_features(net, s_tr, layers=GATE_LAYERS)[1]])
        feats_va = np.concatenate([feats_va, T.predict_with_features(net, s_va, layers=GATE_LAYERS)[1]])
    reference = np.mean([gray_at(img.astype(np.float32) / 255.0, REFERENCE_SIZE) for img in x_tr], axis=0)
    reference = reference.astype(np.float32)
    ssim = np.array([ssim_to_reference(img.astype(np.float32) / 255.0, reference) for img in x_va])
    mean, precision = fit_feature_stats(feats_tr)
    distances = mahalanobis(feats_va, mean, precision)
    negatives = training_negatives(shared_root(config.data), seed=config.seed)
    x_neg = np.stack(
        [np.rint(to_model_input(img, size, 1)[..., 0] * 255).astype(np.uint8) for img in negatives]
    )
    feats_neg = T.predict_with_features(net, x_neg, layers=GATE_LAYERS)[1]
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
        feats = T.predict_with_features(net, x8, layers=GATE_LAYERS)[1]
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


def _fit_domain(config: T.TrainConfig, x_tr: np.ndarray, x_va: np.ndarray) -> DomainFit:
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
    root = T.labels_csv(data).parent.parent.parent
    return root if (root / "dicom").is_dir() else None


def input_size(net: Any) -> int:
    """The square input side of a trained network."""
    return int(net.input_shape[1])


def _sibling_images(config: T.TrainConfig, size: int) -> np.ndarray | None:
    data_dir = T.labels_csv(config.data).parent
    name = SIBLING_DATA.get(data_dir.name)
    if name is None or not (data_dir.parent / name / "labels.csv").is_file():
        return None
    rows = T.read_labels(data_dir.parent / name / "labels.csv")
    logger.info("gate statistics also from %d images of %s", len(rows), name)
    return T.load_images(data_dir.parent / name, [r["path"] for r in rows], size)


def _write(config: T.TrainConfig, net: Any, metadata: dict, gate: FeatureGate, domain: DomainFit) -> Path:
    from inference.bundle import write_bundle

    metadata["training"]["domain_gate"] = domain.summary()
    bundle = write_bundle(config.out_dir, net, metadata)
    gate.save(bundle / GATE_FILE)
    export(domain.net, bundle / domain.spec.file)
    T.export_tflite(net, bundle / "model.tflite", layers=GATE_LAYERS)
    (bundle / "history.json").unlink(missing_ok=True)
    return bundle


def _training_record(
    config: T.TrainConfig, history: dict, n_train: int, n_val: int, grouped: bool, size: int
) -> dict:
    return {
        "seed": config.seed,
        "val_fraction": VAL_FRACTION,
        "split": "StratifiedGroupKFold by patient_key" if grouped else "StratifiedKFold",
        "n_train": n_train,
        "n_val": n_val,
        "epochs_run": (
            len(history["loss"])
            if "loss" in history
            else ", ".join(f"{len(v)} ({k[6:-1]})" for k, v in history.items() if k.startswith("loss ("))
        ),
        "input_size": size,
        "width": WIDTH,
        "history": history,
    }


def _operating_point(y: np.ndarray, p: np.ndarray, threshold: float) -> tuple[float, float]:
    m = E.binary_metrics(y, p, threshold)
    return 1 - m["specificity"].value, m["sensitivity"].value


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


def dump_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
