"""The learning loop as one chain, through `gateway serve` (tiny configured bundles active), the API and the
CLI: radiologists' decisions through the API -> a de-identified export (DICOM and PNG) that the PHI check
passes, and fails once a file is made leaky -> `gateway train` on a tiny base plus the export -> a candidate
in the registry -> another reviewed case that neither model trained on joins the fixed evaluation set ->
the promotion gate accepts a better candidate (other weights, whose answers the evaluation labels follow)
and refuses the retrained one (one epoch on 27 images: worse), leaving out the reviewed images it learnt
from -> the next study's SR at the PACS names the new version, the workers never restarted -> the
retrained version in shadow mode: its predictions stored and never delivered -> the performance
endpoint's figures equal a computation by hand on this test's cases, and its drift section compares live
answers with the gate's reference."""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from core import labels
from inference.bundle import BundleModel
from inference.model import assess
from inference.preprocess import load_any
from tests import factories as f
from tests.inference.tiny_models import make_tiny_bundles
from tests.peers import gateway_command, send_file, wait_for
from tests.review_site import Site, _ready, review_site
from tests.training.tiny_data import write_tiny_pneumonia_data

pytestmark = [pytest.mark.e2e]

RETRAINED = "0.1.0-r1"
BETTER = "0.2.0-b"
EVALUATION_IMAGES = 40


def _case(site: Site, uid: str) -> dict[str, Any]:
    response = site.get(f"/api/cases/{uid}")
    assert response.status_code == 200, response.text
    case: dict[str, Any] = response.json()
    return case


def _review(site: Site, uid: str, choose: Any) -> list[tuple[str, str, str, str]]:
    """Decide the pneumonia answers of a study; (sop uid, AI label, final label, action) per image."""
    model = next(m for m in _case(site, uid)["models"] if m["name"] == "pneumonia")
    answers, decided = [], []
    for image in model["images"]:
        label = choose(image, model)
        answers.append({"sop_instance_uid": image["sop_instance_uid"], "label": label})
        action = "confirmed" if label == image["ai_label"] else "corrected"
        decided.append((image["sop_instance_uid"], image["ai_label"], label, action))
    response = site.post(
        f"/api/cases/{uid}/reviews", {"model": "pneumonia", "base_version": 0, "answers": answers}
    )
    assert response.status_code == 201, response.text
    return decided


def _other(image: dict[str, Any], model: dict[str, Any]) -> str:
    return next(lab["key"] for lab in model["labels"] if lab["key"] != image["ai_label"])


def _send_chest(site: Site, folder: Path, index: int) -> tuple[str, Path]:
    ds = f.chest_radiograph(study_uid=generate_uid(), series_uid=generate_uid())
    ds.PixelData = (f.chest_gray(index=index).astype(np.uint16) * 16).tobytes()
    path = f.save(ds, folder / f"chest-{index}.dcm")
    assert send_file(site.dicom_port, path, calling="MODALITY") == 0
    uid = str(ds.StudyInstanceUID)
    wait_for(f"chest study {index} ready", partial(_ready, site, uid), timeout=120)
    return uid, path


def _study(site: Site, uid: str) -> dict[str, Any]:
    response = site.get(f"/api/studies/{uid}")
    assert response.status_code == 200, response.text
    study: dict[str, Any] = response.json()
    return study


def _pacs_srs(site: Site, study_uid: str) -> list[pydicom.Dataset]:
    return [
        ds for ds in site.pacs_objects().values() if ds.StudyInstanceUID == study_uid and ds.Modality == "SR"
    ]


def _wilson(successes: int, n: int) -> float | None:
    return successes / n if n else None


def _kappa(pairs: list[tuple[str, str]]) -> float | None:
    n = len(pairs)
    po = sum(a == b for a, b in pairs) / n
    ai, final = Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
    pe = sum(ai[k] * final[k] for k in ai.keys() | final.keys()) / n**2
    return None if pe == 1 else (po - pe) / (1 - pe)


