"""Training recipes: a registry of per-model recipes and the configuration ``gateway train`` passes them.

A recipe is registered under a model name with :func:`register`; ``gateway train MODEL`` and ``gateway
evaluate MODEL`` dispatch through :data:`RECIPES`. Recipes live in their own modules (chest models in
:mod:`training.chest.recipe`; a fundus module registers ``glaucoma`` the same way) and are imported by
:func:`recipes`, so adding a model never edits this file's code paths: append the module to
:data:`RECIPE_MODULES` (or import it before calling :func:`get_recipe`).

What recipes share lives beside this module: :mod:`training.data` (labels, image cache, split),
:mod:`training.fitting` (seeded TensorFlow set-up, backbone, fit), :mod:`training.export` (bundle, TFLite,
class-activation output). Reproducibility: ``keras.utils.set_random_seed(seed)`` and TensorFlow op
determinism; the split, the augmentation and the weight initialisation all derive from ``seed``. Only
:mod:`training` imports TensorFlow, and only inside functions: serving runs the exported TFLite files.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from inference.registry import SHIPPED_DIR
from training.data import DEFAULT_SEED

WEIGHTS_DIR = SHIPPED_DIR
#: Modules imported by :func:`recipes`; each calls :func:`register` at import. Missing ones are skipped.
RECIPE_MODULES = ["training.chest.recipe", "training.glaucoma.recipe"]


@dataclass(frozen=True)
class TrainConfig:
    """What ``gateway train`` passes to a recipe."""

    data: Path
    out_dir: Path  # the bundle folder, e.g. inference/weights/pneumonia (card.md and figures too)
    epochs: int | None = None  # None: the recipe's default (early stopping still applies)
    seed: int = DEFAULT_SEED
    threads: int = 2
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def card_path(self) -> Path:
        """The model card, in the bundle folder; its figures are written beside it."""
        return self.out_dir / "card.md"


class TrainFn(Protocol):
    def __call__(self, config: TrainConfig) -> Path: ...


class EvaluateFn(Protocol):
    def __call__(self, bundle_dir: Path, data: Path) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Recipe:
    """How to train one model (writes bundle + card, returns the bundle folder) and evaluate it on data."""

    name: str
    train: TrainFn
    evaluate: EvaluateFn
    description: str = ""


RECIPES: dict[str, Recipe] = {}


def register(recipe: Recipe) -> Recipe:
    """Add (or replace) a recipe under ``recipe.name``."""
    RECIPES[recipe.name] = recipe
    return recipe


def recipes() -> dict[str, Recipe]:
    """All recipes, after importing :data:`RECIPE_MODULES` (modules that do not exist are skipped)."""
    for module in RECIPE_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    return RECIPES


def get_recipe(name: str) -> Recipe:
    found = recipes()
    if name not in found:
        raise KeyError(f"no training recipe for {name!r}; known: {', '.join(sorted(found)) or 'none'}")
    return found[name]


def release(config: TrainConfig, name: str) -> dict[str, Any]:
    """``version`` and ``changelog`` for a bundle trained with ``config``: those of the bundle already in
    ``config.out_dir``, else of the shipped bundle ``name`` (retraining reproduces the current release; a
    new version is a decision written into ``model.json``, not code), else a development version."""
    for folder in (config.out_dir, WEIGHTS_DIR / name):
        path = Path(folder) / "model.json"
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            return {key: data[key] for key in ("version", "changelog") if key in data}
    return {"version": "0.0.0.dev0"}


def default_config(name: str, data: Path, **kwargs: Any) -> TrainConfig:
    """Config that writes into the package (``inference/weights/<name>``, card included)."""
    return TrainConfig(data=Path(data), out_dir=WEIGHTS_DIR / name, **kwargs)
