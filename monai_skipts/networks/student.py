"""Skip-TS student (S-Net): a randomly initialised decoder that mirrors the teacher.

Sub-decoders D3, D2, D1. D3 takes the teacher's deepest feature ``F_t^4`` and outputs ``F_s^3``
(shape of ``F_t^3``). Dj (j = 2, 1) takes ``F_t^{j+1} + F_s^{j+1}`` (the skip connection) and
outputs ``F_s^j``. Each sub-decoder starts with an up-sampling block (transposed convolution,
stride 2) followed by blocks at the output resolution.

Decoder kinds:

- ``"bottleneck"`` (wide_resnet50_2, resnet50): reversed bottleneck stages with the teacher's
  widths; block counts 6, 4, 3 for D3, D2, D1 (paper).
- ``"basic"`` (resnet18): basic residual blocks, two per stage, mirroring the teacher.
- ``"inverted"`` (EfficientNet-Lite): inverted residual blocks (1×1 expand, 3×3 depthwise, 1×1
  project; expansion 6), mirroring the teacher's MBConv blocks; the up-sampling block's depthwise
  convolution is transposed.

Up-sampling kernel 3 (the paper, mirroring the teacher's 3×3 stride-2 convolutions); kernel 2 is
the official code's choice (``upsample_kernel=2``). Skip modes: ``"add"`` (paper), ``"add_relu"``
(official code: ``relu(F_s + F_t)``), ``"none"`` (ablation "DRKD w/o SC": Dj sees only ``F_s^{j+1}``),
``"gate"`` (ours: ``F_s + sigmoid(g) ⊙ F_t`` with a learned gate ``g`` per channel, initially 0.5).

Options of ours, to limit how much of the teacher's own (possibly anomalous) features the skips hand
the student: ``skip_levels`` (which of the two skips exist), ``skip_dropout`` (channel dropout on the
teacher part, training only) and ``skip_noise`` (Gaussian noise on the teacher part, training only).
Their defaults are the paper's: both skips, no dropout, no noise.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "SkipStudent",
    "UpBottleneck",
    "Bottleneck",
    "UpBasicBlock",
    "BasicBlock",
    "UpInvertedResidual",
    "InvertedResidual",
    "Residual",
    "expand_project",
    "SKIP_MODES",
    "SKIP_LEVELS",
    "EXPANSION",
]

SKIP_MODES = ("add", "add_relu", "none", "gate")
#: teacher levels that can feed a skip: F_t^3 joins before D2, F_t^2 before D1
SKIP_LEVELS = (3, 2)
#: expansion of the inverted-residual blocks' widths over their in/out channels (EfficientNet's MBConv)
EXPANSION = 6


def _deconv(cin: int, cout: int, kernel: int) -> nn.ConvTranspose2d:
    """Transposed conv, stride 2, exactly doubling the spatial size for kernel 2 or 3."""
    if kernel == 3:
        return nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1, bias=False)
    if kernel == 2:
        return nn.ConvTranspose2d(cin, cout, 2, stride=2, bias=False)
    raise ValueError(f"upsample_kernel must be 2 or 3, got {kernel}")


class Residual(nn.Module):
    """``act(body(x) + shortcut(x))``, the form of every block below; the shortcut is the identity
    for blocks at constant resolution and a stride-2 transposed convolution for up-sampling blocks."""

    def __init__(self, body: nn.Module, shortcut: nn.Module | None = None, act: bool = True):
        super().__init__()
        self.body = body
        self.shortcut = shortcut if shortcut is not None else nn.Identity()
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


def _up_shortcut(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(_deconv(cin, cout, kernel), nn.BatchNorm2d(cout))


def expand_project(cin: int, width: int, cout: int, mid: Callable[[], nn.Module]) -> nn.Sequential:
    """1×1 to ``width`` → ``mid()`` → 1×1 to ``cout``, each followed by BatchNorm (ReLU after the
    first two): the body of bottleneck and inverted-residual blocks. ``mid`` is built between the
    two 1×1 convolutions, so parameters are initialised in layer order."""
    return nn.Sequential(
        nn.Conv2d(cin, width, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        mid(),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.Conv2d(width, cout, 1, bias=False),
        nn.BatchNorm2d(cout),
    )


class Bottleneck(Residual):
    """Bottleneck residual block at constant resolution: 1×1 → 3×3 → 1×1, ``channels`` in and out."""

    def __init__(self, channels: int, width: int, act: bool = True):
        body = expand_project(channels, width, channels, lambda: nn.Conv2d(width, width, 3, padding=1, bias=False))
        super().__init__(body, act=act)


class UpBottleneck(Residual):
    """Up-sampling bottleneck: ``(B, cin, h, w) -> (B, cout, 2h, 2w)``; the 3×3 conv and the shortcut
    are stride-2 transposed convolutions (the mirror of torchvision's stride-2 bottleneck)."""

    def __init__(self, cin: int, cout: int, width: int, kernel: int = 3, act: bool = True):
        body = expand_project(cin, width, cout, lambda: _deconv(width, width, kernel))
        super().__init__(body, _up_shortcut(cin, cout, kernel), act=act)


class BasicBlock(Residual):
    """Basic residual block (two 3×3 convs) at constant resolution."""

    def __init__(self, channels: int, act: bool = True):
        body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )
        super().__init__(body, act=act)