def _by_hand(pairs: list[tuple[str, str, str, str]]) -> dict[str, Any]:
    """The performance figures of one version's decided images, computed here: "any finding" positive."""
    decided = [(ai, final) for _, ai, final, _ in pairs if labels.NOT_ASSESSABLE not in (ai, final)]
    neg = "no_pneumonia"
    tp = sum(a != neg and b != neg for a, b in decided)
    fp = sum(a != neg and b == neg for a, b in decided)
    fn = sum(a == neg and b != neg for a, b in decided)
    tn = sum(a == neg and b == neg for a, b in decided)
    return {
        "images": len(pairs),
        "counts": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
        "kappa": _kappa(decided),
        "sensitivity": _wilson(tp, tp + fn),
        "specificity": _wilson(tn, tn + fp),
        "ppv": _wilson(tp, tp + fp),
        "npv": _wilson(tn, tn + fn),
        "confirmation_rate": _wilson(sum(p[3] == "confirmed" for p in pairs), len(pairs)),
        "override_rate": _wilson(sum(p[3] == "corrected" for p in pairs), len(pairs)),
    }


def _label(answers: dict[str, tuple[float, bool]] | None) -> str:
    return labels.NOT_ASSESSABLE if answers is None else labels.ai_label("pneumonia", answers)


def _assert_figures(served: dict[str, Any], hand: dict[str, Any]) -> None:
    assert served["images"] == hand["images"] and served["counts"] == hand["counts"]
    for key in ("kappa", "sensitivity", "specificity", "ppv", "npv", "confirmation_rate", "override_rate"):
        value = served[key]["value"]
        if hand[key] is None:
            assert value is None, key
        else:
            assert value == pytest.approx(hand[key], abs=1e-12), key


