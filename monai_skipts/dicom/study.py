"""Reading a DICOM study folder: the series it holds and the ones a 2-D model can score.

:func:`read_study` walks a folder (any layout, any file names: files are recognised by their DICOM
preamble), groups the image instances by series and splits every series into scoring *units*:

- ``"image"``: one single-frame instance scored as a 2-D image (CR, DX, MG, a lone CT slice, an SC...);
- ``"volume"``: a stack of single-frame instances that share an orientation and differ in position (a
  CT or MR series), or one multi-frame instance (its frames); every slice is scored as a 2-D image and
  the slice scores aggregate to one volume score (the checkpoint's aggregation, see
  :func:`~monai_skipts.transforms.aggregate_volume_scores`).

Series that cannot be scored are listed with the reason (structured reports, segmentations,
presentation states, RT objects, encapsulated documents, images without pixel data). The objects this
package wrote itself (their ``Manufacturer`` is :data:`MANUFACTURER`) are set apart
(:attr:`Study.earlier`). Files that should be DICOM and cannot be used (0 bytes, cut inside the header
or the pixel data, no DICOM header) are listed with the reason: the series they belong to is incomplete
and is not scored (:meth:`Study.incomplete`). Instances that look like slices and do not form one
volume (sizes or orientations differ, positions repeat) are scored as separate images, and
:attr:`Series.not_volume` says why.

Nothing here logs or returns a header value that identifies the patient: series are named by their
index in the study and their modality (``series-002-CT``); the headers themselves travel in the
:class:`Series` objects to the writers, which copy them into the new DICOM objects.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MANUFACTURER", "Series", "Study", "Unit", "read_study", "scrub", "NOT_SCORED_MODALITIES", "DICOM_SUFFIXES"]

MANUFACTURER = "monai-skipts"
"""``Manufacturer`` of every object this package writes (and the mark by which a study's earlier
results are recognised and not scored again)."""

NOT_SCORED_MODALITIES = frozenset(
    {
        "SR",
        "SEG",
        "PR",
        "KO",
        "DOC",
        "RTSTRUCT",
        "RTPLAN",
        "RTDOSE",
        "RTRECORD",
        "REG",
        "FID",
        "ECG",
        "AU",
        "HD",
        "PLAN",
        "OT_DOC",
    }
)
_NO_PIXELS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_PHI_KEYS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "AccessionNumber",
    "InstitutionName",
    "StudyID",
    "ReferringPhysicianName",
    "StudyDescription",
    "SeriesDescription",
    "OperatorsName",
    "PatientAddress",
    "OtherPatientIDs",
    "InstitutionAddress",
    "PerformingPhysicianName",
)
_UID = re.compile(r"\b\d+(?:\.\d+){3,}\b")


@dataclass
class Unit:
    """What gets one decision: a 2-D image (one instance) or a volume (a stack of instances, or the frames
    of one multi-frame instance). ``slices`` lists ``(instance index in the series, frame index)``
    (frame 0 for single-frame instances) in slice order."""

    kind: str
    slices: list[tuple[int, int]]
    label: str = ""


@dataclass
class Series:
    """One image series of a study: its instance files and headers (pixel data not read), sorted in
    slice order, and its scoring units. ``not_volume``: why instances that look like slices are not
    scored as one volume (None when they are, or are no slices)."""

    index: int
    modality: str
    files: list[Path]
    headers: list[Any]
    units: list[Unit] = field(default_factory=list)
    not_volume: str | None = None

    @property
    def name(self) -> str:
        """A name free of patient data: ``series-<index>-<modality>``."""
        return f"series-{self.index:03d}-{self.modality or 'OT'}"

    @property
    def study_uid(self) -> str:
        return str(self.headers[0].StudyInstanceUID)

    @property
    def series_uid(self) -> str:
        return str(self.headers[0].SeriesInstanceUID)

    def n_frames(self, i: int) -> int:
        return _frames(self.headers[i])


def _frames(ds) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def scrub(message: str, headers=()) -> str:
    """``message`` without UIDs and without the identifying header values of ``headers`` (for the logs
    and ``dicom_results.json``: library error messages and file names can quote them). IPv4 addresses
    (four numbers up to 255, e.g. a PACS host) are kept: they are no UIDs."""
    text = _UID.sub(lambda m: m.group(0) if _is_ipv4(m.group(0)) else "<uid>", " ".join(str(message).split()))
    for ds in headers:
        for key in _PHI_KEYS:
            value = str(ds.get(key, "") or "")
            for form in {value, value.replace("^", " ")}:
                if len(form) >= 3:
                    text = text.replace(form, "<redacted>")
    return text[:500]


def _is_ipv4(text: str) -> bool:
    parts = text.split(".")
    return len(parts) == 4 and all(len(x) <= 3 and int(x) <= 255 for x in parts)


def _is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _vec(value, n: int) -> np.ndarray | None:
    try:
        v = np.asarray([float(x) for x in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return v if v.shape == (n,) else None


def _not_scored(ds) -> str | None:
    """Why this instance is not an image to score (None when it is)."""
    modality = str(ds.get("Modality", ""))
    if modality in NOT_SCORED_MODALITIES:
        return f"modality {modality} is not an image"
    if not any(t in ds for t in _NO_PIXELS):
        return "no pixel data"
    if "Rows" not in ds or "Columns" not in ds:
        return "no Rows/Columns"
    return None


def _pixel_data_problem(ds, size: int) -> str | None:
    """Why the pixel data of ``ds`` (read from a file of ``size`` bytes, pixel data deferred) is
    incomplete, or None: it ends past the end of the file, or holds fewer bytes than Rows x Columns x
    samples x frames need (uncompressed transfer syntaxes)."""
    elem = ds.get_item("PixelData") if "PixelData" in ds else None
    if elem is None:
        return None
    length = getattr(elem, "length", None)
    tell = getattr(elem, "value_tell", None)
    if length is None or length == 0xFFFFFFFF:  # encapsulated (compressed): undefined length
        return None
    if tell is not None and tell + length > size:
        return f"pixel data cut short (the file ends {tell + length - size} bytes early)"
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is not None and getattr(ts, "is_compressed", False):
        return None
    try:
        bits = int(ds.get("BitsAllocated", 0) or 0)
        need = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1) * _frames(ds) * bits // 8
    except (TypeError, ValueError, AttributeError):
        return None
    if bits and length < need:
        return f"pixel data cut short ({length} of {need} bytes)"
    return None


_VOLUME_MODALITIES = frozenset({"CT", "MR", "PT", "NM"})


def _stack_order(headers: list, modality: str) -> tuple[list[int] | None, str | None]:
    """``(order, why_not)``: the slice order of single-frame instances forming a stack (same
    orientation and size, distinct positions along the normal), else None and, for instances that look
    like slices of a volume (positions and orientations given, or a CT/MR/PT/NM series), why they are
    not treated as one (they are then scored as separate images)."""
    if len(headers) < 2 or any(_frames(h) > 1 for h in headers):
        return None, None
    iops = [_vec(h.get("ImageOrientationPatient"), 6) for h in headers]
    ipps = [_vec(h.get("ImagePositionPatient"), 3) for h in headers]
    if any(v is None for v in iops + ipps):
        missing = sum(a is None or b is None for a, b in zip(iops, ipps))
        if modality in _VOLUME_MODALITIES:
            return None, f"{missing} of {len(headers)} instances have no slice position/orientation"
        return None, None
    if any(np.abs(v - iops[0]).max() > 1e-3 for v in iops):
        return None, f"the slice orientations differ ({len({tuple(np.round(v, 3)) for v in iops})} orientations)"
    sizes = sorted({(int(h.get("Rows")), int(h.get("Columns"))) for h in headers})
    if len(sizes) != 1:
        return None, "the image sizes differ (" + ", ".join(f"{r}x{c}" for r, c in sizes) + ")"
    normal = np.cross(iops[0][:3], iops[0][3:])
    pos = np.asarray([float(p @ normal) for p in ipps])
    distinct = len(np.unique(np.round(pos, 3)))
    if distinct != len(pos):
        return (
            None,
            f"{len(pos) - distinct + 1} or more instances share a slice position ({distinct} positions, {len(pos)} instances)",
        )
    return [int(i) for i in np.argsort(pos, kind="stable")], None


@dataclass
class Study:
    """What :func:`read_study` found below a folder. File names are relative to the folder, UIDs in them
    replaced by ``<uid>``.

    Attributes:
        series: the image series to score, in study order (study date and time, series number, then
            SeriesInstanceUID; index 1, 2, ...; this package's own earlier results take no index, so the
            numbering is the same on every run).
        skipped: ``[{"series", "reason"}]``: series that are no images to score (SR, SEG...).
        broken: ``{series name: [{"file", "reason"}]}``: files of a series that cannot be used (pixel
            data missing or cut short): the series is incomplete and must not be scored.
        unreadable: ``[{"file", "reason", "folder"}]``: files that should be DICOM and cannot be read
            (0 bytes, cut inside the header, no DICOM header at all): the series they belong to is
            unknown; the series with files in the same folder are incomplete.
        ignored: names of files that are not DICOM (by name and content: ``notes.txt``...).
        earlier: ``{SeriesInstanceUID: modality}`` of this package's own earlier results in the folder.
        study_uids: the StudyInstanceUIDs of the scorable series.
    """

    series: list[Series] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    broken: dict[int, list[dict[str, str]]] = field(default_factory=dict)
    unreadable: list[dict[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    earlier: dict[str, str] = field(default_factory=dict)
    study_uids: set[str] = field(default_factory=set)

    def incomplete(self, s: Series) -> list[dict[str, str]]:
        """The files that make series ``s`` incomplete: its own unusable instances and the unreadable
        files in a folder that holds one of its files (they may be its missing slices)."""
        folders = {str(p.parent) for p in s.files}
        return self.broken.get(s.name, []) + [u for u in self.unreadable if u["folder"] in folders]


#: file name endings of DICOM files (and no ending at all, as in DICOMDIR layouts)
DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic", ".ima", ""})


def _read_file(path: Path, name: str):
    """``(dataset, None)`` for a usable DICOM file; ``(None, reason)`` for a file that should be DICOM and is
    not usable; ``(None, None)`` for a file that is no DICOM at all (by name and content)."""
    import pydicom

    try:
        size = path.stat().st_size
    except OSError as e:
        return None, f"cannot be read ({e.strerror})"
    expected = path.suffix.lower() in DICOM_SUFFIXES
    if not _is_dicom_file(path):
        if not expected:
            return None, None
        if size == 0:
            return None, "empty file (0 bytes)"
        if size < 132 or path.suffix:
            return None, f"not a DICOM file (no 'DICM' marker at byte 128; {size} bytes)"
        return None, None  # a file without a name ending and without DICOM marker: README, LICENSE...
    try:
        ds = pydicom.dcmread(str(path), defer_size="1 KB")
    except Exception as e:
        return None, f"cannot be read as DICOM ({type(e).__name__}: {scrub(e)})"
    if "SeriesInstanceUID" not in ds or "StudyInstanceUID" not in ds:
        return None, f"the DICOM header is cut short or incomplete (no Study/Series Instance UID; {size} bytes)"
    return ds, None


def read_study(folder: str | os.PathLike) -> Study:
    """The scorable series below ``folder``, the ones skipped and the files that cannot be used.

    Raises:
        InputDataError: ``folder`` is not a folder, or holds no file at all.
    """
    from monai_skipts.utils import InputDataError

    root = Path(folder)
    if not root.is_dir():
        raise InputDataError(root, "not a folder (give the folder holding the study's DICOM files)")
    study = Study()
    groups: dict[str, list[tuple[Path, Any]]] = {}
    files = sorted(x for x in root.rglob("*") if x.is_file() and not x.name.startswith("."))
    if not files:
        raise InputDataError(root, "the folder holds no file (give the folder holding the study's DICOM files)")
    for p in files:
        if p.name.upper() == "DICOMDIR":
            continue
        name = scrub(p.relative_to(root).as_posix())
        ds, problem = _read_file(p, name)
        if ds is None:
            if problem is None:
                study.ignored.append(name)
            else:
                study.unreadable.append({"file": name, "reason": problem, "folder": str(p.parent)})
            continue
        if str(ds.get("Manufacturer", "")) == MANUFACTURER:
            study.earlier[str(ds.SeriesInstanceUID)] = str(ds.get("Modality", ""))
            continue
        groups.setdefault(str(ds.SeriesInstanceUID), []).append((p, ds))

    def order(item):  # the same on every run, whatever the file names (a pulled study's are arbitrary)
        uid, members = item
        h = members[0][1]
        try:
            number = int(h.get("SeriesNumber", 0) or 0)
        except (TypeError, ValueError):
            number = 0
        return str(h.get("StudyDate", "")), str(h.get("StudyTime", "")), number, uid

    for k, (_, members) in enumerate(sorted(groups.items(), key=order), start=1):
        modality = "".join(c for c in str(members[0][1].get("Modality", "OT")) if c.isalnum())[:8] or "OT"
        name = f"series-{k:03d}-{modality}"
        reasons = [_not_scored(ds) for _, ds in members]
        if all(r is not None for r in reasons):
            files_named = ", ".join(scrub(p.relative_to(root).as_posix()) for p, _ in members[:3])
            more = f" and {len(members) - 3} more" if len(members) > 3 else ""
            study.skipped.append({"series": name, "reason": f"{reasons[0]} ({files_named}{more})"})
            continue
        keep = []
        for (p, ds), r in zip(members, reasons):
            problem = r if r is not None else _pixel_data_problem(ds, p.stat().st_size)
            if problem is None:
                keep.append((p, ds))
            else:  # an instance of an image series without (complete) pixels: the series is incomplete
                file = scrub(p.relative_to(root).as_posix())
                study.broken.setdefault(name, []).append({"file": file, "reason": problem})
        if not keep:
            continue

        def inst(m):
            try:
                return int(m[1].get("InstanceNumber", 0) or 0), str(m[0])
            except (TypeError, ValueError):
                return 0, str(m[0])

        keep.sort(key=inst)
        headers = [ds for _, ds in keep]
        stack, why_not = _stack_order(headers, modality)
        if stack is not None:
            keep = [keep[i] for i in stack]
            headers = [ds for _, ds in keep]
        s = Series(index=k, modality=modality, files=[p for p, _ in keep], headers=headers, not_volume=why_not)
        if stack is not None:
            s.units.append(Unit("volume", [(i, 0) for i in range(len(keep))], "volume"))
        else:
            for i, ds in enumerate(headers):
                n = _frames(ds)
                if n > 1:
                    s.units.append(Unit("volume", [(i, f) for f in range(n)], f"instance {i + 1} (multi-frame)"))
                else:
                    s.units.append(Unit("image", [(i, 0)], f"image {i + 1}"))
        study.series.append(s)
        study.study_uids.add(s.study_uid)
    return study
