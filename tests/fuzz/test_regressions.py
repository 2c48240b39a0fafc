"""One test per crash class the fuzzer found (bench/fuzz.py): each input rebuilt from a seed and a recipe.

Each case runs as the fuzzer runs it (tests/fuzz/target.py in a forked child with a memory cap and a
timeout) and must end as a refusal (C-STORE failure status, or "not assessable" in the worker) or be read and
reported: never an exception other than a refusal, a dead child, more than 2 GiB resident, or a hang.

Recipes name attributes instead of byte offsets where they can (``value``, ``vr``, ``length``, ``drop``
are resolved against the seed's element map); the seeds are rebuilt from ../shared at test time, never stored.
Classes that today's code fails are marked xfail(strict=True) for exactly today's crash (another crash fails
the test); when a fix lands, its tests pass (XPASS, strict) and their ``crash`` must be emptied.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from pydicom.datadict import tag_for_keyword
from pydicom.uid import UID

from tests.fuzz.recipe import Op, scan
from tests.fuzz.runner import Case, Crash, Runner
from tests.fuzz.seeds import Seed, all_seeds, file_seed
from tests.peers import SHARED_DICOM

JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
DEFLATED = "1.2.840.10008.1.2.1.99"


def value(keyword: str, text: str | bytes) -> Op:
    """New value of a top-level attribute (its length follows)."""
    data = text.encode("latin-1") if isinstance(text, str) else text
    return ["=value", keyword, data.hex()]


def vr(keyword: str, new_vr: str) -> Op:
    """Another VR for a top-level attribute (explicit VR seeds)."""
    return ["=vr", keyword, new_vr]


def length(keyword: str, new_length: int) -> Op:
    """Another length field for a top-level attribute."""
    return ["=length", keyword, new_length]


def retag(keyword: str, new_keyword: str) -> Op:
    """Give a top-level element another tag (its VR and value stay)."""
    return ["=retag", keyword, new_keyword]


def drop(keyword: str) -> Op:
    """Remove a top-level attribute."""
    return ["=drop", keyword]


def bomb(size: int) -> Op:
    """Insert an OB element of ``size`` zero bytes before Pixel Data, then deflate the stream."""
    return ["=bomb", size]


def nest(keyword: str, depth: int) -> Op:
    """Insert sequence ``keyword`` nested ``depth`` deep (defined lengths) where it belongs in tag order."""
    return ["=nest", keyword, depth]


def resolve(seed: Seed, ops: list[Op]) -> list[Op]:
    """Attribute-level operations to the byte-level ones the fuzzer replays."""
    elements = {e.tag: e for e in scan(seed.stream, seed.encoding) if e.depth == 0 and e.kind == "element"}
    endian = "<" if UID(seed.encoding).is_little_endian else ">"
    out: list[Op] = []
    for op in ops:
        if not str(op[0]).startswith("="):
            out.append(op)
            continue
        if op[0] == "=bomb":
            out.append(["bomb", elements[0x7FE00010].offset, op[1]])
            continue
        tag = tag_for_keyword(op[1])
        if tag is None:
            raise AssertionError(f"unknown keyword {op[1]}")
        if op[0] == "=nest":
            after = [e.offset for t, e in elements.items() if t > tag]
            out.append(["nest", min(after, default=len(seed.stream)), tag, op[2], True])
            continue
        if tag not in elements:
            raise AssertionError(f"{seed.name} has no top-level {op[1]}")
        element = elements[tag]
        if op[0] == "=value":
            out.append(["value", element.offset, op[2]])
        elif op[0] == "=vr":
            out.append(["put", element.offset + 4, op[2].encode().hex()])
        elif op[0] == "=length":
            fmt = endian + ("H" if element.length_size == 2 else "I")
            out.append(["put", element.length_at, struct.pack(fmt, op[2]).hex()])
        elif op[0] == "=retag":
            new_tag = tag_for_keyword(op[2]) or 0
            out.append(
                ["put", element.offset, struct.pack(endian + "HH", new_tag >> 16, new_tag & 0xFFFF).hex()]
            )
        elif op[0] == "=drop":
            out.append(["delete", element.offset, element.end - element.offset])
    return out


@dataclass(frozen=True)
class Regression:
    name: str
    seed: str
    ops: list[Op]
    #: The start of the signature (runner.Crash.signature) of today's crash, "" when it is handled.
    crash: str
    #: What today's code does with it, and where.
    today: str
    timeout: float = 20.0


REGRESSIONS = [
    # -- C-STORE: decoding and validation ----------------------------------------------------------------
    Regression(
        "deflate-bomb-1GiB",
        "mini/dx_chest_small.deflated",
        [bomb(1 << 30), ["ts", DEFLATED]],
        "memory:decode:",
        "memory: pynetdicom's decode (dsutils.py:116) inflates the whole 1 MB stream to 1 GiB in the C-STORE "
        "handler: more than 2 GiB resident",
        timeout=60.0,
    ),
    Regression(
        "value-length-vs-vr-in-validation",
        "factory/dx12.explicit",
        [vr("BitsAllocated", "FD")],  # a 2-byte value read as 8-byte floats
        "exception:validate:pydicom.errors.BytesLengthException",
        "validate: pydicom.errors.BytesLengthException (hooks.py:256) leaves check_pixel_data, which catches "
        "only AttributeError/KeyError/TypeError/ValueError (the handler's catch-all then answers 0xC000)",
    ),
    Regression(
        "unknown-vr-in-validation",
        "factory/op8.explicit",
        [vr("Rows", "UW")],
        "exception:validate:NotImplementedError",
        "validate: NotImplementedError 'Unknown Value Representation' (pydicom hooks.py:248) from "
        "get_expected_length in check_pixel_data (the handler's catch-all then answers 0xC000)",
    ),
    Regression(
        "pixel-data-with-a-text-vr",
        "mini/dx_chest_small.explicit",
        [drop("PixelData"), retag("WindowCenter", "PixelData")],
        "exception:validate:TypeError:core/ingest.py",
        "validate: TypeError 'object of type DSfloat has no len()' at core/ingest.py:104 check_pixel_data "
        "(the handler's catch-all then answers 0xC000)",
    ),
    # -- worker: the pixel path (inference.preprocess.load_dicom_image) ----------------------------------
    Regression(
        "rle-segment-panic",
        "mini/cr_hip_rle.rle",
        [["insert", 4800, "fad9"]],
        "exception:pixels:pyo3_runtime.PanicException",
        "pixels: pyo3_runtime.PanicException (a BaseException) from pylibjpeg-rle (rle/utils.py:114) passes "
        "every `except Exception` of the pixel path",
    ),
    Regression(
        "rle-panic-hostile-file",
        "hostile/rle_panic_chest_0",
        [],
        "exception:pixels:pyo3_runtime.PanicException",
        "pixels: pyo3_runtime.PanicException from pylibjpeg-rle (the issue's hostile RLE file)",
    ),
    Regression(
        "unknown-vr-in-pixel-module",
        "factory/dx12.explicit",
        [vr("RescaleSlope", "DC")],
        "exception:pixels:NotImplementedError",
        "pixels: NotImplementedError 'Unknown Value Representation' (pydicom hooks.py:248) from "
        "apply_modality_lut's read of the element, not caught in load_dicom_image",
    ),
    Regression(
        "value-length-vs-vr-in-pixel-module",
        "factory/dx12.explicit",
        [vr("RescaleSlope", "FD")],
        "exception:pixels:pydicom.errors.BytesLengthException",
        "pixels: pydicom.errors.BytesLengthException (hooks.py:256) from apply_modality_lut's read of the "
        "element, not caught in load_dicom_image",
    ),
    Regression(
        "number-of-frames-not-a-number",
        "factory/sc2frames.rle",
        [value("NumberOfFrames", "abc ")],
        "exception:pixels:ValueError:inference/preprocess.py",
        "pixels: ValueError from int() in inference/preprocess.py:59 number_of_frames",
    ),
    Regression(
        "number-of-frames-multi-valued",
        "factory/sc2frames.rle",
        [value("NumberOfFrames", "1\\2 ")],
        "exception:pixels:TypeError:inference/preprocess.py",
        "pixels: TypeError (int() of a MultiValue) in inference/preprocess.py:59 number_of_frames",
    ),
    Regression(
        "rescale-slope-multi-valued",
        "factory/dx12.rle",
        [value("RescaleSlope", "1\\2 ")],
        "exception:pixels:ValueError:pydicom/pixels/processing.py",
        "pixels: ValueError 'operands could not be broadcast' in pydicom apply_modality_lut "
        "(processing.py:416), called unguarded by inference/preprocess.py _grayscale",
    ),
    Regression(
        "rescale-slope-empty",
        "factory/dx12.rle",
        [value("RescaleSlope", "")],
        "exception:pixels:TypeError:pydicom/pixels/processing.py",
        "pixels: TypeError / UFuncOutputCastingError in pydicom apply_modality_lut (processing.py:415-416) "
        "for an empty Rescale Slope",
    ),
    Regression(
        "rescale-intercept-text-vr",
        "factory/dx12.explicit",
        [vr("RescaleIntercept", "DT")],
        "exception:pixels:numpy._core._exceptions._UFuncNoLoopError",
        "pixels: numpy UFuncNoLoopError (float + str) in pydicom apply_modality_lut (processing.py:416)",
    ),
    Regression(
        "rescale-slope-overflow",
        "factory/dx12.explicit",
        [value("RescaleSlope", "-1e308")],
        "exception:pixels:tests.fuzz.target.ContractViolation",
        "pixels: load_dicom_image returns NaN/inf pixels (its promise is float32 in [0, 1]); NaN reaches "
        "the model and a NaN probability makes the SR writer raise",
    ),
    Regression(
        "length-beyond-end-of-file",
        "factory/dx12.explicit",
        [length("PixelData", 0xFFFFFFF0)],
        "memory:pixels:MemoryError",
        "pixels: MemoryError: pydicom's dcmread of the stored file asks for the declared 4 GiB "
        "(filereader.py data_element_generator) under an address-space limit; not caught in read_dataset",
    ),
    Regression(
        "file-meta-element-in-the-dataset",
        "mini/dx_chest_small.implicit",
        [["put", 0, "02001000"]],  # the first element becomes (0002,0010) Transfer Syntax UID
        "exception:pixels:AttributeError:inference/preprocess.py",
        "pixels: the stored file's dataset carries a (0002,0010), which dcmread lets override the file meta; "
        "inference/preprocess.py:163 then raises AttributeError ('MultiValue' has no 'name') while "
        "formatting its UnreadableImage",
    ),
    Regression(
        "jpeg-height-zero",
        "factory/dx12.jpeg-extended",
        [["put", 1194, "0000"]],  # SOF1 at 1189: number of lines 0 (to be given by a DNL marker)
        "memory:pixels:",
        "memory: pylibjpeg-libjpeg decode_pixel_data (libjpeg/utils.py:213) grows past 2 GiB on a JPEG whose "
        "frame header declares 0 lines",
        timeout=60.0,
    ),
    Regression(
        "jpeg-ls-stream-as-jpeg-lossless",
        "mini/cr_chest_jpegls.jpegls",
        [["ts", JPEG_LOSSLESS_SV1], ["put", 1671, "0000"]],
        "hang:pixels:",
        "hang: pylibjpeg-libjpeg decode_pixel_data (libjpeg/utils.py:213) runs for more than a minute and "
        "grows past 2 GiB on a JPEG-LS codestream declared JPEG Lossless",
        timeout=10.0,
    ),
    # -- worker: the SR writer reading the source (reporting.sr.build_report) ----------------------------
    Regression(
        "nesting-300-defined-lengths",
        "factory/dx12.jpeg-extended",
        [nest("ProcedureCodeSequence", 300)],
        "memory:report:",
        "report: Procedure Code Sequence nested 300 deep is accepted; writing the SR grows past 2 GiB",
        timeout=60.0,
    ),
    Regression(
        "nesting-300-hostile-file",
        "hostile/nest300_defined_ProcCodeSeq",
        [],
        "memory:report:",
        "report: ../shared/dicom/hostile/nest300_defined_ProcCodeSeq.dcm; writing the SR grows past 2 GiB",
        timeout=60.0,
    ),
    Regression(
        "nesting-1000",
        "factory/dx12.jpeg-ls",
        [nest("ProcedureCodeSequence", 1000)],
        "exception:report:RecursionError",
        "report: RecursionError in pydicom (datadict.py) while the SR copies the study module",
    ),
    Regression(
        "study-date-invalid",
        "factory/dx12.jpeg-ls",
        [value("StudyDate", "2026")],
        "exception:report:ValueError:pydicom/valuerep.py",
        "report: ValueError \"Unable to convert '2026' to 'DA'\" (pydicom valuerep.py) in build_report",
    ),
    Regression(
        "patient-name-invalid",
        "mini/dx_chest_small.explicit",
        [value("PatientName", "\\ ")],
        "exception:report:TypeError:highdicom/valuerep.py",
        "report: TypeError 'Invalid type for a person name' (highdicom valuerep.py:48) in build_report",
    ),
    Regression(
        "specific-character-set-unknown",
        "mini/cr_chest_jpegls.jpegls",
        [value("SpecificCharacterSet", "ISO_IR 300")],
        "exception:report:ValueError:enum.py",
        "report: ValueError 'not a valid SpecificCharacterSetValues' (enum) in build_report",
    ),
    Regression(
        "unknown-vr-in-study-module",
        "factory/dx12.explicit",
        [vr("StudyTime", "TO")],
        "exception:report:NotImplementedError",
        "report: NotImplementedError 'Unknown Value Representation' (pydicom hooks.py:248) in build_report",
    ),
    Regression(
        "sop-class-not-an-image",
        "mini/dx_chest_small.implicit",
        [value("SOPClassUID", "1.2.3\x00")],
        "exception:report:ValueError:highdicom/sr/templates.py",
        "report: ValueError 'SOP Class UID does not identify a SOP Class for storage of an image' "
        "(highdicom sr/templates.py:662)",
    ),
    Regression(
        "pixel-data-as-text-vr",
        "factory/dx12.jpeg-lossless",
        [vr("PixelData", "UR")],
        "exception:validate:AttributeError",
        "validate: AttributeError in pydicom encaps.parse_basic_offsets (Pixel Data sent as UR is a str); "
        "found by the 100,000-case run on the merged code",
    ),
    Regression(
        "text-attribute-with-numeric-vr",
        "mini/dx_chest_small.explicit",
        [vr("InstitutionName", "SS")],
        "exception:report:TypeError",
        "report: TypeError 'sequence item 0: expected a bytes-like object, int found' (pydicom filewriter) "
        "writing the SR that copied Institution Name read as SS",
    ),
    Regression(
        "rows-length-runs-over",
        "factory/sc2frames.rle",
        [length("Rows", 0xD8B0)],  # Rows swallows the elements after it: a multi-valued, non-integer Rows
        "exception:report:TypeError:highdicom/sr/value_types.py",
        "report: accepted; TypeError 'Argument value must have type int or float' (highdicom "
        "value_types.py:1159) for the TID 1602 Rows entry in reporting/sr.py _image_library",
    ),
    Regression(
        "sop-instance-uid-as-ds",
        "mini/dx_chest_small.explicit",
        [value("SOPInstanceUID", "1.200 "), vr("SOPInstanceUID", "DS")],
        "exception:report:ValueError:reporting/sr.py",
        "report: a SOP Instance UID encoded as DS passes check_uid through str(); build_report "
        "(reporting/sr.py:236) then finds 'no source' for the result: ValueError",
    ),
    Regression(
        "patient-orientation-as-at",
        "mini/dx_chest_small.explicit",
        [vr("PatientOrientation", "AT")],
        "exception:report:TypeError:reporting/sr.py",
        "report: TypeError 'object of type BaseTag has no len()' in reporting/sr.py:97 "
        "_EntryDescriptors._is_projection_radiography",
    ),
    Regression(
        "uid-as-person-name",
        "factory/dx12.rle",
        [vr("StudyInstanceUID", "PN")],
        "exception:report:TypeError:pydicom/uid.py",
        "report: a Study Instance UID encoded as PN passes check_uid through str(); the SR's copy raises "
        "TypeError 'A UID must be created from a string' (pydicom uid.py:83)",
    ),
    Regression(
        "malformed-sequence-read-by-the-sr",
        "factory/op8.explicit",
        [["nest", 190, 0x00081032, 8, True], ["put", 298, "ffffffff"]],  # an inner item's length undefined
        "exception:report:OSError:pydicom/filereader.py",
        "report: accepted and its pixels read, but the source read for the SR (dcmread without pixels, "
        "outside any try in gateway/study.py) raises OSError 'No tag to read' (pydicom filereader.py:560)",
    ),
    Regression(
        "patient-sex-missing",
        "factory/dx12.explicit",
        [drop("PatientSex")],
        "exception:report:AttributeError",
        "report: AttributeError 'no attribute PatientSex' (pydicom dataset.py:918) in build_report",
    ),
    Regression(
        "image-without-rows",
        "factory/dx12.explicit",
        [drop("Rows")],
        "exception:report:AttributeError",
        "report: accepted (check_pixel_data takes an object without Rows for a non-image), not assessable, "
        "then AttributeError 'Rows' while the SR lists it",
    ),
]


@pytest.fixture(scope="module")
def seeds() -> dict[str, Seed]:
    """The fuzzer's seeds and the two files of ../shared/dicom/hostile."""
    hostile = [
        file_seed(f"hostile/{name}", SHARED_DICOM / "hostile" / f"{name}.dcm")
        for name in ("rle_panic_chest_0", "nest300_defined_ProcCodeSeq")
    ]
    return {s.name: s for s in (*all_seeds(), *hostile)}


def _params() -> Iterator[Any]:
    for regression in REGRESSIONS:
        marks = []
        if regression.crash.startswith(("memory:", "hang:")):
            marks.append(pytest.mark.slow)  # runs until the memory bound or the timeout
        yield pytest.param(regression, id=regression.name, marks=marks)


class KnownCrash(AssertionError):
    """The crash a regression's xfail mark expects; any other failure fails the test."""


@pytest.mark.parametrize("regression", list(_params()))
def test_crash_class_is_handled(regression: Regression, seeds: dict[str, Seed]) -> None:
    seed = seeds[regression.seed]
    ops = resolve(seed, regression.ops)
    with Runner(list(seeds.values()), timeout=regression.timeout) as runner:
        result = runner.run(Case(0, seed.name, ops))
    if isinstance(result, Crash):
        detail = f"{result.signature}\n{result.message}\n{result.traceback[-3000:]}"
        if regression.crash and result.signature.startswith(regression.crash):
            raise KnownCrash(detail)
        raise AssertionError(detail)
