"""SR building cost: the two chest reports (pneumonia, covid19) of CR chest studies of 1-4 images, built and
written as the worker does (sources read with gateway.sources.read_source), --repeat times; prints ms per SR
(build and write) and CPU ms per study.

With --dump DIR it also writes each SR (its creation dates and times blanked) as DIR/<images>-<model>.dcm and
.txt (pydicom's listing), so two versions of reporting/sr.py can be compared: `diff -r before/ after/`.
With --profile it runs the loop under cProfile and prints the top functions by cumulative time.
Usage: python bench/sr_build.py [--repeat 50] [--dump DIR] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from core.domain import Finding, ImageResult, InstanceRef, ModelInfo  # noqa: E402
from core.settings import IngestSettings  # noqa: E402
from gateway.sources import read_source  # noqa: E402
from reporting.sr import build_report, report_series_uid, report_uid, write_report  # noqa: E402
from tests import factories as f  # noqa: E402

PNEUMONIA = ModelInfo(name="pneumonia", version="2.0.0", display_name="Pneumonia (chest X-ray)")
COVID19 = ModelInfo(name="covid19", version="1.3.0", display_name="COVID-19 (chest X-ray)")
FINDINGS = {
    PNEUMONIA: (("pneumonia", 0.8836), ("bacterial_pneumonia", 0.5), ("viral_pneumonia", 0.5)),
    COVID19: (("covid19", 0.5), ("viral_pneumonia", 0.5)),
}


def study(directory: Path, images: int) -> list[InstanceRef]:
    """A CR chest study of ``images`` images with fixed UIDs, saved under ``directory``."""
    study_uid = generate_uid(entropy_srcs=["sr_build", "study", str(images)])
    series_uid = generate_uid(entropy_srcs=["sr_build", "series", str(images)])
    refs = []
    for number in range(1, images + 1):
        ds = f.chest_radiograph(sop_class=f.CR, modality="CR", study_uid=study_uid, series_uid=series_uid)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
            entropy_srcs=["sr_build", "image", str(images), str(number)]
        )
        ds.InstanceNumber = number
        path = f.save(ds, directory / f"{images}-{number}.dcm")
        refs.append(
            InstanceRef(
                study_instance_uid=study_uid,
                series_instance_uid=series_uid,
                sop_instance_uid=ds.SOPInstanceUID,
                sop_class_uid=f.CR,
                path=path,
            )
        )
    return refs


def results(refs: list[InstanceRef], model: ModelInfo) -> list[ImageResult]:
    out = []
    for index, ref in enumerate(refs):
        if index == 3:  # one image of the largest study is not assessable
            out.append(ImageResult(instance=ref, model=model, assessable=False, reason="not a chest image"))
            continue
        findings = tuple(
            Finding(name, probability=(0.13 * (index + k + 1)) % 1.0, threshold=t, present=k % 2 == 0)
            for k, (name, t) in enumerate(FINDINGS[model])
        )
        out.append(ImageResult(instance=ref, model=model, assessable=True, findings=findings))
    return out


def report_study(refs: list[InstanceRef], out: Path, limits: IngestSettings) -> list[pydicom.Dataset]:
    """Both chest reports of a study, as the worker makes them (sources read once per model)."""
    reports: list[pydicom.Dataset] = []
    for model in (PNEUMONIA, COVID19):
        sources = [read_source(ref, limits) for ref in refs]
        uids = [ref.sop_instance_uid for ref in refs]
        study_uid = refs[0].study_instance_uid
        sr = build_report(
            results=results(refs, model),
            sources=sources,
            model=model,
            sop_instance_uid=report_uid(study_uid, model, uids),
            series_instance_uid=report_series_uid(study_uid, model),
        )
        write_report(sr, out / f"{len(refs)}-{model.name}.dcm")
        reports.append(sr)
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=50, help="studies of each size built")
    parser.add_argument("--dump", type=Path, help="write each SR (.dcm and .txt) here")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    limits = IngestSettings()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        studies = {n: study(directory, n) for n in (1, 2, 3, 4)}
        for refs in studies.values():  # warm-up: imports, caches
            report_study(refs, directory, limits)
        if args.dump:
            args.dump.mkdir(parents=True, exist_ok=True)
            for n, refs in studies.items():
                for sr in report_study(refs, directory, limits):
                    sr.ContentDate = sr.ContentTime = sr.InstanceCreationDate = sr.InstanceCreationTime = ""
                    for item in sr.ContributingEquipmentSequence:
                        item.ContributionDateTime = ""
                    name = f"{n}-{sr.ManufacturerModelName}"
                    write_report(sr, args.dump / f"{name}.dcm")
                    (args.dump / f"{name}.txt").write_text(str(sr))
        profiler = cProfile.Profile() if args.profile else None
        cpu, wall = time.process_time(), time.perf_counter()
        if profiler:
            profiler.enable()
        for _ in range(args.repeat):
            for refs in studies.values():
                report_study(refs, directory, limits)
        if profiler:
            profiler.disable()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    reports = args.repeat * len(studies) * 2
    print(
        f"{reports} SRs of 1-4 images: {1000 * wall / reports:.1f} ms wall, "
        f"{1000 * cpu / reports:.1f} ms CPU per SR (read sources, build, write); "
        f"{2000 * cpu / reports:.0f} ms CPU per study (2 SRs)"
    )
    if profiler:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(45)


if __name__ == "__main__":
    main()
