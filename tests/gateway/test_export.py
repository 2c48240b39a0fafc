"""Label exports end to end: studies processed by `gateway serve` with the shipped models, decided by a
radiologist through the API, exported de-identified by `gateway export` (folder, DICOM and PNG) and by
`POST /api/exports` (ZIP); the PHI check passes on every file and fails on a file made leaky; exported DICOM
passes dciodvfy as its source does."""

from __future__ import annotations

import csv
import io
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest

from tests.accounts import bearer
from tests.peers import gateway_command
from tests.reporting.dciodvfy import dciodvfy
from tests.review_site import Site, review_site
from tests.training.tiny_data import write_tiny_pneumonia_data

pytestmark = [pytest.mark.e2e]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with review_site(tmp_path_factory.mktemp("export")) as site:
        _decide_all(site)
        yield site


def _case(site: Site, name: str) -> dict[str, Any]:
    response = site.get(f"/api/cases/{site.studies[name]}")
    assert response.status_code == 200, response.text
    case: dict[str, Any] = response.json()
    return case


#: (model, AI label, final label) of every image decided, as the fixture decided them
DECIDED: list[tuple[str, str, str]] = []


def _decide(site: Site, name: str, model: str, choose: Any) -> None:
    case = _case(site, name)
    m = next(m for m in case["models"] if m["name"] == model)
    answers = []
    for image in m["images"]:
        label = choose(image, m)
        answer = {"sop_instance_uid": image["sop_instance_uid"], "label": label}
        if label == "not_assessable":
            answer["reason"] = "rotated"
        answers.append(answer)
        DECIDED.append((model, image["ai_label"], label))
    response = site.post(
        f"/api/cases/{case['study_instance_uid']}/reviews",
        {"model": model, "base_version": 0, "answers": answers},
    )
    assert response.status_code == 201, response.text


def _other(image: dict[str, Any], model: dict[str, Any]) -> str:
    return next(lab["key"] for lab in model["labels"] if lab["key"] != image["ai_label"])


def _decide_all(site: Site) -> None:
    """Chest: pneumonia confirmed, covid19 corrected; two-image chest: pneumonia one confirmed, one not
    assessable; fundus: glaucoma confirmed."""
    _decide(site, "chest", "pneumonia", lambda image, m: image["ai_label"])
    _decide(site, "chest", "covid19", _other)
    sequence = iter(["confirm", "not_assessable"])
    _decide(
        site,
        "chest2",
        "pneumonia",
        lambda image, m: image["ai_label"] if next(sequence) == "confirm" else "not_assessable",
    )
    _decide(site, "fundus", "glaucoma", lambda image, m: image["ai_label"])


def _source_values(site: Site) -> set[str]:
    """What no exported byte may contain: the sent studies' names, accession numbers, UIDs and dates."""
    values = {
        "Two^Images",
        "Eye^Patient",
        "ACC-XSS",
        "ACC-EYE",
        "ACC-TWO",
        "20240105",
        "20240310",
        "20240201",
    }
    values |= set(site.studies.values())
    return values


def test_dicom_export_is_clean_and_verifies(site: Site, tmp_path: Path) -> None:
    dry = gateway_command(site.env, "export", "--dry-run", "--decision", "any")
    assert dry.returncode == 0, dry.stderr
    assert "5 images would be exported" in dry.stdout  # chest 1+1, chest2 2, fundus 1
    confirmed = [d for d in DECIDED if d[1] == d[2] != "not_assessable"]
    assert confirmed, DECIDED

    out = tmp_path / "dicom-export"
    done = gateway_command(site.env, "export", "--out", str(out), "--images", "dicom", "--format", "jsonl")
    assert done.returncode == 0, done.stderr
    # confirmed only (the default)
    assert f"{len(confirmed)} rows, {len(confirmed)} images" in done.stdout
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted((r["model"], r["label"]) for r in rows) == sorted((m, lab) for m, _, lab in confirmed)
    assert all(r["decision"] == "confirmed" and r["label"] == r["ai_label"] for r in rows)
    assert all(r["image"].startswith("2.25.") and r["patient"].startswith("P-") for r in rows)
    files = sorted(out.rglob("*.dcm"))
    assert len(files) == len(confirmed)
    everything = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    for value in _source_values(site):
        assert value.encode() not in everything, value
    for path in files:
        ds = pydicom.dcmread(path)
        assert ds.PatientIdentityRemoved == "YES" and ds.SOPInstanceUID in {r["image"] for r in rows}
        errors = [line for line in dciodvfy(path) if "Error" in line]
        # the test studies lack a few Type 2 attributes the sources lack too; nothing new may appear
        assert not [e for e in errors if "PatientBirthDate" in e or "Deidentification" in e], errors

    check = gateway_command(site.env, "export", "--verify", str(out))
    assert check.returncode == 0 and "0 problems" in check.stdout, check.stdout

    leaky = pydicom.dcmread(files[0])  # its source is one of the three studies: put back all their accessions
    leaky.AccessionNumber = "ACC-XSS"
    leaky.StudyID = "ACC-EYE"
    leaky.PatientComments = "ACC-TWO"
    leaky.save_as(files[0])
    check = gateway_command(site.env, "export", "--verify", str(out))
    assert check.returncode == 1
    assert "AccessionNumber value 'ACC-" in check.stdout, check.stdout


