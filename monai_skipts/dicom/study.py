"""Reading a DICOM study folder: the series it holds and the ones a 2-D model can score.

:func:`read_study` walks a folder (any layout, any file names: files are recognised by their DICOM
preamble), groups the image instances by series and splits every series into scoring *units*:

- ``"image"``: one single-frame instance scored as a 2-D image (CR, DX, MG, a lone CT slice, an SC...);
- ``"volume"``: a stack of single-frame instances that share an orientation and differ in position (a
  CT or MR series), or one multi-frame instance (its frames); every slice is scored as a 2-D image and
  the slice scores aggregate to one volume score (the checkpoint's aggregation, see
  :func:`~monai_skipts.transforms.aggregate_volume_scores`).

Series that cannot be scored are listed with the reason (structured reports, segmentations,
presentation states, RT objects, encapsulated documents, images without pixel data, and the objects
this package wrote itself: their ``Manufacturer`` is :data:`MANUFACTURER`).

Nothing here logs or returns a header value that identifies the patient: series are named by their
index in the study and their modality (``series-002-CT``); the headers themselves travel in the
:class:`Series` objects to the writers, which copy them into the new DICOM objects.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MANUFACTURER", "Series", "Unit", "read_study", "NOT_SCORED_MODALITIES"]

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
    slice order, and its scoring units."""

    index: int
    modality: str
    files: list[Path]
    headers: list[Any]
    units: list[Unit] = field(default_factory=list)

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
    if str(ds.get("Manufacturer", "")) == MANUFACTURER:
        return f"written by {MANUFACTURER} (an earlier result)"
    modality = str(ds.get("Modality", ""))
    if modality in NOT_SCORED_MODALITIES:
        return f"modality {modality} is not an image"
    if not any(t in ds for t in _NO_PIXELS):
        return "no pixel data"
    if "Rows" not in ds or "Columns" not in ds:
        return "no Rows/Columns"
    return None


def _stack_order(headers: list) -> list[int] | None:
    """Slice order of single-frame instances forming a stack (same orientation, distinct positions
    along the normal), or None when they are no stack."""
    if len(headers) < 2 or any(_frames(h) > 1 for h in headers):
        return None
    iops = [_vec(h.get("ImageOrientationPatient"), 6) for h in headers]
    ipps = [_vec(h.get("ImagePositionPatient"), 3) for h in headers]
    if any(v is None for v in iops + ipps):
        return None
    if any(np.abs(v - iops[0]).max() > 1e-3 for v in iops):
        return None
    if len({(int(h.get("Rows")), int(h.get("Columns"))) for h in headers}) != 1:
        return None
    normal = np.cross(iops[0][:3], iops[0][3:])
    pos = np.asarray([float(p @ normal) for p in ipps])
    if len(np.unique(np.round(pos, 3))) != len(pos):
        return None
    return [int(i) for i in np.argsort(pos, kind="stable")]


def read_study(folder: str | os.PathLike) -> tuple[list[Series], list[dict[str, str]]]:
    """The scorable series below ``folder`` and the ones skipped.

    Returns:
        ``(series, skipped)``: series in order of (study date/time, series number, first file); skipped
        ``[{"series": name, "reason": ...}]`` (names free of patient data).
    """
    import pydicom

    root = Path(folder)
    if not root.is_dir():
        from monai_skipts.utils import InputDataError

        raise InputDataError(root, "not a folder (give the folder holding the study's DICOM files)")
    groups: dict[str, list[tuple[Path, Any]]] = {}
    for p in sorted(x for x in root.rglob("*") if x.is_file() and not x.name.startswith(".")):
        if p.name.upper() == "DICOMDIR" or not _is_dicom_file(p):
            continue
        try:
            ds = pydicom.dcmread(str(p), stop_before_pixels=False, defer_size="1 KB")
        except Exception:  # unreadable: not a DICOM file we can use
            continue
        if "SeriesInstanceUID" not in ds or "StudyInstanceUID" not in ds:
            continue
        groups.setdefault(str(ds.SeriesInstanceUID), []).append((p, ds))

    def order(item):
        _, members = item
        h = members[0][1]
        try:
            number = int(h.get("SeriesNumber", 0) or 0)
        except (TypeError, ValueError):
            number = 0
        return str(h.get("StudyDate", "")), str(h.get("StudyTime", "")), number, str(members[0][0])

    series: list[Series] = []
    skipped: list[dict[str, str]] = []
    for k, (_, members) in enumerate(sorted(groups.items(), key=order), start=1):
        modality = "".join(c for c in str(members[0][1].get("Modality", "OT")) if c.isalnum())[:8] or "OT"
        name = f"series-{k:03d}-{modality}"
        reasons = [_not_scored(ds) for _, ds in members]
        keep = [(p, ds) for (p, ds), r in zip(members, reasons) if r is None]
        if not keep:
            skipped.append({"series": name, "reason": next(r for r in reasons if r)})
            continue

        def inst(m):
            try:
                return int(m[1].get("InstanceNumber", 0) or 0), str(m[0])
            except (TypeError, ValueError):
                return 0, str(m[0])

        keep.sort(key=inst)
        headers = [ds for _, ds in keep]
        stack = _stack_order(headers)
        if stack is not None:
            keep = [keep[i] for i in stack]
            headers = [ds for _, ds in keep]
        s = Series(index=k, modality=modality, files=[p for p, _ in keep], headers=headers)
        if stack is not None:
            s.units.append(Unit("volume", [(i, 0) for i in range(len(keep))], "volume"))
        else:
            for i, ds in enumerate(headers):
                n = _frames(ds)
                if n > 1:
                    s.units.append(Unit("volume", [(i, f) for f in range(n)], f"instance {i + 1} (multi-frame)"))
                else:
                    s.units.append(Unit("image", [(i, 0)], f"image {i + 1}"))
        series.append(s)
    return series, skipped
