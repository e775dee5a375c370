"""RD4AD's one-class bottleneck embedding (Deng & Li, CVPR 2022): the student front end that fuses the
teacher's E1..E3 into a compact code the decoder must expand; used by
:class:`~monai_skipts.networks.RD4AD` and by :class:`~monai_skipts.networks.SkipTS` with
``bottleneck=True``."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from monai_skipts.networks.student import EXPANSION, Residual, SkipStudent, expand_project

__all__ = ["OneClassBottleneck", "RD4ADStudent"]


def _conv_bn_relu(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class _DownBlock(Residual):
    """Stride-2 residual block ``(B, cin, h, w) -> (B, cout, h/2, w/2)``: 1×1 → 3×3 s2 → 1×1 with a
    strided 1×1 shortcut (a ResNet bottleneck; ``depthwise`` makes it an inverted residual)."""

    def __init__(self, cin: int, cout: int, width: int, depthwise: bool = False):
        mid = lambda: nn.Conv2d(width, width, 3, stride=2, padding=1, groups=width if depthwise else 1, bias=False)  # noqa: E731
        body = expand_project(cin, width, cout, mid)
        super().__init__(body, nn.Sequential(nn.Conv2d(cin, cout, 1, stride=2, bias=False), nn.BatchNorm2d(cout)))


class OneClassBottleneck(nn.Module):
    """RD4AD's OCBE: ``[E1, E2, E3] -> (B, c4, h/32, w/32)``.

    Args:
        teacher_channels: channels of E1..E4.
        width: width of the embedding block (default: ``c4``, RD4AD's ``layer4`` width ratio).
        depthwise: inverted-residual embedding block (EfficientNet teachers) instead of a bottleneck.
    """

    def __init__(self, teacher_channels: Sequence[int], width: int | None = None, depthwise: bool = False):
        super().__init__()
        c1, c2, c3, c4 = (int(c) for c in teacher_channels)
        self.fuse1 = nn.Sequential(*_conv_bn_relu(c1, c2, 2), *_conv_bn_relu(c2, c3, 2))
        self.fuse2 = nn.Sequential(*_conv_bn_relu(c2, c3, 2))
        width = int(width) if width is not None else (EXPANSION * 3 * c3 if depthwise else c4)
        self.embed = _DownBlock(3 * c3, c4, width, depthwise)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        e1, e2, e3 = feats[:3]
        return self.embed(torch.cat([self.fuse1(e1), self.fuse2(e2), e3], dim=1))


class RD4ADStudent(nn.Module):
    """OCBE + decoder: ``[E1, E2, E3, E4] -> [F_s^1, F_s^2, F_s^3]``; E4 is replaced by the
    bottleneck's code, E2 and E3 reach the decoder's skips (used only when the decoder has skips:
    RD4AD's has none)."""

    def __init__(self, teacher_channels: Sequence[int], decoder: SkipStudent, depthwise: bool = False):
        super().__init__()
        self.bottleneck = OneClassBottleneck(teacher_channels, depthwise=depthwise)
        self.decoder = decoder

    def forward(self, t_feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        code = self.bottleneck(t_feats)
        return self.decoder([*t_feats[:3], code])
