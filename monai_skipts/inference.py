"""Inference with a trained checkpoint on files a hospital has: PNG/JPG, DICOM (single, multi-frame,
series folders), NIfTI/NRRD volumes. Volumes are scored slice-wise and aggregated to a volume score.

Outputs under ``output_dir``: ``predictions.csv`` (one row per image or slice: id, score, threshold,
anomalous, normalized_score), ``volume_predictions.csv`` (one row per volume), and the anomaly maps
at the input's own size: a 16-bit PNG per 2-D image, a NIfTI per volume (slice maps stacked, with
the volume's RAS affine so it overlays the input in any viewer).
"""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import load_model
from .data import is_image_file
from .engines import resolve_device
from .handlers.plots import safe_name, save_map_png
from .inferers import SkipTSPredictor
from .metrics import normalize_score
from .transforms import aggregate_volume_scores, build_preprocessing, expand_volume_datalist
from .transforms.io import LoadMedicalImage
from .utils import InputDataError, atomic_save, atomic_write_text

__all__ = ["AnomalyPredictor", "list_inputs"]

logger = logging.getLogger(__name__)

_VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd")


def list_inputs(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[dict]:
    """Datalist items ``{"image": path, "id": ...}`` from a folder (every image file below it; a
    folder of DICOM files without sub-folders counts as one series), a file, or a list of paths."""
    if isinstance(inputs, (str, os.PathLike)):
        root = Path(inputs)
        if root.is_dir():
            files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".") and is_image_file(p))
            if not files:
                raise InputDataError(root, "no image files (PNG/JPG/DICOM/NIfTI/NRRD) found in this folder")
            return [{"image": str(p), "id": p.relative_to(root).as_posix()} for p in files]
        if not root.exists():
            raise InputDataError(root, "input not found")
        return [{"image": str(root), "id": root.name}]
    return [{"image": str(p), "id": Path(p).name} for p in inputs]


