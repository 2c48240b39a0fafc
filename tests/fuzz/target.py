"""The fuzz target: what the gateway runs on one dataset received by C-STORE, and on it once accepted.

Listener (``dicom_listener.handlers.handle_store``): the P-DATA bytes written to a file as pynetdicom's
chunked receive writes them and read as the handler reads that file, then the handler's validation
(:func:`validate`). Worker, for an accepted
instance: the stored file (``event.encoded_dataset()``: preamble, pynetdicom's file meta, the bytes as
received) read by the pixel path as ``inference.model.run_model`` reads it, and, when the instance would be
routed to a model, the SR writer reading it as a source (``gateway.study``: ``dcmread`` without pixels,
``build_report``, encoding).

Refusals are outcomes; anything else leaving a stage is a crash, raised as :class:`CaseCrash` with the stage.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.uid import UID
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from core.domain import ImageResult, InstanceRef, ModelInfo
from core.ingest import IngestError, InstanceMeta, read_instance, validate_instance
from core.settings import IngestSettings, RoutingSettings
from gateway.sources import UnreadableSource, read_source
from gateway.study import build_report_leaving_out_bad_sources
from inference.preprocess import UnreadableImage, load_dicom_image
from inference.routing import SeriesInfo, route_series

#: What the C-STORE handler turns into a refusal status on purpose.
LISTENER_REFUSALS: tuple[type[BaseException], ...] = (IngestError,)
#: What ``inference.model.run_model`` catches around ``load_dicom_image`` (the image becomes not assessable).
WORKER_REFUSALS: tuple[type[BaseException], ...] = (UnreadableImage, OSError)

_REPORT_MODEL = ModelInfo("pneumonia", "0.0.0", "fuzz")


@dataclass(frozen=True)
class Outcome:
    """How the gateway ended with one received dataset (when it did not crash)."""

    #: "refused" (C-STORE answers a failure status), "unreadable" (stored, pixels refused: not assessable),
    #: "stored" (stored and read, not routed to a model), "reported" (read and listed in an SR).
    #: ``run_case`` lists an unreadable image in the SR too, as the worker does.
    status: str
    reason: str = ""


class CaseCrash(Exception):
    """An exception other than a refusal left ``stage`` ("decode", "validate", "pixels", "report")."""

    def __init__(self, stage: str, error: BaseException) -> None:
        super().__init__(f"{stage}: {type(error).__name__}: {error}")
        self.stage = stage
        self.error = error


class ContractViolation(Exception):
    """The pixel path returned something its callers are promised never to get."""


#: The limits the listener and the worker run with (the defaults).
LIMITS = IngestSettings()


def validate(ds: Dataset, transfer_syntax: str) -> InstanceMeta:
    """The C-STORE handler's validation of a decoded dataset (``handle_store``), in one place."""
    return validate_instance(ds, transfer_syntax, LIMITS)


#: The command's UIDs in the received file's meta (the fuzzed dataset's own may not be valid UIDs).
_COMMAND_UIDS = (UID("1.2.840.10008.5.1.4.1.1.1"), UID("1.2.826.0.1.3680043.10.1.1"))


def decode_received(transfer_syntax: str, stream: bytes, workdir: Path) -> Dataset:
    """The dataset of a C-STORE request as ``handle_store`` reads it: the file pynetdicom received it into
    (zero preamble, file meta from the command, the bytes as received), read within the limits."""
    path = workdir / "received.dcm"
    meta = create_file_meta(
        sop_class_uid=_COMMAND_UIDS[0],
        sop_instance_uid=_COMMAND_UIDS[1],
        transfer_syntax=UID(transfer_syntax),
    )
    path.write_bytes(b"".join((b"\x00" * 128, b"DICM", encode_file_meta(meta), stream)))
    return read_instance(path, LIMITS)


def stored_file(meta: InstanceMeta, stream: bytes) -> bytes:
    """What the listener writes: ``event.encoded_dataset()`` (the command's UIDs equal the dataset's here)."""
    file_meta = create_file_meta(
        sop_class_uid=UID(meta.sop_class_uid),
        sop_instance_uid=UID(meta.sop_instance_uid),
        transfer_syntax=UID(meta.transfer_syntax_uid),
    )
    return b"".join((b"\x00" * 128, b"DICM", encode_file_meta(file_meta), stream))


