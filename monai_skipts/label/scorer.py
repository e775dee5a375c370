"""Serving core: a trained checkpoint scoring files and arrays with the bundle's preprocessing.

:class:`AnomalyScorer` is what MONAI Label (:mod:`monai_skipts.label.infer`) and the MLflow model
(:mod:`monai_skipts.registry`) run. It needs neither monailabel nor mlflow.

- 2-D images (PNG/JPEG/TIFF, single-frame DICOM, single-slice NIfTI): preprocessed exactly as in
  training (:func:`~monai_skipts.transforms.build_preprocessing` with the stored modality and spatial
  size), scored in batches by :class:`~monai_skipts.inferers.SkipTSPredictor`; maps are returned at the
  image's own size (bilinear), scores are those of the model-size map (as the evaluator's).
- Volumes (NIfTI, NRRD, DICOM series / multi-frame): every slice along ``slice_axis`` is scored as a
  2-D image; the maps are put back in place, giving a map volume on the RAS grid of the loaded volume
  (affine kept), and the volume score is :func:`~monai_skipts.transforms.aggregate_volume_scores` of
  the slice scores (``"max"`` by default).
- Arrays: ``(H, W)`` or ``(C, H, W)``; see :func:`array_to_image` for the intensity conventions.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor

from monai_skipts.checkpoint import load_checkpoint, load_model
from monai_skipts.inferers import SkipTSPredictor
from monai_skipts.metrics import normalize_score
from monai_skipts.transforms import (
    LoadMedicalImage,
    VolumeToSlices,
    aggregate_volume_scores,
    build_preprocessing,
)
from monai_skipts.utils import InputDataError

__all__ = ["AnomalyScorer", "array_to_image", "slice_to_plane", "scorer_options", "scorer_from_conf"]


def array_to_image(array: Any, bit_depth: int | None = None, name: str | None = None) -> MetaTensor:
    """An in-memory image ``(H, W)`` or ``(C, H, W)`` (C in 1..4) as the loader would give it.

    Intensity conventions (so that an array read from a file scores like the file):

    - ``bit_depth`` 8 or 16, or an ``uint8``/``uint16`` array: a picture with that bit range
      (0..255 / 0..65535), like a PNG; CT presets scale such pictures by the bit range too;
    - otherwise raw values: HU for the CT windows, the image's own min-max for bit-range presets.

    Raises:
        InputDataError: wrong shape, not numeric or not finite (``name`` labels the input).
    """
    arr = np.asarray(array)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise InputDataError(name, f"is not a numeric image array (dtype {arr.dtype})")
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[0] not in (1, 2, 3, 4):
        raise InputDataError(name, f"has shape {tuple(np.shape(array))}; expected (H, W) or (C, H, W) with C in 1..4")
    if bit_depth in (None, 0):
        bit_depth = {np.dtype(np.uint8): 8, np.dtype(np.uint16): 16}.get(arr.dtype)
    if bit_depth not in (None, 8, 16):
        raise ValueError(f"bit_depth must be 8, 16 or 0/None (raw values), got {bit_depth}")
    data = torch.from_numpy(arr.astype(np.float32, copy=False))
    if not bool(torch.isfinite(data).all()):
        raise InputDataError(name, "contains NaN/inf values")
    if bit_depth is None:
        meta = {"source_format": "array", "value_min": math.nan, "value_max": math.nan}
    else:
        meta = {"source_format": "picture", "value_min": 0.0, "value_max": float(2**bit_depth - 1)}
    meta.update(filename_or_obj=name or "", spatial_shape=tuple(arr.shape[1:]))
    return MetaTensor(data, meta=meta)


def slice_to_plane(plane: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`~monai_skipts.transforms.take_slice`'s display layout: an ``(H, W)`` slice
    map back to the ``(A, B)`` plane of the volume (the two remaining axes in RAS order)."""
    return plane.transpose(0, 1).flip(0, 1)


