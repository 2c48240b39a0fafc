"""What a reviewer chooses from: one label per (image, model), and how a label maps to the model's findings.

A model reports several findings per image (pneumonia: pneumonia, bacterial and viral pneumonia; COVID-19:
COVID-19 and viral pneumonia), each present or absent. A reviewer answers the question the model asks with one
label ("bacterial pneumonia", "normal", ...), and the verified report carries the findings that label means.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

NOT_ASSESSABLE = "not_assessable"

#: What a reviewer did with the AI's answer for one image.
ACTIONS = ("confirmed", "corrected", "not assessable")


@dataclass(frozen=True)
class Label:
    key: str
    title: str
    #: finding name -> present; findings not named are absent.
    present: frozenset[str]


LABEL_SETS: dict[str, tuple[Label, ...]] = {
    "glaucoma": (
        Label("no_glaucoma", "No glaucoma", frozenset()),
        Label("glaucoma", "Glaucoma", frozenset({"glaucoma"})),
    ),
    "pneumonia": (
        Label("no_pneumonia", "No pneumonia", frozenset()),
        Label("bacterial_pneumonia", "Bacterial pneumonia", frozenset({"pneumonia", "bacterial_pneumonia"})),
        Label("viral_pneumonia", "Viral pneumonia", frozenset({"pneumonia", "viral_pneumonia"})),
    ),
    "covid19": (
        Label("normal", "Normal", frozenset()),
        Label("covid19", "COVID-19", frozenset({"covid19"})),
        Label("viral_pneumonia", "Viral pneumonia", frozenset({"viral_pneumonia"})),
    ),
}


#: A reviewer's label as the columns of a training labels CSV (what `gateway train MODEL` reads; the shipped
#: data's vocabulary), per model; a label not here is written as it is, in ``label``.
TRAINING_LABELS: dict[str, dict[str, dict[str, str]]] = {
    "glaucoma": {"no_glaucoma": {"label": "normal"}, "glaucoma": {"label": "glaucoma"}},
    "pneumonia": {
        "no_pneumonia": {"label": "normal", "subtype": "normal"},
        "bacterial_pneumonia": {"label": "pneumonia", "subtype": "bacteria"},
        "viral_pneumonia": {"label": "pneumonia", "subtype": "virus"},
    },
    "covid19": {
        "normal": {"label": "normal"},
        "covid19": {"label": "covid19"},
        "viral_pneumonia": {"label": "viral_pneumonia"},
    },
}


def training_columns(model: str, label: str) -> dict[str, str]:
    """The label columns of a training CSV row for a reviewer's ``label`` of ``model``."""
    return dict(TRAINING_LABELS.get(model, {}).get(label, {"label": label}))


#: (model, finding) -> the finding it refines: a subtype is reported (and can be uncertain) only where its
#: parent is present (the pneumonia model's bacterial/viral outputs are conditional on pneumonia).
REQUIRES: dict[tuple[str, str], str] = {
    ("pneumonia", "bacterial_pneumonia"): "pneumonia",
    ("pneumonia", "viral_pneumonia"): "pneumonia",
}


#: What a reader must know about a finding before using it, said beside it in every SR, page and PDF.
SUBTYPE_CAUTION = (
    "Bacterial vs viral subtype is unreliable (validation AUC 0.79; experts also disagree on a radiograph): "
    "do not base treatment on it."
)
CAUTIONS: dict[tuple[str, str], str] = {
    ("pneumonia", "bacterial_pneumonia"): SUBTYPE_CAUTION,
    ("pneumonia", "viral_pneumonia"): SUBTYPE_CAUTION,
}


def cautions(model: str, findings: Iterable[str]) -> list[str]:
    """The cautions of ``model``'s ``findings``, each text once, in the order of the findings."""
    out: list[str] = []
    for finding in findings:
        text = CAUTIONS.get((model, finding))
        if text is not None and text not in out:
            out.append(text)
    return out


def counts(model: str, finding: str, present: set[str] | frozenset[str]) -> bool:
    """Whether ``finding`` of ``model`` says anything on an image whose present findings are ``present``
    (False for a subtype of an absent finding)."""
    parent = REQUIRES.get((model, finding))
    return parent is None or parent in present


def labels_of(model: str, findings: list[str] | tuple[str, ...] = ()) -> tuple[Label, ...]:
    """The labels of ``model``; for a model without a set here (a plug-in), "none" or one of its findings."""
    known = LABEL_SETS.get(model)
    if known is not None:
        return known
    return (
        Label("none", "No finding", frozenset()),
        *(Label(f, f.replace("_", " ").capitalize(), frozenset({f})) for f in findings),
    )


def label_title(model: str, key: str | None, findings: list[str] | tuple[str, ...] = ()) -> str:
    if key is None or key == NOT_ASSESSABLE:
        return "Not assessable"
    return next((label.title for label in labels_of(model, findings) if label.key == key), key)


def ai_label(model: str, probabilities: Mapping[str, tuple[float, bool]]) -> str:
    """The label the AI's findings amount to; ``probabilities``: finding -> (probability, present).

    Among labels whose findings are all present, the one naming most findings wins (bacterial pneumonia over
    bare pneumonia), ties broken by the lower probability among its findings. Present findings that no label
    names alone (pneumonia with neither subtype above its threshold) take the label whose missing finding is
    most probable.
    """
    present = {f for f, (_, is_present) in probabilities.items() if is_present}
    known = labels_of(model, tuple(probabilities))

    def p(finding: str) -> float:
        return probabilities.get(finding, (0.0, False))[0]

    candidates = [lab for lab in known if lab.present <= present]
    if not candidates:
        return known[0].key
    best = max(candidates, key=lambda lab: (len(lab.present), min((p(f) for f in lab.present), default=0.0)))
    if not best.present and present:
        choices = [lab for lab in known if lab.present & present]
        if choices:
            return max(choices, key=lambda lab: max((p(f) for f in lab.present - present), default=0.0)).key
    return best.key


def findings_of(model: str, key: str, findings: list[str] | tuple[str, ...]) -> dict[str, bool]:
    """finding -> present that label ``key`` means, for the findings the AI report holds."""
    label = next((lab for lab in labels_of(model, findings) if lab.key == key), None)
    if label is None:
        raise ValueError(f"unknown label {key!r} for model {model!r}")
    return {f: f in label.present for f in findings}
