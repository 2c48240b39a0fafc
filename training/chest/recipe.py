"""Training recipes for the chest radiograph models ``pneumonia`` and ``covid19`` (registered at import).

The networks, data and split are :mod:`training.chest.network`'s; :mod:`training.chest.bundle` calibrates,
gates and writes bundle and card after training.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from training import fitting, recipes
from training.chest import bundle
from training.chest.network import (
    COVID_CLASSES,
    COVID_MEMBER_SIZES,
    EPOCHS,
    PNEUMONIA_MEMBERS,
    build_covid_net,
    build_pneumonia_net,
    combine_covid,
    combine_members,
    covid_split,
    load_covid,
    load_pneumonia,
    pneumonia_loss,
    pneumonia_split,
    uses_processing,
)

logger = logging.getLogger(__name__)


def _fit_or_load(
    config: recipes.TrainConfig, name: str, build: Any, fit_args: dict[str, Any]
) -> tuple[Any, dict]:
    """Train (or, with ``extra["reuse"]``, load the bundle's existing network to redo "
    "calibration/gate/card)."""
    import keras

    fitting.setup_tensorflow(config.seed, config.threads)
    existing, saved_history = config.out_dir / "model.keras", config.out_dir / "history.json"
    if config.extra.get("reuse") and existing.is_file():
        net = keras.models.load_model(existing, compile=False)
        if saved_history.is_file():
            return net, json.loads(saved_history.read_text())
        meta = json.loads((config.out_dir / "model.json").read_text())
        return net, meta.get("training", {}).get("history", {})
    net = build(config.seed)
    net.summary(print_fn=logger.info)
    history = fitting.fit(net, epochs=config.epochs or EPOCHS[name], seed=config.seed, **fit_args)
    # Saved before calibration and gate, so those can be redone with ``reuse`` without retraining.
    config.out_dir.mkdir(parents=True, exist_ok=True)
    net.save(existing)
    saved_history.write_text(json.dumps(history), encoding="utf-8")
    return net, history


def train_pneumonia(config: recipes.TrainConfig) -> Path:
    """Train ``pneumonia`` and write its bundle and card (see module docstring).

    With ``extra["members"]`` = n > 1 (1.1.0 on: :data:`PNEUMONIA_MEMBERS`) the bundle averages n networks
    trained alike with seeds seed, seed + 1, ... (:func:`training.chest.network.combine_members`); member 0 is
    the one ``reuse`` loads, the others come from ``extra["members_dir"]`` when an earlier run saved them.
    """
    rows, x, y = load_pneumonia(config.data)
    tr, va = pneumonia_split(rows, y, config.seed)
    logger.info("pneumonia: %d train, %d validation images", len(tr), len(va))
    fit_args = {
        "x_train": x[tr],
        "y_train": y[tr],
        "x_val": x[va],
        "y_val": y[va],
        "loss": pneumonia_loss,
        "processing": uses_processing("pneumonia", config.extra),
    }
    members = int(config.extra.get("members", PNEUMONIA_MEMBERS))
    net, history = _fit_or_load(config, "pneumonia", build_pneumonia_net, fit_args)
    if members > 1 and not net.name.startswith("pneumonia_cnn_x"):  # reuse of an averaged bundle: as it is
        nets = [net]
        for k in range(1, members):

            def train_member(k: int = k) -> tuple[Any, dict]:
                member = build_pneumonia_net(config.seed + k)
                epochs = config.epochs or EPOCHS["pneumonia"]
                return member, fitting.fit(member, epochs=epochs, seed=config.seed + k, **fit_args)

            nets.append(
                fitting.cached_network(config.extra.get("members_dir"), f"pneumonia_{k}", train_member)[0]
            )
        net = combine_members(nets, "pneumonia_cnn")
    return bundle.finish_pneumonia(config, net, history, rows, x, y, tr, va)


def train_covid19(config: recipes.TrainConfig) -> Path:
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
        fitting.setup_tensorflow(config.seed, config.threads)
        members, history = [], {}
        for size in COVID_MEMBER_SIZES:
            member, member_history = _covid_member(config, size)
            members.append(member)
            history.update({f"{k} ({size} px)": v for k, v in member_history.items()})
        net = combine_covid(members) if len(members) > 1 else members[0]
        config.out_dir.mkdir(parents=True, exist_ok=True)
        net.save(existing)
        (config.out_dir / "history.json").write_text(json.dumps(history), encoding="utf-8")
    return bundle.finish_covid19(config, net, history, rows, x, y, tr, va)


def _covid_member(config: recipes.TrainConfig, size: int) -> tuple[Any, dict]:
    """One covid19 network at ``size`` px: trained (seeded), or loaded from ``extra["members_dir"]``."""

    def train() -> tuple[Any, dict]:
        import keras

        _, x, y = load_covid(config.data, size)
        tr, va = covid_split(y, config.seed)
        onehot = np.eye(len(COVID_CLASSES), dtype=np.float32)[y]
        keras.utils.set_random_seed(config.seed)
        net = build_covid_net(config.seed, size)
        history = fitting.fit(
            net,
            x[tr],
            onehot[tr],
            x[va],
            onehot[va],
            loss=keras.losses.CategoricalCrossentropy(),
            metrics=["accuracy"],
            epochs=config.epochs or EPOCHS["covid19"],
            seed=config.seed,
            processing=uses_processing("covid19", config.extra),
        )
        return net, history

    return fitting.cached_network(config.extra.get("members_dir"), f"covid19_{size}", train)


def _evaluate(name: str) -> recipes.EvaluateFn:
    def evaluate(bundle_dir: Path, data: Path) -> dict[str, Any]:
        return bundle.evaluate_bundle(name, bundle_dir, data)

    return evaluate


recipes.register(
    recipes.Recipe("pneumonia", train_pneumonia, _evaluate("pneumonia"), "pneumonia + subtype, chest X-ray")
)
recipes.register(
    recipes.Recipe("covid19", train_covid19, _evaluate("covid19"), "normal / COVID-19 / viral pneumonia")
)
