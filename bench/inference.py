"""Inference speed of the shipped models vs the original glaucoma service's VGG19-224, in one run.

    .venv/bin/python bench/inference.py [--repeats N]

For each shipped model: ms/image at batch 1 and 16 through the full path a study takes after DICOM decoding
(``inference.model.assess``: rule gate, preprocessing, all gate stages, calibrated prediction; every call on
new image objects, so nothing cached per image is reused), on the real
chest (or fundus) DICOM of ``../shared/dicom``; then the bare network, Keras ``model(x)`` vs TFLite, at
batch 1. Baseline: ``keras.applications.VGG19(weights=None)`` at 224 x 224 x 3 built here (resize included).
Peak memory is the process's ``ru_maxrss``. TensorFlow and TFLite use 2 threads.

    .venv/bin/python bench/inference.py --footprint [--runs 3] [--quiet-seconds 0.5]

``--footprint`` measures the service as an operator sees it, through the CLI and external tools only
(nothing of the project is imported here, so the same command runs before and after a refactor): a dcmtk
``storescp`` is the PACS; ``python -m gateway serve`` (this checkout, embedded default: SQLite, listener,
API and 2 worker threads) starts on a fresh data dir; from just before its start, the script times the
listener answering ``echoscu`` (listener ready) and the real chest CR (``cr_chest_jpegls.dcm``, fresh UIDs,
sent with ``storescu`` as soon as the listener is ready) reaching the PACS as SR: the first SR file
(cold start) and all of the study's SRs (the API says every job is done). A second study then times the
warm path, send -> SR (both include the completion quiet time). Peak RSS is ``VmHWM`` from
``/proc/<pid>/status`` (summed with its child processes if any; MB = MiB) after both studies' SRs arrived.
Then the same for a ``gateway worker`` process next to a ``serve`` with 0 worker threads on the same SQLite
database: study 1 is stored and past its quiet time before the worker starts, so its cold start = worker
start -> SR. Each mode runs ``--runs`` times on fresh processes and data; the table gives the median and
every run.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "dicom"
SAMPLE = {"chest": "cr_chest_jpegls.dcm", "fundus": "sc_fundus_j2k.dcm"}


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def variants(image: np.ndarray, n: int) -> list[np.ndarray]:
    """``n`` slightly different copies (so no cached result is reused between them)."""
    rng = np.random.default_rng(0)
    return [np.clip(image + rng.normal(0, 0.002, image.shape).astype(np.float32), 0, 1) for _ in range(n)]


def timed_fresh(fn: Callable[[list[np.ndarray]], object], images: list[np.ndarray], repeats: int) -> float:
    """Median seconds of ``fn(batch)`` where each call gets new array objects (copied outside the timing):
    the models remember work per image object (disc analysis, gate outputs), and a repeated object would
    time the cache, not the path a new study takes."""
    fn([im.copy() for im in images])
    times = []
    for _ in range(repeats):
        batch = [im.copy() for im in images]
        start = time.perf_counter()
        fn(batch)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--footprint", action="store_true", help="serve/worker peak RSS and cold start (see the docstring)"
    )
    parser.add_argument("--runs", type=int, default=3, help="--footprint: runs per mode, fresh processes")
    parser.add_argument(
        "--quiet-seconds", type=float, default=0.5, help="--footprint: GATEWAY_COMPLETION__QUIET_SECONDS"
    )
    args = parser.parse_args()
    if args.footprint:
        from footprint import footprint  # bench/footprint.py, beside this file

        footprint(args.runs, args.quiet_seconds)
        return

    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(2)
    tf.config.threading.set_inter_op_parallelism_threads(2)
    import keras

    from inference.bundle import BundleModel
    from inference.model import assess
    from inference.preprocess import load_dicom_image
    from inference.registry import ModelRegistry
    from inference.runners import TfliteRunner
    from training.export import embedding_model

    print(f"{'model':<28} {'batch 1 ms/img':>15} {'batch 16 ms/img':>16}  notes")
    registry = ModelRegistry()
    for model in (registry.get(n) for n in registry.names()):
        assert isinstance(model, BundleModel)
        image = load_dicom_image(SHARED / SAMPLE[model.modality_kind])
        one, sixteen = variants(image, 1), variants(image, 16)
        assert assess(model, one)[0].assessable, f"{model.info.name} rejects its own sample"
        b1 = timed_fresh(lambda b, m=model: assess(m, b), one, args.repeats) * 1000
        b16 = timed_fresh(lambda b, m=model: assess(m, b), sixteen, max(3, args.repeats // 4)) * 1000 / 16
        note = f"full path on {SAMPLE[model.modality_kind]} {image.shape[1]}x{image.shape[0]}"
        print(f"{model.info.name + ' ' + model.info.version:<28} {b1:>15.2f} {b16:>16.2f}  {note}")
        x = model._input(image)[np.newaxis]
        net = keras.models.load_model(model.path / "model.keras", compile=False)
        both = embedding_model(net, model.metadata.feature_layers)
        keras_ms = timed(lambda n=both, x=x: n(x, training=False), args.repeats) * 1000
        lite = TfliteRunner(model.path / "model.tflite")
        lite_ms = timed(lambda r=lite, x=x: r(x), args.repeats) * 1000
        cam_ms = timed(lambda r=lite, x=x: r(x, with_cam=True), args.repeats) * 1000
        heat_ms = timed(lambda m=model, im=image: m.heatmap(im), max(3, args.repeats // 4)) * 1000
        print(
            f"{'  network only':<28} {'':>15} {'':>16}  Keras model(x) {keras_ms:.2f} ms, "
            f"LiteRT {lite_ms:.2f} ms ({cam_ms:.2f} with maps); heatmap on the image {heat_ms:.1f} ms"
        )
    print(f"peak memory after shipped models: {peak_mb():.0f} MB")

    import cv2

    vgg = keras.applications.VGG19(weights=None, input_shape=(224, 224, 3), classes=2)
    image = load_dicom_image(SHARED / SAMPLE["fundus"])

    def vgg_batch(n: int) -> None:
        x = np.stack([cv2.resize(image, (224, 224), interpolation=cv2.INTER_AREA)] * n)
        np.asarray(vgg(x * 255.0, training=False))

    b1 = timed(lambda: vgg_batch(1), max(3, args.repeats // 4)) * 1000
    b16 = timed(lambda: vgg_batch(16), 2) * 1000 / 16
    print(f"{'VGG19-224 (baseline)':<28} {b1:>15.2f} {b16:>16.2f}  Keras, weights=None, resize included")
    print(f"peak memory after VGG19: {peak_mb():.0f} MB")


if __name__ == "__main__":
    main()