class AnomalyScorer:
    """Anomaly maps, scores and decisions from a monai-skipts checkpoint.

    Args:
        checkpoint: path of a checkpoint (``model.pt`` of a bundle run) or the loaded dict.
        modality, spatial_size, window, mri_norm: preprocessing (see
            :func:`~monai_skipts.transforms.build_preprocessing`); default: the checkpoint's ``extra``
            entries, spatial size 256.
        sigma: Gaussian sigma; default the checkpoint's ``extra["sigma"]`` or 4.
        teacher_weights: teacher weights file when not in the default place.
        device: ``"cpu"``, ``"cuda"``, ``"auto"``.
        batch_size: images per forward pass.
        volume_aggregation, topk: slice scores to volume score (``"max"``, ``"mean"``, ``"topk"``).
        slice_axis: axis of the RAS volume to slice along (2 = axial).

    Attributes:
        threshold: the calibration record (``None`` when the checkpoint has none).
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike | dict[str, Any],
        modality: str | None = None,
        spatial_size: int | Sequence[int] | None = None,
        window: str | Sequence[float] | None = None,
        mri_norm: str | None = None,
        sigma: float | None = None,
        teacher_weights: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 8,
        volume_aggregation: str = "max",
        topk: int = 3,
        slice_axis: int = 2,
    ):
        from monai_skipts.engines import resolve_device

        source = "checkpoint" if isinstance(checkpoint, dict) else str(checkpoint)
        ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
        extra = ckpt.get("extra") or {}
        self.modality = modality or extra.get("modality")
        if not self.modality:
            raise ValueError(f"{source}: the checkpoint stores no modality; pass modality=<preset name>")
        self.spatial_size = spatial_size or extra.get("spatial_size") or 256
        self.window = window if window is not None else extra.get("window")
        self.mri_norm = mri_norm or extra.get("mri_norm") or "percentile"
        self.sigma = float(sigma if sigma is not None else extra.get("sigma", 4.0))
        self.device = resolve_device(device)
        self.batch_size = int(batch_size)
        self.volume_aggregation, self.topk, self.slice_axis = volume_aggregation, int(topk), int(slice_axis)
        self.threshold: dict[str, Any] | None = ckpt.get("threshold")
        model, _ = load_model(ckpt, teacher_weights=teacher_weights, map_location=self.device)
        self.teacher = model.config["teacher"]
        self.predictor = SkipTSPredictor(model, sigma=self.sigma).to(self.device).eval()
        self.loader = LoadMedicalImage()
        self.preprocess = build_preprocessing(
            self.modality, self.spatial_size, window=self.window, mri_norm=self.mri_norm, load=False
        )  # fmt: skip

    def config(self) -> dict[str, Any]:
        """The serving configuration (JSON-able), enough to rebuild this scorer from the checkpoint."""
        size = self.spatial_size if isinstance(self.spatial_size, int) else list(self.spatial_size)
        return {
            "modality": self.modality, "spatial_size": size, "window": self.window, "mri_norm": self.mri_norm,
            "sigma": self.sigma, "volume_aggregation": self.volume_aggregation, "topk": self.topk,
            "slice_axis": self.slice_axis, "batch_size": self.batch_size,
        }  # fmt: skip

    # ---- model ------------------------------------------------------------------------------------

    def _model_input(self, image: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.preprocess({"image": image})["image"])

    @torch.no_grad()
    def predict(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Preprocessed ``(N, 3, S, S)`` -> maps ``(N, 1, S, S)`` and scores ``(N,)`` (CPU, float32)."""
        maps, scores = [], []
        for i in range(0, len(batch), self.batch_size):
            m, s = self.predictor(batch[i : i + self.batch_size].to(self.device))
            maps.append(m.float().cpu())
            scores.append(s.float().cpu())
        if not maps:
            return torch.zeros(0, 1, 1, 1), torch.zeros(0)
        return torch.cat(maps), torch.cat(scores)

    def _score_slices(self, images: Sequence[torch.Tensor], maps: bool):
        maps_s, scores = self.predict(torch.stack([self._model_input(im) for im in images]))
        out = None
        if maps:
            out = [
                F.interpolate(m[None], size=tuple(im.shape[-2:]), mode="bilinear", align_corners=False)[0, 0]
                for m, im in zip(maps_s, images)
            ]
        return scores.numpy().astype(np.float64), out

    # ---- public API ---------------------------------------------------------------------------------

    def load(self, path: str | os.PathLike) -> MetaTensor:
        """Load a file: ``(C, H, W)`` for 2-D sources, ``(C, X, Y, Z)`` RAS for volumes."""
        return self.loader(str(path))

    def score_images(self, images: Sequence[torch.Tensor], maps: bool = True):
        """Score 2-D images ``(C, H, W)`` (loaded, or from :func:`array_to_image`).

        Returns:
            ``(scores (N,) float64, maps)``: maps is a list of ``(H, W)`` float32 tensors at each
            image's size, or ``None`` when ``maps`` is False.
        """
        if not len(images):
            return np.zeros(0), ([] if maps else None)
        return self._score_slices(images, maps)

    def score_volume(self, volume: torch.Tensor, maps: bool = True):
        """Score a RAS volume ``(C, X, Y, Z)`` slice by slice.

        Returns:
            ``(volume score, slice scores (n,), map)``: map is a ``(X, Y, Z)`` float32 ``MetaTensor``
            with the volume's affine (zeros on slices not scored), or ``None``.
        """
        slicer = VolumeToSlices(axis=self.slice_axis)
        indices = slicer.indices(volume)
        if not indices:
            raise InputDataError(getattr(volume, "meta", {}).get("filename_or_obj"), "volume has no slices to score")
        slices = slicer(volume, indices)
        scores, planes = self._score_slices(slices, maps)
        vid = "volume"
        vscore = aggregate_volume_scores([vid] * len(scores), scores, self.volume_aggregation, self.topk)[vid]
        if not maps:
            return vscore, scores, None
        out = torch.zeros(volume.shape[1:], dtype=torch.float32)
        for k, plane in zip(indices, planes):
            out.select(self.slice_axis, k).copy_(slice_to_plane(plane))
        affine = volume.affine if isinstance(volume, MetaTensor) else None
        return vscore, scores, MetaTensor(out, affine=affine)

    def score_file(self, path: str | os.PathLike, maps: bool = True) -> dict[str, Any]:
        """Score one file (2-D image or volume): ``{"kind", "score", "map", "slice_scores"}`` plus the
        decision (:meth:`decide`)."""
        img = self.load(path)
        if img.ndim == 4:
            score, slice_scores, amap = self.score_volume(img, maps)
            out = {"kind": "volume", "score": score, "map": amap, "slice_scores": slice_scores.tolist()}
        else:
            scores, amaps = self.score_images([img], maps)
            out = {"kind": "image", "score": float(scores[0]), "map": amaps[0] if maps else None}
        out["image"] = img
        out.update(self.decide(out["score"]))
        return out

    def decide(self, score: float) -> dict[str, Any]:
        """``{"threshold", "anomalous", "normalized_score"}`` for a score (``None`` where the checkpoint
        has no threshold, or no scale for the normalised score). ``anomalous`` is ``score >= threshold``."""
        thr = self.threshold or {}
        value, scale = thr.get("value"), thr.get("scale")
        if value is None:
            return {"threshold": None, "anomalous": None, "normalized_score": None}
        norm = normalize_score(float(score), value, scale) if scale is not None and scale > 0 else None
        return {"threshold": float(value), "anomalous": bool(score >= value), "normalized_score": norm}


