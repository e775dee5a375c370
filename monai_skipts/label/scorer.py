"""Serving settings for MONAI Label: the predictor from ``--conf`` string settings.

The serving core is :class:`~monai_skipts.inference.AnomalyPredictor`, the package's one predictor
(bundle inference, MONAI Label, the MLflow model). It needs neither monailabel nor mlflow.

- 2-D images (PNG/JPEG/TIFF, single-frame DICOM, single-slice NIfTI): preprocessed exactly as in
  training (:func:`~monai_skipts.transforms.preset_transforms` with the checkpoint's options), scored in
  batches; maps are returned at the image's own size (bilinear), scores are those of the model-size
  map (as the evaluator's).
- Volumes (NIfTI, NRRD, DICOM series / multi-frame): every slice along ``slice_axis`` is scored as a
  2-D image; the maps are put back in place, giving a map volume on the RAS grid of the loaded volume
  (affine kept), and the volume score aggregates the slice scores (``"max"`` by default).
- Arrays: ``(H, W)`` or ``(C, H, W)``; see :func:`~monai_skipts.transforms.array_to_image` for the
  intensity conventions.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monai_skipts.inference import AnomalyPredictor

__all__ = ["scorer_options", "scorer_from_conf"]


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
    """``(checkpoint path, AnomalyPredictor keyword arguments)`` from string settings (MONAI Label
    ``--conf`` pairs): ``checkpoint`` (required), ``modality``, ``spatial_size``, ``window``,
    ``mri_norm``, ``sigma``, ``teacher_weights``, ``device``, ``batch_size``, ``volume_aggregation``,
    ``slice_axis``, ``backend`` (``torch`` | ``onnxruntime`` | ``openvino``: the network's runtime, see
    :class:`~monai_skipts.inference.AnomalyPredictor`), ``num_threads``. Unset keys keep the
    checkpoint's defaults.

    Paths (``checkpoint``, ``teacher_weights``) are returned absolute; a relative one is taken against
    ``base_dir``, by default the current working directory: for ``monailabel start_server ... --conf
    checkpoint runs/x/model.pt`` the folder the server was started from, as a user expects."""
    if not conf.get("checkpoint"):
        raise ValueError("conf 'checkpoint' is required: the path of a monai-skipts checkpoint (model.pt)")
    ckpt = _resolve(conf["checkpoint"], base_dir)
    casts = {
        "modality": str,
        "spatial_size": int,
        "window": str,
        "mri_norm": str,
        "sigma": float,
        "teacher_weights": lambda p: _resolve(p, base_dir),
        "device": str,
        "batch_size": int,
        "volume_aggregation": str,
        "slice_axis": int,
        "backend": str,
        "num_threads": int,
    }
    kwargs = {k: cast(conf[k]) for k, cast in casts.items() if conf.get(k) not in (None, "")}
    return ckpt, kwargs  # type: ignore[return-value]


def scorer_from_conf(conf: Mapping[str, Any], base_dir: str | os.PathLike | None = None) -> AnomalyPredictor:
    """An :class:`~monai_skipts.inference.AnomalyPredictor` from string settings (see :func:`scorer_options`)."""
    ckpt, kwargs = scorer_options(conf, base_dir)
    return AnomalyPredictor(ckpt, **kwargs)
