"""Training recipe ``glaucoma``: disc-crop CNN on fundus-glaucoma, calibrated, gated, with its model card.

``gateway train glaucoma --data ../shared/data/fundus-glaucoma`` runs :func:`train`:

1. labels.csv (``path``, ``label`` glaucoma / normal), every photograph located (:mod:`inference.optic_disc`);
2. one stratified, seeded 80/20 train/validation split (:func:`training.recipes.split_indices`);
3. :data:`MEMBERS` networks of :mod:`training.glaucoma.network` (seeds seed, seed + 1, ...) trained on the
   train split, disc crops jittered per epoch, joined into one network averaging their logits;
4. temperature scaling fitted on the validation logits and folded into the last Dense layer (weights / T),
   so the shipped network outputs calibrated probabilities; the Youden threshold on those;
5. gate statistics (:mod:`inference.gates.fundus`) from the train split; validation false rejections, the
   out-of-domain pass rates and the external disc crops measured by :mod:`training.glaucoma.evaluation`;
6. bundle (``model.json`` with ``"preprocess": "fundus-disc"``, ``model.keras``, ``model.tflite``,
   ``fundus_gate.npz``) and card.

``gateway evaluate glaucoma --data FOLDER_OR_CSV`` runs :func:`evaluate` through the full serving path.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from inference.gates.fundus import GATE_FILE, EmbeddingStats
from inference.optic_disc import DiscLocation, crop_at, locate_disc
from inference.preprocess import load_image_file
from training.cards.metrics import (
    auc_ci,
    binary_metrics,
    expected_calibration_error,
    fit_temperature,
    logit,
    youden_threshold,
)
from training.data import labels_csv, read_labels, split_indices
from training.fitting import cached_network, setup_tensorflow
from training.gate_fitting import fit_fundus_gate
from training.recipes import Recipe, TrainConfig, register, release

logger = logging.getLogger(__name__)

DEFAULT_EPOCHS = 30
#: Networks averaged (seeds seed, seed + 1, ...); 1.0.0 was one network.
MEMBERS = 3
#: Folds for the out-of-fold distances behind the embedding gate's bound (:func:`embedding_stats`).
OOF_FOLDS = 5
#: Copies of each training photograph as other cameras would take it (:func:`training.camera.random_camera`)
#: that the gate statistics and the domain classifier are fitted on besides the photograph itself (1.2.0 on).
GATE_CAMERAS = 2
#: SSIM view of the gate (:data:`inference.gates.fundus.VIEWS`).
GATE_VIEW = 2
#: Train on photographs as other cameras would take them (:func:`training.glaucoma.network.augmented_crop`;
#: ``extra["camera_augment"]``). Tried for 1.2.0 and not shipped: external photographs AUC 0.852 -> 0.881, but
#: a lower sensitivity at its own Youden threshold, and the promotion gate refused it (see design.md).
CAMERA_AUGMENT = False
POSITIVE = {"glaucoma", "rg", "1", "referable"}
NEGATIVE = {"normal", "non-glaucoma", "nrg", "0"}


def metadata(config: TrainConfig, threshold: float, members: int) -> dict[str, Any]:
    from training.glaucoma.network import INPUT_SIZE, WIDTHS

    last = f"relu{len(WIDTHS) - 1}b"
    return {
        "name": "glaucoma",
        **release(config, "glaucoma"),
        "display_name": "Referable glaucoma (colour fundus photograph or optic-disc crop)",
        "kind": "fundus",
        "input_size": INPUT_SIZE,
        "channels": 3,
        "preprocess": "fundus-disc",
        "outputs": [{"finding": "glaucoma", "index": 0, "threshold": round(float(threshold), 4)}],
        # every member's last maps against its share of the averaged head
        "heatmap": {
            "layers": [f"m{k}_{last}" for k in range(members)] if members > 1 else [last],
            "heads": ["glaucoma"],
        },
    }


def binary_label(value: str) -> int | None:
    """1 glaucoma, 0 normal, None for anything else (e.g. "unknown")."""
    v = value.strip().lower()
    return 1 if v in POSITIVE else 0 if v in NEGATIVE else None


def load_labelled(data: Path) -> tuple[list[np.ndarray], np.ndarray, list[str]]:
    """Images (float32 RGB) and 0/1 labels of a labels CSV; rows without a binary label are skipped."""
    csv_path = labels_csv(data)
    images, labels, paths = [], [], []
    for row in read_labels(csv_path):
        label = binary_label(row.get("label", ""))
        if label is None:
            continue
        images.append(load_image_file(csv_path.parent / row["path"]))
        labels.append(label)
        paths.append(row["path"])
    return images, np.asarray(labels, dtype=np.int64), paths


def crops_for(images: list[np.ndarray], locations: list[DiscLocation], size: int) -> np.ndarray:
    return np.stack(
        [crop_at(im, loc.cx, loc.cy, loc.crop_side, size) for im, loc in zip(images, locations, strict=True)]
    )


def fold_temperature(model: Any, temperature: float) -> None:
    """Divide the last Dense layer's kernel and bias by T: sigmoid(z / T) becomes the network output."""
    dense = model.get_layer("glaucoma")
    kernel, bias = dense.get_weights()
    dense.set_weights([kernel / temperature, bias / temperature])


