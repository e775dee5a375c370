"""The trained model an evaluation bundle scores with: :func:`load_trained_model` rebuilds it from
its checkpoint with its threshold and the preprocessing it was trained with (:class:`TrainedModel`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["TrainedModel", "load_trained_model"]


@dataclass
class TrainedModel:
    """A calibrated checkpoint rebuilt for evaluation (what :func:`load_trained_model` returns).

    Attributes:
        network: the :class:`~monai_skipts.networks.AnomalyDetector`, in eval mode, on the requested device.
        checkpoint: the checkpoint dictionary (version 2).
        threshold: the calibrated decision threshold (``None`` when the checkpoint has none).
        score_scale: the validation normals' score standard deviation (for the normalised score).
        spec: the preprocessing the model was trained with, ``{"modality", "spatial_size", "window",
            "mri_norm"}`` (:func:`~monai_skipts.transforms.preprocessing_spec`).
        pixel_threshold: the calibrated map threshold of the outlines (the detector's
            ``pixel_threshold``), ``None`` when the checkpoint has none.
    """

    network: torch.nn.Module
    checkpoint: dict[str, Any]
    threshold: float | None
    score_scale: float | None
    spec: dict[str, Any]
    pixel_threshold: float | None = None

    @property
    def teacher(self) -> str:
        """The teacher's registered name."""
        return str(self.network.config["model"]["teacher"])

    @property
    def modality(self) -> str:
        """The modality preset the model was trained with."""
        return self.spec["modality"]

    @property
    def spatial_size(self) -> int | Sequence[int]:
        """The side (or ``(H, W)``) the model was trained at."""
        return self.spec["spatial_size"]

    def preprocessing(self, mask_key: str | None = "mask") -> list:
        """The trained preprocessing (:func:`~monai_skipts.transforms.preset_transforms` with
        :attr:`spec`) as a list of transforms on the key ``image``, masks under ``mask_key`` included."""
        from monai_skipts.transforms import preset_transforms

        return preset_transforms(**self.spec, keys="image", mask_key=mask_key)


def load_trained_model(
    checkpoint: str | os.PathLike,
    teacher_weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    modality: str | None = None,
    spatial_size: int | Sequence[int] | None = None,
) -> TrainedModel:
    """Rebuild a trained detector from its checkpoint (:func:`~monai_skipts.checkpoint.load_detector`)
    with its threshold and the preprocessing it was trained with. The checkpoint's preprocessing wins:
    ``modality`` and ``spatial_size`` fill only what it does not record.

    Args:
        checkpoint: ``model.pt`` of a training run.
        teacher_weights: the teacher's weights file, when not in torchvision's cache.
        device: where the model goes.
        modality, spatial_size: used only when the checkpoint does not record them (older checkpoints).

    Raises:
        ValueError: the checkpoint records no modality and none is given.
    """
    from monai_skipts.checkpoint import load_checkpoint, load_detector
    from monai_skipts.transforms import preprocessing_spec

    ckpt = load_checkpoint(checkpoint)
    network = load_detector(ckpt, teacher_weights, map_location=device)
    decision = network.decide(0.0)
    scale, pixel = float(network.scale), float(network.pixel_threshold)
    spec = preprocessing_spec(
        network.config["preprocessing"], defaults={"modality": modality, "spatial_size": spatial_size}
    )
    if not spec["modality"]:
        raise ValueError(f"{checkpoint}: the checkpoint records no modality; pass --modality <preset name>")
    return TrainedModel(
        network=network,
        checkpoint=ckpt,
        threshold=decision["threshold"],
        score_scale=None if math.isnan(scale) else scale,
        spec=spec,
        pixel_threshold=None if math.isnan(pixel) else pixel,
    )
