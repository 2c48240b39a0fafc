"""Recipes: a seed's P-DATA bytes and a list of operations, replayed the same on every run.

A recipe is a seed name and a list of concrete operations (JSON-friendly lists, bytes as hex), so a crash can
be replayed and minimised and a regression test can rebuild its input from the seed without storing it:

    ["flip", pos, mask]            XOR one byte
    ["put", pos, hex]              overwrite bytes
    ["insert", pos, hex]           insert bytes
    ["delete", pos, n]             remove n bytes
    ["truncate", n]                keep the first n bytes
    ["copy", src, n, dst]          insert a copy of n bytes from src at dst
    ["value", pos, hex]            new value of the element whose header is at pos (its length follows)
    ["nest", pos, tag, depth, defined]   insert a sequence nested ``depth`` deep (defined or undefined)
    ["ts", uid]                    declare another transfer syntax (the bytes stay as they are)
    ["deflate"]                    deflate the stream (Deflated Explicit VR Little Endian)
    ["bomb", pos, n]               insert an OB element of n zero bytes, then deflate (never held inflated)

:func:`scan` finds the element headers (items, fragments) the structure-aware operations aim at.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.uid import UID

from tests.fuzz.seeds import Seed

Op = list[Any]

ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
UNDEFINED = 0xFFFFFFFF
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


@dataclass(frozen=True)
class Element:
    """One element header (or item/delimiter) found in a stream."""

    offset: int
    tag: int
    vr: bytes  # b"" for items, delimiters and implicit VR
    length: int
    length_at: int
    length_size: int
    value_at: int
    depth: int
    kind: str  # "element", "item", "fragment", "delimiter"

    @property
    def end(self) -> int:
        """End of a defined-length element; the value start for an undefined one."""
        return self.value_at + (0 if self.length == UNDEFINED else self.length)


def _is_sequence(tag: int) -> bool:
    try:
        return bool(dictionary_VR(tag) == "SQ")
    except KeyError:
        return False


def scan(buf: bytes, encoding: str, *, limit: int = 4096) -> list[Element]:
    """Element headers of ``buf`` in order, descending into sequences and encapsulated pixel data.

    Tolerant: stops at the first header that does not fit, never raises.
    """
    ts = UID(encoding)
    implicit, endian = ts.is_implicit_VR, "<" if ts.is_little_endian else ">"
    out: list[Element] = []
    stack: list[tuple[str, int | None]] = []  # ("sequence" | "item" | "pixels", end offset or None)
    pos = 0
    while pos + 8 <= len(buf) and len(out) < limit:
        while stack and stack[-1][1] is not None and pos >= (stack[-1][1] or 0):
            stack.pop()
        group, number = struct.unpack_from(endian + "HH", buf, pos)
        tag = group << 16 | number
        if group == 0xFFFE:
            (length,) = struct.unpack_from(endian + "I", buf, pos + 4)
            in_pixels = bool(stack) and stack[-1][0] == "pixels"
            kind = "delimiter" if tag in (ITEM_END, SEQUENCE_END) else "fragment" if in_pixels else "item"
            out.append(Element(pos, tag, b"", length, pos + 4, 4, pos + 8, len(stack), kind))
            if kind == "delimiter":
                if stack:
                    stack.pop()
                pos += 8
            elif kind == "fragment":
                pos += 8 + (0 if length == UNDEFINED else length)
            else:
                stack.append(("item", None if length == UNDEFINED else pos + 8 + length))
                pos += 8
            continue
        if implicit:
            vr = b""
            (length,) = struct.unpack_from(endian + "I", buf, pos + 4)
            length_at, length_size, value_at = pos + 4, 4, pos + 8
            sequence = _is_sequence(tag) or (length == UNDEFINED and tag != PIXEL_DATA)
        else:
            vr = bytes(buf[pos + 4 : pos + 6])
            if vr in LONG_VRS:
                if pos + 12 > len(buf):
                    break
                (length,) = struct.unpack_from(endian + "I", buf, pos + 8)
                length_at, length_size, value_at = pos + 8, 4, pos + 12
            else:
                (length,) = struct.unpack_from(endian + "H", buf, pos + 6)
                length_at, length_size, value_at = pos + 6, 2, pos + 8
            sequence = vr == b"SQ" or (vr == b"UN" and length == UNDEFINED and tag != PIXEL_DATA)
        out.append(Element(pos, tag, vr, length, length_at, length_size, value_at, len(stack), "element"))
        if sequence:
            stack.append(("sequence", None if length == UNDEFINED else value_at + length))
            pos = value_at
        elif length == UNDEFINED:
            stack.append(("pixels", None))
            pos = value_at
        else:
            pos = value_at + length
    return out


# -- applying ------------------------------------------------------------------------------------------------


def build_case(seed: Seed, ops: Sequence[Op]) -> tuple[str, bytes]:
    """The (declared transfer syntax, stream) a recipe makes of ``seed``."""
    transfer_syntax = seed.encoding
    buf = seed.stream
    for op in ops:
        if op[0] == "ts":
            transfer_syntax = str(op[1])
        elif op[0] == "deflate":
            buf = _deflate([buf])
        elif op[0] == "bomb":
            pos, size = int(op[1]), int(op[2])
            header = _header(0x00091010, b"OB", size, seed.encoding)
            buf = _deflate([buf[:pos], header, _zeros(size), buf[pos:]])
        else:
            buf = apply(buf, op, seed.encoding)
    return transfer_syntax, buf


def apply(buf: bytes, op: Op, encoding: str) -> bytes:
    """One byte-level operation (every kind but "ts", "deflate" and "bomb")."""
    kind = op[0]
    n = len(buf)
    if kind == "flip":
        pos = min(int(op[1]), n - 1)
        return buf[:pos] + bytes([buf[pos] ^ int(op[2])]) + buf[pos + 1 :] if n else buf
    if kind == "put":
        data = bytes.fromhex(op[2])
        pos = min(int(op[1]), n)
        return buf[:pos] + data + buf[pos + len(data) :]
    if kind == "insert":
        pos = min(int(op[1]), n)
        return buf[:pos] + bytes.fromhex(op[2]) + buf[pos:]
    if kind == "delete":
        pos = int(op[1])
        return buf[:pos] + buf[pos + int(op[2]) :]
    if kind == "truncate":
        return buf[: int(op[1])]
    if kind == "copy":
        src, size, dst = int(op[1]), int(op[2]), min(int(op[3]), n)
        return buf[:dst] + buf[src : src + size] + buf[dst:]
    if kind == "value":
        return _replace_value(buf, int(op[1]), bytes.fromhex(op[2]), encoding)
    if kind == "nest":
        pos = min(int(op[1]), n)
        return buf[:pos] + nested_sequence(int(op[2]), int(op[3]), encoding, defined=bool(op[4])) + buf[pos:]
    raise ValueError(f"unknown operation {kind!r}")


def _replace_value(buf: bytes, pos: int, value: bytes, encoding: str) -> bytes:
    found = scan(buf[pos:], encoding, limit=1)
    if not found or found[0].length == UNDEFINED:
        return buf
    element = found[0]
    endian = "<" if UID(encoding).is_little_endian else ">"
    size = min(len(value), 0xFFFF if element.length_size == 2 else UNDEFINED - 1)
    length = struct.pack(endian + ("H" if element.length_size == 2 else "I"), size)
    start = pos + element.value_at
    return buf[: pos + element.length_at] + length + value[:size] + buf[start + element.length :]


def _header(tag: int, vr: bytes, length: int, encoding: str) -> bytes:
    ts = UID(encoding)
    endian = "<" if ts.is_little_endian else ">"
    tag_bytes = struct.pack(endian + "HH", tag >> 16, tag & 0xFFFF)
    if ts.is_implicit_VR:
        return tag_bytes + struct.pack(endian + "I", length)
    if vr in LONG_VRS:
        return tag_bytes + vr + b"\x00\x00" + struct.pack(endian + "I", length)
    return tag_bytes + vr + struct.pack(endian + "H", length)


def nested_sequence(tag: int, depth: int, encoding: str, *, defined: bool) -> bytes:
    """A sequence ``tag`` whose one item holds the same sequence, ``depth`` levels, around one code value."""
    endian = "<" if UID(encoding).is_little_endian else ">"
    leaf = _header(0x00080100, b"SH", 2, encoding) + b"1 "

    def item(length: int) -> bytes:
        return struct.pack(endian + "HHI", 0xFFFE, 0xE000, length)

    if not defined:
        opening = _header(tag, b"SQ", UNDEFINED, encoding) + item(UNDEFINED)
        closing = struct.pack(endian + "HHIHHI", 0xFFFE, 0xE00D, 0, 0xFFFE, 0xE0DD, 0)
        return opening * depth + leaf + closing * depth
    sq_header = len(_header(tag, b"SQ", 0, encoding))
    headers = []
    content = len(leaf)  # of the innermost item
    for _ in range(depth):  # inside out
        headers.append(_header(tag, b"SQ", content + 8, encoding) + item(content))
        content += sq_header + 8
    return b"".join(reversed(headers)) + leaf


def _zeros(size: int) -> Iterator[bytes]:
    chunk = bytes(1 << 20)
    for start in range(0, size, len(chunk)):
        yield chunk[: min(len(chunk), size - start)]


def _deflate(parts: Sequence[bytes | Iterator[bytes]]) -> bytes:
    """Raw deflate (no zlib header), as Deflated Explicit VR Little Endian has it."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = []
    for part in parts:
        for chunk in [part] if isinstance(part, bytes) else part:
            out.append(compressor.compress(chunk))
    out.append(compressor.flush())
    return b"".join(out)
