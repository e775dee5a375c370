"""Volumes (NIfTI, NRRD, DICOM series, multi-frame DICOM) to 2-D slices, and slice scores back to volumes.

Two ways to feed a volume to the 2-D model:

- inference on one volume: :class:`VolumeToSlicesd` turns a dictionary holding a loaded RAS volume
  ``(C, X, Y, Z)`` into a list of slice dictionaries (a MONAI ``Compose`` then maps the following
  transforms over the list);
- datasets: :func:`expand_volume_datalist` turns each volume item into one item per slice
  (``{"image": path, "volume_id": ..., "slice_index": k, "slice_axis": axis, ...}``), which a plain
  ``monai.data.Dataset`` indexes and :class:`~monai_skipts.transforms.LoadMedicalImaged` loads.

Slice indices count along the RAS-oriented volume (index 0 = most left / posterior / inferior).
Slices are ``(C, H, W)`` images in display order (see :func:`~monai_skipts.transforms.take_slice`).
:func:`aggregate_volume_scores` turns per-slice anomaly scores into one score per volume.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from monai_skipts.transforms.io import LoadMedicalImage, detect_format, dicom_frame_count, read_dicom_header, take_slice
from monai_skipts.utils import InputDataError

__all__ = [
    "slice_foreground_fractions",
    "select_slices",
    "VolumeToSlices",
    "VolumeToSlicesd",
    "expand_volume_datalist",
    "aggregate_volume_scores",
    "slice_to_plane",
]


def _check_volume(volume: torch.Tensor, axis: int) -> None:
    if volume.ndim != 4:
        fname = getattr(volume, "meta", {}).get("filename_or_obj")
        raise InputDataError(fname, f"expected a volume of shape (C, X, Y, Z), got shape {tuple(volume.shape)}")
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2 (a spatial axis of the RAS volume), got {axis}")


def slice_foreground_fractions(volume: torch.Tensor, axis: int = 2, threshold: float | None = None) -> np.ndarray:
    """Fraction of foreground pixels in every slice along ``axis`` of a ``(C, X, Y, Z)`` volume.

    A voxel is foreground when any channel is above ``threshold`` (default: above the volume's minimum,
    which suits MRI and padded CT; for CT pass a HU level, e.g. -500 to count the body only).

    Returns:
        float array of length ``volume.shape[axis + 1]``.
    """
    _check_volume(volume, axis)
    x = volume.as_tensor() if isinstance(volume, MetaTensor) else torch.as_tensor(volume)
    thr = x.min() if threshold is None else threshold
    fg = (x > thr).any(0).float()  # (X, Y, Z)
    return fg.mean(dim=[d for d in range(3) if d != axis]).numpy()


def select_slices(
    volume: torch.Tensor,
    axis: int = 2,
    slice_range: Sequence[int | None] | None = None,
    min_foreground: float = 0.0,
    foreground_threshold: float | None = None,
) -> list[int]:
    """Indices of the slices to keep along ``axis``: inside ``slice_range`` = ``(start, stop)`` (Python
    slice semantics, negative values count from the end, ``None`` = open) and with a foreground fraction
    of at least ``min_foreground`` (see :func:`slice_foreground_fractions`)."""
    _check_volume(volume, axis)
    n = volume.shape[axis + 1]
    start, stop = (None, None) if slice_range is None else slice_range
    indices = list(range(n))[start:stop]
    if min_foreground > 0:
        frac = slice_foreground_fractions(volume, axis, foreground_threshold)
        indices = [k for k in indices if frac[k] >= min_foreground]
    return indices


class VolumeToSlices(Transform):
    """Split a RAS volume ``(C, X, Y, Z)`` into ``(C, H, W)`` slices along ``axis``.

    Args:
        axis: 0 (sagittal), 1 (coronal) or 2 (axial, default).
        slice_range, min_foreground, foreground_threshold: see :func:`select_slices`.

    Returns:
        list of ``MetaTensor`` slices; each meta holds ``slice_index``, ``slice_axis`` and ``volume_id``.
    """

    def __init__(
        self, axis: int = 2, slice_range=None, min_foreground: float = 0.0, foreground_threshold: float | None = None
    ):
        self.axis, self.slice_range = axis, slice_range
        self.min_foreground, self.foreground_threshold = min_foreground, foreground_threshold

    def indices(self, volume: torch.Tensor) -> list[int]:
        """The slice indices this transform keeps for ``volume``."""
        return select_slices(volume, self.axis, self.slice_range, self.min_foreground, self.foreground_threshold)

    def __call__(self, volume: torch.Tensor, indices: Sequence[int] | None = None) -> list[MetaTensor]:
        indices = self.indices(volume) if indices is None else indices
        meta = getattr(volume, "meta", {})
        vid = str(meta.get("volume_id") or meta.get("filename_or_obj", ""))
        out = []
        for k in indices:
            s = take_slice(volume, self.axis, k)
            s.meta["volume_id"] = vid
            out.append(s)
        return out


class VolumeToSlicesd(MapTransform):
    """Dictionary version of :class:`VolumeToSlices`: one dictionary in, a list of slice dictionaries out.

    All ``keys`` (e.g. image and mask volumes) are cut at the same indices, chosen on the first key.
    Every output dictionary is a copy of the input with the keys replaced by ``(C, H, W)`` slices and
    ``volume_id`` (kept if present, else the first key's file name), ``slice_index`` and ``slice_axis`` set.
    Keys that are missing or ``None`` (with ``allow_missing_keys``) are copied as they are.
    """

    def __init__(
        self,
        keys: KeysCollection,
        axis: int = 2,
        slice_range=None,
        min_foreground: float = 0.0,
        foreground_threshold: float | None = None,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.splitter = VolumeToSlices(axis, slice_range, min_foreground, foreground_threshold)

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:
        keys = [k for k in self.key_iterator(dict(data)) if data[k] is not None]
        if not keys:
            return [dict(data)]
        ref = data[keys[0]]
        indices = self.splitter.indices(ref)
        vid = data.get("volume_id") or getattr(ref, "meta", {}).get("filename_or_obj", "")
        per_key = {}
        for key in keys:
            vol = data[key]
            if vol.shape[1:] != ref.shape[1:]:
                fname = getattr(vol, "meta", {}).get("filename_or_obj")
                shapes = f"{tuple(vol.shape[1:])}, but {keys[0]!r} has {tuple(ref.shape[1:])}"
                problem = f"{key!r} has spatial shape {shapes}"
                raise InputDataError(fname, problem)
            per_key[key] = self.splitter(vol, indices)
        out = []
        for i, k in enumerate(indices):
            d = dict(data)
            for key in keys:
                d[key] = per_key[key][i]
                d[key].meta["volume_id"] = str(vid)
            d.update(volume_id=str(vid), slice_index=k, slice_axis=self.splitter.axis)
            out.append(d)
        return out


def _is_2d_source(path) -> bool:
    """True for pictures and single-frame DICOM files, known without reading the pixels."""
    fmt = detect_format(path)
    return fmt == "picture" or (fmt == "dicom" and dicom_frame_count(read_dicom_header(path), path) == 1)


def expand_volume_datalist(
    datalist: Sequence[Mapping],
    axis: int = 2,
    slice_range=None,
    min_foreground: float = 0.0,
    foreground_threshold: float | None = None,
    image_key: str = "image",
    on_error: str = "raise",
    loader: LoadMedicalImage | None = None,
) -> list[dict]:
    """One datalist item per kept slice of every volume item; 2-D items (and items that already have a
    ``slice_index``) pass through unchanged, without their pixels being read.

    Each volume (NIfTI, NRRD, DICOM series folder, multi-frame DICOM) is loaded once to count its slices
    and measure their foreground. Slice items are copies of the volume item with ``volume_id`` (kept if
    present, else the path), ``slice_index`` and ``slice_axis`` added; other keys (a mask volume, a label)
    are copied and :class:`~monai_skipts.transforms.LoadMedicalImaged` loads the same slice of each.

    Args:
        axis, slice_range, min_foreground, foreground_threshold: see :func:`select_slices`.
        image_key: the key holding the volume path.
        on_error: ``"raise"`` the first :class:`~monai_skipts.utils.InputDataError`, or ``"skip"`` the bad
            item with a warning naming the file.
        loader: the loader to use (default ``LoadMedicalImage(cache_volumes=0)``).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    loader = loader or LoadMedicalImage(cache_volumes=0)
    out: list[dict] = []
    for item in datalist:
        try:
            if item.get("slice_index", -1) not in (None, -1) or _is_2d_source(item[image_key]):
                out.append(dict(item))  # already a slice item, or a 2-D image: pixels not read here
                continue
            img = loader(item[image_key])
            if img.ndim != 4:
                out.append(dict(item))
                continue
            indices = select_slices(img, axis, slice_range, min_foreground, foreground_threshold)
        except InputDataError as e:
            if on_error == "raise":
                raise
            warnings.warn(f"skipping item: {e}", stacklevel=2)
            continue
        vid = str(item.get("volume_id") or item[image_key])
        out.extend({**item, "volume_id": vid, "slice_index": k, "slice_axis": axis} for k in indices)
    return out


def aggregate_volume_scores(volume_ids: Sequence[Hashable], scores, method: str = "max", k: int = 3) -> dict:
    """Combine per-slice anomaly scores into one score per volume.

    Args:
        volume_ids: the volume of every slice (length N), e.g. the ``volume_id`` of a batch of slices.
        scores: N slice scores (sequence, array or tensor).
        method: ``"max"``, ``"mean"``, or ``"topk"`` (mean of the ``k`` highest slice scores, or of all
            slices when a volume has fewer than ``k``).

    Returns:
        ``{volume_id: score}`` in the order volumes first appear.
    """
    if method not in ("max", "mean", "topk"):
        raise ValueError(f"method must be 'max', 'mean' or 'topk', got {method!r}")
    if method == "topk" and int(k) < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().numpy()
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    ids = list(volume_ids)
    if len(ids) != len(s):
        raise ValueError(f"got {len(ids)} volume ids but {len(s)} scores")
    groups: dict = {}
    for vid, x in zip(ids, s):
        groups.setdefault(vid, []).append(x)
    if method == "max":
        return {v: float(np.max(x)) for v, x in groups.items()}
    if method == "mean":
        return {v: float(np.mean(x)) for v, x in groups.items()}
    return {v: float(np.mean(np.sort(x)[::-1][: int(k)])) for v, x in groups.items()}


def slice_to_plane(plane: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`~monai_skipts.transforms.take_slice`'s display layout: an ``(H, W)`` slice
    map back to the ``(A, B)`` plane of the volume (the two remaining axes in RAS order)."""
    return plane.transpose(0, 1).flip(0, 1)
