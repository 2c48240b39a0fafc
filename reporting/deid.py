"""De-identification of exported instances, DICOM PS3.15 Annex E, and the check that nothing leaked.

The Basic Application Level Confidentiality Profile is applied from Table E.1-1 as dicom-anonymizer carries it
(its ``dicomfields_2026c`` table and its D/Z/X actions), recursively into every sequence item, with:

- **UIDs** (the table's U attributes, and those inside the U* sequences) replaced by
  ``2.25.<int(HMAC-SHA256(key, uid)[:16])>``: the same original gives the same pseudonym in every export made
  with the same key, so references between exported objects still resolve (128 bits: a 2.25 UID fits in 64
  characters only so).
- **Retain Longitudinal Temporal Information with Modified Dates Option**: every date (DA) and datetime (DT)
  of the table is shifted back by a per-patient number of days derived from the key and the Patient ID
  (1 to 10 years), so intervals within a patient are kept; times of day are kept. Birth dates are emptied.
- **Retain Patient Characteristics Option**, only when asked: sex, age, size, weight and the others of
  :data:`CHARACTERISTICS` are kept.
- Patient ID and Patient's Name become one pseudonym (``P-`` and 16 hex digits of HMAC(key, Patient ID));
  private attributes are removed; the 128-byte preamble is zeroed.
- Patient Identity Removed YES; De-identification Method and its Code Sequence (CID 7050) name exactly the
  profile and the options applied.

An instance whose Burned In Annotation is YES cannot be de-identified by attributes alone: :func:`deidentify`
refuses it (:class:`BurnedInAnnotation`) and the export leaves it out.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from functools import cache
from typing import Any

from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector
from dicomanonymizer.simpledicomanonymizer import initialize_actions
from pydicom import Dataset, FileMetaDataset
from pydicom.dataelem import DataElement
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.tag import BaseTag, Tag

#: The edition of Table E.1-1 applied (dicom-anonymizer's name for it).
TABLE = "dicomfields_2026c"
PATIENT_ID = Tag(0x0010, 0x0020)
PATIENT_NAME = Tag(0x0010, 0x0010)
BIRTH_DATE = Tag(0x0010, 0x0030)
#: Kept under the Retain Patient Characteristics Option.
CHARACTERISTICS = frozenset(
    Tag(t)
    for t in (
        0x00100040,  # Patient's Sex
        0x00101010,  # Patient's Age
        0x00101020,  # Patient's Size
        0x00101030,  # Patient's Weight
        0x00102160,  # Ethnic Group
        0x001021A0,  # Smoking Status
        0x001021C0,  # Pregnancy Status
        0x00102203,  # Patient's Sex Neutered
    )
)
#: The attributes this module writes itself.
MARKERS = frozenset(Tag(t) for t in (0x00120062, 0x00120063, 0x00120064))
_MIN_SHIFT_DAYS, _SHIFT_RANGE_DAYS = 365, 9 * 365


class BurnedInAnnotation(ValueError):
    """The pixels may show identifying text (Burned In Annotation YES): not exported."""


Action = Callable[[Dataset, tuple[int, int]], None]


@dataclass(frozen=True)
class _Table:
    #: (group, element) -> the library's action for that attribute
    actions: dict[tuple[int, int], Action]
    #: (group, element, group mask, element mask) -> action: repeating groups (overlays, curves)
    masked: dict[tuple[int, int, int, int], Action]
    uids: frozenset[tuple[int, int]]
    uid_sequences: frozenset[tuple[int, int]]
    removed: frozenset[tuple[int, int]]

    def action(self, tag: BaseTag) -> Action | None:
        found = self.actions.get((tag.group, tag.element))
        if found is not None:
            return found
        for (group, element, gmask, emask), masked in self.masked.items():
            if tag.group & gmask == group & gmask and tag.element & emask == element & emask:
                return masked
        return None

    def lists(self, tag: BaseTag) -> bool:
        return self.action(tag) is not None


@cache
def table() -> _Table:
    tags = dicom_anonymization_database_selector(TABLE)
    every = initialize_actions(TABLE)
    return _Table(
        actions={t: a for t, a in every.items() if len(t) == 2},
        masked={t: a for t, a in every.items() if len(t) == 4},
        uids=frozenset(tags["U_TAGS"]),
        uid_sequences=frozenset(tags["X_Z_U_STAR_TAGS"]),
        removed=frozenset(t for t in tags["X_TAGS"] if len(t) == 2),
    )


@dataclass(frozen=True)
class Deidentifier:
    """De-identifies datasets with one project key (bytes); ``keep_characteristics``: the Retain Patient
    Characteristics Option."""

    key: bytes
    keep_characteristics: bool = False
    _table: _Table = field(default_factory=table, repr=False)

    def _digest(self, purpose: str, value: str) -> bytes:
        return hmac.new(self.key, f"{purpose}:{value}".encode(), hashlib.sha256).digest()

    def uid(self, original: str) -> str:
        return "2.25." + str(int.from_bytes(self._digest("uid", original.strip())[:16], "big"))

    def patient(self, patient_id: str) -> str:
        return "P-" + self._digest("patient", patient_id.strip()).hex()[:16]

    def shift_days(self, patient_id: str) -> int:
        """How many days this patient's dates move back (1 to 10 years)."""
        n = int.from_bytes(self._digest("dates", patient_id.strip())[:8], "big")
        return _MIN_SHIFT_DAYS + n % _SHIFT_RANGE_DAYS

    def method(self) -> tuple[list[str], list[Any]]:
        """De-identification Method (LO, each value at most 64 characters) and its codes (CID 7050)."""
        texts = ["PS3.15 E.1-1 Basic Profile (dicom-anonymizer 2026c)", "UIDs: 2.25 HMAC-SHA256"]
        texts.append("Dates shifted per patient")
        applied = [
            codes.DCM.BasicApplicationConfidentialityProfile,
            codes.DCM.RetainLongitudinalTemporalInformationModifiedDatesOption,
        ]
        if self.keep_characteristics:
            applied.append(codes.DCM.RetainPatientCharacteristicsOption)
            texts.append("Patient characteristics retained")
        return texts, applied

    def deidentify(self, ds: Dataset) -> Dataset:
        """``ds`` de-identified in place (file meta included) and returned; raises BurnedInAnnotation."""
        if str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES":
            raise BurnedInAnnotation("Burned In Annotation is YES")
        patient_id = str(ds.get("PatientID") or "") or str(ds.get("StudyInstanceUID") or "")
        days = self.shift_days(patient_id)
        self._clean(ds, days, top=True)
        pseudonym = self.patient(patient_id)
        ds.PatientID = pseudonym
        ds.PatientName = pseudonym
        ds.PatientIdentityRemoved = "YES"
        texts, applied = self.method()
        ds.DeidentificationMethod = texts
        ds.DeidentificationMethodCodeSequence = Sequence([_code_item(c) for c in applied])
        # New file meta: the source's names its software and the AE it came from.
        old = getattr(ds, "file_meta", None)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if old is not None and "TransferSyntaxUID" in old:
            meta.TransferSyntaxUID = old.TransferSyntaxUID
        ds.file_meta = meta
        ds.preamble = b"\0" * 128
        return ds

    def _clean(self, ds: Dataset, days: int, *, top: bool = False) -> None:
        t = self._table
        for elem in list(ds):
            tag = elem.tag
            pair = (tag.group, tag.element)
            if tag.is_private:
                del ds[tag]
            elif tag in (PATIENT_ID, PATIENT_NAME) and top:
                continue  # the pseudonym, set after
            elif tag == BIRTH_DATE:
                elem.value = ""  # Z: Type 2 in the Patient module
            elif tag in CHARACTERISTICS and self.keep_characteristics:
                continue
            elif pair in t.uid_sequences or (elem.VR == "SQ" and not t.lists(tag)):
                self._clean_items(elem, days)  # U*: their UIDs replaced; a sequence the table keeps: cleaned
            elif pair in t.uids and elem.VR == "UI":
                self._replace_uids(elem)
            elif not t.lists(tag):
                continue  # not identifying: kept
            elif elem.VR in ("DA", "DT"):
                _shift(elem, days)
            elif elem.VR == "TM":
                continue  # times of day are kept with modified dates
            else:
                action = t.action(tag)
                assert action is not None
                try:
                    action(ds, pair)
                except NotImplementedError:  # a VR the library has no dummy for: remove it instead
                    del ds[tag]

    def _clean_items(self, elem: DataElement, days: int) -> None:
        for item in elem.value or ():
            self._clean(item, days)

    def _replace_uids(self, elem: DataElement) -> None:
        if elem.VM > 1:
            elem.value = [self.uid(str(v)) for v in elem.value]
        elif elem.value:
            elem.value = self.uid(str(elem.value))


