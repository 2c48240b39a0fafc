"""Structure-aware mutations of a seed's P-DATA bytes, drawn as recipes (tests.fuzz.recipe) from a seeded RNG.

:func:`generate` draws byte flips, inserts, deletes, truncation, element length, VR and tag changes, values
of the attributes the pipeline reads (dimensions, bit depths, photometric interpretation, rescale, windows,
UIDs), deleted and duplicated elements, deep nesting, codestream headers (JPEG SOF, JPEG-LS SOF55, JPEG 2000
SIZ, RLE segment table), transfer-syntax swaps and deflate bombs.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Sequence
from typing import Any

from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from dicom_listener.server import TRANSFER_SYNTAXES
from tests.fuzz.recipe import (
    ITEM,
    ITEM_END,
    LONG_VRS,
    PIXEL_DATA,
    SEQUENCE_END,
    UNDEFINED,
    Element,
    Op,
    apply,
    build_case,
    scan,
)
from tests.fuzz.seeds import Seed

_VRS = [
    *sorted(LONG_VRS),
    *(v.encode() for v in ("AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "PN")),
    *(v.encode() for v in ("SH", "SL", "SS", "ST", "TM", "UI", "UL", "US")),
    b"ZZ",
    b"\x00\x00",
    b"\xff\xff",
]
_US = [0, 1, 2, 3, 7, 8, 12, 15, 16, 17, 24, 32, 33, 64, 255, 256, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF]
_IS = ["0", "-1", "1", "2", "3", "1000", "65536", "99999999", "2147483648", "", "abc", "1e3", "1.5", "1\\2"]
_DS = ["0", "-1", "1", "0.5", "nan", "inf", "-inf", "1e308", "-1e308", "1e-308", "", "abc", "1\\2", "4096"]
_CS = [
    "MONOCHROME1",
    "MONOCHROME2",
    "RGB",
    "YBR_FULL",
    "YBR_FULL_422",
    "YBR_ICT",
    "YBR_RCT",
    "YBR_PARTIAL_420",
    "PALETTE COLOR",
    "HSV",
    "ARGB",
    "CMYK",
    "",
    "X",
    "INVERSE",
    "IDENTITY",
]
_UI = [
    "",
    "1.2.3",
    "1..2",
    "01.2.3",
    "1.2.",
    "a.b.c",
    "1.2.3\x00",
    "1.2\\3.4",
    "9" * 65,
    "1.2.3.4.5.6.7.8.9.0" * 4,
]
_TEXT = ["", "CHEST", "HIP", "EYE", "CR", "DX", "OP", "SR", "ÿ", "\x1b$B", "x" * 70, "\\", "a\\b"]
#: The attributes the listener, the pixel path and the SR writer read, with the values worth trying.
_ATTRIBUTES: dict[int, tuple[str, Sequence[Any]]] = {
    0x00280010: ("US", _US),  # Rows
    0x00280011: ("US", _US),  # Columns
    0x00280100: ("US", _US),  # Bits Allocated
    0x00280101: ("US", _US),  # Bits Stored
    0x00280102: ("US", _US),  # High Bit
    0x00280103: ("US", [0, 1, 2, 0xFFFF]),  # Pixel Representation
    0x00280002: ("US", [0, 1, 2, 3, 4, 0xFFFF]),  # Samples per Pixel
    0x00280006: ("US", [0, 1, 2, 0xFFFF]),  # Planar Configuration
    0x00280008: ("IS", _IS),  # Number of Frames
    0x00280004: ("CS", _CS),  # Photometric Interpretation
    0x20500020: ("CS", _CS),  # Presentation LUT Shape
    0x00281052: ("DS", _DS),  # Rescale Intercept
    0x00281053: ("DS", _DS),  # Rescale Slope
    0x00281050: ("DS", _DS),  # Window Center
    0x00281051: ("DS", _DS),  # Window Width
    0x00281056: ("CS", ["LINEAR", "SIGMOID", "LINEAR_EXACT", "", "X"]),  # VOI LUT Function
    0x00283002: ("US", _US),  # LUT Descriptor
    0x00080016: ("UI", _UI),  # SOP Class UID
    0x00080018: ("UI", _UI),  # SOP Instance UID
    0x0020000D: ("UI", _UI),  # Study Instance UID
    0x0020000E: ("UI", _UI),  # Series Instance UID
    0x00080060: ("CS", _TEXT),  # Modality
    0x00180015: ("CS", _TEXT),  # Body Part Examined
    0x00080070: ("LO", _TEXT),  # Manufacturer
    0x00100010: ("PN", ["", "A^B", "=^^", "x" * 70, "\\", "A^B=C^D=E^F=G"]),  # Patient's Name
    0x00080020: ("DA", ["", "2026", "20261301", "abcdefgh", "1"]),  # Study Date
    0x00080005: ("CS", ["ISO_IR 100", "ISO 2022 IR 87", "ISO_IR 192", "GB18030", "X", "", "\\\\"]),
}
_NEST_TAGS = [0x00081032, 0x00081110, 0x00082218, 0x00400275, 0x00081140, 0x00089215]
_NEST_DEPTHS = [2, 8, 33, 64, 300, 1000, 10000]
_INTERESTING_BYTES = [0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF]
_INTERESTING_INTS = [
    0,
    1,
    2,
    0x7F,
    0x80,
    0xFF,
    0x100,
    0x7FFF,
    0x8000,
    0xFFFF,
    0x10000,
    0x7FFFFFFF,
    0xFFFFFFFF,
]
#: (marker, offset of a field after the marker, field size) in JPEG SOF, JPEG-LS SOF55, JPEG 2000 SIZ.
_CODEC_FIELDS: dict[bytes, list[tuple[int, int]]] = {
    b"\xff\xc0": [(4, 1), (5, 2), (7, 2), (9, 1), (10, 1), (11, 1)],
    b"\xff\xc1": [(4, 1), (5, 2), (7, 2), (9, 1), (10, 1), (11, 1)],
    b"\xff\xc3": [(4, 1), (5, 2), (7, 2), (9, 1), (10, 1), (11, 1)],
    b"\xff\xf7": [(4, 1), (5, 2), (7, 2), (9, 1), (10, 1), (11, 1)],
    b"\xff\x51": [(4, 2), (6, 4), (10, 4), (14, 4), (18, 4), (22, 4), (26, 4), (38, 2), (40, 1), (41, 1)],
}
_BOMB_SIZES = [64 << 20, 512 << 20, 1 << 30]


def generate(seed: Seed, rng: random.Random) -> list[Op]:
    """A random recipe for ``seed``: usually one to three operations, sometimes up to eight."""
    count = rng.choice([1, 1, 1, 1, 2, 2, 3, 3, 4, 5, 8])
    ops: list[Op] = []
    buf = seed.stream
    for _ in range(count):
        op = mutation(seed, buf, rng)
        if op is None:
            continue
        ops.append(op)
        if op[0] != "ts":
            buf = apply(buf, op, seed.encoding)
    if seed.deflated or (ops and ops[-1][0] == "ts" and UID(ops[-1][1]).is_deflated and rng.random() < 0.7):
        bomb = rng.random() < 0.01
        if bomb:
            top = [e for e in scan(buf, seed.encoding) if e.depth == 0]
            ops.append(["bomb", rng.choice(top).offset if top else len(buf), rng.choice(_BOMB_SIZES)])
        else:
            ops.append(["deflate"])
        if not any(op[0] == "ts" for op in ops):
            ops.append(["ts", DeflatedExplicitVRLittleEndian])
        if not bomb and rng.random() < 0.2:  # corrupt the compressed stream too
            _, deflated = build_case(seed, ops)
            ops.append(_byte_op(deflated, rng, 0, len(deflated)))
    return ops


def mutation(seed: Seed, buf: bytes, rng: random.Random) -> Op | None:
    """One operation drawn against the current bytes ``buf`` of ``seed`` (None when none applies)."""
    elements = scan(buf, seed.encoding)
    pixels = next((e for e in elements if e.tag == PIXEL_DATA and e.depth == 0), None)
    header_end = pixels.offset if pixels else len(buf)
    roll = rng.random()
    if roll < 0.30:  # bytes: 2/3 in the header, 1/3 in the pixel data
        if rng.random() < 0.66 or pixels is None:
            return _byte_op(buf, rng, 0, header_end)
        return _byte_op(buf, rng, pixels.value_at, len(buf))
    if roll < 0.45:
        return _attribute_op(elements, rng, seed.encoding)
    if roll < 0.62:
        return _header_op(elements, buf, rng, seed.encoding)
    if roll < 0.74:
        return _codec_op(elements, buf, rng)
    if roll < 0.82:
        return _element_op(elements, rng)
    if roll < 0.86:
        top = [e for e in elements if e.depth == 0]
        pos = rng.choice(top).offset if top and rng.random() < 0.8 else len(buf)
        depth = rng.choice(_NEST_DEPTHS)
        return ["nest", pos, rng.choice(_NEST_TAGS), depth, rng.random() < 0.5]
    if roll < 0.93:
        return ["ts", str(rng.choice(TRANSFER_SYNTAXES))]
    return _byte_op(buf, rng, 0, len(buf))


def _byte_op(buf: bytes, rng: random.Random, start: int, end: int) -> Op:
    end = max(end, start + 1)
    pos = rng.randrange(start, end)
    kind = rng.choice(["flip", "flip", "flip", "put", "insert", "delete", "truncate", "copy"])
    if kind == "flip":
        return ["flip", pos, 1 << rng.randrange(8)]
    if kind == "put":
        return ["put", pos, bytes([rng.choice(_INTERESTING_BYTES)] * rng.choice([1, 2, 4])).hex()]
    if kind == "insert":
        return ["insert", pos, rng.randbytes(rng.choice([1, 2, 4, 8, 16, 64])).hex()]
    if kind == "delete":
        return ["delete", pos, rng.choice([1, 2, 4, 8, 64, 1024])]
    if kind == "truncate":
        return ["truncate", pos]
    size = rng.choice([4, 8, 64, 512])
    return ["copy", rng.randrange(max(len(buf) - size, 1)), size, pos]


def _attribute_op(elements: list[Element], rng: random.Random, encoding: str) -> Op | None:
    present = [e for e in elements if e.tag in _ATTRIBUTES and e.kind == "element"]
    if not present:
        return None
    element = rng.choice(present)
    vr, values = _ATTRIBUTES[element.tag]
    value = rng.choice(values)
    little = UID(encoding).is_little_endian
    if vr == "US":
        count = 3 if element.tag == 0x00283002 else 1
        numbers = [value if i == 0 or rng.random() < 0.5 else rng.choice(_US) for i in range(count)]
        data = struct.pack(("<" if little else ">") + "H" * count, *numbers)
    else:
        data = str(value).encode("utf-8")
        if len(data) % 2:
            data += b"\x00" if vr == "UI" else b" "
    return ["value", element.offset, data.hex()]


def _header_op(elements: list[Element], buf: bytes, rng: random.Random, encoding: str) -> Op | None:
    """Length, VR or tag of an element, item or fragment."""
    if not elements:
        return None
    element = rng.choice(elements)
    endian = "<" if UID(encoding).is_little_endian else ">"
    choice = rng.random()
    if choice < 0.6:
        size = element.length_size
        candidates = [0, 1, 2, 3, element.length + 1, element.length - 1, element.length * 2, len(buf)]
        candidates += [0xFFFF, 0xFFFE] if size == 2 else [UNDEFINED, 0x7FFFFFFF, 0xFFFFFFF0]
        length = rng.choice(candidates) % (1 << (8 * size))
        return ["put", element.length_at, struct.pack(endian + ("H" if size == 2 else "I"), length).hex()]
    if choice < 0.8 and element.vr:
        return ["put", element.offset + 4, rng.choice(_VRS).hex()]
    tag = rng.choice([*_ATTRIBUTES, ITEM, ITEM_END, SEQUENCE_END, PIXEL_DATA, 0x00020010, 0, 0xFFFFFFFF])
    return ["put", element.offset, struct.pack(endian + "HH", tag >> 16, tag & 0xFFFF).hex()]


def _codec_op(elements: list[Element], buf: bytes, rng: random.Random) -> Op | None:
    """A field of the first codestream header: dimensions, precision, components; RLE segment table."""
    fragments = [e for e in elements if e.kind == "fragment" and 0 < e.length != UNDEFINED]
    if not fragments:
        return None
    fragment = fragments[1] if len(fragments) > 1 and rng.random() < 0.9 else fragments[0]
    start = fragment.value_at
    head = buf[start : start + 1024]
    found = [
        (head.find(marker), fields) for marker, fields in _CODEC_FIELDS.items() if head.find(marker) >= 0
    ]
    value = rng.choice(_INTERESTING_INTS)
    if found:
        at, fields = rng.choice(found)
        offset, size = rng.choice(fields)
        data = (value % (1 << (8 * size))).to_bytes(size, "big")
        return ["put", start + at + offset, data.hex()]
    # RLE: segment count and 15 offsets (little endian) open every frame.
    field = rng.randrange(16)
    number = rng.choice([value, value + fragment.length, rng.randrange(64, max(65, fragment.length))])
    return ["put", start + 4 * field, (number % (1 << 32)).to_bytes(4, "little").hex()]


def _element_op(elements: list[Element], rng: random.Random) -> Op | None:
    """Delete or duplicate a whole defined-length element."""
    whole = [e for e in elements if e.kind == "element" and e.length != UNDEFINED]
    if not whole:
        return None
    element = rng.choice(whole)
    size = element.end - element.offset
    if rng.random() < 0.6:
        return ["delete", element.offset, size]
    return ["copy", element.offset, size, rng.choice(whole).offset]
