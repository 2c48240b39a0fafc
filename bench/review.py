"""Review speed: the worklist query with 10,000 studies, and the case page of a 2,000 x 2,000 CR.

worklist: a SQLite database filled with --studies studies (chest with both chest models or fundus with
glaucoma; positive, uncertain, negative and not-assessable results; dates over a year), then the worklist
query (page, total and the counts per filter value) under several filters, p50/p95 over --repeat runs,
in-process and over HTTP (`gateway serve` on that database, a radiologist's token). Goal: <= 100 ms.

case: `gateway serve` with its workers and the shipped models, one 2,000 x 2,000 CR (16-bit) sent by
C-STORE; once drawn, the case page is fetched --repeat times as a browser would: the HTML, then the image and
the heatmaps (in parallel); and, with --browser, Debian's chromium (Playwright) opening the page until the
canvas is drawn. Goal: p95 <= 300 ms.

Usage: python bench/review.py [worklist|case|all] [--studies 10000] [--repeat 30] [--browser]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

from core.db import make_engine, make_sessionmaker, read_session, transaction  # noqa: E402
from core.migrate import upgrade  # noqa: E402
from core.tables import utcnow  # noqa: E402
from core.worklist import WorklistFilter, query_worklist  # noqa: E402
from tests import factories as f  # noqa: E402
from tests.accounts import PASSWORD, add_user, bearer  # noqa: E402
from tests.peers import free_port, gateway_serve, send_file, storescp, wait_for  # noqa: E402
from tests.review_rows import add_study  # noqa: E402

FILTERS = {
    "default (unreviewed, priority order)": {},
    "model=pneumonia": {"model": "pneumonia"},
    "ai_label=uncertain": {"ai_label": "uncertain"},
    "finding=covid19 + present": {"finding": "covid19", "ai_label": "present"},
    "last 90 days + modality CR": {
        "date_from": (utcnow() - timedelta(days=90)).date().isoformat(),
        "date_to": utcnow().date().isoformat(),
        "modality": "CR",
    },
    "status=any, page 20": {"status": "any", "page": "20"},
}


def _stats(values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[max(0, round(0.95 * len(ordered)) - 1)]
    return f"p50 {1000 * statistics.median(ordered):6.1f} ms  p95 {1000 * p95:6.1f} ms"


def _filter(params: dict[str, str]) -> WorklistFilter:
    day = {k: v.replace("-", "") for k, v in params.items() if k.startswith("date")}
    return WorklistFilter(
        model=params.get("model"),
        finding=params.get("finding"),
        ai_label=params.get("ai_label"),
        status=None if params.get("status") == "any" else "unreviewed",
        modality=params.get("modality"),
        date_from=day.get("date_from"),
        date_to=day.get("date_to"),
    )


def seed(url: str, studies: int) -> None:
    rng = random.Random(1)
    engine = make_engine(url)
    upgrade(engine)
    factory = make_sessionmaker(engine)
    start = time.monotonic()
    now = utcnow()
    for chunk in range(0, studies, 500):
        with transaction(factory) as s:
            for n in range(chunk, min(studies, chunk + 500)):
                day = (now - timedelta(days=rng.randrange(365))).strftime("%Y%m%d")
                at = now - timedelta(minutes=studies - n)
                if rng.random() < 0.25:
                    p = rng.random()
                    add_study(
                        s, models={"glaucoma": {"glaucoma": p}}, modality="OP", study_date=day, received_at=at
                    )
                    continue
                kind = rng.random()
                models: dict[str, dict[str, float] | None] = (
                    {"pneumonia": None, "covid19": None}
                    if kind < 0.05
                    else {
                        "pneumonia": {"pneumonia": rng.random(), "bacterial_pneumonia": rng.random()},
                        "covid19": {"covid19": rng.random() * 0.7, "viral_pneumonia": rng.random() * 0.6},
                    }
                )
                add_study(s, models=models, modality=rng.choice(["CR", "DX"]), study_date=day, received_at=at)
    print(f"seeded {studies} studies in {time.monotonic() - start:.0f} s")
    engine.dispose()


def bench_worklist(root: Path, studies: int, repeat: int) -> None:
    data_dir = root / "var"
    data_dir.mkdir(parents=True)
    url = f"sqlite:///{data_dir / 'gateway.sqlite3'}"
    seed(url, studies)
    engine = make_engine(url)
    factory = make_sessionmaker(engine)
    print(f"worklist, {studies} studies, {repeat} runs each (page of 50, total and counts per filter value)")
    for name, params in FILTERS.items():
        f_ = _filter(params)
        offset = (int(params.get("page", "1")) - 1) * 50
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            with read_session(factory) as s:
                page = query_worklist(s, f_, band=0.1, offset=offset, limit=50)
            times.append(time.perf_counter() - t)
        print(f"  in-process  {name:40s} {_stats(times)}  ({page.total} cases)")
    engine.dispose()
    env = {
        "GATEWAY_DATA_DIR": str(data_dir),
        "GATEWAY_DICOM__PORT": str(free_port()),
        "GATEWAY_HTTP__PORT": str(free_port()),
        "GATEWAY_WORKER__PROCESSES": "0",
    }
    with (
        gateway_serve(env, root / "serve.log"),
        httpx.Client(
            base_url=f"http://127.0.0.1:{env['GATEWAY_HTTP__PORT']}",
            headers=bearer(env, "radiologist"),
            timeout=30,
        ) as client,
    ):
        for name, params in FILTERS.items():
            times = []
            for _ in range(repeat):
                t = time.perf_counter()
                response = client.get("/api/worklist", params=params)
                times.append(time.perf_counter() - t)
                assert response.status_code == 200, response.text
            print(f"  HTTP JSON   {name:40s} {_stats(times)}")
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            assert client.get("/worklist").status_code == 200
            times.append(time.perf_counter() - t)
        print(f"  HTTP page   {'/worklist (default filter)':40s} {_stats(times)}")


def _cr(folder: Path, side: int) -> Path:
    ds = f.base_dataset(f.CR, "CR", study_uid=generate_uid(), series_uid=generate_uid())
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", "PA"
    gray = f.chest_gray(side).astype(np.uint16) * 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = gray.tobytes()
    return f.save(ds, folder / "cr.dcm", ExplicitVRLittleEndian)


def bench_case(root: Path, repeat: int, browser: bool) -> None:
    with storescp(root / "pacs") as pacs:
        env = {
            "GATEWAY_DATA_DIR": str(root / "var"),
            "GATEWAY_DICOM__PORT": str(free_port()),
            "GATEWAY_HTTP__PORT": str(free_port()),
            "GATEWAY_COMPLETION__QUIET_SECONDS": "0.5",
            "GATEWAY_DESTINATIONS": f'[{{"name":"pacs","ae_title":"PACS","host":"127.0.0.1","port":{pacs}}}]',
        }
        path = _cr(root, 2000)
        import pydicom

        study_uid = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
        with gateway_serve(env, root / "serve.log", timeout=180):
            base = f"http://127.0.0.1:{env['GATEWAY_HTTP__PORT']}"
            headers = bearer(env, "radiologist")
            assert send_file(int(env["GATEWAY_DICOM__PORT"]), path) == 0
            with httpx.Client(base_url=base, headers=headers, timeout=30) as client:

                def ready() -> dict[str, object] | None:
                    r = client.get(f"/api/cases/{study_uid}")
                    if r.status_code != 200:
                        return None
                    case = r.json()
                    image = case["images"][0]
                    return case if image["display_url"] and image["heatmaps"] else None

                case = wait_for("the case drawn", ready, timeout=300)
                image = case["images"][0]
                urls = [image["display_url"], *image["heatmaps"].values()]
                print(
                    f"case page, 2000 x 2000 CR ({image['width']} x {image['height']} shown), {repeat} runs"
                )
                totals, htmls = [], []
                with ThreadPoolExecutor(4) as pool:
                    for _ in range(repeat):
                        t = time.perf_counter()
                        assert client.get(f"/cases/{study_uid}").status_code == 200
                        htmls.append(time.perf_counter() - t)
                        sizes = list(pool.map(lambda u: len(client.get(u).content), urls))
                        totals.append(time.perf_counter() - t)
                print(f"  HTML                                   {_stats(htmls)}")
                label = f"HTML + image + {len(urls) - 1} heatmaps (parallel)"
                print(f"  {label:39s}{_stats(totals)}  ({sum(sizes)} bytes)")
            if browser:
                _browser(base, env, study_uid, repeat)


def _browser(base: str, env: dict[str, str], study_uid: str, repeat: int) -> None:
    from playwright.sync_api import sync_playwright

    from tests.accounts import database_url

    name = add_user(database_url(env), "radiologist")
    with sync_playwright() as p:
        chromium = p.chromium.launch(
            executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"]
        )
        page = chromium.new_page()
        page.goto(f"{base}/login")
        page.fill("input[name=username]", name)
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(f"{base}/")
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            page.goto(f"{base}/cases/{study_uid}")
            page.wait_for_selector('canvas#view[data-ready="1"]')
            times.append(time.perf_counter() - t)
        print(f"  chromium: navigation -> canvas drawn     {_stats(times)}")
        chromium.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", nargs="?", default="all", choices=["worklist", "case", "all"])
    parser.add_argument("--studies", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--browser", action="store_true", help="also time chromium until the canvas is drawn")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-review-") as tmp:
        if args.what in ("worklist", "all"):
            bench_worklist(Path(tmp) / "worklist", args.studies, args.repeat)
        if args.what in ("case", "all"):
            bench_case(Path(tmp) / "case", args.repeat, args.browser)


if __name__ == "__main__":
    main()
