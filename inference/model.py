"""The Model protocol and :func:`run_model`, which turns stored instances into :class:`ImageResult` objects.

Models may also offer ``heatmap(image)`` and ``describe_input(image)``; :func:`assess` uses them when present.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import numpy as np

from core.domain import Finding, ImageResult, InstanceRef, ModelInfo
from core.encoding import describe
from core.settings import IngestSettings
from inference.preprocess import UnreadableImage, load_dicom_image

logger = logging.getLogger(__name__)

ModalityKind = Literal["fundus", "chest"]


@runtime_checkable
class Model(Protocol):
    """A screening model: a consistency gate in front of a classifier that returns one Finding per output."""

    info: ModelInfo
    modality_kind: ModalityKind

    def check_input(self, image: np.ndarray) -> str | None:
        """None when ``image`` (float32 [0, 1], HxW or HxWx3) suits this model, else the reason why not."""
        ...

    def predict(self, images: Sequence[np.ndarray]) -> list[list[Finding]]:
        """Findings for each image, in order; deterministic for the same input."""
        ...


def not_assessable(reason: str) -> str:
    """The reason text a result carries when no finding may be reported."""
    return reason if reason.startswith("not assessable") else f"not assessable: {reason}"


@dataclass(frozen=True)
class Assessment:
    """What a model said about one image, before it is tied to an instance or a file.

    ``reason`` says why when not assessable; on an assessable result it may carry the model's note on the
    input (``describe_input``, e.g. "input: optic-disc crop (used as given)").
    """

    assessable: bool
    findings: tuple[Finding, ...] = ()
    reason: str | None = None
    heatmap: np.ndarray | None = field(default=None, compare=False, repr=False)

    @classmethod
    def rejected(cls, reason: str) -> Assessment:
        return cls(assessable=False, reason=not_assessable(reason))


def assess(model: Model, images: Sequence[np.ndarray], *, with_heatmap: bool = False) -> list[Assessment]:
    """Gate every image, run the accepted ones through ``model.predict`` as one batch; never raises.

    A model failure on the batch makes every image in it not assessable with the error as reason.
    """
    results: dict[int, Assessment] = {}
    accepted: list[int] = []
    for i, image in enumerate(images):
        try:
            reason = model.check_input(image)
        except Exception as exc:  # e.g. an image of a shape the gate cannot measure
            logger.warning("gate of model %s failed: %s", model.info.name, exc)
            reason = f"input check failed: {type(exc).__name__}: {exc}"
        if reason is None:
            accepted.append(i)
        else:
            results[i] = Assessment.rejected(reason)
    if accepted:
        try:
            batch = model.predict([images[i] for i in accepted])
            if len(batch) != len(accepted):
                raise RuntimeError(f"predict returned {len(batch)} results for {len(accepted)} images")
        except Exception as exc:  # the model is a plug-in: report its failure per image, never crash the job
            logger.exception("model %s failed on a batch of %d images", model.info.name, len(accepted))
            for i in accepted:
                results[i] = Assessment.rejected(f"model error: {type(exc).__name__}: {exc}")
        else:
            for i, findings in zip(accepted, batch, strict=True):
                heatmap = _heatmap(model, images[i]) if with_heatmap else None
                note = _input_note(model, images[i])
                results[i] = Assessment(
                    assessable=True, findings=tuple(findings), reason=note, heatmap=heatmap
                )
    return [results[i] for i in range(len(images))]


def run_model(
    model: Model,
    instances: Sequence[InstanceRef],
    *,
    with_heatmap: bool = False,
    limits: IngestSettings | None = None,
    decoded: MutableMapping[Path, np.ndarray | str] | None = None,
) -> list[ImageResult]:
    """One :class:`ImageResult` per instance, in order; one bad image never fails the others.

    ``decoded`` is shared by the models of one study so each image is decoded once: every image read (made
    read-only, as models must not change their input) or the reason it is unreadable, by path.

    Unreadable pixels (beyond the decoding budget ``limits``, or anything a codec raises, a panic included)
    and images the gate rejects become ``assessable=False`` with "not assessable: <reason>" and no findings;
    the rest go through ``model.predict`` in one batch (see :func:`assess`).
    """
    outcome: dict[int, Assessment] = {}
    readable: list[tuple[int, np.ndarray]] = []
    images = {} if decoded is None else decoded
    for i, instance in enumerate(instances):
        if instance.path not in images:
            images[instance.path] = _load(instance, limits)
        image = images[instance.path]
        if isinstance(image, str):
            outcome[i] = Assessment.rejected(f"unreadable image: {image}")
        else:
            readable.append((i, image))
    assessed = assess(model, [image for _, image in readable], with_heatmap=with_heatmap)
    for (i, _), assessment in zip(readable, assessed, strict=True):
        if not assessment.assessable:
            logger.info("SOP instance %s %s", instances[i].sop_instance_uid, assessment.reason)
        outcome[i] = assessment
    return [
        ImageResult(
            instance=instance,
            model=model.info,
            assessable=outcome[i].assessable,
            findings=outcome[i].findings,
            reason=outcome[i].reason,
            heatmap=outcome[i].heatmap,
        )
        for i, instance in enumerate(instances)
    ]


def _load(instance: InstanceRef, limits: IngestSettings | None) -> np.ndarray | str:
    """The image, read-only, or why it cannot be read."""
    try:
        image = load_dicom_image(instance.path, limits=limits)
    except (UnreadableImage, OSError) as exc:
        logger.warning("SOP instance %s unreadable: %s", instance.sop_instance_uid, exc)
        return str(exc)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # load_dicom_image converts what it knows; nothing else may fail the job
        logger.warning("SOP instance %s unreadable: %s", instance.sop_instance_uid, describe(exc))
        return describe(exc)
    image.flags.writeable = False
    return image


def _input_note(model: Model, image: np.ndarray) -> str | None:
    """The model's note on an accepted input (optional ``describe_input``), e.g. "input: optic-disc crop"."""
    method = getattr(model, "describe_input", None)
    if method is None:
        return None
    try:
        note = method(image)
    except Exception:  # a note is a courtesy; losing it must not lose the finding
        logger.exception("describe_input failed for model %s", model.info.name)
        return None
    return None if note is None else str(note)


def _heatmap(model: Model, image: np.ndarray) -> np.ndarray | None:
    method = getattr(model, "heatmap", None)
    if method is None:
        return None
    try:
        return method(image)
    except Exception:  # a heatmap is an illustration; losing it must not lose the finding
        logger.exception("heatmap failed for model %s", model.info.name)
        return None