class UpBasicBlock(Residual):
    """Up-sampling basic block: ``(B, cin, h, w) -> (B, cout, 2h, 2w)``."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, act: bool = True):
        body = nn.Sequential(
            _deconv(cin, cout, kernel),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
        )
        super().__init__(body, _up_shortcut(cin, cout, kernel), act=act)


class InvertedResidual(Residual):
    """MobileNetV2/EfficientNet inverted residual at constant resolution: 1×1 expand → 3×3 depthwise
    → 1×1 project, ``channels`` in and out (the mirror of an MBConv block)."""

    def __init__(self, channels: int, width: int, act: bool = True):
        dw = lambda: nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False)  # noqa: E731
        super().__init__(expand_project(channels, width, channels, dw), act=act)


class UpInvertedResidual(Residual):
    """Up-sampling inverted residual: 1×1 expand → 3×3 depthwise transposed conv (stride 2) → 1×1
    project, with a transposed-conv shortcut: ``(B, cin, h, w) -> (B, cout, 2h, 2w)``."""

    def __init__(self, cin: int, cout: int, width: int, kernel: int = 3, act: bool = True):
        # The depthwise layer takes _deconv's geometry. It is built before the 1×1 convolutions, and
        # the dense _deconv it is read from draws from the RNG too: both stay as they were, so that a
        # seed gives the same initial student as the runs whose results the README reports.
        geometry = _deconv(width, width, kernel)
        dw = nn.ConvTranspose2d(
            width,
            width,
            geometry.kernel_size,
            stride=2,
            padding=geometry.padding,
            output_padding=geometry.output_padding,
            groups=width,
            bias=False,
        )
        super().__init__(expand_project(cin, width, cout, lambda: dw), _up_shortcut(cin, cout, kernel), act=act)


class SkipStudent(nn.Module):
    """The student decoder D3, D2, D1 with skip connections from the teacher.

    Args:
        teacher_channels: channels of the teacher's E1..E4.
        kind: ``"bottleneck"``, ``"inverted"`` or ``"basic"`` (see module docstring).
        blocks: blocks per sub-decoder (D3, D2, D1), the up-sampling block included.
        widths: bottleneck widths of the blocks after the up-sampling block in D3, D2, D1
            (``kind="bottleneck"`` only); default: out-channels / 2.
        up_widths: bottleneck widths of the up-sampling blocks; default: in-channels / 2. Each
            up-sampling block mirrors the teacher's stride-2 block it inverts (for wide_resnet50_2,
            D3's first block inverts layer4's first block: width 1024), the blocks after it mirror
            the teacher's blocks at the output resolution (D3: layer3's, width 512).
        upsample_kernel: 3 (paper) or 2 (official code).
        skip: how ``F_t^{j+1}`` joins ``F_s^{j+1}`` before Dj: ``"add"`` (paper, ``F_s + F_t``),
            ``"add_relu"`` (official code, ``relu(F_s + F_t)``), ``"none"`` (ablation: ``F_s``
            only; the same as ``skip_levels=()``) or ``"gate"`` (ours: ``F_s + sigmoid(g) ⊙ F_t``,
            ``g`` a learned parameter per channel and level, initialised to 0, i.e. a gate of 0.5).
        final_activation: end each sub-decoder with a ReLU. Right for ResNet teachers, whose taps
            are post-ReLU (non-negative); wrong for EfficientNet, whose taps are linear projections
            (signed): a ReLU there keeps the student from matching the teacher's direction.
        skip_levels: (ours) the teacher levels that feed a skip, a subset of ``(3, 2)``: level 3
            (``F_t^3``) joins before D2, level 2 (``F_t^2``) before D1; a level left out gives that
            sub-decoder ``F_s^{j+1}`` only. Default ``(3, 2)`` (paper).
        skip_dropout: (ours) probability ``p`` in ``[0, 1)`` of zeroing a whole channel of the
            teacher part of each skip, the rest scaled by ``1 / (1 - p)`` (``nn.Dropout2d``), in
            training mode only; identity in eval mode. Default 0 (paper).
        skip_noise: (ours) in training mode only, the teacher part of each skip becomes
            ``F_t + skip_noise · std_c(F_t) · N(0, 1)``, with ``std_c`` the (population) standard
            deviation of each sample's channel over space, not back-propagated through; identity in
            eval mode. Applied before ``skip_dropout`` (a dropped channel is all zero). Default 0.

    Input: ``[F_t^1, F_t^2, F_t^3, F_t^4]``. Output: ``[F_s^1, F_s^2, F_s^3]``, each the shape of
    the teacher's feature at the same level.

    With the defaults the parameters, their initial values (for a seed) and the outputs are those of
    the paper's student; ``"gate"`` adds parameters ``skip_gate.level3``/``skip_gate.level2`` of
    shapes ``(C_3,)``/``(C_2,)`` (created without drawing random numbers).
    """

    def __init__(
        self,
        teacher_channels: Sequence[int],
        kind: str = "basic",
        blocks: Sequence[int] = (2, 2, 2),
        widths: Sequence[int] | None = None,
        up_widths: Sequence[int] | None = None,
        upsample_kernel: int = 3,
        skip: str = "add",
        final_activation: bool = True,
        skip_levels: Sequence[int] = SKIP_LEVELS,
        skip_dropout: float = 0.0,
        skip_noise: float = 0.0,
    ):
        super().__init__()
        if skip not in SKIP_MODES:
            raise ValueError(f"skip must be one of {SKIP_MODES}, got '{skip}'")
        levels = [int(v) for v in skip_levels]
        if len(set(levels)) != len(levels) or not set(levels) <= set(SKIP_LEVELS):
            raise ValueError(f"skip_levels must be distinct levels out of {SKIP_LEVELS}, got {tuple(skip_levels)}")
        if not 0.0 <= float(skip_dropout) < 1.0:
            raise ValueError(f"skip_dropout must be in [0, 1), got {skip_dropout}")
        if not float(skip_noise) >= 0.0:
            raise ValueError(f"skip_noise must be >= 0, got {skip_noise}")
        if len(teacher_channels) != 4 or len(blocks) != 3:
            raise ValueError("need 4 teacher channel counts (E1..E4) and 3 block counts (D3, D2, D1)")
        c1, c2, c3, c4 = (int(c) for c in teacher_channels)
        io = [(c4, c3), (c3, c2), (c2, c1)]  # D3, D2, D1
        if widths is None:
            widths = [max(cout // 2, 1) for _, cout in io]
        if up_widths is None:
            up_widths = [max(cin // 2, 1) for cin, _ in io]
        stages = []
        for (cin, cout), n, width, up_width in zip(io, blocks, widths, up_widths):
            if n < 1:
                raise ValueError(f"each sub-decoder needs at least one block, got {blocks}")
            acts = [True] * (n - 1) + [bool(final_activation)]
            if kind == "bottleneck":
                layers = [UpBottleneck(cin, cout, up_width, upsample_kernel, acts[0])]
                layers += [Bottleneck(cout, width, a) for a in acts[1:]]
            elif kind == "inverted":
                layers = [UpInvertedResidual(cin, cout, up_width, upsample_kernel, acts[0])]
                layers += [InvertedResidual(cout, width, a) for a in acts[1:]]
            elif kind == "basic":
                layers = [UpBasicBlock(cin, cout, upsample_kernel, acts[0])] + [BasicBlock(cout, a) for a in acts[1:]]
            else:
                raise ValueError(f"unknown decoder kind '{kind}'")
            stages.append(nn.Sequential(*layers))
        self.d3, self.d2, self.d1 = stages
        self.skip = skip
        #: the levels that feed a skip, as used (empty for ``skip="none"``), in (3, 2) order
        self.skip_levels: tuple[int, ...] = () if skip == "none" else tuple(v for v in SKIP_LEVELS if v in levels)
        self.skip_dropout = float(skip_dropout)
        self.skip_noise = float(skip_noise)
        self._init_weights()
        # new parameters come after the decoder's and draw no random numbers: the decoder's initial
        # weights for a seed stay those of the paper's student
        if skip == "gate":
            channels = {3: c3, 2: c2}
            self.skip_gate = nn.ParameterDict(
                {f"level{v}": nn.Parameter(torch.zeros(channels[v])) for v in self.skip_levels}
            )

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _teacher_part(self, f_t: torch.Tensor) -> torch.Tensor:
        """``F_t`` as the skip passes it on: noise then channel dropout in training mode."""
        if not self.training:
            return f_t
        if self.skip_noise > 0:
            std = f_t.detach().std(dim=(-2, -1), keepdim=True, unbiased=False)
            f_t = f_t + self.skip_noise * std * torch.randn_like(f_t)
        if self.skip_dropout > 0:
            f_t = F.dropout2d(f_t, self.skip_dropout, training=True)
        return f_t

    def _join(self, level: int, f_t: torch.Tensor, f_s: torch.Tensor) -> torch.Tensor:
        """The input of the next sub-decoder: ``F_s`` joined with the teacher's ``F_t`` at ``level``."""
        if level not in self.skip_levels:
            return f_s
        f_t = self._teacher_part(f_t)
        if self.skip == "gate":
            f_t = torch.sigmoid(self.skip_gate[f"level{level}"]).view(1, -1, 1, 1) * f_t
        x = f_s + f_t
        return torch.relu(x) if self.skip == "add_relu" else x

    def forward(self, t_feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        t1, t2, t3, t4 = t_feats
        s3 = self.d3(t4)
        s2 = self.d2(self._join(3, t3, s3))
        s1 = self.d1(self._join(2, t2, s2))
        return [s1, s2, s3]