def embedding_stats(
    model: Any, crops: np.ndarray, percentile: float = 99.5, groups: np.ndarray | None = None
) -> EmbeddingStats:
    """Mean and precision of the ``"features"`` embedding of training crops; bound at ``percentile`` of the
    out-of-fold distances (crops of one ``groups`` value, e.g. one photograph and its camera copies, share a
    fold)."""
    import keras

    from training.gate_fitting import fit_feature_stats

    embed = keras.Model(model.inputs, model.get_layer("features").output)
    feats = np.concatenate(
        [np.asarray(embed(crops[i : i + 64], training=False)) for i in range(0, len(crops), 64)]
    )
    feats = feats.astype(np.float64)
    centre, precision = fit_feature_stats(feats)
    # The bound comes from out-of-fold distances: a crop's distance to statistics fitted without it. Distances
    # of the fitting crops themselves run low (288 dimensions, 456 crops) and would reject new in-domain eyes.
    out_of_fold = np.zeros(len(feats))
    fold_of = (np.arange(len(feats)) if groups is None else np.asarray(groups)) % OOF_FOLDS
    for k in range(OOF_FOLDS):
        held = fold_of == k
        stats_k = EmbeddingStats(*fit_feature_stats(feats[~held]), 0.0)
        out_of_fold[held] = [stats_k.distance(f) for f in feats[held]]
    return EmbeddingStats(centre, precision, float(np.percentile(out_of_fold, percentile)))


def camera_copies(
    images: list[np.ndarray], indices: np.ndarray, copies: int, seed: int
) -> list[tuple[np.ndarray, DiscLocation]]:
    """``copies`` of each photograph of ``indices`` as a random other camera would take it, located as served
    (seeded per photograph and copy)."""
    from training.camera import random_camera

    out = []
    for i in indices:
        for k in range(copies):
            varied = random_camera(images[i], np.random.default_rng([seed, int(i), k]))
            out.append((varied, locate_disc(varied)))
    return out


def fit_fundus_domain(
    images: list[np.ndarray],
    locations: list[DiscLocation],
    tr: np.ndarray,
    va: np.ndarray,
    config: TrainConfig,
    cameras: Sequence[tuple[np.ndarray, DiscLocation]] = (),
) -> Any:
    """The fundus domain classifier (:mod:`inference.gates.domain`): photographs and disc crops (and the
    ``cameras`` copies of the training photographs with their crops) vs seeded colour noise, pages and
    synthetic scenes (seeds 101 and 102; the card's probes use seed 0)."""
    from inference.gates.domain import DOMAIN_SIZE, FUNDUS_SUBJECT
    from inference.gates.rules import MEASURE_SIDE
    from inference.preprocess import load_dicom_image
    from training.domain_gate import epochs_for, fit_domain_gate
    from training.glaucoma.evaluation import synthetic_ood
    from training.glaucoma.network import colour_jitter

    rng = np.random.default_rng(config.seed)

    def positives(indices: np.ndarray, scales: tuple[float, ...], jitter: bool) -> list[np.ndarray]:
        out = []
        for i in indices:
            im, loc = images[i], locations[i]
            out.append(im)
            for scale in scales:
                crop = crop_at(im, loc.cx, loc.cy, loc.crop_side * scale, DOMAIN_SIZE)
                out.append(colour_jitter(crop, rng) if jitter else crop)
        return out

    def negatives(seed: int, n: int) -> list[np.ndarray]:
        return [im for group in synthetic_ood(seed=seed, n=n).values() for im in group]

    shared_fundus = Path(config.data).parent.parent / "dicom" / "sc_fundus_j2k.dcm"
    must_pass = []
    if shared_fundus.is_file():
        from inference.bundle import reduce_image

        must_pass.append(reduce_image(load_dicom_image(shared_fundus), MEASURE_SIDE))
    varied = []
    for im, loc in cameras:
        varied.append(im)
        if loc.kind == "full":
            varied.append(crop_at(im, loc.cx, loc.cy, loc.crop_side, DOMAIN_SIZE))
    fit = fit_domain_gate(
        positives(tr, (0.7, 1.0, 1.5), True) + varied,
        positives(va, (1.0,), False) + [im for im, _ in camera_copies(images, va, 1, config.seed + 1)],
        negatives(101, 150),
        negatives(102, 40),
        seed=config.seed,
        epochs=epochs_for(config.epochs),
        channels=3,
        subject=FUNDUS_SUBJECT,
        must_pass=must_pass,
    )
    logger.info("fundus domain classifier: %s", fit.summary())
    return fit


