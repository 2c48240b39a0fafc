"""Input-consistency gate and input adapter of the fundus (glaucoma) model.

Behind the rule gate of :mod:`inference.gates.rules` (blank and grayscale images are rejected there) come
two checks, each with separate statistics for full photographs and for optic-disc crops
(:mod:`inference.optic_disc` decides which the image is):

1. Structural similarity (SSIM, as the COVID-19 service did with an average chest radiograph) of the image,
   gray at 64 x 64, with the average training image of its kind, stored in the bundle. Below the 0.5th
   percentile of the training images the input is rejected. View 2 (glaucoma 1.2.0 on,
   :func:`field_view`) compares the field of view, not the frame: a full photograph is cut to the square
   around its round field (zero-padded, so a 3:2 frame or a shifted field looks like a centred square one),
   masked to the circle (a borderless photograph gets the round edge it lost), and every view is scaled to
   one mean exposure; view 1 (older bundles) is the whole frame as it is.
2. Mahalanobis distance of 14 colour and texture statistics of the disc crop the network sees to those of
   the training images (Ledoit-Wolf covariance). The bound is the 99.5th percentile of the
   training distances; the model card reports how many validation images it rejects (goal <= 1 %).

3. Mahalanobis distance of the network's penultimate embedding (``"features"``, 96 values) of the crop to
   the training crops (Ledoit-Wolf covariance plus a small ridge,
   :func:`training.gate_fitting.fit_feature_stats`), bound at the 99.5th percentile of the training
   distances; the bundle runs it through :meth:`FundusDiscAdapter.check_features` and reuses the network's
   output for the prediction.

The statistics live in ``fundus_gate.npz`` in the bundle (fitted by :mod:`training.gate_fitting`).
:class:`FundusDiscAdapter` is what ``"preprocess": "fundus-disc"`` in ``model.json`` plugs into
:class:`inference.bundle.BundleModel`: it gates, cuts the disc crop the network sees, says which kind of
input it got and maps the heatmap back. No TensorFlow here.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from skimage.metrics import structural_similarity

from inference.optic_disc import (
    BORDERLESS_FOV,
    FULL_CORNERS,
    DiscLocation,
    InputKind,
    as_rgb,
    crop_at,
    dark_corners,
    fov_mask,
    locate_disc,
    place_on_image,
    reduce,
)

GATE_FILE = "fundus_gate.npz"
#: Long side (px) at which a photograph is analysed: localiser, crop, gate (training photographs are 512 px).
ANALYSE_SIDE = 1024
SSIM_SIDE = 64
KINDS: tuple[InputKind, ...] = ("full", "disc")


#: Mean and SD of the gray level of the lit field in a view-2 SSIM view (about those of training photographs).
VIEW_EXPOSURE = 0.35
VIEW_CONTRAST = 0.1
#: SSIM views: 1 the whole frame, 2 the field of view at one exposure (:func:`field_view`).
VIEWS = (1, 2)


def ssim_view(image: np.ndarray, kind: InputKind = "full", view: int = 1) -> np.ndarray:
    """Gray 64 x 64 float32 view compared with the average image of ``kind``."""
    if view == 2:
        return field_view(image, kind)
    gray = cv2.cvtColor(as_rgb(image), cv2.COLOR_RGB2GRAY)
    return np.asarray(
        cv2.resize(gray, (SSIM_SIDE, SSIM_SIDE), interpolation=cv2.INTER_AREA), dtype=np.float32
    )


def field_view(image: np.ndarray, kind: InputKind) -> np.ndarray:
    """View 2: a full photograph's field of view cut square around its centre and masked to its circle (a
    disc crop: the whole frame), its lit part at mean :data:`VIEW_EXPOSURE` and SD :data:`VIEW_CONTRAST`."""
    small, _ = reduce(image)
    gray = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
    h, w = gray.shape
    if kind == "disc":
        view = cv2.resize(gray, (SSIM_SIDE, SSIM_SIDE), interpolation=cv2.INTER_AREA)
    else:
        mask = fov_mask(small)
        if dark_corners(small) < FULL_CORNERS or not mask.any():  # borderless: the field is wider
            cx, cy, diameter = w / 2, h / 2, BORDERLESS_FOV * max(h, w)
        else:
            ys, xs = np.nonzero(mask)
            cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
            diameter = float(max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1))
        yy, xx = np.mgrid[0:h, 0:w]
        circle = ((xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2) <= (diameter / 2) ** 2
        view = crop_at(np.where(circle, gray, 0).astype(np.float32), cx, cy, diameter, SSIM_SIDE)
    view = np.asarray(view, dtype=np.float32)
    lit = view > 0.02
    if lit.sum() > 1:
        level, spread = float(view[lit].mean()), float(view[lit].std())
        scaled = VIEW_EXPOSURE + (view - level) * (VIEW_CONTRAST / max(spread, 1e-3))
        view = np.where(lit, np.clip(scaled, 0.02, 1.0), 0.0)
    return np.asarray(view, dtype=np.float32)


def ssim(view: np.ndarray, mean: np.ndarray) -> float:
    return float(structural_similarity(view, mean, data_range=1.0, gaussian_weights=True, sigma=1.5))


def crop_features(crop: np.ndarray) -> np.ndarray:
    """Colour and texture statistics of a disc crop (float32 RGB in [0, 1]): the gate features of both input
    kinds, measured on the crop the network sees.

    Field-of-view shape and aspect ratio, and the blue/red ratio, were tried and left out: they measure the
    camera (EyePACS is square, cut at top and bottom; older cameras record almost no blue), so they
    rejected most photographs of other databases.
    """
    small = cv2.resize(crop, (32, 32), interpolation=cv2.INTER_AREA)
    means, sds = small.reshape(-1, 3).mean(axis=0), small.reshape(-1, 3).std(axis=0)
    eps = 1e-3
    gray = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
    centre = float(gray[10:22, 10:22].mean()) - float(gray.mean())
    mid = cv2.cvtColor(cv2.resize(crop, (64, 64), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2GRAY)
    laplacian = float(np.abs(cv2.Laplacian(mid, cv2.CV_32F)).mean())
    brightest, darkest = small.max(axis=2), small.min(axis=2)
    saturation = float(((brightest - darkest) / (brightest + eps)).mean())
    # fundus pixels are red >= green >= blue almost everywhere; noise and other scenes are not
    lit = brightest > 0.05
    ordered = (small[..., 0] >= small[..., 1]) & (small[..., 1] >= small[..., 2])
    order = float(ordered[lit].mean()) if lit.any() else 0.0
    # thin dark lines (vessels) in the green channel: black-hat at vessel scale, relative to the brightness
    green = np.ascontiguousarray(cv2.resize(crop[..., 1], (64, 64), interpolation=cv2.INTER_AREA))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))
    vessels = float(cv2.morphologyEx(green, cv2.MORPH_BLACKHAT, kernel).mean()) / (float(green.mean()) + eps)
    hue = cv2.cvtColor(small, cv2.COLOR_RGB2HSV)[..., 0][lit] if lit.any() else np.zeros(1, np.float32)
    angle = np.deg2rad(hue.astype(np.float64))  # circular: red sits at both ends of the hue scale
    concentration = float(np.hypot(np.cos(angle).mean(), np.sin(angle).mean()))
    return np.array(
        [
            *means,
            *sds,
            np.log((means[1] + eps) / (means[0] + eps)),
            centre,
            float((brightest < 0.05).mean()),
            np.log(laplacian + eps),
            saturation,
            order,
            np.log(vessels + eps),
            np.log(1.0 - concentration + 1e-3),
        ],
        dtype=np.float64,
    )


@dataclass(frozen=True)
class KindStats:
    """Gate statistics of one input kind."""

    mean_view: np.ndarray
    ssim_min: float
    centre: np.ndarray
    precision: np.ndarray
    distance_max: float

    def distance(self, f: np.ndarray) -> float:
        d = f - self.centre
        return float(np.sqrt(max(0.0, float(d @ self.precision @ d))))


@dataclass(frozen=True)
class EmbeddingStats:
    """Mean, precision and distance bound of the network's ``"features"`` embedding of training crops."""

    centre: np.ndarray
    precision: np.ndarray
    distance_max: float

    def distance(self, f: np.ndarray) -> float:
        d = np.asarray(f, dtype=np.float64) - self.centre
        return float(np.sqrt(max(0.0, float(d @ self.precision @ d))))