def test_the_learning_loop(tmp_path: Path) -> None:
    bundles = make_tiny_bundles(tmp_path / "bundles")
    evaluation = tmp_path / "evaluation"
    with review_site(
        tmp_path / "site",
        INFERENCE__MODEL_DIRS=str(bundles),
        INFERENCE__EVALUATION_SETS=json.dumps({"pneumonia": str(evaluation)}),
        INFERENCE__DRIFT_MIN_IMAGES="1",
    ) as site:
        env = site.env
        first = gateway_command(env, "models", "show", "pneumonia", "0.0.1-test")
        assert json.loads(first.stdout)["status"] == "active", first.stdout + first.stderr

        # 1. radiologists decide through the API
        reviewed: dict[str, list[tuple[str, str, str, str]]] = {"0.0.1-test": []}
        reviewed["0.0.1-test"] += _review(site, site.studies["chest"], lambda image, m: image["ai_label"])
        corrections = iter([True, False])
        reviewed["0.0.1-test"] += _review(
            site,
            site.studies["chest2"],
            lambda image, m: _other(image, m) if next(corrections) else image["ai_label"],
        )

        # 2. de-identified exports, checked for PHI
        png, dicom = tmp_path / "export-png", tmp_path / "export-dicom"
        for out, images in ((png, "png"), (dicom, "dicom")):
            done = gateway_command(
                env,
                "export",
                "--out",
                str(out),
                "--images",
                images,
                "--model",
                "pneumonia",
                "--decision",
                "any",
            )
            assert done.returncode == 0, done.stderr[-2000:]
            assert "3 rows, 3 images" in done.stdout, done.stdout
            check = gateway_command(env, "export", "--verify", str(out))
            assert check.returncode == 0 and "0 problems" in check.stdout, check.stdout
        leaky_file = next(dicom.rglob("*.dcm"))
        leaky = pydicom.dcmread(leaky_file)
        leaky.PatientComments = "Two^Images ACC-TWO ACC-XSS"
        leaky.save_as(leaky_file)
        check = gateway_command(env, "export", "--verify", str(dicom))
        assert check.returncode == 1 and "PatientComments" in check.stdout, check.stdout
        exported_ids = {r["image"] for r in csv.DictReader((png / "pneumonia" / "labels.csv").open())}
        assert len(exported_ids) == 3

        # 3. retrained on a tiny base plus the export: a candidate
        base = write_tiny_pneumonia_data(tmp_path / "base", count=24)
        trained = gateway_command(
            env, "train", "pneumonia", "--data", str(base), "--from-export", str(png),
            "--epochs", "1", "--seed", "5", "--version", RETRAINED, timeout=900,
        )  # fmt: skip
        assert trained.returncode == 0, trained.stderr[-3000:]
        shown = json.loads(gateway_command(env, "models", "show", "pneumonia", RETRAINED).stdout)
        assert shown["status"] == "candidate"
        assert set(shown["data_summary"]["exported_image_ids"]) == exported_ids
        assert (Path(shown["path"]) / "card.md").is_file()

        # 4. one more reviewed case, after the export: neither model trained on it
        later_uid, later_path = _send_chest(site, tmp_path, 7)

        # a better candidate: other weights, whose answers the evaluation set's labels reproduce (AUC 1)
        better = make_tiny_bundles(tmp_path / "better", seed=2000, version=BETTER, names=("pneumonia",))
        better_model = BundleModel(better / "pneumonia")
        (evaluation / "images").mkdir(parents=True)
        for i in range(EVALUATION_IMAGES):
            cv2.imwrite(str(evaluation / "images" / f"{i}.png"), f.chest_gray(index=100 + i))
        answers = assess(
            better_model, [load_any(evaluation / "images" / f"{i}.png") for i in range(EVALUATION_IMAGES)]
        )
        scored = [a.findings[0].probability for a in answers]
        assert len(set(scored)) == EVALUATION_IMAGES
        cut = float(np.median(scored))
        with open(evaluation / "labels.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path", "label", "subtype"])
            for i, p in enumerate(scored):
                writer.writerow(
                    [f"images/{i}.png", *(("pneumonia", "bacteria") if p > cut else ("normal", "normal"))]
                )
        meta = json.loads((better / "pneumonia" / "model.json").read_text())
        meta["outputs"][0]["threshold"] = cut  # its calibrated threshold on this population
        (better / "pneumonia" / "model.json").write_text(json.dumps(meta))
        (later_answer,) = assess(better_model, [load_any(later_path)])
        positive_later = later_answer.findings[0].probability > cut
        reviewed["0.0.1-test"] += _review(
            site, later_uid, lambda image, m: "bacterial_pneumonia" if positive_later else "no_pneumonia"
        )
        assert gateway_command(env, "models", "add", str(better / "pneumonia")).returncode == 0

        # 5. the gate: the better candidate goes live ...
        passed = gateway_command(env, "models", "promote", "pneumonia", BETTER, timeout=600)
        assert passed.returncode == 0, passed.stdout + passed.stderr
        assert "PASSED" in passed.stdout and "DeLong" in passed.stdout
        # every reviewed case counts: neither of these two versions was trained on any
        assert f"{EVALUATION_IMAGES} of the fixed set, 4 reviewed cases neither model trained on)" in (
            passed.stdout
        )
        promoted = json.loads(gateway_command(env, "models", "show", "pneumonia", BETTER).stdout)
        gate = promoted["metrics"]["gate"]
        assert promoted["status"] == "active" and gate["reviewed_images"] == 4
        assert gate["candidate"]["auc"] > gate["active"]["auc"]
        assert promoted["metrics"]["reference"] == gate["candidate"]["reference"]
        assert promoted["metrics"]["reference"]["images"] == EVALUATION_IMAGES + 4

        # ... the retrained one (one epoch on 27 images) is worse, and the reviewed images it learnt from are
        # left out of the evaluation
        refused = gateway_command(env, "models", "promote", "pneumonia", RETRAINED, timeout=600)
        assert refused.returncode == 1 and "REFUSED" in refused.stdout, refused.stdout + refused.stderr
        assert "1 reviewed cases neither model trained on, 3 trained on left out" in refused.stdout
        assert "is not higher than the active model's" in refused.stdout or "needs positive" in refused.stdout
        assert json.loads(gateway_command(env, "models", "show", "pneumonia", RETRAINED).stdout)[
            "status"
        ] == ("candidate")

        # 6. the next study is reported by the new version, the same workers
        live_uid, _ = _send_chest(site, tmp_path, 8)
        reports = {r["model"]: r["version"] for r in _study(site, live_uid)["reports"]}
        assert reports["pneumonia"] == BETTER
        wait_for("both chest SRs at the PACS", lambda: len(_pacs_srs(site, live_uid)) >= 2 or None, 60)
        assert any(BETTER.encode() in p.read_bytes() for p in site.pacs_dir.glob("*"))

        # 7. shadow: stored beside the active answers, never delivered
        assert gateway_command(env, "models", "shadow", "pneumonia", RETRAINED).returncode == 0
        shadow_uid, _ = _send_chest(site, tmp_path, 9)
        study = _study(site, shadow_uid)
        shadowed = [p for p in study["shadow_predictions"] if p["model"] == "pneumonia"]
        assert shadowed and {p["version"] for p in shadowed} == {RETRAINED}
        assert all(p["version"] != RETRAINED for p in study["predictions"])
        wait_for("both chest SRs at the PACS", lambda: len(_pacs_srs(site, shadow_uid)) >= 2 or None, 60)
        assert not any(RETRAINED.encode() in p.read_bytes() for p in site.pacs_dir.glob("*"))
        reviewed[BETTER] = _review(site, shadow_uid, _other)

        # 8. the performance endpoint against a computation by hand
        performance = site.get("/api/models/pneumonia/performance").json()
        by_version = {v["version"]: v for v in performance["versions"]}
        assert set(by_version) == set(reviewed)
        for version, pairs in reviewed.items():
            _assert_figures(by_version[version], _by_hand(pairs))
        shadow_answers: dict[str, dict[str, tuple[float, bool]]] = {}
        for p in shadowed:
            if p["assessable"]:
                shadow_answers.setdefault(p["sop_instance_uid"], {})[p["finding"]] = (
                    p["probability"],
                    p["label"] == "present",
                )
        shadow_pairs = [
            (uid, _label(shadow_answers.get(uid)), final, "") for uid, _, final, _ in reviewed[BETTER]
        ]
        (shadow,) = performance["shadow"]
        assert shadow["version"] == RETRAINED and shadow["images"] == len(shadow_pairs)
        _assert_figures({**shadow["shadow"], "images": len(shadow_pairs)}, _by_hand(shadow_pairs))
        _assert_figures(shadow["active_on_the_same_images"], _by_hand(reviewed[BETTER]))

        drift = {d["version"]: d for d in performance["drift"]}
        assert drift["0.0.1-test"]["status"] == "no reference"
        live = drift[BETTER]
        assert live["images"] == 2 and live["reference"] == promoted["metrics"]["reference"]
        assert live["status"] in ("ok", "drift") and (live["status"] == "drift") == bool(live["warnings"])
        mine = [
            p
            for s in (live_uid, shadow_uid)
            for p in _study(site, s)["predictions"]
            if p["model"] == "pneumonia"
        ]
        found = [p["probability"] for p in mine if p["finding"] == "pneumonia"]
        if found:
            assert live["mean_probability"]["pneumonia"] == pytest.approx(sum(found) / len(found))
        assert math.isclose(live["not_assessable_share"], 1 - len(found) / 2)
        page = site.get("/models/pneumonia/performance")
        assert page.status_code == 200 and "Drift" in page.text and BETTER in page.text
