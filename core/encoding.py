"""Bounded reading of encoded datasets (PS3.5 7, PS3.10 7): what a sender's bytes may cost before pydicom
parses them.

pydicom parses undefined-length sequences eagerly and recursively, inflates Deflated Explicit VR Little
Endian without a bound, and keeps one object per element; so a 1 MB deflate bomb becomes 1 GiB, 10,000
nested items end in a RecursionError deep inside the reader, and millions of empty elements cost gigabytes.
:func:`scan` walks the encoded bytes once, without recursion, following the structure pydicom will follow,
and refuses deep nesting and element floods before anything is built; :func:`inflate` bounds the inflated
size. :func:`walk` then touches every element of the parsed dataset (again without recursion), so a value
that cannot be decoded fails here and not later in a worker.
"""

from __future__ import annotations

import contextlib
import mmap
import re
import struct
import zlib
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

from pydicom import Dataset, config
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR

from core.settings import IngestSettings

_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_PIXEL_DATA = 0x7FE00010
_KNOWN_VRS = {str(vr) for vr in VR}
_LONG_VRS = {str(vr) for vr in EXPLICIT_VR_LENGTH_32}
_INFLATE_CHUNK = 1 << 20
#: Group 0002 holds a handful of elements; anything longer is not a file meta header.
_MAX_META_ELEMENTS = 64

Buffer = bytes | mmap.mmap
_BYTES_LITERAL = re.compile(r"(?<!\w)b'(?:[^'\\]|\\.)*(?:'|$)" + r'|(?<!\w)b"(?:[^"\\]|\\.)*(?:"|$)')


class EncodingError(ValueError):
    """The bytes are not a dataset we can read: malformed, truncated, or nested beyond the limit."""


class EncodingLimitExceeded(EncodingError):
    """The dataset would cost more than a limit allows (inflated size, number of elements)."""