def run_case(
    transfer_syntax: str,
    stream: bytes,
    workdir: Path,
    *,
    report: bool = True,
    entering: Callable[[str], None] = lambda stage: None,
) -> Outcome:
    """Run one received dataset through the listener and, once accepted, the worker's reading of it.

    ``report=False`` skips the SR stage (the caller knows the header is one already reported cleanly).
    ``entering(stage)`` is called as each stage starts (a watchdog then knows where a hang or a death was).
    Raises :class:`CaseCrash` for anything that is not a refusal.
    """
    entering("decode")
    try:
        ds = decode_received(transfer_syntax, stream, workdir)
    except MemoryError as exc:  # refused too, but only after the memory was taken
        raise CaseCrash("decode", exc) from exc
    except LISTENER_REFUSALS as exc:
        return Outcome("refused", f"undecodable: {type(exc).__name__}")
    except BaseException as exc:
        raise CaseCrash("decode", exc) from exc

    entering("validate")
    try:
        meta = validate(ds, transfer_syntax)
    except LISTENER_REFUSALS as exc:
        return Outcome("refused", str(exc)[:200])
    except BaseException as exc:
        raise CaseCrash("validate", exc) from exc

    path = workdir / "instance.dcm"
    entering("store")
    try:
        path.write_bytes(stored_file(meta, stream))
    except BaseException as exc:  # validation let through UIDs that the file meta cannot carry
        raise CaseCrash("store", exc) from exc

    entering("pixels")
    unreadable = None
    try:
        image = load_dicom_image(path)
        _check_image(image)
    except WORKER_REFUSALS as exc:
        unreadable = Outcome("unreadable", str(exc)[:200])
    except BaseException as exc:
        raise CaseCrash("pixels", exc) from exc

    # The SR lists every routed image, a not assessable one too.
    if not report or not _routed(meta):
        return unreadable or Outcome("stored")
    entering("report")
    try:
        _report(meta, path)
    except BaseException as exc:
        raise CaseCrash("report", exc) from exc
    return unreadable or Outcome("reported")


def _check_image(image: np.ndarray) -> None:
    """``load_dicom_image`` promises float32 HxW or HxWx3 in [0, 1]; NaN would reach the model and the SR."""
    if image.dtype != np.float32 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ContractViolation(f"image {image.dtype} of shape {image.shape}")
    if image.size == 0:
        raise ContractViolation(f"empty image of shape {image.shape}")
    if not np.isfinite(image).all() or float(image.min()) < 0.0 or float(image.max()) > 1.0:
        raise ContractViolation("image values outside [0, 1] or not finite")


def _routed(meta: InstanceMeta) -> bool:
    info = SeriesInfo(
        modality=meta.modality,
        sop_class_uid=meta.sop_class_uid,
        body_part_examined=meta.body_part_examined,
        series_description=meta.series_description,
        study_description=meta.study_description,
        manufacturer=meta.manufacturer,
    )
    return any(route.routed for route in route_series(info, RoutingSettings()))


def _report(meta: InstanceMeta, path: Path) -> None:
    """As ``gateway.study`` lists a source: read its header within the limits, build the SR, encode it."""
    ref = InstanceRef(
        study_instance_uid=meta.study_instance_uid,
        series_instance_uid=meta.series_instance_uid,
        sop_instance_uid=meta.sop_instance_uid,
        sop_class_uid=meta.sop_class_uid,
        path=path,
    )
    try:
        source = read_source(ref, LIMITS)
    except UnreadableSource:
        return  # gateway.study leaves such an image out of the report, with the reason
    result = ImageResult(instance=ref, model=_REPORT_MODEL, assessable=False, reason="fuzz")
    # As gateway.study does: a source highdicom cannot describe is left out of the report with its reason.
    sr, _ = build_report_leaving_out_bad_sources(
        [result],
        {meta.sop_instance_uid: source},
        model=_REPORT_MODEL,
        sop_instance_uid="2.25.1",
        series_instance_uid="2.25.2",
    )
    if sr is None:
        return
    sr.save_as(io.BytesIO(), enforce_file_format=True)