def _reused(config: TrainConfig) -> Any:
    """The network of the existing bundle with its temperature taken out again (``extra["reuse"]``): redoes
    calibration, gate and card without training."""
    import keras

    out = Path(config.out_dir)
    model = keras.models.load_model(out / "model.keras", compile=False)
    temperature = float(json.loads((out / "model.json").read_text())["training"]["temperature"])
    fold_temperature(model, 1.0 / temperature)
    logger.info("reusing the network of %s (temperature %.3f taken out)", out, temperature)
    return model


def _without_optimizer(model: Any) -> Any:
    """An uncompiled copy, so the saved bundle holds weights only (no optimizer state)."""
    import keras

    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def train(config: TrainConfig) -> Path:
    """Train, calibrate, gate and write the bundle and card; returns the bundle folder."""
    from training.domain_gate import export as export_domain
    from training.export import write_bundle
    from training.glaucoma.card import write_glaucoma_card
    from training.glaucoma.network import INPUT_SIZE, ensemble_network, fit, predict_crops

    setup_tensorflow(config.seed, config.threads)
    started = time.monotonic()
    images, y, paths = load_labelled(config.data)
    locations = [locate_disc(im) for im in images]
    logger.info("%d images, %d glaucoma; discs located", len(y), int(y.sum()))
    tr, va = split_indices(y, val_fraction=float(config.extra.get("val_fraction", 0.2)), seed=config.seed)
    epochs = config.epochs or DEFAULT_EPOCHS

    def progress(epoch: int, logs: dict[str, float]) -> None:
        shown = ", ".join(f"{k} {v:.3f}" for k, v in logs.items())
        print(f"epoch {epoch + 1}/{epochs}: {shown} ({time.monotonic() - started:.0f} s)", flush=True)

    def member(k: int) -> Any:
        """Member k (seed + k); loaded from ``extra["members_dir"]`` when saved there by an earlier run."""

        def train_member() -> tuple[Any, dict]:
            net = fit(
                [images[i] for i in tr],
                [locations[i] for i in tr],
                y[tr],
                seed=config.seed + k,
                epochs=epochs,
                progress=progress,
                camera=bool(config.extra.get("camera_augment", CAMERA_AUGMENT)),
            )
            return _without_optimizer(net), {}

        return cached_network(config.extra.get("members_dir"), f"member{k}", train_member)[0]

    members = int(config.extra.get("members", MEMBERS))
    model = _reused(config) if config.extra.get("reuse") else None
    if model is None:
        nets = [member(k) for k in range(members)]
        model = nets[0] if members == 1 else ensemble_network(nets)

    val_crops = crops_for([images[i] for i in va], [locations[i] for i in va], INPUT_SIZE)
    raw = predict_crops(model, val_crops)
    temperature = fit_temperature(logit(raw), y[va])
    fold_temperature(model, temperature)
    calibrated = predict_crops(model, val_crops)
    threshold = youden_threshold(y[va], calibrated)

    train_crops = [
        crop_at(images[i], locations[i].cx, locations[i].cy, locations[i].crop_side, INPUT_SIZE) for i in tr
    ]
    copies = int(config.extra.get("gate_cameras", GATE_CAMERAS))
    cameras = camera_copies(images, tr, copies, config.seed)
    view = int(config.extra.get("gate_view", GATE_VIEW))
    gate = fit_fundus_gate(
        [(images[i], locations[i]) for i in tr], train_crops, INPUT_SIZE, view=view, cameras=cameras
    )
    camera_crops = [
        crop_at(im, loc.cx, loc.cy, loc.crop_side, INPUT_SIZE)
        if loc.kind == "full"
        else crop_at(im, im.shape[1] / 2, im.shape[0] / 2, min(im.shape[:2]), INPUT_SIZE)
        for im, loc in cameras
    ]
    groups = np.r_[np.arange(len(tr)), np.repeat(np.arange(len(tr)), copies)]
    gate = replace(
        gate, embedding=embedding_stats(model, np.stack(train_crops + camera_crops), groups=groups)
    )
    logger.info("gate fitted on %d photographs and %d camera copies (view %d)", len(tr), len(cameras), view)

    domain = fit_fundus_domain(images, locations, tr, va, config, cameras)
    out = Path(config.out_dir)
    meta = metadata(config, threshold, members) | {
        "domain_gate": domain.spec.as_dict(),
        "training": {
            "seed": config.seed,
            "epochs": epochs,
            "members": members,
            "temperature": temperature,
            "gate_cameras": copies,
            "gate_view": view,
            "domain_gate": domain.summary(),
        },
    }
    write_bundle(out, _without_optimizer(model), meta)
    gate.save(out / GATE_FILE)
    export_domain(domain.net, out / domain.spec.file)
    summary: dict[str, Any] = {
        "seed": config.seed,
        "epochs": epochs,
        "members": members,
        "n_train": len(tr),
        "n_val": len(va),
        "temperature": temperature,
        "threshold": threshold,
        "val_auc": auc_ci(y[va], calibrated, seed=config.seed).as_dict(),
        "val_ece_before": expected_calibration_error(y[va], raw),
        "val_ece_after": expected_calibration_error(y[va], calibrated),
        "val_metrics": {k: v.as_dict() for k, v in binary_metrics(y[va], calibrated, threshold).items()},
        "train_seconds": round(time.monotonic() - started),
        "version": meta["version"],
        "reused_network": bool(config.extra.get("reuse")),
    }
    logger.info("glaucoma validation: %s", json.dumps(summary))
    write_glaucoma_card(
        config.card_path,
        bundle_dir=out,
        data=Path(config.data),
        val_paths=[paths[i] for i in va],
        y_val=y[va],
        raw=raw,
        calibrated=calibrated,
        summary=summary,
        val_images=[images[i] for i in va],
        extra=config.extra,
    )
    return out