def test_png_zip_over_the_api_for_the_data_role(site: Site, tmp_path: Path) -> None:
    data_team = bearer(site.env, "data")
    refused = site.post("/api/exports", {"images": "png"})  # a radiologist's token
    assert refused.status_code == 403
    response = httpx.post(
        site.url + "/api/exports", json={"images": "png", "decision": "any"}, headers=data_team, timeout=120
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/zip"
    archive = tmp_path / "export.zip"
    archive.write_bytes(response.content)
    with zipfile.ZipFile(archive) as z:
        names = z.namelist()
        manifest = list(csv.DictReader(io.StringIO(z.read("manifest.csv").decode())))
        pneumonia = list(csv.DictReader(io.StringIO(z.read("pneumonia/labels.csv").decode())))
        readme = z.read("README.txt").decode()
        everything = b"".join(z.read(n) for n in names)
    assert len(manifest) == len(DECIDED) == 5  # "any": corrected and not assessable too
    assert "Research use only" in readme and "113107" in readme
    assert {r["decision"] for r in manifest} >= {"confirmed", "corrected", "not assessable"}
    assert sorted((r["model"], r["label"]) for r in manifest) == sorted((m, lab) for m, _, lab in DECIDED)
    # labels.csv speaks the training data's vocabulary, paths relative to the model's folder
    assert all(r["label"] in ("normal", "pneumonia") for r in pneumonia)
    assert all(r["path"].startswith("images/") and f"pneumonia/{r['path']}" in names for r in pneumonia)
    pngs = [n for n in names if n.endswith(".png")]
    assert len(pngs) == len(manifest)
    for value in _source_values(site):
        assert value.encode() not in everything, value
    check = gateway_command(site.env, "export", "--verify", str(archive))
    assert check.returncode == 0, check.stdout

    listed = httpx.get(site.url + "/api/exports", headers=data_team, timeout=30).json()
    assert listed[0]["detail"]["via"] == "api" and listed[0]["detail"]["rows"] == len(manifest)


def test_retraining_from_the_export_registers_a_candidate(site: Site, tmp_path: Path) -> None:
    """The PNG export, given twice (as two exports holding the same images), merged with a tiny base by
    `gateway train pneumonia --from-export`: each exported image once, a candidate version in the registry
    with its data summary, its bundle under DATA_DIR/models and a card that says what it was trained on."""
    export = tmp_path / "export"
    made = gateway_command(
        site.env, "export", "--out", str(export), "--images", "png", "--model", "pneumonia"
    )
    assert made.returncode == 0, made.stderr[-2000:]
    exported = list(csv.DictReader((export / "pneumonia" / "labels.csv").open()))
    assert [r["decision"] for r in exported] == ["confirmed", "confirmed"]  # chest, and chest2's first image
    archive = tmp_path / "export.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in export.rglob("*"):
            z.write(path, path.relative_to(export).as_posix())
    base = write_tiny_pneumonia_data(tmp_path / "base", count=24)

    trained = gateway_command(
        site.env, "train", "pneumonia", "--data", str(base), "--from-export", str(export),
        "--from-export", str(archive), "--epochs", "1", "--seed", "5", "--version", "1.0.1-r1",
        timeout=900,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "24 base rows + 2 exported images (0 corrected) from 2 export(s), 2 duplicate rows dropped" in (
        trained.stdout
    )
    assert "registered pneumonia 1.0.1-r1 as a candidate" in trained.stdout
    bundle = site.data_dir / "models" / "pneumonia" / "1.0.1-r1"
    meta = json.loads((bundle / "model.json").read_text())
    assert meta["version"] == "1.0.1-r1" and meta["training"]["n_train"] + meta["training"]["n_val"] == 26
    assert "2 images labelled by radiologists" in meta["changelog"][0]["changes"]
    card = (bundle / "card.md").read_text()
    assert "## Retraining data" in card and "--from-export" in card and "Research" in card

    listed = gateway_command(site.env, "models", "show", "pneumonia", "1.0.1-r1")
    assert listed.returncode == 0, listed.stderr
    shown = json.loads(listed.stdout)
    assert shown["status"] == "candidate" and shown["path"] == str(bundle.resolve())
    summary = shown["data_summary"]
    assert summary["base_rows"] == 24 and summary["exported_images"] == 2
    assert summary["duplicates_dropped"] == 2 and len(summary["exports"]) == 2
    again = gateway_command(site.env, "train", "pneumonia", "--data", str(base), "--from-export", str(export),
                            "--version", "1.0.1-r1")  # fmt: skip
    assert again.returncode == 1 and "retrained before" in again.stderr
