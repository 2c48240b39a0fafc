"""A reviewing site for tests: `gateway serve` (listener, API and workers, the shipped models) delivering to a
dcmtk storescp PACS, with studies sent over C-STORE and processed until their cases can be opened."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import generate_uid

from tests import factories as f
from tests.accounts import add_user, bearer, database_url
from tests.peers import free_port, gateway_serve, send_file, storescp, wait_for

#: A patient name and a study description that must render as text (no "=" in the name: in a PN it starts
#: the ideographic component group).
XSS_NAME = "<script>window.pwned++</script>"
XSS_DESCRIPTION = '"><img src=x onerror="window.pwned=2"><b>bold</b> chest'
VIEWER_TEMPLATE = "https://viewer.example/ohif/viewer?StudyInstanceUIDs={study_uid}"


@dataclass
class Site:
    url: str
    dicom_port: int
    data_dir: Path
    pacs_dir: Path
    env: dict[str, str]
    studies: dict[str, str]  # name -> Study Instance UID
    radiologist: dict[str, str]  # bearer headers
    db: str

    def get(self, path: str, headers: dict[str, str] | None = None, **params: Any) -> httpx.Response:
        return httpx.get(
            self.url + path,
            headers=self.radiologist if headers is None else headers,
            params=params,
            timeout=30,
        )

    def post(self, path: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
        return httpx.post(
            self.url + path, json=body, headers=self.radiologist if headers is None else headers, timeout=30
        )

    def pacs_objects(self) -> dict[str, pydicom.Dataset]:
        """What the PACS stored, by SOP Instance UID (files still being written are skipped)."""
        out: dict[str, pydicom.Dataset] = {}
        for path in self.pacs_dir.glob("*"):
            try:
                ds = pydicom.dcmread(path)
                out[str(ds.SOPInstanceUID)] = ds
            except (InvalidDicomError, EOFError, OSError, AttributeError, ValueError):
                continue
        return out


def _write_studies(folder: Path) -> dict[str, list[Path]]:
    """Three studies: a chest DX whose patient name is an XSS payload, a colour fundus photograph, a chest
    study of two images."""
    out: dict[str, list[Path]] = {}
    uid = generate_uid()
    ds = f.chest_radiograph(study_uid=uid, series_uid=generate_uid())
    ds.PatientName = XSS_NAME
    ds.StudyDescription = XSS_DESCRIPTION
    ds.AccessionNumber = "ACC-XSS"
    ds.StudyDate = "20240105"
    out["chest"] = [f.save(ds, folder / "chest.dcm")]
    ds = f.ophthalmic_photo()
    ds.PatientName = "Eye^Patient"
    ds.AccessionNumber = "ACC-EYE"
    ds.StudyDate = "20240310"
    out["fundus"] = [f.save(ds, folder / "fundus.dcm")]
    uid, series = generate_uid(), generate_uid()
    out["chest2"] = []
    for n in (1, 2):
        ds = f.chest_radiograph(study_uid=uid, series_uid=series)
        ds.PixelData = (f.chest_gray(index=n).astype(np.uint16) * 16).tobytes()
        ds.PatientName = "Two^Images"
        ds.AccessionNumber = "ACC-TWO"
        ds.StudyDate = "20240201"
        ds.InstanceNumber = n
        out["chest2"].append(f.save(ds, folder / f"chest2-{n}.dcm"))
    return out


@contextmanager
def review_site(root: Path, **settings: str) -> Iterator[Site]:
    pacs_dir = root / "pacs"
    with storescp(pacs_dir) as pacs_port:
        env = {
            "GATEWAY_DATA_DIR": str(root / "var"),
            "GATEWAY_DICOM__PORT": str(free_port()),
            "GATEWAY_HTTP__PORT": str(free_port()),
            "GATEWAY_DESTINATIONS": json.dumps(
                [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}]
            ),
            "GATEWAY_COMPLETION__QUIET_SECONDS": "0.5",
            "GATEWAY_WORKER__PROCESSES": "1",
            "GATEWAY_REVIEW__VIEWER_URL_TEMPLATE": VIEWER_TEMPLATE,
            # no random checks of negative cases: the tests know which case comes first (see
            # tests/core/test_worklist.py and tests/api/test_worklist_sample.py for the sample)
            "GATEWAY_REVIEW__NEGATIVE_SAMPLE_SHARE": "0",
            **{f"GATEWAY_{k}": v for k, v in settings.items()},
        }
        with gateway_serve(env, root / "gateway.log", timeout=180):
            db = database_url(env)
            site = Site(
                url=f"http://127.0.0.1:{env['GATEWAY_HTTP__PORT']}",
                dicom_port=int(env["GATEWAY_DICOM__PORT"]),
                data_dir=root / "var",
                pacs_dir=pacs_dir,
                env=env,
                studies={},
                radiologist=bearer(env, "radiologist"),
                db=db,
            )
            for name, paths in _write_studies(root / "studies").items():
                for path in paths:
                    assert send_file(site.dicom_port, path, calling="MODALITY") == 0
                site.studies[name] = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
            for name, uid in site.studies.items():
                wait_for(f"{name} ready for review", partial(_ready, site, uid), timeout=180)
            yield site


def _ready(site: Site, study_uid: str) -> bool:
    response = site.get(f"/api/cases/{study_uid}")
    if response.status_code != 200:
        return False
    case = response.json()
    return bool(case["images"]) and all(
        i["display_url"]
        and (i["heatmaps"] or not any(im["assessable"] for m in case["models"] for im in m["images"]))
        for i in case["images"]
    )


def radiologist_user(site: Site, full_name: str = "Jane Reader") -> str:
    return add_user(site.db, "radiologist", full_name=full_name)


def decide(site: Site, study_uid: str, model: str = "pneumonia", *, correct: bool) -> dict[str, Any]:
    """A radiologist's first decision on the model's first image of the study: the AI label confirmed, or
    (``correct``) another label; returns the label chosen (key, title)."""
    case = site.get(f"/api/cases/{study_uid}").json()
    answers = next(m for m in case["models"] if m["name"] == model)
    image = answers["images"][0]
    label = next(lab for lab in answers["labels"] if (lab["key"] != image["ai_label"]) == correct)
    decided = site.post(
        f"/api/cases/{study_uid}/reviews",
        {
            "model": model,
            "base_version": 0,
            "answers": [{"sop_instance_uid": image["sop_instance_uid"], "label": label["key"]}],
        },
    )
    assert decided.status_code == 201, decided.text
    return dict(label)
