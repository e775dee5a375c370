"""From features to the anomaly map and image score (paper eq 7-8): the one implementation used by
the evaluator, bundle inference, MONAI Label, the MLflow model and the TorchScript/ONNX exports.

``M_ano = G_sigma * sum_l Upsample(M_l)`` (bilinear up-sampling to the input size, Gaussian
filter sigma = 4), image score ``S = max M_ano``. The Gaussian filter is a separable convolution
in torch with scipy's defaults (``truncate=4``, boundary mode ``reflect`` = half-sample symmetric),
so it matches ``scipy.ndimage.gaussian_filter`` and exports to TorchScript and ONNX.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from monai.inferers import Inferer
from torch import nn

from .losses import anomaly_maps

__all__ = [
    "GaussianBlur2d",
    "fuse_anomaly_maps",
    "anomaly_map_and_score",
    "AnomalyMapHead",
    "SkipTSInferer",
    "SkipTSPredictor",
]


def _symmetric_index(n: int, pad: int, device: torch.device) -> torch.Tensor:
    """Indices of a length-``n`` axis padded by ``pad`` on both sides, half-sample symmetric
    (``d c b a | a b c d | d c b a``), valid for any ``pad`` (repeats for short axes)."""
    i = torch.arange(-pad, n + pad, device=device)
    i = torch.remainder(i, 2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


class GaussianBlur2d(nn.Module):
    """Separable Gaussian filter on ``(B, C, H, W)``; equals ``scipy.ndimage.gaussian_filter(x,
    sigma, truncate=truncate, mode="reflect")`` per channel. ``sigma <= 0`` is the identity."""

    def __init__(self, sigma: float = 4.0, truncate: float = 4.0):
        super().__init__()
        self.sigma = float(sigma)
        radius = int(truncate * self.sigma + 0.5) if self.sigma > 0 else 0
        self.radius = radius
        if radius > 0:
            x = torch.arange(-radius, radius + 1, dtype=torch.float64)
            k = torch.exp(-0.5 * (x / self.sigma) ** 2)
            k = (k / k.sum()).float()
        else:
            k = torch.ones(1)
        self.register_buffer("kernel", k, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.radius == 0:
            return x
        b, c, h, w = x.shape
        r = self.radius
        k = self.kernel.to(x.dtype)
        y = x.reshape(b * c, 1, h, w)
        y = y.index_select(2, _symmetric_index(h, r, x.device))
        y = F.conv2d(y, k.view(1, 1, -1, 1))
        y = y.index_select(3, _symmetric_index(w, r, x.device))
        y = F.conv2d(y, k.view(1, 1, 1, -1))
        return y.reshape(b, c, h, w)


def fuse_anomaly_maps(maps: Sequence[torch.Tensor], size: Sequence[int], blur: nn.Module | None = None) -> torch.Tensor:
    """``sum_l Upsample(M_l)`` to ``size`` (bilinear, ``align_corners=False``), then ``blur``.

    Args:
        maps: ``(B, 1, h_l, w_l)`` maps.
        size: ``(H, W)`` of the input image.
    Returns:
        ``(B, 1, H, W)`` float32 map.
    """
    size = (int(size[0]), int(size[1]))
    fused = torch.zeros((maps[0].shape[0], 1) + size, device=maps[0].device, dtype=torch.float32)
    for m in maps:
        fused = fused + F.interpolate(m.float(), size=size, mode="bilinear", align_corners=False)
    return blur(fused) if blur is not None else fused


def anomaly_map_and_score(
    t_feats: Sequence[torch.Tensor],
    s_feats: Sequence[torch.Tensor],
    size: Sequence[int],
    sigma: float = 4.0,
    layers: Sequence[int] | None = None,
    similarity: str = "cosine",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anomaly map ``(B, 1, H, W)`` and score ``(B,)`` from teacher/student features (eq 1, 7, 8)."""
    return AnomalyMapHead(sigma, layers, similarity).to(t_feats[0].device)(t_feats, s_feats, size)


class AnomalyMapHead(nn.Module):
    """Module form of eq 1, 7, 8: ``(t_feats, s_feats, size) -> (map (B,1,H,W), score (B,))``."""

    def __init__(self, sigma: float = 4.0, layers: Sequence[int] | None = None, similarity: str = "cosine"):
        super().__init__()
        self.blur = GaussianBlur2d(sigma)
        self.layers = tuple(layers) if layers is not None else None
        self.similarity = similarity

    def forward(self, t_feats: Sequence[torch.Tensor], s_feats: Sequence[torch.Tensor], size: Sequence[int]):
        maps = anomaly_maps(t_feats, s_feats, self.similarity, self.layers)
        amap = fuse_anomaly_maps(maps, size, self.blur)
        return amap, amap.flatten(1).amax(dim=1)


class SkipTSPredictor(nn.Module):
    """Image to ``(anomaly map (B, 1, H, W), score (B,))``: the whole inference path in one module
    (teacher, student, maps, up-sampling, Gaussian filter, max) for export and serving.

    Args:
        model: a :class:`~monai_skipts.networks.SkipTS`.
        sigma, layers, similarity: see :class:`AnomalyMapHead`.
    """

    def __init__(self, model: nn.Module, sigma: float = 4.0, layers: Sequence[int] | None = None, similarity: str = "cosine"):
        super().__init__()
        self.model = model
        self.head = AnomalyMapHead(sigma, layers, similarity)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t, s = self.model(x)
        return self.head(t, s, x.shape[-2:])


class SkipTSInferer(Inferer):
    """MONAI inferer: ``inferer(inputs, network) -> anomaly map (B, 1, H, W)``.

    ``network`` is a :class:`~monai_skipts.networks.SkipTS` (its forward gives the features). The
    score is the map's maximum (:meth:`score`). Used by :class:`monai.engines.SupervisedEvaluator`.
    """

    def __init__(self, sigma: float = 4.0, layers: Sequence[int] | None = None, similarity: str = "cosine"):
        super().__init__()
        self.head = AnomalyMapHead(sigma, layers, similarity)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        t, s = network(inputs, *args, **kwargs)
        self.head = self.head.to(inputs.device)
        amap, _ = self.head(t, s, inputs.shape[-2:])
        return amap

    @staticmethod
    def score(amap: torch.Tensor) -> torch.Tensor:
        """Image score: the map's maximum over all but the batch dimension."""
        return amap.flatten(1).amax(dim=1) if amap.dim() > 1 else amap.amax()
