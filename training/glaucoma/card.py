"""The glaucoma model card (markdown + PNGs beside it), written at the end of ``gateway train glaucoma``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from inference.bundle import BundleModel
from inference.optic_disc import CROP_FRACTION
from inference.registry import SHIPPED_DIR
from training.cards.metrics import Estimate, auc_ci, plot_calibration, plot_roc, wilson_ci, write_card
from training.glaucoma.evaluation import (
    camera_refusals,
    external_sets,
    gate_table,
    localiser_figures,
    score,
    speed,
)
from training.glaucoma.network import INPUT_SIZE

logger = logging.getLogger(__name__)

#: Filled in by hand from the design experiments (5-fold CV on the 570 images, not rerun by the recipe).
DESIGN_NOTES = SHIPPED_DIR / "glaucoma" / "design.md"

ARCHITECTURE = f"""\
Optic-disc crop CNN trained from scratch (no pretrained weights); since 1.1.0 an average of three such
networks:

* input: the disc-centred crop, {INPUT_SIZE} x {INPUT_SIZE} RGB in [0, 1]. For a full-field photograph
  the optic disc is located by classical image analysis (`inference/optic_disc.py`: field-of-view mask,
  vessel-erasing closing, local brightness + vessel density) and a square of {CROP_FRACTION:g} x the
  field-of-view diameter (about 2.3 disc diameters) is cut around it. An image without a black border is a
  disc crop (used whole, centre square) when its brightest blob is centred and large, else a borderless
  photograph (a narrower camera field) whose field is taken as 1.3 x its long side (1.2.0 on; before, every
  borderless image was read as a crop). The result names which it was ("input: ...").
* network (`training/glaucoma/network.py`): per-image, per-channel standardisation (LayerNormalization
  over H and W, no parameters), five stages of two 3x3 Conv-BN-ReLU (16, 32, 48, 64, 96 filters) with
  max-pooling between, global average pooling, dropout 0.3, one sigmoid unit. About 0.26 M weights.
* ensemble: three networks trained alike with seeds s, s + 1, s + 2 are joined into one graph that
  averages their logits (`ensemble_network`: trunks side by side, one output unit holding the three output
  weights / 3), so the bundle stays one network and one TFLite file (about 0.77 M weights).
* training: AdamW (2e-3, cosine decay, weight decay 1e-4), binary cross-entropy with label smoothing 0.05,
  batch 32; disc crops re-cut every epoch with scale x0.8-1.25, shift +-8 %, rotation +-15 deg, flips,
  per-channel gain, brightness, gamma and blur jitter. Seeded (`keras.utils.set_random_seed`, op
  determinism). (Training on photographs varied as other cameras take them, `extra["camera_augment"]`, was
  measured for 1.2.0 and not shipped: see the design notes.)
* calibration: temperature scaling on the validation logits, folded into the last layer (weights / T).
* heatmap: the class activation map of the three networks' last feature maps against their share of
  the averaged head (an output of `model.tflite`), mapped back from the crop onto the input image."""

CONFOUNDS = """\
* All training images come from **one screening programme (EyePACS, via the AIROGS challenge "light"
  derivative)**; "glaucoma" means *referable glaucoma as graded there* (graders' referral decision on a
  photograph, not a confirmed diagnosis by visual field or OCT). Cameras, populations and grading
  standards elsewhere differ: see the external figures, which are small and from mixed databases.
* 570 images, balanced 50/50; real screening prevalence is a few per cent, so positive predictive values
  will be much lower than the balanced sensitivity/specificity suggest.
* The network sees only the optic-disc region; glaucoma signs elsewhere (RNFL defects away from the disc)
  are out of view. A wrong disc localisation gives a wrong crop: the localiser figure says how often.
* Threshold and temperature are fitted on the same 114 validation images that the metrics are reported on,
  so sensitivity/specificity at the threshold are optimistic; the AUC is not affected by either.
