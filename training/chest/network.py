"""The chest radiograph networks ``pneumonia`` and ``covid19``: data, split, architecture, loss.

``pneumonia`` (chest-xray-pneumonia, split grouped by ``patient_key``): the network outputs three columns,
P(pneumonia), P(bacterial | pneumonia), P(viral | pneumonia) (sigmoid + a 2-way softmax trained only on
pneumonia images). ``covid19`` (covid19-radiography, stratified split): a 3-way softmax normal / covid19 /
viral_pneumonia, the average of two networks trained at 128 and 160 px (:func:`combine_covid`). Gray input
(128 px pneumonia, 160 px covid19), the small CNN of :func:`training.recipes.build_backbone`, temperature
scaling and thresholds fitted on validation, an SSIM + Mahalanobis + domain-classifier input gate
(:mod:`training.chest.recipe` trains them, :mod:`training.chest.bundle` finishes bundle and card).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from training import data as T
from training.fitting import build_backbone

#: Input size per bundle (covid19: 160 px).
SIZES = {"pneumonia": 128, "covid19": 160}
#: covid19 (1.3.0) averages the softmax of two networks trained alike at these input sizes (the 1.1.0 and
#: 1.2.0 recipes); the bundle takes the largest and resizes inside the graph for the others.
COVID_MEMBER_SIZES = (128, 160)
WIDTH = 32
VAL_FRACTION = 0.2
#: pneumonia (1.1.0 on) averages this many networks trained alike with consecutive seeds.
PNEUMONIA_MEMBERS = 3
#: pneumonia: train on radiographs as other consoles process them
#: (:func:`training.fitting.console_processing`; ``extra["processing"]``).
PNEUMONIA_PROCESSING = False
#: covid19: the same for its networks (``extra["processing"]``).
COVID_PROCESSING = False


def uses_processing(name: str, extra: dict[str, Any]) -> bool:
    """Whether ``name``'s networks train with console processing: ``extra["processing"]`` (``gateway train
    --processing``), else the recipe's default."""
    return bool(extra.get("processing", PNEUMONIA_PROCESSING if name == "pneumonia" else COVID_PROCESSING))


EPOCHS = {"pneumonia": 14, "covid19": 20}  # covid19 1.1.0: 20 epochs beat 14 on validation (0.952 vs 0.944)
COVID_CLASSES = ("normal", "covid19", "viral_pneumonia")


def load_pneumonia(data: Path) -> tuple[list[dict[str, str]], np.ndarray, np.ndarray]:
    """Rows, uint8 images and targets N x 3: [pneumonia, bacterial, viral] (subtype columns 0 for normal)."""
    csv_path = T.labels_csv(data)
    rows = T.read_labels(csv_path)
    x = T.load_images(csv_path.parent, [r["path"] for r in rows], SIZES["pneumonia"])
    return rows, x, pneumonia_targets(rows)


def pneumonia_targets(rows: list[dict[str, str]]) -> np.ndarray:
    """Targets N x 3 of labels.csv rows: [pneumonia, bacterial, viral] (subtype columns 0 for normal)."""
    y = np.zeros((len(rows), 3), dtype=np.float32)
    for i, r in enumerate(rows):
        if r["label"] != "normal":
            y[i, 0] = 1.0
            y[i, 1 if r.get("subtype") == "bacteria" else 2] = 1.0
    return y


def load_covid(data: Path, size: int | None = None) -> tuple[list[dict[str, str]], np.ndarray, np.ndarray]:
    """Rows, uint8 images (``size``, default the bundle's input) and class indices (0 normal, 1 covid19,
    2 viral_pneumonia)."""
    csv_path = T.labels_csv(data)
    rows = T.read_labels(csv_path)
    x = T.load_images(csv_path.parent, [r["path"] for r in rows], size or SIZES["covid19"])
    return rows, x, covid_targets(rows)


def covid_targets(rows: list[dict[str, str]]) -> np.ndarray:
    """Class indices of labels.csv rows (0 normal, 1 covid19, 2 viral_pneumonia)."""
    return np.array([COVID_CLASSES.index(r["label"]) for r in rows], dtype=np.int64)


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

    inputs, features = build_backbone(SIZES["pneumonia"], 1, WIDTH)
    x = layers.Dropout(0.2, seed=seed)(features)
    pneumonia = layers.Dense(1, activation="sigmoid", name="pneumonia")(x)
    subtype = layers.Dense(2, activation="softmax", name="subtype")(x)
    outputs = layers.Concatenate(name="probabilities")([pneumonia, subtype])
    return keras.Model(inputs, outputs, name="pneumonia_cnn")


def build_covid_net(seed: int, size: int | None = None) -> Any:
    import keras
    from keras import layers

    inputs, features = build_backbone(size or SIZES["covid19"], 1, WIDTH)
    x = layers.Dropout(0.2, seed=seed)(features)
    outputs = layers.Dense(len(COVID_CLASSES), activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="covid19_cnn")


def combine_members(members: list[Any], name: str) -> Any:
    """One network averaging the outputs of members of one input size; the first member's layers stay
    top-level (the gate's embedding layers and the heatmap's feature maps are its own), the others are
    nested as ``member_<k>``."""
    import keras
    from keras import layers

    main = members[0]
    outputs = [main.output]
    for k, member in enumerate(members[1:], start=1):
        wrapped = keras.Model(member.inputs, member.output, name=f"member_{k}")
        outputs.append(wrapped(main.inputs[0]))
    averaged = layers.Average(name="probabilities_mean")(outputs)
    return keras.Model(main.inputs, averaged, name=f"{name}_x{len(members)}")


def combine_covid(members: list[Any]) -> Any:
    """One network averaging the members' softmax outputs; input: the largest member's.

    The largest member's layers stay top-level (the gate's embedding layers and the heatmap's feature maps are
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
