"""Coded concepts written into our Structured Reports, each citing where the standard defines it.

References are to DICOM PS3.16 (Content Mapping Resource): CID = context group, TID = template.
SCT = SNOMED CT, DCM = DICOM Controlled Terminology (PS3.16 Annex D), UCUM = units.
"""

from __future__ import annotations

from pydicom.sr.coding import Code

# Findings our models report (TID 1501 row "Finding" and the concept name of the qualitative evaluation).
# SNOMED CT disorder concepts; code meanings are LO (at most 64 characters), so 840539006 carries its
# SNOMED synonym "COVID-19" rather than the 66-character fully specified name.
FINDING_CODES: dict[str, Code] = {
    "glaucoma": Code("23986001", "SCT", "Glaucoma"),
    "pneumonia": Code("233604007", "SCT", "Pneumonia"),
    "bacterial_pneumonia": Code("53084003", "SCT", "Bacterial pneumonia"),
    "viral_pneumonia": Code("75570004", "SCT", "Viral pneumonia"),
    "covid19": Code("840539006", "SCT", "COVID-19"),
}

# Value of the qualitative evaluation: CID 241 "Present-Absent Only". The standard's CID 241 lists
# (272519000, SCT, "Absent"), not the older 2667000, so that is what we write.
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("272519000", "SCT", "Absent")

# Value written instead of Present/Absent when the image cannot be assessed by the model
# (e.g. a hip radiograph sent to a chest model): CID 240 "Present-Absent" member "Undetermined".
UNDETERMINED = Code("373068000", "SCT", "Undetermined")

# Model output for a finding, TID 300 numeric measurement: CID 6048 "CAD Operating Point Axis Label"
# member (111012, DCM, "Certainty of Finding"), which the CAD SR templates (TID 4000 family) express in
# percent. We write probability * 100.
CERTAINTY_OF_FINDING = Code("111012", "DCM", "Certainty of Finding")

# Units of CERTAINTY_OF_FINDING: CID 7181 "Abstract Multi-dimensional Image Model Component Unit".
PERCENT = Code("%", "UCUM", "Percent")

# Free text items: (121106, DCM, "Comment"), used for TEXT qualitative evaluations in TID 1500 row
# "Qualitative Evaluations" (decision support notice) and TID 1501 (why an image was not assessable).
COMMENT = Code("121106", "DCM", "Comment")

# Container of report level qualitative evaluations: TID 1500 row "Qualitative Evaluations".
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")

# Concept name of the IMAGE item of a TID 1601 Image Library Entry (as highdicom writes it).
SOURCE = Code("260753009", "SCT", "Source")

# TID 1500 "Procedure reported": CID 100 "Quantitative Diagnostic Imaging Procedure" generic member.
IMAGING_PROCEDURE = Code("363679005", "SCT", "Imaging procedure")

# TID 4019 "Algorithm Parameters" entry stating the decision threshold of a finding (TEXT, so the
# threshold travels with the algorithm identification of every group and measurement).
THRESHOLD_PARAMETER = "decision threshold={threshold:.4f} (probability)"
