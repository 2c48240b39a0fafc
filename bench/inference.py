"""Inference speed of the shipped models vs the original glaucoma service's VGG19-224, in one run.

    .venv/bin/python bench/inference.py [--repeats N]

For each shipped model: ms/image at batch 1 and 16 through the full path a study takes after DICOM decoding
(``inference.base.assess``: rule gate, preprocessing, all gate stages, calibrated prediction; every call on
new image objects, so nothing cached per image is reused), on the real
chest (or fundus) DICOM of ``../shared/dicom``; then the bare network, Keras ``model(x)`` vs TFLite, at
batch 1. Baseline: ``keras.applications.VGG19(weights=None)`` at 224 x 224 x 3 built here (resize included).
Peak memory is the process's ``ru_maxrss``. TensorFlow and TFLite use 2 threads.
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
    args = parser.parse_args()

    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(2)
    tf.config.threading.set_inter_op_parallelism_threads(2)
    import keras

    from inference.base import assess
    from inference.bundle import KerasBundleModel
    from inference.preprocess import load_dicom_image
    from inference.registry import ModelRegistry
    from inference.runners import KerasRunner, TfliteRunner

    print(f"{'model':<28} {'batch 1 ms/img':>15} {'batch 16 ms/img':>16}  notes")
    registry = ModelRegistry()
    for model in (registry.get(n) for n in registry.names()):
        assert isinstance(model, KerasBundleModel)
        image = load_dicom_image(SHARED / SAMPLE[model.modality_kind])
        one, sixteen = variants(image, 1), variants(image, 16)
        assert assess(model, one)[0].assessable, f"{model.info.name} rejects its own sample"
        b1 = timed_fresh(lambda b, m=model: assess(m, b), one, args.repeats) * 1000
        b16 = timed_fresh(lambda b, m=model: assess(m, b), sixteen, max(3, args.repeats // 4)) * 1000 / 16
        note = f"full path on {SAMPLE[model.modality_kind]} {image.shape[1]}x{image.shape[0]}"
        print(f"{model.info.name + ' ' + model.info.version:<28} {b1:>15.2f} {b16:>16.2f}  {note}")
        x = model._input(image)[np.newaxis]
        layers = model.metadata.feature_layers
        runner = KerasRunner(model._keras_model(), layers)
        keras_ms = timed(lambda r=runner, x=x: r(x), args.repeats) * 1000
        tflite = model.path / "model.tflite"
        if tflite.is_file():
            lite = TfliteRunner(tflite)
            lite_ms = timed(lambda r=lite, x=x: r(x), args.repeats) * 1000
            print(
                f"{'  network only':<28} {'':>15} {'':>16}  "
                f"Keras model(x) {keras_ms:.2f} ms, TFLite {lite_ms:.2f} ms"
            )
        else:
            print(f"{'  network only':<28} {'':>15} {'':>16}  Keras model(x) {keras_ms:.2f} ms (no TFLite)")
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
