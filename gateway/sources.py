"""Source images as the report writers see them: headers read within the ingest limits, reduced to what a
report copies.

highdicom copies every root attribute of the Patient and Study modules of the first source into the SR and
reads the TID 1602/1603 descriptors from each; anything deeper is of no use to a report and may be hostile (a
Procedure Code Sequence nested 300 deep made the SR writer grow past 6 GB). So the writers get a copy with the
short, non-private root elements and sequences cut at two levels, and an empty value for each type 2
Patient/Study attribute the source lacks.
"""

from __future__ import annotations

from pydicom import Dataset
from pydicom.datadict import dictionary_VR
from pydicom.sequence import Sequence

from core.domain import InstanceRef
from core.encoding import EncodingError, describe, read_part10
from core.settings import IngestSettings

#: Longest element value copied (patient and study attributes are short; LUTs, overlays and blobs are not).
MAX_VALUE_BYTES = 1024
#: Sequence levels copied (Procedure Code Sequence > item > Equivalent Code Sequence > item).
MAX_SEQUENCE_DEPTH = 2
MAX_ITEMS = 8
#: Type 2 attributes highdicom requires of the first source (absent ones become empty).
_TYPE_2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


class UnreadableSource(ValueError):
    """A source header that cannot be read (within the ingest limits)."""


def read_source(ref: InstanceRef, limits: IngestSettings) -> Dataset:
    """The header of a stored instance, reduced to what a report needs (see the module docstring)."""
    try:
        ds = read_part10(ref.path, limits, stop_before_pixels=True)
        return report_view(ds)
    except (EncodingError, OSError) as exc:
        raise UnreadableSource(f"unreadable header: {describe(exc)}") from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # an element that does not decode, on any access
        raise UnreadableSource(f"unreadable header: {describe(exc)}") from None


def report_view(ds: Dataset) -> Dataset:
    """A copy of ``ds`` holding what a report copies from a source, nothing nested deeper or larger."""
    out = _copy(ds, depth=0)
    for keyword in _TYPE_2:
        if keyword not in out:
            setattr(out, keyword, "")
    return out


def _copy(ds: Dataset, depth: int) -> Dataset:
    out = Dataset()
    for elem in ds:
        if elem.tag.is_private or elem.tag.group in (0x7FE0, 0xFFFE) or 0x6000 <= elem.tag.group <= 0x60FF:
            continue
        if not _dictionary_vr(elem.tag, elem.VR):
            continue  # e.g. Institution Name sent as SS: the SR writer cannot encode it as the standard says
        if elem.VR == "SQ":
            if depth < MAX_SEQUENCE_DEPTH:
                out.add_new(
                    elem.tag, "SQ", Sequence([_copy(item, depth + 1) for item in elem.value[:MAX_ITEMS]])
                )
            continue
        if len(elem.value if isinstance(elem.value, bytes | str) else str(elem.value)) <= MAX_VALUE_BYTES:
            out.add(elem)
    return out


def _dictionary_vr(tag: int, vr: str) -> bool:
    """True when ``vr`` is one the data dictionary allows for ``tag`` (unknown tags pass)."""
    try:
        allowed = dictionary_VR(tag)
    except KeyError:
        return True
    return vr in allowed.split(" or ")
