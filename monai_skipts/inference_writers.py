"""The files :meth:`~monai_skipts.inference.AnomalyPredictor.run` writes. Every file is written to a
temporary file and renamed; the run's ``status.json`` is :func:`~monai_skipts.progress.write_run_status`.

Outputs under ``output_dir``: ``predictions.csv`` (one row per image or slice: id, score, threshold,
anomalous, normalized_score, volume_id, slice_index, map), ``volume_predictions.csv`` (one row per
volume; ``threshold_kind`` says which threshold decided it: ``volume``, the checkpoint's volume
threshold, or ``image`` when it has none), ``errors.csv`` (file, reason: one row per input that could not be scored) and the anomaly maps
at the input's own size under ``maps/``: a 16-bit PNG per 2-D image, a NIfTI per volume (slice maps
stacked, with the volume's RAS affine so it overlays the input in any viewer).

Ids (``id``, ``volume_id``, ``file``) are paths relative to the input root: the folder given, or the
deepest folder holding every file of a list. A map keeps its input's relative folders and whole file
name (``p1/ct.nii.gz`` -> ``maps/p1/ct.nii.gz.map.nii.gz``; see
:func:`~monai_skipts.data.files.output_relpath`), so no two inputs share a map; the ``map`` column names
each row's map file (relative to ``output_dir``).
"""

from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from monai_skipts.data.files import output_relpaths
from monai_skipts.transforms import slice_to_plane
from monai_skipts.utils import atomic_save, atomic_write_text, save_map_png

__all__ = [
    "ERROR_COLUMNS",
    "PREDICTION_COLUMNS",
    "VOLUME_COLUMNS",
    "map_names",
    "save_volume_map",
    "write_csv",
    "write_maps",
    "write_tables",
]

PREDICTION_COLUMNS = ("id", "score", "threshold", "anomalous", "normalized_score", "volume_id", "slice_index", "map")
VOLUME_COLUMNS = (
    "volume_id",
    "score",
    "threshold",
    "threshold_kind",
    "anomalous",
    "normalized_score",
    "n_slices",
    "aggregation",
    "map",
)
ERROR_COLUMNS = ("file", "reason")


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> None:
    """Rows as CSV (UTF-8), written atomically; ``columns`` fixes the header (written even without rows)."""
    keys: list[str] = list(columns or [])
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def map_names(results: Sequence[Mapping[str, Any]], volume_ids: Sequence[str]) -> dict[str, str]:
    """``{id: "maps/<relative path>"}``: one map file per 2-D image (``.map.png``) and per volume
    (``.map.nii.gz``), keeping the input's folders (:func:`~monai_skipts.data.files.output_relpaths`)."""
    wanted = {r["id"]: ".map.png" for r in results if "volume_id" not in r}
    wanted.update(dict.fromkeys(volume_ids, ".map.nii.gz"))
    return {k: f"maps/{v}" for k, v in output_relpaths(wanted).items()}


def save_volume_map(path: Path, volume: torch.Tensor, slices: Sequence[Mapping[str, Any]], axis: int) -> None:
    """Stack slice maps (``{"map": (H, W), "slice_index"}``, display layout) back into the loaded RAS
    ``volume``'s grid (zeros on slices not scored) and write a NIfTI with its affine."""
    import nibabel as nib

    grid = np.zeros(tuple(volume.shape[1:]), np.float32)
    for r in slices:
        m = slice_to_plane(torch.from_numpy(r["map"])).numpy()  # (H, W) display layout -> the volume's plane
        idx = [slice(None)] * 3
        idx[axis] = r["slice_index"]
        grid[tuple(idx)] = m
    affine = np.asarray(getattr(volume, "affine", np.eye(4)), dtype=np.float64)
    img = nib.Nifti1Image(grid, affine)
    data = img.to_bytes()
    atomic_save(path, lambda f: f.write(gzip.compress(data) if str(path).endswith(".gz") else data))


def write_maps(
    out: Path,
    results: Sequence[Mapping[str, Any]],
    volume_ids: Sequence[str],
    names: Mapping[str, str],
    vmax: float,
    load_volume: Callable[[str], torch.Tensor],
    axis: int,
) -> None:
    """Write every map named in ``names`` under ``out``: 2-D images as 16-bit PNGs scaled to ``vmax``,
    volumes (``load_volume(path)`` gives the RAS grid) as NIfTI."""
    for r in results:
        if "volume_id" not in r:
            save_map_png(out / names[r["id"]], r["map"], vmax)
    for vid in volume_ids:
        slices = [r for r in results if r.get("volume_id") == vid]
        save_volume_map(out / names[vid], load_volume(slices[0]["image"]), slices, axis)


def write_tables(
    out: Path,
    results: Sequence[Mapping[str, Any]],
    volumes: Mapping[str, Mapping[str, Any]],
    errors: Sequence[Mapping[str, str]],
    names: Mapping[str, str],
) -> list[dict[str, Any]]:
    """Write ``predictions.csv``, ``volume_predictions.csv`` (when there are volumes) and ``errors.csv``
    (always: no stale list from an earlier run); returns the prediction rows."""
    rows = [
        {k: r.get(k, "") for k in PREDICTION_COLUMNS[:-1]} | {"map": names.get(r.get("volume_id", r["id"]), "")}
        for r in results
    ]
    write_csv(out / "predictions.csv", rows, PREDICTION_COLUMNS)
    if volumes:
        vrows = [{"volume_id": v, **d, "map": names.get(v, "")} for v, d in volumes.items()]
        write_csv(out / "volume_predictions.csv", vrows, VOLUME_COLUMNS)
    write_csv(out / "errors.csv", errors, ERROR_COLUMNS)
    return rows