def inflate(data: bytes | memoryview, limit: int) -> bytes:
    """Inflate a Deflated Explicit VR Little Endian dataset (raw deflate, PS3.5 A.5) of at most ``limit``
    bytes.

    The stream is first inflated a chunk at a time and only counted, so a bomb costs one chunk of memory
    (and the time to inflate ``limit`` bytes) before it is refused; a stream within the limit is then
    inflated into a buffer of its exact size.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    size, pending = 0, data
    try:
        while not inflater.eof:
            chunk = inflater.decompress(pending, _INFLATE_CHUNK)
            size += len(chunk)
            if size > limit:
                raise EncodingLimitExceeded(f"deflated dataset inflates to more than {limit} bytes")
            pending = inflater.unconsumed_tail
            if not chunk and not pending and not inflater.eof:
                raise EncodingError("deflated dataset is truncated")
        return zlib.decompress(data, -zlib.MAX_WBITS, max(size, 1))
    except zlib.error as exc:
        raise EncodingError(f"deflated dataset is corrupt: {exc}") from None


def scan(
    buffer: Buffer,
    *,
    implicit_vr: bool,
    little_endian: bool,
    max_depth: int,
    max_elements: int,
    start: int = 0,
    stop_at_pixels: bool = False,
) -> int:
    """Walk the encoded dataset in ``buffer[start:]`` without building it; returns the number of elements.

    Follows what pydicom's reader will do (an explicit-VR element whose VR is not two capitals is read as
    implicit, UN of undefined length is a sequence, undefined-length values that are not sequences end at a
    Sequence Delimitation Item). Raises :class:`EncodingLimitExceeded` past ``max_elements`` (items count as
    elements) and :class:`EncodingError` for sequences nested deeper than ``max_depth`` or any length that
    runs past its container.
    """
    # Each frame: [is_sequence, end (None: undefined length), bound, implicit, little, depth]
    stack: list[tuple[bool, int | None, int, bool, bool, int]] = [
        (False, len(buffer), len(buffer), implicit_vr, little_endian, 0)
    ]
    pos, count = start, 0
    while stack:
        is_sequence, end, bound, implicit, little, depth = stack[-1]
        if end is not None and pos >= end:
            if pos > end:
                raise EncodingError(f"element overruns its container at byte {pos}")
            stack.pop()
            continue
        if pos + 8 > bound:
            if len(stack) == 1:
                break  # pydicom ignores fewer than 8 trailing bytes
            raise EncodingError(f"dataset truncated at byte {pos}")
        count += 1
        if count > max_elements:
            raise EncodingLimitExceeded(f"more than {max_elements} data elements")
        e = "<" if little else ">"
        group, element, length = struct.unpack_from(f"{e}HHL", buffer, pos)
        tag = group << 16 | element
        if is_sequence:
            pos += 8
            if tag == _SEQUENCE_END:  # pydicom ends any sequence there, even one of defined length
                pos = pos if end is None else end
                stack.pop()
            elif tag != _ITEM:
                raise EncodingError(
                    f"expected a sequence item at byte {pos - 8}, found ({group:04X},{element:04X})"
                )
            elif length == _UNDEFINED:
                stack.append((False, None, bound, implicit, little, depth))
            else:
                _fits(pos, length, bound)
                stack.append((False, pos + length, pos + length, implicit, little, depth))
            continue
        if tag == _ITEM_END:
            if end is not None:
                raise EncodingError(f"unexpected item delimiter at byte {pos}")
            pos += 8
            stack.pop()
            continue
        if tag in (_ITEM, _SEQUENCE_END):
            raise EncodingError(f"unexpected item tag at byte {pos}")
        vr, pos, length = _header(buffer, pos, implicit, little, bound)
        if stop_at_pixels and tag == _PIXEL_DATA and len(stack) == 1:
            break
        if length == _UNDEFINED:
            if vr == "UN" or vr == "SQ" or (vr is None and _is_sequence(tag, buffer, pos, little, bound)):
                _check_depth(depth + 1, max_depth)
                stack.append((True, None, bound, implicit, little, depth + 1))
            else:
                pos = _skip_undefined(buffer, pos, little, bound)
            continue
        _fits(pos, length, bound)
        # pydicom parses a sequence value (a UN one too) in the encoding of its dataset.
        if vr == "SQ" or (
            vr in (None, "UN") and _is_sequence(tag, buffer, pos, little, pos + length, length)
        ):
            _check_depth(depth + 1, max_depth)
            stack.append((True, pos + length, pos + length, implicit, little, depth + 1))
            continue
        pos += length
    return count


def _header(
    buffer: Buffer, pos: int, implicit: bool, little: bool, bound: int
) -> tuple[str | None, int, int]:
    """(VR or None when implicit, position of the value, value length) of the element at ``pos``."""
    e = "<" if little else ">"
    if not implicit:
        raw = bytes(buffer[pos + 4 : pos + 6])
        vr = raw.decode("latin-1")
        if vr in _KNOWN_VRS:
            if vr in _LONG_VRS:
                if pos + 12 > bound:
                    raise EncodingError(f"dataset truncated at byte {pos}")
                return vr, pos + 12, int(struct.unpack_from(f"{e}L", buffer, pos + 8)[0])
            return vr, pos + 8, int(struct.unpack_from(f"{e}H", buffer, pos + 6)[0])
        if b"AA" <= raw <= b"ZZ":
            return vr, pos + 8, int(struct.unpack_from(f"{e}H", buffer, pos + 6)[0])
        # pydicom reads an element whose VR is not two capitals as implicit VR (writers that switch in SQs).
    return None, pos + 8, int(struct.unpack_from(f"{e}L", buffer, pos + 4)[0])


def _fits(pos: int, length: int, bound: int) -> None:
    if pos + length > bound:
        raise EncodingError(f"value of {length} bytes at byte {pos} runs past the end of its container")


def _check_depth(depth: int, max_depth: int) -> None:
    if depth > max_depth:
        raise EncodingError(f"sequences nested deeper than {max_depth} levels")


def _is_sequence(
    tag: int, buffer: Buffer, pos: int, little: bool, bound: int, length: int = _UNDEFINED
) -> bool:
    """An implicit-VR (or UN) value pydicom will parse as a sequence: the dictionary says SQ, or, for a tag it
    does not know, the value starts with an item (a private sequence)."""
    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:
        pass
    if length == 0 or pos + 4 > bound:
        return False
    group, element = struct.unpack_from("<HH" if little else ">HH", buffer, pos)
    return (group << 16 | element) == _ITEM


def _skip_undefined(buffer: Buffer, pos: int, little: bool, bound: int) -> int:
    """Past an undefined-length value that is not a sequence (encapsulated pixel data): its items, else the
    first Sequence Delimitation Item, as pydicom reads it."""
    e = "<" if little else ">"
    probe = pos
    while probe + 8 <= bound:
        group, element, length = struct.unpack_from(f"{e}HHL", buffer, probe)
        tag = group << 16 | element
        if tag == _SEQUENCE_END:
            return probe + 8
        if tag != _ITEM or length == _UNDEFINED or probe + 8 + length > bound:
            break
        probe += 8 + length
    delimiter = struct.pack(f"{e}HH", 0xFFFE, 0xE0DD)
    found = buffer.find(delimiter, pos, bound)
    if found < 0 or found + 8 > bound:
        raise EncodingError(f"undefined-length value at byte {pos} has no delimiter")
    return found + 8


def walk(ds: Dataset, *, max_depth: int, max_elements: int) -> int:
    """Decode every element of ``ds`` once, items included, without recursion; returns how many there were.

    Raises :class:`EncodingError` naming the first element that cannot be decoded (unknown VR, a value whose
    length does not fit its VR, ...), or when sequences are nested deeper than ``max_depth``.
    """
    stack: list[tuple[Dataset, int]] = [(ds, 0)]
    count = 0
    while stack:
        current, depth = stack.pop()
        for tag in list(current.keys()):
            count += 1
            if count > max_elements:
                raise EncodingLimitExceeded(f"more than {max_elements} data elements")
            try:
                elem = current[tag]
                value = elem.value
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # every pydicom converter raises its own types (and recurses)
                raise EncodingError(f"element {tag} cannot be decoded: {describe(exc)}") from None
            if elem.VR == "SQ":
                if depth + 1 > max_depth:
                    raise EncodingError(f"sequences nested deeper than {max_depth} levels")
                stack.extend((item, depth + 1) for item in value)
    return count


def printable(text: str, limit: int = 200) -> str:
    """``text`` on one line of printable ASCII, at most ``limit`` characters, bytes literals elided: what
    may be shown to a user, stored as a job's reason or logged, whatever a dataset put into a message."""
    text = _BYTES_LITERAL.sub("<bytes>", " ".join(text[: 20 * limit].split()))
    text = "".join(c if " " <= c <= "~" else "?" for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(exc: BaseException, limit: int = 200) -> str:
    """``Type: message`` of an exception, through :func:`printable`."""
    text = printable(str(exc), limit)
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


def decode_dataset(data: bytes, transfer_syntax_uid: str, limits: IngestSettings) -> Dataset:
    """A dataset as a C-STORE carries it (no file meta) in ``transfer_syntax_uid``, read within ``limits``."""
    syntax = _transfer_syntax(transfer_syntax_uid)
    if syntax.is_deflated:
        data = inflate(data, limits.max_inflated_bytes)
    scan(
        data,
        implicit_vr=syntax.is_implicit_VR,
        little_endian=syntax.is_little_endian,
        max_depth=limits.max_sequence_depth,
        max_elements=limits.max_elements,
    )
    return _read(BytesIO(data), syntax)


def read_part10(source: bytes | Path, limits: IngestSettings, *, stop_before_pixels: bool = False) -> Dataset:
    """A DICOM file (preamble optional, file meta required) read within ``limits``; ``ds.file_meta`` is set.

    ``source`` is the file's bytes or its path (mapped, not read, while it is scanned). From a path, native
    (uncompressed) Pixel Data is not read either: its value is a read-only view of the mapped file, so that
    validating a received 7.5 MB instance does not copy its pixels (reading them cost the C-STORE receivers
    a third of their CPU; ``bench/ingest_cr.py``). The mapping lives as long as that view.
    """
    if isinstance(source, Path):
        with open(source, "rb") as fh:
            if fh.seek(0, 2) == 0:
                raise EncodingError("empty file")
            mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            try:
                meta, start, syntax = _file_meta(mapped)
                if syntax.is_deflated:
                    return _with_meta(decode_dataset(mapped[start:], str(syntax), limits), meta)
                _scan_body(mapped, start, syntax, limits, stop_before_pixels)
                fh.seek(start)
                if stop_before_pixels or syntax.is_encapsulated:
                    return _with_meta(_read(fh, syntax, stop_before_pixels), meta)
                return _with_meta(_read_mapping_pixels(fh, mapped, start, syntax), meta)
            finally:
                with contextlib.suppress(BufferError):  # a view of it is the Pixel Data: unmapped with it
                    mapped.close()
    meta, start, syntax = _file_meta(source)
    if syntax.is_deflated:
        return _with_meta(decode_dataset(source[start:], str(syntax), limits), meta)
    _scan_body(source, start, syntax, limits, stop_before_pixels)
    stream = BytesIO(source)
    stream.seek(start)
    return _with_meta(_read(stream, syntax, stop_before_pixels), meta)


def _scan_body(
    buffer: Buffer, start: int, syntax: UID, limits: IngestSettings, stop_before_pixels: bool
) -> None:
    scan(
        buffer,
        start=start,
        implicit_vr=syntax.is_implicit_VR,
        little_endian=syntax.is_little_endian,
        max_depth=limits.max_sequence_depth,
        max_elements=limits.max_elements,
        stop_at_pixels=stop_before_pixels,
    )


def _file_meta(buffer: Buffer) -> tuple[FileMetaDataset, int, UID]:
    """File meta information (group 0002, explicit VR little endian), where the dataset starts, its syntax."""
    start = 132 if bytes(buffer[128:132]) == b"DICM" else 0
    if bytes(buffer[start : start + 2]) != b"\x02\x00":
        raise EncodingError("not a DICOM file (no file meta information)")
    end = start
    for _ in range(_MAX_META_ELEMENTS):
        if end + 8 > len(buffer) or bytes(buffer[end : end + 2]) != b"\x02\x00":
            break
        _vr, end, length = _header(buffer, end, False, True, len(buffer))
        if length == _UNDEFINED:
            raise EncodingError("undefined length in the file meta information")
        _fits(end, length, len(buffer))
        end += length
    else:
        raise EncodingError("file meta information too long")
    try:
        meta = FileMetaDataset(_read(BytesIO(bytes(buffer[start:end])), UID("1.2.840.10008.1.2.1")))
        syntax = meta.TransferSyntaxUID
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise EncodingError(f"file meta information unreadable ({describe(exc)})") from None
    return meta, end, _transfer_syntax(str(syntax))


def _transfer_syntax(uid: str) -> UID:
    syntax = UID(str(uid).strip())
    if not syntax.is_transfer_syntax:
        raise EncodingError(f"unknown transfer syntax {str(uid)[:64]!r}")
    return syntax


def _read(fp: BinaryIO, syntax: UID, stop_before_pixels: bool = False) -> Dataset:
    stop = (lambda tag, vr, length: tag == _PIXEL_DATA) if stop_before_pixels else None
    try:
        ds = read_dataset(fp, syntax.is_implicit_VR, syntax.is_little_endian, stop_when=stop)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # pydicom's reader raises anything from EOFError to RecursionError
        raise EncodingError(f"dataset cannot be parsed: {describe(exc)}") from None
    ds.set_original_encoding(syntax.is_implicit_VR, syntax.is_little_endian)
    return ds


def _read_mapping_pixels(fh: BinaryIO, mapped: mmap.mmap, start: int, syntax: UID) -> Dataset:
    """The dataset in ``fh`` (at ``start``; scanned), its top-level native Pixel Data a view of ``mapped``."""
    ds = _read(fh, syntax, stop_before_pixels=True)  # pydicom leaves fh at the Pixel Data element
    pos = fh.tell()
    if pos + 8 > len(mapped):
        return ds
    implicit, little = syntax.is_implicit_VR, syntax.is_little_endian
    vr, value, length = _header(mapped, pos, implicit, little, len(mapped))
    if length == _UNDEFINED or value + length > len(mapped) or vr not in (None, "OB", "OW"):
        fh.seek(start)  # nothing a decoder reads as native pixels: pydicom reads it as it is
        return _read(fh, syntax)
    view = memoryview(mapped)[value : value + length]
    # Implicit VR: OW, as pydicom resolves Pixel Data's "OB or OW" (PS3.5 A.1). A memoryview is not one of
    # the value types pydicom checks for: it is bytes-like everywhere the value is read or written.
    ds.add(DataElement(_PIXEL_DATA, vr or "OW", view, validation_mode=config.IGNORE))
    fh.seek(value + length)
    ds.update(_read(fh, syntax))  # whatever follows the pixels (padding, signatures)
    return ds


def _with_meta(ds: Dataset, meta: FileMetaDataset) -> Dataset:
    ds.file_meta = meta
    return ds
