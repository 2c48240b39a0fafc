"""The PDF result as a DICOM Encapsulated PDF (PS3.3 A.45.1) in the study, delivered with the SR
(GATEWAY_REPORTING__ENCAPSULATED_PDF=true): for PACS and viewers that show documents but not Structured
Reports. The SR stays the authoritative, coded result; the document says it is decision support.

Modules (PS3.3 A.45.1-1): Patient, General Study (copied from a source instance), Encapsulated Document
Series, General Equipment, SC Equipment, Encapsulated Document, SOP Common. UIDs are derived from the study
and the reports the document shows, so the same results give the same instance (a retry is a duplicate at
the PACS) and new results a new one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from core.domain import MANUFACTURER

ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"  # Encapsulated PDF Storage
_NAMESPACE = f"{MANUFACTURER}/reporting/pdf"
#: Patient and General Study module attributes taken over from a source instance of the study.
_COPIED = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
)
TITLE = "AI screening result (decision support, not a diagnosis)"


def pdf_uid(study_uid: str, report_uids: Iterable[str]) -> str:
    """SOP Instance UID of the document showing these reports of the study."""
    return generate_uid(entropy_srcs=[_NAMESPACE, "instance", study_uid, *sorted(report_uids)])


def pdf_series_uid(study_uid: str) -> str:
    return generate_uid(entropy_srcs=[_NAMESPACE, "series", study_uid])


def build_encapsulated_pdf(
    pdf: bytes,
    *,
    source: Dataset,
    sources: Sequence[tuple[str, str]],
    sop_instance_uid: str,
    series_number: int,
    software_version: str,
    now: datetime,
) -> Dataset:
    """The Encapsulated PDF Storage object of ``pdf`` in the patient and study of ``source``; ``sources``
    are (SOP Class UID, SOP Instance UID) of the instances the document was derived from (the images and
    the reports), listed in the Source Instance Sequence."""
    if not pdf.startswith(b"%PDF"):
        raise ValueError("not a PDF document")
    ds = Dataset()
    for keyword in _COPIED:
        if keyword in source:
            setattr(ds, keyword, source[keyword].value)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime"):
        ds.setdefault(keyword, "")  # type 2: present, empty when unknown
    ds.ReferringPhysicianName = ds.get("ReferringPhysicianName", "")
    ds.StudyID = ds.get("StudyID", "")
    ds.AccessionNumber = ds.get("AccessionNumber", "")
    # Encapsulated Document Series
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = pdf_series_uid(str(source.StudyInstanceUID))
    ds.SeriesNumber = series_number
    ds.SeriesDescription = "AI screening result (PDF)"
    # General Equipment, SC Equipment
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "screening-gateway PDF result"
    ds.SoftwareVersions = software_version
    ds.ConversionType = "SYN"  # synthetic: made by software, not scanned
    # Encapsulated Document
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "YES"  # the document names the patient
    ds.RecognizableVisualFeatures = "NO"
    ds.DocumentTitle = TITLE
    ds.ConceptNameCodeSequence = DicomSequence([])
    refs = []
    for class_uid, instance_uid in sources:
        ref = Dataset()
        ref.ReferencedSOPClassUID = class_uid
        ref.ReferencedSOPInstanceUID = instance_uid
        refs.append(ref)
    ds.SourceInstanceSequence = DicomSequence(refs)
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    data = pdf if len(pdf) % 2 == 0 else pdf + b"\x00"  # OB values have even length
    ds.EncapsulatedDocument = data
    ds.EncapsulatedDocumentLength = len(pdf)
    # SOP Common
    ds.SOPClassUID = ENCAPSULATED_PDF
    ds.SOPInstanceUID = sop_instance_uid
    ds.SpecificCharacterSet = source.get("SpecificCharacterSet", "ISO_IR 192")
    ds.InstanceCreationDate, ds.InstanceCreationTime = ds.ContentDate, ds.ContentTime
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds
