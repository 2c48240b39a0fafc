"""Secondary Capture of a result: the image, its heatmap and the result text burned in.

For PACS viewers that cannot show Structured Reports (GATEWAY_REPORTING__SECONDARY_CAPTURE=true). The SR stays
the authoritative result; this picture is a convenience and says so.
"""

from __future__ import annotations

import cv2
import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from core.domain import MANUFACTURER, ImageResult

NOTICE_LINES = ("AI decision support for research - not a diagnosis.", "See the structured report.")
_MAX_SIDE = 1024


def capture_uid(report_uid: str, source_sop_uid: str) -> str:
    """Deterministic SOP Instance UID of the capture of one source image for one report."""
    return generate_uid(entropy_srcs=[MANUFACTURER, "capture", report_uid, source_sop_uid])


def capture_series_uid(report_series_uid: str) -> str:
    return generate_uid(entropy_srcs=[MANUFACTURER, "capture-series", report_series_uid])


def result_lines(result: ImageResult) -> list[str]:
    """The text burned into the capture, one line per finding."""
    head = f"{result.model.algorithm_name} {result.model.version}"
    if not result.assessable:
        return [head, result.reason or "not assessable"]
    lines = [head]
    for f in result.findings:
        lines.append(
            f"{f.name.replace('_', ' ')}: {f.label} (p={f.probability:.2f}, threshold {f.threshold:.2f})"
        )
    return lines


def render(image: np.ndarray, heatmap: np.ndarray | None, lines: list[str]) -> np.ndarray:
    """RGB uint8 picture: the image (float [0, 1], gray or RGB), heatmap blended in, text band on top."""
    rgb = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
    scale = min(1.0, _MAX_SIDE / max(rgb.shape[:2]))
    size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
    picture = cv2.resize((np.clip(rgb, 0, 1) * 255).astype(np.uint8), size, interpolation=cv2.INTER_AREA)
    if heatmap is not None:
        heat = cv2.resize(np.clip(heatmap, 0, 1).astype(np.float32), size, interpolation=cv2.INTER_LINEAR)
        colour = cv2.cvtColor(
            cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB
        )
        alpha = (0.45 * heat)[..., None]
        picture = (picture * (1 - alpha) + colour * alpha).astype(np.uint8)
    font, font_scale, thick = cv2.FONT_HERSHEY_SIMPLEX, max(0.4, size[0] / 1400), 1
    line_h = int(30 * font_scale) + 6
    text = [*lines, *NOTICE_LINES]
    band = np.zeros((line_h * len(text) + 6, size[0], 3), np.uint8)
    for i, line in enumerate(text):
        cv2.putText(band, line, (6, line_h * (i + 1)), font, font_scale, (255, 255, 255), thick, cv2.LINE_AA)
    return np.ascontiguousarray(np.vstack([band, picture]))


def build_capture(
    *,
    result: ImageResult,
    source: Dataset,
    image: np.ndarray,
    report_uid: str,
    report_series_uid: str,
    series_number: int,
    instance_number: int = 1,
) -> hd.sc.SCImage:
    """Secondary Capture Image (PS3.3 A.8.1) of ``result`` on ``source``, in the source's patient and study.

    Burned-in annotation YES; the Source Image Sequence references the analysed image; Image Comments carry
    the decision-support notice.
    """
    pixels = render(image, result.heatmap, result_lines(result))
    orientation = source.get("PatientOrientation")
    sc = hd.sc.SCImage.from_ref_dataset(
        source,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=capture_series_uid(report_series_uid),
        series_number=series_number + 1,
        sop_instance_uid=capture_uid(report_uid, result.instance.sop_instance_uid),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        patient_orientation=("L", "F"),  # placeholder: highdicom wants one; replaced just below
    )
    # Patient Orientation is type 2: the source's value when it has one, else empty (unknown), never made up.
    sc.PatientOrientation = list(orientation) if orientation and len(orientation) == 2 else ""  # type: ignore[assignment]
    # General Series Laterality is type 2C; the source's value (possibly empty) is the honest one.
    side = source.get("Laterality") or source.get("ImageLaterality") or ""
    sc.Laterality = side if side in ("R", "L") else ""
    sc.BurnedInAnnotation = "YES"
    sc.ManufacturerModelName = result.model.name
    sc.SoftwareVersions = result.model.version
    sc.SeriesDescription = f"AI screening image: {result.model.name} {result.model.version}"[:64]
    sc.ImageComments = " ".join(NOTICE_LINES)
    sc.DerivationDescription = "Source image with model heatmap and result text burned in"
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = pydicom.Sequence([ref])
    return sc
