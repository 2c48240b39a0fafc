"""After training a chest model: calibration, thresholds, gate, TFLite, bundle, figures and model card.

Also :func:`evaluate_bundle`, the serving-path evaluation behind ``gateway evaluate pneumonia|covid19``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from inference.gates.features import FeatureGate
from inference.preprocess import load_any
from training import data as D
from training import recipes as T
from training.cards import metrics as E
from training.chest import card
from training.chest.gate import GATE_FILE, GATE_LAYERS, fit_gate, input_size
from training.chest.network import COVID_CLASSES, VAL_FRACTION, WIDTH, uses_processing
from training.domain_gate import DomainFit, export
from training.export import predict_with_features, write_bundle

logger = logging.getLogger(__name__)

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
    raw, feats_tr, feats_va = _outputs_and_embeddings(net, x, tr, va)
    yv = y[va]
    t_pn = E.fit_temperature(E.logit(raw[:, 0]), yv[:, 0])
    pos = yv[:, 0] == 1
    t_sub = E.fit_temperature(np.log(np.clip(raw[pos, 1:], 1e-7, 1)), yv[pos, 2].astype(int))
    cal = raw.copy()
    cal[:, 0] = E.apply_temperature(E.logit(raw[:, 0]), t_pn)
    cal[:, 1:] = E.apply_temperature(np.log(np.clip(raw[:, 1:], 1e-7, 1)), t_sub)
    threshold = E.youden_threshold(yv[:, 0], cal[:, 0])
    gate, domain = fit_gate(config, net, x[tr], x[va], feats_tr, feats_va)
    metadata = {
        "name": "pneumonia",
        **T.release(config, "pneumonia"),
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
        "heatmap": {"layers": ["last_conv_relu"], "heads": ["pneumonia", "subtype"], "softmax": [[1, 2]]},
        "training": _training_record(config, history, len(tr), len(va), grouped=True, size=input_size(net))
        | {"members": 1 + sum(layer.name.startswith("member_") for layer in net.layers)},
    }
    bundle = _write(config, net, metadata, gate, domain)
    metrics = pneumonia_metrics(yv, cal, threshold)
    metrics["pneumonia ECE before temperature scaling"] = E.expected_calibration_error(yv[:, 0], raw[:, 0])
    fig_dir = config.card_path.parent
    figures = {
        "ROC": E.plot_roc(
            fig_dir / "roc.png",
            {"pneumonia": (yv[:, 0], cal[:, 0]), "viral vs bacterial": (yv[pos, 2], cal[pos, 2])},
            points={f"threshold {threshold:.3f}": _operating_point(yv[:, 0], cal[:, 0], threshold)},
        ),
        "Calibration": E.plot_calibration(
            fig_dir / "calibration.png",
            {"raw": (yv[:, 0], raw[:, 0]), f"T={t_pn:.2f}": (yv[:, 0], cal[:, 0])},
        ),
    }
    card.write_pneumonia_card(config, bundle, metrics, figures, metadata, rows, va)
    return bundle


# -- covid19 -------------------------------------------------------------------------------------------------


def finish_covid19(
    config: T.TrainConfig, net: Any, history: dict, rows: list, x: np.ndarray, y: np.ndarray, tr: Any, va: Any
) -> Path:
    raw, feats_tr, feats_va = _outputs_and_embeddings(net, x, tr, va)
    yv = y[va]
    logp = np.log(np.clip(raw, 1e-7, 1))
    temperature = E.fit_temperature(logp, yv)
    cal = E.apply_temperature(logp, temperature)
    gate, domain = fit_gate(config, net, x[tr], x[va], feats_tr, feats_va)
    metadata = {
        "name": "covid19",
        **T.release(config, "covid19"),
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
        # the 160 px member's maps and head (the 128 px member is nested behind a resize)
        "heatmap": {"layers": ["last_conv_relu"], "heads": ["probabilities"], "softmax": [[0, 1, 2]]},
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
            fig_dir / "roc.png", {name: (yv == c, cal[:, c]) for c, name in enumerate(COVID_CLASSES)}
        ),
        "Calibration": E.plot_calibration(
            fig_dir / "calibration.png",
            {name: (yv == c, cal[:, c]) for c, name in enumerate(COVID_CLASSES)},
        ),
    }
    card.write_covid_card(config, bundle, metrics, figures, metadata, rows, va, yv, cal)
    return bundle


# -- evaluation of a bundle on labelled images ---------------------------------------------------------------


def evaluate_bundle(name: str, bundle_dir: Path, data: Path) -> dict[str, Any]:
    """Serving-path metrics (gate, preprocessing, calibrated outputs) on a labelled CSV or folder.

    ``data``: a labels CSV (``path`` relative to it, ``label``; pneumonia also ``subtype``), a folder holding
    ``labels.csv``, or a folder of class subfolders (``NORMAL``/``PNEUMONIA`` with "virus"/"bacteria" in the
    file names, or ``normal``/``covid19``/``viral_pneumonia``). Images the gate rejects are counted, not
    scored.
    """
    from inference.bundle import BundleModel
    from inference.model import assess

    model = BundleModel(Path(bundle_dir))
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
        csv_path = D.labels_csv(data)
        rows = D.read_labels(csv_path)
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


def _outputs_and_embeddings(
    net: Any, x: np.ndarray, tr: Any, va: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw validation outputs, and the gate embeddings of the training and validation images."""
    raw, feats_va = predict_with_features(net, x[va], layers=GATE_LAYERS)
    _, feats_tr = predict_with_features(net, x[tr], layers=GATE_LAYERS)
    return raw, feats_tr, feats_va


def _write(config: T.TrainConfig, net: Any, metadata: dict, gate: FeatureGate, domain: DomainFit) -> Path:
    metadata["training"]["domain_gate"] = domain.summary()
    bundle = write_bundle(config.out_dir, net, metadata)
    gate.save(bundle / GATE_FILE)
    export(domain.net, bundle / domain.spec.file)
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
        "processing": uses_processing("pneumonia" if grouped else "covid19", config.extra),
        "history": history,
    }


def _operating_point(y: np.ndarray, p: np.ndarray, threshold: float) -> tuple[float, float]:
    m = E.binary_metrics(y, p, threshold)
    return 1 - m["specificity"].value, m["sensitivity"].value