* Hand-made disc crops from other databases are framed differently (tighter or looser than our crop); the
  network was trained with scale jitter for this, and the external crop AUC measures it on a few images."""

INTENDED_USE = """\
Decision support for research screening workflows: flags colour fundus photographs (45-degree, disc
visible) or optic-disc crops as possibly referable glaucoma for review by an eye-care professional.
Not for images of other modalities (the gate rejects them), not for children, not for eyes after
surgery, not a substitute for clinical examination, tonometry, visual fields or OCT."""


def write_glaucoma_card(
    card_path: Path,
    *,
    bundle_dir: Path,
    data: Path,
    val_paths: list[str],
    y_val: np.ndarray,
    raw: np.ndarray,
    calibrated: np.ndarray,
    summary: dict[str, Any],
    val_images: list[np.ndarray],
    extra: dict[str, Any],
) -> Path:
    """Measure what the card reports (serving path, gate, localiser, external sets, speed) and write it."""
    folder = Path(card_path).parent
    folder.mkdir(parents=True, exist_ok=True)
    model = BundleModel(Path(bundle_dir))
    threshold = float(summary["threshold"])
    full = score(model, val_images, y_val)
    crops = [model._input(im) for im in val_images]  # what the network saw: fed back as hand-made crops
    crop_path = score(model, crops, y_val)
    databases: dict[str, list[str]] = {}
    ext = external_sets(data, databases)
    ext_scores = {k: score(model, imgs, y) for k, (imgs, y) in ext.items() if len(y)}
    cameras = camera_refusals(model, val_images)
    loc = localiser_figures(data)
    in_domain = {"validation photographs (EyePACS)": val_images, "validation disc crops (EyePACS)": crops}
    if "crops" in ext:
        in_domain["external disc crops (other databases)"] = ext["crops"][0]
    gate_md, gate_figures = gate_table(model, in_domain, data)
    ms, fastest = speed(model, val_images[0])

    curves = {
        "validation, full photographs": (full["y"], full["p"]),
        "validation, disc crops": (crop_path["y"], crop_path["p"]),
    }
    curves.update({f"external {k}": (s["y"], s["p"]) for k, s in ext_scores.items() if "auc_ungated" in s})
    roc = plot_roc(
        folder / "roc.png",
        curves,
        title="ROC: glaucoma",
        points={"threshold (validation)": _point(full, threshold)},
    )
    cal = plot_calibration(
        folder / "calibration.png",
        {
            "before temperature scaling": (y_val, raw),
            f"after (T = {summary['temperature']:.2f})": (y_val, calibrated),
        },
        title="Calibration (validation)",
    )
    # No picture of the photographs themselves: the EyePACS-AIROGS licence (CC BY-NC-ND) allows no
    # derivatives in the repository. training.glaucoma.evaluation.montage draws one locally when needed.

    metrics: dict[str, Estimate | float | str] = {
        f"AUC, validation photographs ({full['n'] - full['rejected']} of {full['n']} accepted)": full.get(
            "auc", "n/a"
        ),
        "sensitivity at threshold": full.get("sensitivity", "n/a"),
        "specificity at threshold": full.get("specificity", "n/a"),
        "accuracy at threshold": full.get("accuracy", "n/a"),
        "AUC, validation disc crops (the same eyes, fed as crops)": crop_path.get("auc", "n/a"),
        "ECE before / after temperature scaling": (
            f"{summary['val_ece_before']:.3f} / {summary['val_ece_after']:.3f}"
        ),
    }
    for k, s in ext_scores.items():
        if "auc_ungated" in s:
            metrics[f"AUC, external {k}, fundus-disc-samples (n={s['n']}, gate bypassed)"] = s["auc_ungated"]
            if len(set(databases.get(k, []))) > 2:
                metrics[
                    f"AUC, external {k}, CI resampling the {len(set(databases[k]))} databases (cross-camera)"
                ] = auc_ci(s["y"], s["p"], groups=databases[k])
        if "auc" in s:
            metrics[f"AUC, external {k}, gated ({s['n'] - s['rejected']} of {s['n']} accepted)"] = s["auc"]
    metrics["optic disc centre inside the true disc (fundus-disc-samples)"] = loc["disc_hit"]
    design = (
        f"Whole image vs disc crop vs both, the number of epochs and the three-network average (1.1.0) were "
        f"chosen by cross-validation on the 570 images before this run: see "
        f"[{DESIGN_NOTES.name}]({DESIGN_NOTES.name})."
    )
    path = write_card(
        Path(card_path),
        title=f"Model card: glaucoma {summary.get('version', '')}".strip(),
        data_and_split=_data_text(summary, data),
        architecture=ARCHITECTURE,
        training_command="gateway train glaucoma --data ../shared/data/fundus-glaucoma",
        metrics=metrics,
        figures={"ROC": roc, "Calibration": cal},
        threshold_rule=(
            "Youden's J (sensitivity + specificity - 1) maximised on the calibrated validation "
            "probabilities: "
            f"**glaucoma present when p >= {threshold:.3f}**. Temperature T = {summary['temperature']:.3f}."
        ),
        gate=_gate_text(gate_md, json.loads((Path(bundle_dir) / "model.json").read_text())),
        confounds=CONFOUNDS,
        intended_use=INTENDED_USE,
        extra={
            "Optic-disc localiser": _localiser_text(loc),
            "Camera variation": _camera_text(cameras),
            "Speed": (
                f"Median {ms:.1f} ms (fastest {fastest:.1f} ms) per 512 px photograph at batch 1, decoded "
                "pixels to findings (rule "
                "gate, kind detection, disc localisation, SSIM, Mahalanobis and domain-classifier gate, "
                "TFLite network), on "
                "this machine's 2 CPU cores while other training jobs ran; `bench/inference.py` compares "
                "with VGG19."
            ),
            "Design choices (cross-validation)": design,
            "Training run": "```json\n" + json.dumps(_jsonable(summary), indent=2) + "\n```",
        },
    )
    logger.info("gate figures: %s", gate_figures)
    return path


def _point(full: dict[str, Any], threshold: float) -> tuple[float, float]:
    y, p = full["y"], full["p"]
    pred = p >= threshold
    return float(np.mean(pred[y == 0])), float(np.mean(pred[y == 1]))


def _data_text(summary: dict[str, Any], data: Path) -> str:
    return (
        "fundus-glaucoma: 570 colour fundus photographs (512 x 512, full field with black border) from "
        "EyePACS-AIROGS-light v2, 285 referable glaucoma / 285 normal (CC BY-NC-ND 4.0, research use). One "
        f"stratified, seeded split (`training.recipes.split_indices`, seed {summary['seed']}): "
        f"{summary['n_train']} train / {summary['n_val']} validation images; no patient key exists, so eyes "
        "of one person may fall on both sides. External checks, never trained on: fundus-disc-samples "
        "(SMDG-19 "
        "samples of other public databases: hand-made optic-disc crops and full photographs with "
        "glaucoma / non-glaucoma labels; EyePACS rows left out)."
    )


def _view_text(view: int) -> str:
    if view == 1:
        return "The view is the whole frame as it is."
    return (
        "The view is the field of view, not the frame: a photograph is cut to the square around its round "
        "field and masked to the circle (so a 3:2 frame, a shifted field or a borderless photograph look "
        "alike), and the lit part is scaled to one mean and SD (exposure and contrast do not count). "
        "Stages 2-4 are fitted on the training photographs plus two copies of each as other cameras would "
        "take them (`training/camera.py`, every variation with chance 0.35, relocated as served), stage 5 "
        "on those copies too."
    )


def _gate_text(table: str, meta: dict[str, Any]) -> str:
    spec, d = meta.get("domain_gate"), meta.get("training", {}).get("domain_gate")
    domain = (
        "5. A separate domain classifier (`inference/gates/domain.py`, `domain_gate.tflite`): a tiny CNN on "
        f"the whole input at {spec['input_size']} px RGB, trained on {d['positives']} positives (the "
        "training photographs and their disc crops at three scales with colour jitter) against "
        f"{d['negatives']} seeded colour noise images, pages and synthetic scenes (other seeds than the "
        f"probes below); rejected below {spec['min_score']:.4f}, the 0.1th percentile of the validation "
        f"positives. On its own validation set: {d['validation positives rejected']} of "
        f"{d['validation positives']} photographs and crops rejected, {d['validation negatives passed']} of "
        f"{d['validation negatives']} held-out negatives passed.\n"
        if spec and d
        else ""
    )
    return (
        "1. Rule gate (`inference/gates/rules.py`): blank images and grayscale images (saturation <= 0.08) "
        "are rejected, so every radiograph is 'not assessable: grayscale image, not a colour fundus "
        "photograph'.\n"
        "2. SSIM of a gray 64 x 64 view with the average training view of its kind (full photograph or "
        "disc crop; stored in `fundus_gate.npz`), rejected below the 0.5th percentile of the training "
        "views. " + _view_text(int(meta.get("training", {}).get("gate_view", 1))) + "\n"
        "3. Mahalanobis distance (Ledoit-Wolf covariance) of 14 colour/texture statistics of the disc crop "
        "(channel means and SDs, green/red ratio, disc contrast, black fraction, sharpness, saturation, "
        "share of red >= green >= blue pixels, vessel density, hue concentration) to the training crops; "
        "rejected "
        "beyond the 99.5th percentile of the training distances.\n"
        "4. Mahalanobis distance of the network's penultimate embedding of the crop (the three networks' "
        "pooled features, 288 values) to the training crops (Ledoit-Wolf plus ridge), rejected beyond the "
        "99.5th percentile of out-of-fold training distances (5 folds: each crop measured against statistics "
        "fitted without it).\n" + domain + "\n" + table
    )


def _camera_text(cameras: dict[str, tuple[int, int]]) -> str:
    rows = "\n".join(
        f"| {name} | {refused} of {n} ({wilson_ci(refused, n)}) |" for name, (refused, n) in cameras.items()
    )
    return (
        "Validation photographs refused by the served gate (`check_input`) as they are and under fixed "
        "camera variations (`training/camera.py`; the strengths at the ends of the ranges the gate "
        "statistics were fitted with, on training photographs only). `bench/glaucoma_gate.py` names the "
        "refusing stage per image and adds the 19 databases of fundus-disc-samples.\n\n"
        "| variation | refused |\n|---|---|\n" + rows
    )


def _localiser_text(loc: dict[str, Any]) -> str:
    return (
        f"Detected disc centre inside the annotated disc (mask, else box) on {loc['hits']} of {loc['n']} "
        f"fundus-disc-samples photographs with annotations ({loc['disc_hit']}). Full photographs recognised "
        "as "
        f"such: {loc['full_as_full']}; hand-made disc crops recognised as crops: {loc['crop_as_crop']}."
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, float):
        return round(value, 4)
    return value