class AnomalyPredictor:
    """A trained Skip-TS ready to score files.

    Args:
        checkpoint: the training run's ``model.pt`` (holds the threshold and the preprocessing
            preset: modality and spatial size).
        teacher_weights: the teacher's weights file when not in the default place.
        device: ``"auto"`` / ``"cpu"`` / ``"cuda"``.
        volume_axis: slicing axis for volumes (2 = axial).
        volume_aggregation: ``"max"``, ``"mean"`` or ``"topk"`` slice scores → volume score.
        batch_size: images per forward pass.
    """

    def __init__(self, checkpoint: str | os.PathLike, teacher_weights: str | os.PathLike | None = None,
                 device: str = "auto", volume_axis: int = 2, volume_aggregation: str = "max",
                 batch_size: int = 16, topk: int = 3):  # fmt: skip
        self.device = resolve_device(device)
        model, ckpt = load_model(checkpoint, teacher_weights, map_location=self.device)
        self.predictor = SkipTSPredictor(model).to(self.device).eval()
        thr = ckpt.get("threshold") or {}
        self.threshold: float | None = thr.get("value")
        self.scale: float | None = thr.get("scale")
        extra = ckpt.get("extra", {})
        self.modality = extra.get("modality", "xray")
        self.spatial_size = int(extra.get("spatial_size", 256))
        self.preprocess = build_preprocessing(self.modality, self.spatial_size)
        self.volume_axis, self.volume_aggregation, self.topk = volume_axis, volume_aggregation, topk
        self.batch_size = int(batch_size)

    @torch.inference_mode()
    def predict_tensor(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Preprocessed images ``(B, 3, S, S)`` → maps ``(B, 1, S, S)`` and scores ``(B,)``."""
        amap, score = self.predictor(images.to(self.device))
        return amap.float().cpu(), score.float().cpu()

    def decide(self, score: float) -> dict[str, Any]:
        """``{"score", "threshold", "anomalous", "normalized_score"}`` for one score."""
        out: dict[str, Any] = {"score": float(score), "threshold": self.threshold, "anomalous": None, "normalized_score": None}
        if self.threshold is not None:
            out["anomalous"] = bool(score >= self.threshold)
            if self.scale:
                out["normalized_score"] = float(normalize_score(score, self.threshold, self.scale))
        return out

    def predict_items(self, items: Iterable[dict]) -> list[dict[str, Any]]:
        """Score datalist items (volumes expanded to slices); each result holds the decision, the
        map at the input's size (``"map"``, float32 ``(H, W)``) and volume keys when a slice."""
        items = expand_volume_datalist(list(items), axis=self.volume_axis)
        results: list[dict[str, Any]] = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            data = [self.preprocess(dict(it)) for it in chunk]
            maps, scores = self.predict_tensor(torch.stack([d["image"].as_tensor() if hasattr(d["image"], "as_tensor") else d["image"] for d in data]))
            for it, d, amap, s in zip(chunk, data, maps, scores):
                if not torch.isfinite(s):
                    raise InputDataError(it["image"], "the anomaly score is not finite; the image holds invalid values")
                size = tuple(int(v) for v in d["image"].meta.get("spatial_shape", amap.shape[-2:]))[-2:]
                full = F.interpolate(amap[None], size=size, mode="bilinear", align_corners=False)[0, 0].numpy()
                rec = {"id": str(it.get("id", it["image"])), **self.decide(float(s)), "map": full}
                if "slice_index" in it:
                    rec.update(volume_id=str(it["volume_id"]), slice_index=int(it["slice_index"]))
                results.append(rec)
        return results

    def run(self, inputs: str | os.PathLike | Sequence, output_dir: str | os.PathLike, save_maps: bool = True) -> dict[str, Any]:
        """Score ``inputs`` (folder, file or list of paths) and write the outputs; returns a summary."""
        out = Path(output_dir)
        items = list_inputs(inputs)
        results = self.predict_items(items)
        rows = [{k: r[k] for k in ("id", "score", "threshold", "anomalous", "normalized_score")} | (
            {"volume_id": r["volume_id"], "slice_index": r["slice_index"]} if "volume_id" in r else {}) for r in results]  # fmt: skip
        _write_csv(out / "predictions.csv", rows)
        volumes = self._volumes(results)
        if volumes:
            _write_csv(out / "volume_predictions.csv", [{"volume_id": v, **d} for v, d in volumes.items()])
        if save_maps:
            vmax = 2.0 * self.threshold if self.threshold else max(r["score"] for r in results)
            for r in results:
                if "volume_id" not in r:
                    save_map_png(out / "maps" / f"{safe_name(r['id'])}.png", r["map"], vmax)
            for vid in volumes:
                self._save_volume_map(out / "maps" / f"{safe_name(Path(vid).name)}.nii.gz", vid,
                                      [r for r in results if r.get("volume_id") == vid])  # fmt: skip
        logger.info("scored %d images (%d volumes) into %s", len(results), len(volumes), out)
        return {"n_images": len(results), "n_volumes": len(volumes), "n_anomalous": sum(bool(r["anomalous"]) for r in rows)}

    def _volumes(self, results: list[dict]) -> dict[str, dict[str, Any]]:
        sl = [r for r in results if "volume_id" in r]
        if not sl:
            return {}
        agg = aggregate_volume_scores([r["volume_id"] for r in sl], [r["score"] for r in sl], self.volume_aggregation, self.topk)
        return {v: {**self.decide(s), "n_slices": sum(r["volume_id"] == v for r in sl), "aggregation": self.volume_aggregation}
                for v, s in agg.items()}  # fmt: skip

    def _save_volume_map(self, path: Path, volume_path: str, slices: list[dict]) -> None:
        """Stack slice maps back into the volume's RAS grid (inverse of the slice display layout)."""
        import nibabel as nib

        vol = LoadMedicalImage(cache_volumes=0)(volume_path)
        shape = tuple(vol.shape[1:])
        grid = np.zeros(shape, np.float32)
        axis = self.volume_axis
        for r in slices:
            m = torch.from_numpy(r["map"])  # (H, W) display layout: undo transpose, then flips
            m = m.transpose(0, 1).flip(0, 1).numpy()
            idx = [slice(None)] * 3
            idx[axis] = r["slice_index"]
            grid[tuple(idx)] = m
        affine = np.asarray(getattr(vol, "affine", np.eye(4)), dtype=np.float64)
        img = nib.Nifti1Image(grid, affine)
        atomic_save(path, lambda f: f.write(img.to_bytes() if not str(path).endswith(".gz") else _gz(img)))


def _gz(img) -> bytes:
    import gzip

    return gzip.compress(img.to_bytes())


def _write_csv(path: Path, rows: list[dict]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())