def _code_item(code: Any) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def _shift(elem: DataElement, days: int) -> None:
    """Move a DA or DT value (each of a multi-value) back by ``days``; an unreadable one is emptied."""
    values = list(elem.value) if elem.VM > 1 else [elem.value]
    shifted = []
    for value in values:
        text = str(value or "").strip()
        try:
            moved = date(int(text[0:4]), int(text[4:6]), int(text[6:8])) - timedelta(days=days)
        except (ValueError, IndexError):
            shifted.append("")
            continue
        shifted.append(moved.strftime("%Y%m%d") + text[8:])
    elem.value = shifted if elem.VM > 1 else shifted[0]


def walk(ds: Dataset) -> Iterator[DataElement]:
    """Every element of ``ds``, those in sequence items included (depth first)."""
    for elem in ds:
        yield elem
        if elem.VR == "SQ":
            for item in elem.value or ():
                yield from walk(item)


def leaks(source: Dataset, exported: Dataset, encoded: bytes, deidentifier: Deidentifier) -> list[str]:
    """What of ``source`` survives de-identification in ``exported`` (its file bytes: ``encoded``); empty
    when nothing does.

    Checked: no value of an attribute Table E.1-1 lists (names, IDs, dates, UIDs, institution, free text),
    nor any person name, appears anywhere in the file's bytes, unless the same value is also one the profile
    keeps (a body part that is also a study description's word); no private attribute; no attribute the
    profile removes; every listed UID a 2.25 pseudonym; Patient Identity Removed YES.
    """
    t = deidentifier._table
    kept: set[str] = set()
    identifying: dict[str, str] = {}
    for elem in walk(source):
        if elem.VR in ("SQ", "TM") or elem.tag.is_private:
            continue  # times of day are kept with the modified dates
        for text in _texts(elem):
            if elem.VR == "PN" or t.lists(elem.tag):
                if not (elem.tag in CHARACTERISTICS and deidentifier.keep_characteristics):
                    identifying.setdefault(text, elem.keyword or str(elem.tag))
            else:
                kept.add(text)
    problems = [
        f"{keyword} value {text[:12]!r}… found in the output"
        for text, keyword in sorted(identifying.items())
        if text.encode() in encoded and not any(text in k for k in kept)
    ]
    for elem in walk(exported):
        name = elem.keyword or str(elem.tag)
        if elem.tag.is_private:
            problems.append(f"private attribute {elem.tag} present")
        elif (elem.tag.group, elem.tag.element) in t.removed and elem.VR not in ("DA", "DT", "TM"):
            if elem.tag not in CHARACTERISTICS or not deidentifier.keep_characteristics:
                problems.append(f"{name} present, the profile removes it")
        elif (
            elem.VR == "UI"
            and (elem.tag.group, elem.tag.element) in t.uids
            and any(v and not v.startswith("2.25.") for v in _texts(elem))
        ):
            problems.append(f"{name} is not a pseudonymous UID")
    if str(exported.get("PatientIdentityRemoved", "")) != "YES":
        problems.append("Patient Identity Removed is not YES")
    return problems


def _texts(elem: DataElement) -> list[str]:
    """The string forms of an element's values (and of a person name's components) of 4 characters or more."""
    if elem.VR in ("OB", "OW", "OF", "OD", "OL", "OV", "UN", "SQ") or elem.value is None:
        return []
    values = elem.value if elem.VM > 1 else [elem.value]
    out: list[str] = []
    for value in values:
        text = str(value).strip()
        if elem.VR == "PN":
            out.extend(part.strip() for part in text.replace("=", "^").split("^"))
        out.append(text)
    return [s for s in out if len(s) >= 4]