def evaluate(bundle_dir: Path, data: Path) -> dict[str, Any]:
    """Serving-path metrics (gate, disc localisation, network) on a labelled folder or CSV of images.

    Labels glaucoma/normal (or non-glaucoma); images may be full photographs or disc crops. Rejected
    images are counted, not scored.
    """
    from inference.bundle import BundleModel
    from inference.model import assess

    model = BundleModel(Path(bundle_dir))
    images, y, paths = load_labelled(data)
    assessed = assess(model, images)
    kept = [i for i, a in enumerate(assessed) if a.assessable]
    scores = np.array([assessed[i].findings[0].probability for i in kept])
    threshold = model.metadata.outputs[0].threshold
    result: dict[str, Any] = {
        "model": model.info.name,
        "version": model.info.version,
        "n": len(y),
        "assessable": len(kept),
        "rejected": {paths[i]: a.reason for i, a in enumerate(assessed) if not a.assessable},
        "input_kinds": _kinds([assessed[i].reason for i in kept]),
    }
    if len(set(y[kept].tolist())) == 2:
        result["auc"] = auc_ci(y[kept], scores).as_dict()
        result.update({k: v.as_dict() for k, v in binary_metrics(y[kept], scores, threshold).items()})
        result["ece"] = expected_calibration_error(y[kept], scores)
    return result


def _kinds(notes: list[str | None]) -> dict[str, int]:
    crops = sum(1 for n in notes if n and "crop" in n)
    return {"full": len(notes) - crops, "disc": crops}


register(
    Recipe(
        name="glaucoma",
        train=train,
        evaluate=evaluate,
        description="referable glaucoma from a fundus photograph or optic-disc crop (disc-crop CNN)",
    )
)
