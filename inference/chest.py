"""Training recipes for the chest radiograph models ``pneumonia`` and ``covid19`` (registered at import).

``pneumonia`` (chest-xray-pneumonia, split grouped by ``patient_key``): the network outputs three columns,
P(pneumonia), P(bacterial | pneumonia), P(viral | pneumonia) (sigmoid + a 2-way softmax trained only on
pneumonia images). ``covid19`` (covid19-radiography, stratified split): a 3-way softmax normal / covid19 /
viral_pneumonia, the average of two networks trained at 128 and 160 px (:func:`combine_covid`). Gray input
(128 px pneumonia, 160 px covid19), the small CNN of :func:`inference.train.build_backbone`, temperature
scaling and thresholds fitted on validation, an SSIM + Mahalanobis + domain-classifier input gate
(:mod:`inference.chest_card` computes the figures and writes bundle and card).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from inference import train as T

logger = logging.getLogger(__name__)

#: Input size per bundle (covid19: 160 px).
SIZES = {"pneumonia": 128, "covid19": 160}
#: covid19 (1.3.0) averages the softmax of two networks trained alike at these input sizes (the 1.1.0 and
#: 1.2.0 recipes); the bundle takes the largest and resizes inside the graph for the others.
COVID_MEMBER_SIZES = (128, 160)
WIDTH = 32
VAL_FRACTION = 0.2
EPOCHS = {"pneumonia": 14, "covid19": 20}  # covid19 1.1.0: 20 epochs beat 14 on validation (0.952 vs 0.944)
PNEUMONIA_CLASSES = ("normal", "bacteria", "virus")
COVID_CLASSES = ("normal", "covid19", "viral_pneumonia")


def load_pneumonia(data: Path) -> tuple[list[dict[str, str]], np.ndarray, np.ndarray]:
    """Rows, uint8 images and targets N x 3: [pneumonia, bacterial, viral] (subtype columns 0 for normal)."""
    csv_path = T.labels_csv(data)
    rows = T.read_labels(csv_path)
    x = T.load_images(csv_path.parent, [r["path"] for r in rows], SIZES["pneumonia"])
    y = np.zeros((len(rows), 3), dtype=np.float32)
    for i, r in enumerate(rows):
        if r["label"] != "normal":
            y[i, 0] = 1.0
            y[i, 1 if r.get("subtype") == "bacteria" else 2] = 1.0
    return rows, x, y


def load_covid(data: Path, size: int | None = None) -> tuple[list[dict[str, str]], np.ndarray, np.ndarray]:
    """Rows, uint8 images (``size``, default the bundle's input) and class indices (0 normal, 1 covid19,
    2 viral_pneumonia)."""
    csv_path = T.labels_csv(data)
    rows = T.read_labels(csv_path)
    x = T.load_images(csv_path.parent, [r["path"] for r in rows], size or SIZES["covid19"])
    y = np.array([COVID_CLASSES.index(r["label"]) for r in rows], dtype=np.int64)
    return rows, x, y


def pneumonia_split(rows: list[dict[str, str]], y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    strata = np.where(y[:, 0] == 0, 0, np.where(y[:, 1] == 1, 1, 2))
    groups = [r.get("patient_key") or r["path"] for r in rows]
    return T.split_indices(strata, groups=groups, val_fraction=VAL_FRACTION, seed=seed)


def covid_split(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    return T.split_indices(y, val_fraction=VAL_FRACTION, seed=seed)


def pneumonia_loss(y_true: Any, y_pred: Any) -> Any:
    """BCE on P(pneumonia) + cross-entropy of the subtype, counted on pneumonia images only."""
    from keras import ops

    eps = 1e-7
    p = ops.clip(y_pred, eps, 1 - eps)
    bce = -(y_true[:, 0] * ops.log(p[:, 0]) + (1 - y_true[:, 0]) * ops.log(1 - p[:, 0]))
    sub = -(y_true[:, 1] * ops.log(p[:, 1]) + y_true[:, 2] * ops.log(p[:, 2]))
    return ops.mean(bce) + ops.sum(sub * y_true[:, 0]) / (ops.sum(y_true[:, 0]) + 1.0)


def build_pneumonia_net(seed: int) -> Any:
    import keras
    from keras import layers

    inputs, features = T.build_backbone(SIZES["pneumonia"], 1, WIDTH)
    x = layers.Dropout(0.2, seed=seed)(features)
    pneumonia = layers.Dense(1, activation="sigmoid", name="pneumonia")(x)
    subtype = layers.Dense(2, activation="softmax", name="subtype")(x)
    outputs = layers.Concatenate(name="probabilities")([pneumonia, subtype])
    return keras.Model(inputs, outputs, name="pneumonia_cnn")


def build_covid_net(seed: int, size: int | None = None) -> Any:
    import keras
    from keras import layers

    inputs, features = T.build_backbone(size or SIZES["covid19"], 1, WIDTH)
    x = layers.Dropout(0.2, seed=seed)(features)
    outputs = layers.Dense(len(COVID_CLASSES), activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="covid19_cnn")


def _fit_or_load(config: T.TrainConfig, name: str, build: Any, fit_args: dict[str, Any]) -> tuple[Any, dict]:
    """Train (or, with ``extra["reuse"]``, load the bundle's existing network to redo "
    "calibration/gate/card)."""
    import keras

    T.setup_tensorflow(config.seed, config.threads)
    existing, saved_history = config.out_dir / "model.keras", config.out_dir / "history.json"
    if config.extra.get("reuse") and existing.is_file():
        net = keras.models.load_model(existing, compile=False)
        if saved_history.is_file():
            return net, json.loads(saved_history.read_text())
        meta = json.loads((config.out_dir / "model.json").read_text())
        return net, meta.get("training", {}).get("history", {})
    net = build(config.seed)
    net.summary(print_fn=logger.info)
    history = T.fit(net, epochs=config.epochs or EPOCHS[name], seed=config.seed, **fit_args)
    # Saved before calibration and gate, so those can be redone with ``reuse`` without retraining.
    config.out_dir.mkdir(parents=True, exist_ok=True)
    net.save(existing)
    saved_history.write_text(json.dumps(history), encoding="utf-8")
    return net, history


def train_pneumonia(config: T.TrainConfig) -> Path:
    """Train ``pneumonia`` and write its bundle and card (see module docstring)."""
    rows, x, y = load_pneumonia(config.data)
    tr, va = pneumonia_split(rows, y, config.seed)
    logger.info("pneumonia: %d train, %d validation images", len(tr), len(va))
    net, history = _fit_or_load(
        config,
        "pneumonia",
        build_pneumonia_net,
        {"x_train": x[tr], "y_train": y[tr], "x_val": x[va], "y_val": y[va], "loss": pneumonia_loss},
    )
    from inference import chest_card

    return chest_card.finish_pneumonia(config, net, history, rows, x, y, tr, va)


def train_covid19(config: T.TrainConfig) -> Path:
    """Train ``covid19`` (one network per :data:`COVID_MEMBER_SIZES`, averaged) and write its bundle and card.

    With ``extra["reuse"]`` the bundle's network is loaded instead; with ``extra["members_dir"]`` a member
    saved there as ``covid19_<size>.keras`` by an earlier run is loaded instead of trained.
    """
    rows, x, y = load_covid(config.data)
    tr, va = covid_split(y, config.seed)
    logger.info("covid19: %d train, %d validation images", len(tr), len(va))
    existing = config.out_dir / "model.keras"
    if config.extra.get("reuse") and existing.is_file():
        net, history = _fit_or_load(config, "covid19", build_covid_net, {})
    else:
        T.setup_tensorflow(config.seed, config.threads)
        members, history = [], {}
        for size in COVID_MEMBER_SIZES:
            member, member_history = _covid_member(config, size)
            members.append(member)
            history.update({f"{k} ({size} px)": v for k, v in member_history.items()})
        net = combine_covid(members) if len(members) > 1 else members[0]
        config.out_dir.mkdir(parents=True, exist_ok=True)
        net.save(existing)
        (config.out_dir / "history.json").write_text(json.dumps(history), encoding="utf-8")
    from inference import chest_card

    return chest_card.finish_covid19(config, net, history, rows, x, y, tr, va)


def _covid_member(config: T.TrainConfig, size: int) -> tuple[Any, dict]:
    """One covid19 network at ``size`` px: trained (seeded), or loaded from ``extra["members_dir"]``."""

    def train() -> tuple[Any, dict]:
        import keras

        _, x, y = load_covid(config.data, size)
        tr, va = covid_split(y, config.seed)
        onehot = np.eye(len(COVID_CLASSES), dtype=np.float32)[y]
        keras.utils.set_random_seed(config.seed)
        net = build_covid_net(config.seed, size)
        history = T.fit(
            net,
            x[tr],
            onehot[tr],
            x[va],
            onehot[va],
            loss=keras.losses.CategoricalCrossentropy(),
            metrics=["accuracy"],
            epochs=config.epochs or EPOCHS["covid19"],
            seed=config.seed,
        )
        return net, history

    return T.cached_network(config.extra.get("members_dir"), f"covid19_{size}", train)


def combine_covid(members: list[Any]) -> Any:
    """One network averaging the members' softmax outputs; input: the largest member's.

    The largest member's layers stay top-level (the gate's embedding layers and the Grad-CAM convolution are
    its own); each smaller member is nested as ``member_<size>`` behind a bilinear resize of the input.
    """
    import keras
    from keras import layers

    members = sorted(members, key=lambda m: int(m.input_shape[1]))
    main = members[-1]
    size = int(main.input_shape[1])
    outputs = [main.output]
    for member in members[:-1]:
        s = int(member.input_shape[1])
        wrapped = keras.Model(member.inputs, member.output, name=f"member_{s}")
        small = layers.Resizing(s, s, interpolation="bilinear", name=f"resize_{s}")(main.inputs[0])
        outputs.append(wrapped(small))
    averaged = layers.Average(name="probabilities_mean")(outputs)
    return keras.Model(main.inputs, averaged, name=f"covid19_cnn_x{len(members)}_{size}")


def _evaluate(name: str) -> T.EvaluateFn:
    def evaluate(bundle_dir: Path, data: Path) -> dict[str, Any]:
        from inference import chest_card

        return chest_card.evaluate_bundle(name, bundle_dir, data)

    return evaluate


T.register(T.Recipe("pneumonia", train_pneumonia, _evaluate("pneumonia"), "pneumonia + subtype, chest X-ray"))
T.register(T.Recipe("covid19", train_covid19, _evaluate("covid19"), "normal / COVID-19 / viral pneumonia"))
