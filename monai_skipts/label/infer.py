"""MONAI Label infer task: the Skip-TS anomaly map as the label, score and decision in the result JSON.

Requires monailabel (``pip install 'monai-skipts[label]'``, in its own environment: it pins numpy < 2).

Request keys (besides MONAI Label's ``image``, ``device``, ...):

- ``output``: ``"map"`` (default): the float32 anomaly map; ``"mask"``: uint8 ``map >= t``, ``t`` the
  checkpoint's pixel threshold when calibrated, else the image threshold (``mask_threshold`` and
  ``mask_threshold_kind``, ``"pixel"`` or ``"image"``, in the result JSON);
- ``result_extension``: default ``.nrrd`` for 2-D maps, ``.png`` for 2-D masks, ``.nii.gz`` for volumes.

Result JSON (``params`` of MONAI Label's answer): ``score``, ``threshold``, ``threshold_kind``
(``"volume"``: a volume decided with the checkpoint's volume threshold; ``"image"``: the image
threshold, for images and for volumes when the checkpoint has no volume threshold), ``anomalous``
(``score >= threshold``), ``normalized_score`` (0.5 at the threshold), ``kind`` (``"image"``/``"volume"``),
``teacher``, ``modality``, and for volumes ``slice_scores`` and ``volume_aggregation``.

The label file holds the map at the input's geometry: 2-D images at their own size; volumes as a
volume on the loaded (RAS) grid with the input's affine, every slice along ``slice_axis`` scored.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

try:
    from monailabel.interfaces.tasks.infer_v2 import InferType
    from monailabel.tasks.infer.basic_infer import BasicInferTask
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(
        "monai_skipts.label.infer needs monailabel: pip install 'monai-skipts[label]' "
        "(in its own environment: monailabel pins numpy<2; see .ci/label_env.sh)"
    ) from e

from monai_skipts.inference import AnomalyPredictor

__all__ = ["SkipTSAnomalyInfer", "OUTPUTS"]

OUTPUTS = ("map", "mask")
_VOLUME_EXTENSIONS = (".nii", ".nii.gz")


class SkipTSAnomalyInfer(BasicInferTask):
    """Anomaly detection infer task for 2-D images and volumes.

    Args:
        checkpoint: monai-skipts checkpoint (``model.pt`` of a bundle run, with a calibrated threshold).
        scorer_kwargs: options of :class:`~monai_skipts.inference.AnomalyPredictor` (modality,
            spatial_size, window, mri_norm, sigma, teacher_weights, batch_size, volume_aggregation,
            slice_axis, backend, num_threads); defaults from the checkpoint. With ``backend``
            ``onnxruntime``/``openvino`` (``--conf backend onnxruntime``) the network runs as the
            exported graph on the CPU, whatever device a request names.
        description, dimension, config: as for MONAI Label's ``BasicInferTask``; ``config`` may set
            ``output`` (``"map"``/``"mask"``) as the default of requests.
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        scorer_kwargs: Mapping[str, Any] | None = None,
        description: str = "Skip-TS anomaly map (teacher-student distillation)",
        dimension: int = 2,
        config: Mapping[str, Any] | None = None,
    ):
        super().__init__(
            path=str(checkpoint),
            network=None,
            type=InferType.SEGMENTATION,
            labels={"anomaly": 1},
            dimension=dimension,
            description=description,
            config={"output": "map", **dict(config or {})},
        )
        self.scorer_kwargs = dict(scorer_kwargs or {})
        self._scorers: dict[str, tuple[AnomalyPredictor, float]] = {}

    # ---- model --------------------------------------------------------------------------------------

    def scorer(self, device: str = "cpu") -> AnomalyPredictor:
        """The :class:`AnomalyPredictor` for ``device``, rebuilt when the checkpoint file changes."""
        path = self.get_path()
        if path is None:
            raise FileNotFoundError(f"{self.path[-1] if self.path else None}: checkpoint not found")
        mtime = os.stat(path).st_mtime
        if str(self.scorer_kwargs.get("backend") or "torch") != "torch":
            device = "cpu"  # an exported backend (onnxruntime, openvino) serves on the CPU whatever the request
        cached = self._scorers.get(device)
        if cached is None or cached[1] != mtime:
            kwargs = {**self.scorer_kwargs, "device": device}
            self._scorers[device] = (AnomalyPredictor(path, **kwargs), mtime)
        return self._scorers[device][0]

    def _get_network(self, device, data):
        return self.scorer(str(device))

    def clear_cache(self):
        self._scorers.clear()

    clear = clear_cache

    # ---- pipeline -----------------------------------------------------------------------------------

    def pre_transforms(self, data=None) -> Sequence[Callable]:
        return [_LoadInput(self)]

    def post_transforms(self, data=None) -> Sequence[Callable]:
        return []

    def inverse_transforms(self, data=None):
        return None

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cuda"):
        output = str(data.get("output", "map"))
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        scorer = self.scorer(str(device))
        img = data[self.input_key]
        if img.ndim == 4:  # (C, X, Y, Z) RAS volume: slice-wise maps stacked into a map volume
            score, slice_scores, amap = scorer.score_volume(img)
            result = {
                "kind": "volume",
                "score": score,
                "slice_scores": [float(s) for s in slice_scores],
                "volume_aggregation": scorer.volume_aggregation,
            }
            pred = amap.as_tensor()
        else:  # (C, H, W): MONAI Label writes (x, y) arrays, i.e. (W, H)
            scores, maps = scorer.score_images([img])
            score, pred = float(scores[0]), maps[0].transpose(0, 1)
            result = {"kind": "image", "score": score}
        decision = scorer.decide_volume(score) if img.ndim == 4 else scorer.decide(score)
        decision.setdefault("threshold_kind", None if decision["threshold"] is None else "image")
        result.update(decision, teacher=scorer.teacher, modality=scorer.modality)
        if output == "mask":
            thr, kind = scorer.detector.outline_threshold()  # the pixel threshold when calibrated
            if thr is None:
                raise ValueError(f"{self.get_path()}: output 'mask' needs a calibrated threshold in the checkpoint")
            pred = (pred >= thr).to(torch.uint8)
            result.update(mask_threshold=thr, mask_threshold_kind=kind)
        affine = img.affine if img.ndim == 4 and isinstance(img, MetaTensor) else None
        data[self.output_label_key] = MetaTensor(pred, affine=affine) if affine is not None else pred.numpy()
        data[self.output_json_key] = result
        data.setdefault("result_extension", _extension(data, img.ndim == 4, output))
        data.setdefault("result_dtype", np.uint8 if output == "mask" else np.float32)
        return data


class _LoadInput:
    """Pre-transform: load ``data["image"]`` (a path) with the scorer's loader; arrays pass through."""

    def __init__(self, task: SkipTSAnomalyInfer):
        self.task = task

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        d = dict(data)
        key = self.task.input_key
        if isinstance(d[key], (str, os.PathLike)):
            d[key] = self.task.scorer(str(d.get("device", "cpu"))).load(d[key])
        return d


def _extension(data: Mapping[str, Any], volume: bool, output: str) -> str:
    if volume:
        path = str(data.get("image_path") or "")
        return next((e for e in _VOLUME_EXTENSIONS[::-1] if path.lower().endswith(e)), ".nii.gz")
    return ".png" if output == "mask" else ".nrrd"
