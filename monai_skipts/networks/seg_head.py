"""A light segmentation head on the teacher-student discrepancy (the second stage of DeSTSeg, Zhang et
al. CVPR 2023).

:class:`SegHead` reads, per level ``l`` of ``E1..E3``, the element-wise product of the L2-normalised
teacher and student features (whose channel sum is the cosine similarity of eq 1) and the cosine
discrepancy ``1 - cos`` itself; each level is reduced by a 1x1 convolution, brought to the resolution
of level 1 (bilinear), and two 3x3 convolutions (GroupNorm, ReLU) and a 1x1 convolution give a lesion
logit map, up-sampled (bilinear) to the image. It is trained on synthetic lesions with the teacher and
student frozen (:class:`~monai_skipts.engines.SegHeadTrainer`).

Held by an :class:`~monai_skipts.networks.AnomalyDetector` (``seg_head``), whose map it selects by
``mode`` (:data:`SEG_HEAD_MODES`):

- ``"discrepancy"``: the discrepancy map as it is (the head is kept but not used);
- ``"map"``: the head's lesion probability ``sigmoid(logit)``;
- ``"fused"``: ``(normalised discrepancy + probability) / 2``, the discrepancy normalised with the
  training normals' statistics in the buffer ``map_norm`` (``(offset, scale)``: the mean normal pixel,
  and the mean normal image maximum minus it, so a typical normal peak is 1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SEG_HEAD_MODES", "SegHead"]

#: the maps an :class:`~monai_skipts.networks.AnomalyDetector` with a head can give
SEG_HEAD_MODES = ("discrepancy", "map", "fused")


def _check_mode(mode: str) -> str:
    if mode not in SEG_HEAD_MODES:
        raise ValueError(f"seg head mode must be one of {list(SEG_HEAD_MODES)}, got {mode!r}")
    return mode


class SegHead(nn.Module):
    """Teacher/student features of ``E1..E3`` and the discrepancy map -> the selected anomaly map.

    Args:
        in_channels: channels of the teacher's ``E1..E3`` (the student's are the same).
        mode: the map :meth:`forward` gives (:data:`SEG_HEAD_MODES`).
        hidden: channels of the 3x3 convolutions.
        reduce: channels each level is reduced to (1x1 convolution) before they are joined.

    Attributes:
        config: ``{"mode", "in_channels", "hidden", "reduce"}`` (JSON-able: the head is rebuilt from it;
            an :class:`~monai_skipts.networks.AnomalyDetector` keeps it as ``config["seg_head"]``).
        map_norm: buffer ``(2,)`` ``(offset, scale)`` of the discrepancy map for ``"fused"``
            (``(0, 1)`` until fitted).

    Raises:
        ValueError: an unknown mode, or no levels.

    >>> head = SegHead([24, 40, 112], mode="map")
    >>> t = [torch.randn(2, c, 16 // 2**i, 16 // 2**i) for i, c in enumerate([24, 40, 112])]
    >>> s = [f + 0.1 * torch.randn_like(f) for f in t]
    >>> prob = head(t, s, torch.zeros(2, 1, 64, 64))
    >>> tuple(prob.shape), bool(((prob > 0) & (prob < 1)).all())
    ((2, 1, 64, 64), True)
    """

    def __init__(self, in_channels: Sequence[int], mode: str = "map", hidden: int = 64, reduce: int = 32):
        super().__init__()
        in_channels = [int(c) for c in in_channels]
        if not in_channels:
            raise ValueError("SegHead needs the channels of at least one feature level")
        self.config: dict[str, Any] = {
            "mode": _check_mode(mode),
            "in_channels": in_channels,
            "hidden": int(hidden),
            "reduce": int(reduce),
        }
        self.reduce = nn.ModuleList(nn.Conv2d(c + 1, int(reduce), kernel_size=1) for c in in_channels)
        groups = 8 if int(hidden) % 8 == 0 else 1
        self.body = nn.Sequential(
            nn.Conv2d(int(reduce) * len(in_channels), int(hidden), kernel_size=3, padding=1),
            nn.GroupNorm(groups, int(hidden)),
            nn.ReLU(inplace=True),
            nn.Conv2d(int(hidden), int(hidden), kernel_size=3, padding=1),
            nn.GroupNorm(groups, int(hidden)),
            nn.ReLU(inplace=True),
            nn.Conv2d(int(hidden), 1, kernel_size=1),
        )
        self.register_buffer("map_norm", torch.tensor([0.0, 1.0], dtype=torch.float32))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> SegHead:
        """The (untrained) head a :attr:`config` describes."""
        return cls(config["in_channels"], config.get("mode", "map"), config.get("hidden", 64), config.get("reduce", 32))

    @property
    def mode(self) -> str:
        return self.config["mode"]

    @mode.setter
    def mode(self, value: str) -> None:
        self.config["mode"] = _check_mode(value)

    def set_map_norm(self, offset: float, scale: float) -> None:
        """Set the discrepancy map's normalisation of ``"fused"`` (``scale > 0``)."""
        if not scale > 0:
            raise ValueError(f"map_norm scale must be > 0, got {scale}")
        self.map_norm.copy_(torch.tensor([float(offset), float(scale)], dtype=torch.float32))

    def logits(self, t_feats: Sequence[torch.Tensor], s_feats: Sequence[torch.Tensor], size: Sequence[int]):
        """The lesion logit map ``(B, 1, H, W)`` at ``size`` (float32)."""
        base = t_feats[0].shape[-2:]
        parts = []
        for conv, t, s in zip(self.reduce, t_feats, s_feats):
            prod = F.normalize(t.float(), dim=1) * F.normalize(s.float(), dim=1)
            y = conv(torch.cat([prod, 1.0 - prod.sum(dim=1, keepdim=True)], dim=1))
            if y.shape[-2:] != base:
                y = F.interpolate(y, size=base, mode="bilinear", align_corners=False)
            parts.append(y)
        out = self.body(torch.cat(parts, dim=1))
        return F.interpolate(out, size=(int(size[0]), int(size[1])), mode="bilinear", align_corners=False)

    def forward(
        self, t_feats: Sequence[torch.Tensor], s_feats: Sequence[torch.Tensor], discrepancy: torch.Tensor
    ) -> torch.Tensor:
        """The map of :attr:`mode` ``(B, 1, H, W)``, ``discrepancy`` being the detector's map (its size)."""
        mode = self.mode
        if mode == "discrepancy":
            return discrepancy
        prob = torch.sigmoid(self.logits(t_feats, s_feats, discrepancy.shape[-2:]))
        if mode == "map":
            return prob
        norm = (discrepancy - self.map_norm[0]) / self.map_norm[1]
        return 0.5 * (norm + prob)