def _resolve(path: str | os.PathLike | None, base_dir: str | os.PathLike | None = None) -> Path | None:
    """``path`` made absolute: ``~`` expanded, a relative path taken against ``base_dir`` (default: the
    current working directory)."""
    if path is None:
        return None
    path = Path(path).expanduser()
    if not path.is_absolute():
        path = Path(os.getcwd() if base_dir is None else base_dir) / path
    return path.resolve()


def scorer_options(conf: Mapping[str, Any], base_dir: str | os.PathLike | None = None) -> tuple[Path, dict[str, Any]]:
    """``(checkpoint path, AnomalyScorer keyword arguments)`` from string settings (MONAI Label
    ``--conf`` pairs): ``checkpoint`` (required), ``modality``, ``spatial_size``, ``window``,
    ``mri_norm``, ``sigma``, ``teacher_weights``, ``device``, ``batch_size``, ``volume_aggregation``,
    ``slice_axis``. Unset keys keep the checkpoint's defaults.

    Paths (``checkpoint``, ``teacher_weights``) are returned absolute; a relative one is taken against
    ``base_dir``, by default the current working directory: for ``monailabel start_server ... --conf
    checkpoint runs/x/model.pt`` the folder the server was started from, as a user expects."""
    if not conf.get("checkpoint"):
        raise ValueError("conf 'checkpoint' is required: the path of a monai-skipts checkpoint (model.pt)")
    ckpt = _resolve(conf["checkpoint"], base_dir)
    casts = {"modality": str, "spatial_size": int, "window": str, "mri_norm": str, "sigma": float,
             "teacher_weights": lambda p: _resolve(p, base_dir), "device": str, "batch_size": int,
             "volume_aggregation": str, "slice_axis": int}  # fmt: skip
    kwargs = {k: cast(conf[k]) for k, cast in casts.items() if conf.get(k) not in (None, "")}
    return ckpt, kwargs  # type: ignore[return-value]


def scorer_from_conf(conf: Mapping[str, Any], base_dir: str | os.PathLike | None = None) -> AnomalyScorer:
    """An :class:`AnomalyScorer` from string settings (see :func:`scorer_options`)."""
    ckpt, kwargs = scorer_options(conf, base_dir)
    return AnomalyScorer(ckpt, **kwargs)