@dataclass(frozen=True)
class FundusGate:
    """SSIM and Mahalanobis gate for full photographs and disc crops, plus the embedding distance."""

    stats: dict[str, KindStats]
    embedding: EmbeddingStats | None = None
    view: int = 1  # SSIM view (:data:`VIEWS`)

    def reason(self, image: np.ndarray, location: DiscLocation, crop: np.ndarray) -> str | None:
        """None when the input passes, else why it does not."""
        s = self.stats[location.kind]
        kind = "full-field fundus photograph" if location.kind == "full" else "optic-disc crop"
        article = "a" if location.kind == "full" else "an"
        score = ssim(ssim_view(image, location.kind, self.view), s.mean_view)
        if score < s.ssim_min:
            return (
                f"does not look like {article} {kind} (SSIM {score:.2f} with the average < {s.ssim_min:.2f})"
            )
        distance = self.distance(image, location, crop)
        if distance > s.distance_max:
            return (
                f"colour/texture statistics unlike the training {kind}s "
                f"(Mahalanobis distance {distance:.1f} > {s.distance_max:.1f})"
            )
        return None

    def distance(self, image: np.ndarray, location: DiscLocation, crop: np.ndarray) -> float:
        return self.stats[location.kind].distance(crop_features(crop))

    def save(self, path: Path) -> Path:
        arrays: dict[str, np.ndarray] = {}
        for kind, s in self.stats.items():
            arrays[f"{kind}_mean_view"] = s.mean_view
            arrays[f"{kind}_centre"] = s.centre
            arrays[f"{kind}_precision"] = s.precision
            arrays[f"{kind}_bounds"] = np.array([s.ssim_min, s.distance_max])
        if self.embedding is not None:
            arrays["embedding_centre"] = self.embedding.centre
            arrays["embedding_precision"] = self.embedding.precision
            arrays["embedding_bound"] = np.array([self.embedding.distance_max])
        arrays["ssim_view"] = np.array([self.view])
        np.savez_compressed(path, **arrays)  # type: ignore[arg-type]
        return path

    @classmethod
    def load(cls, path: Path) -> FundusGate:
        with np.load(path) as data:
            stats: dict[str, KindStats] = {
                str(kind): KindStats(
                    mean_view=data[f"{kind}_mean_view"].astype(np.float32),
                    ssim_min=float(data[f"{kind}_bounds"][0]),
                    centre=data[f"{kind}_centre"],
                    precision=data[f"{kind}_precision"],
                    distance_max=float(data[f"{kind}_bounds"][1]),
                )
                for kind in KINDS
            }
            embedding = (
                EmbeddingStats(
                    data["embedding_centre"], data["embedding_precision"], float(data["embedding_bound"][0])
                )
                if "embedding_centre" in data
                else None
            )
            view = int(data["ssim_view"][0]) if "ssim_view" in data else 1
        if view not in VIEWS:
            raise ValueError(f"{path}: unknown SSIM view {view}; known: {VIEWS}")
        return cls(stats, embedding, view)


def reduce_by_integer(image: np.ndarray, side: int) -> tuple[np.ndarray, float]:
    """RGB ``image`` shrunk by the smallest integer factor that brings its long side to ``side`` or less.

    An integer factor takes OpenCV's fast INTER_AREA path (a 2-4 k px photograph in a few ms instead of
    ~12 ms); the last rows/columns that do not fill a block are dropped (under ``factor`` px).
    """
    rgb = as_rgb(image)
    h, w = rgb.shape[:2]
    factor = max(1, -(-max(h, w) // side))
    if factor == 1:
        return rgb, 1.0
    h2, w2 = h - h % factor, w - w % factor
    small = cv2.resize(rgb[:h2, :w2], (w2 // factor, h2 // factor), interpolation=cv2.INTER_AREA)
    return np.asarray(small, dtype=np.float32), 1.0 / factor


class FundusDiscAdapter:
    """Input adapter for ``"preprocess": "fundus-disc"`` bundles (see :mod:`inference.bundle`)."""

    def __init__(self, bundle_dir: Path, input_size: int) -> None:
        self.size = input_size
        self.gate = FundusGate.load(Path(bundle_dir) / GATE_FILE)
        self._cache: dict[int, tuple[weakref.ref[np.ndarray], DiscLocation, np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()

    def analyse(self, image: np.ndarray) -> tuple[DiscLocation, np.ndarray]:
        """Disc location (original pixels) and the network's input crop; remembered while the image lives."""
        location, crop, _ = self._analysed(image)
        return location, crop

    def _analysed(self, image: np.ndarray) -> tuple[DiscLocation, np.ndarray, np.ndarray]:
        with self._lock:
            hit = self._cache.get(id(image))
        if hit is not None and hit[0]() is image:
            return hit[1], hit[2], hit[3]
        # A camera's full-resolution photograph (2-4 k px) is reduced once: everything below works at most at
        # ANALYSE_SIDE px, which keeps the 128 px disc crop as sharp as on the 512 px training photographs.
        work, scale = reduce_by_integer(image, ANALYSE_SIDE)
        found = locate_disc(work)
        if found.kind == "disc":  # a hand-made crop: its central square, whole
            h, w = work.shape[:2]
            crop = crop_at(work, w / 2, h / 2, min(h, w), self.size)
        else:
            crop = crop_at(work, found.cx, found.cy, found.crop_side, self.size)
        location = DiscLocation(found.kind, found.cx / scale, found.cy / scale, found.fov_diameter / scale)
        try:
            ref = weakref.ref(image)
        except TypeError:  # not weak-referenceable: do not cache
            return location, crop, work
        with self._lock:
            self._cache = {k: v for k, v in self._cache.items() if v[0]() is not None}
            self._cache[id(image)] = (ref, location, crop, work)
        return location, crop, work

    def working_image(self, image: np.ndarray) -> np.ndarray:
        """The image reduced to ANALYSE_SIDE (cached with the analysis): what the rule gate measures."""
        return self._analysed(image)[2]

    def check(self, image: np.ndarray) -> str | None:
        location, crop, work = self._analysed(image)
        return self.gate.reason(work, location, crop)

    def check_features(self, features: np.ndarray) -> str | None:
        """Distance of the network's embedding of the crop to the training crops (after :meth:`check`)."""
        e = self.gate.embedding
        if e is None:
            return None
        distance = e.distance(features)
        if distance > e.distance_max:
            return (
                "unlike the training fundus images "
                f"(network feature distance {distance:.1f} > {e.distance_max:.1f})"
            )
        return None

    def prepare(self, image: np.ndarray) -> np.ndarray:
        return self.analyse(image)[1]

    def describe(self, image: np.ndarray) -> str:
        return self.analyse(image)[0].describe()

    def heatmap_to_image(self, cam: np.ndarray, image: np.ndarray) -> np.ndarray:
        """A map over the crop placed onto the input image (zero outside the crop), HxW float32."""
        location, _ = self.analyse(image)
        h, w = image.shape[:2]
        if location.kind == "disc":
            location = DiscLocation(kind="disc", cx=w / 2, cy=h / 2, fov_diameter=min(h, w))
        return place_on_image(cam, image.shape, location)
