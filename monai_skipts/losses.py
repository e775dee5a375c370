"""Skip-TS losses (paper eq 1-5): per-pixel anomaly maps, L_sim, L_mac and the DRKD loss; RD4AD's
flattened-cosine loss, the peer method's."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "anomaly_maps",
    "similarity_loss",
    "mac_loss",
    "DRKDLoss",
    "RD4ADLoss",
    "LOSSES",
    "build_loss",
    "SIMILARITIES",
    "teacher_target",
]

SIMILARITIES = ("cosine", "mse")


def anomaly_maps(
    t_feats: Sequence[torch.Tensor],
    s_feats: Sequence[torch.Tensor],
    similarity: str = "cosine",
    layers: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """Per-pixel anomaly maps (eq 1).

    ``M_l(h, w) = 1 - cos(F_t^l(h, w), F_s^l(h, w))`` along channels (``similarity="cosine"``), or the
    channel mean of ``(F_t^l - F_s^l)^2`` (``"mse"``, ablation "L_sim with MSE").

    Args:
        t_feats, s_feats: lists of ``(B, C_l, h_l, w_l)`` teacher and student features, level 1 first.
        layers: 1-based levels to use (``(1, 2, 3)`` all; ``(1, 2)`` the ablation M1+M2, ...).

    Returns:
        list of ``(B, 1, h_l, w_l)`` maps, in the order of ``layers``.
    """
    if len(t_feats) != len(s_feats):
        raise ValueError(f"{len(t_feats)} teacher features vs {len(s_feats)} student features")
    idx = [i - 1 for i in layers] if layers is not None else range(len(t_feats))
    maps = []
    for i in idx:
        t, s = t_feats[i], s_feats[i]
        if t.shape != s.shape:
            raise ValueError(f"level {i + 1}: teacher {tuple(t.shape)} vs student {tuple(s.shape)}")
        if similarity == "cosine":
            m = 1.0 - F.cosine_similarity(t.float(), s.float(), dim=1, eps=1e-8)
        elif similarity == "mse":
            m = (t.float() - s.float()).pow(2).mean(dim=1)
        else:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got '{similarity}'")
        maps.append(m.unsqueeze(1))
    return maps


def teacher_target(pred, target=None) -> Sequence[torch.Tensor]:
    """The teacher features a loss compares the student with: ``pred``'s own (``pred[0]``), or
    ``target`` when it is a list/tuple of feature maps: in denoising training
    (:class:`~monai_skipts.engines.DenoisingBatch`) the student reads the teacher's features of a
    corrupted image and is compared with the teacher's features of the clean one, which reach the loss
    as MONAI's ``targets``. A label tensor (or ``None``) as ``target`` is ignored."""
    if isinstance(target, (list, tuple)) and target and all(isinstance(t, torch.Tensor) for t in target):
        return list(target)[: len(pred[1])]
    return pred[0]


def similarity_loss(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """``L_sim = sum_l mean_{b,h,w} M_l`` (eq 2-3)."""
    return torch.stack([m.mean() for m in maps]).sum()


def mac_loss(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Multi-scale anomaly consistency loss (eq 4).

    Every map is bilinearly up-sampled (``align_corners=False``) to the largest map's size; the loss
    is the mean over batch and pixels of ``sum_{i<j} (M_i - M_j)^2`` over all unordered pairs.
    A single map gives 0.
    """
    size = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
    up = [
        m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps
    ]
    total = torch.zeros((), device=maps[0].device, dtype=up[0].dtype)
    for i in range(len(up)):
        for j in range(i + 1, len(up)):
            total = total + (up[i] - up[j]).pow(2).mean()
    return total


class DRKDLoss(nn.Module):
    """Direct reverse knowledge distillation loss ``L = L_sim + beta * L_mac`` (eq 5).

    Args:
        beta: weight of the MAC loss (paper 0.05).
        mac: include the MAC loss (``False``: ablation "w/o MAC").
        similarity: ``"cosine"`` (paper) or ``"mse"`` (ablation).
        layers: 1-based levels (paper: all three).

    ``forward(pred, target=None)`` takes ``pred = (teacher_feats, student_feats)`` as returned by
    :class:`~monai_skipts.networks.SkipTS`; ``target`` is ignored (training images are all normal),
    so the loss plugs into :class:`monai.engines.SupervisedTrainer` unchanged, unless it is a list of
    clean teacher features (denoising training, :func:`teacher_target`), which replace ``pred``'s.
    After each call ``last`` holds the float components ``{"sim", "mac", "total"}``.
    """

    def __init__(
        self, beta: float = 0.05, mac: bool = True, similarity: str = "cosine", layers: Sequence[int] | None = None
    ):
        super().__init__()
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got '{similarity}'")
        self.beta, self.mac, self.similarity = float(beta), bool(mac), similarity
        self.layers = tuple(layers) if layers is not None else None
        self.last: dict[str, float] = {}

    def forward(self, pred, target: torch.Tensor | Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        t_feats, s_feats = teacher_target(pred, target), pred[1]
        maps = anomaly_maps(t_feats, s_feats, self.similarity, self.layers)
        l_sim = similarity_loss(maps)
        l_mac = mac_loss(maps) if self.mac and len(maps) > 1 else torch.zeros_like(l_sim)
        total = l_sim + self.beta * l_mac
        self.last = {"sim": float(l_sim.detach()), "mac": float(l_mac.detach()), "total": float(total.detach())}
        return total


class RD4ADLoss(nn.Module):
    """RD4AD's loss: ``sum_l mean_b (1 - cos(flatten(F_t^l), flatten(F_s^l)))``, the cosine taken over
    each sample's whole flattened feature map. ``forward(pred, target=None)`` with ``pred`` the
    model's ``(teacher_feats, student_feats)`` (``target``: as for :class:`DRKDLoss`); ``last`` holds
    ``{"total"}`` after each call."""

    def __init__(self):
        super().__init__()
        self.last: dict[str, float] = {}

    def forward(self, pred, target: torch.Tensor | Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        t_feats, s_feats = teacher_target(pred, target), pred[1]
        total = torch.zeros((), device=t_feats[0].device)
        for t, s in zip(t_feats, s_feats):
            cos = F.cosine_similarity(t.float().flatten(1), s.float().flatten(1), dim=1)
            total = total + (1.0 - cos).mean()
        self.last = {"total": float(total.detach())}
        return total


LOSSES = ("drkd", "rd4ad")


def build_loss(kind: str = "drkd", beta: float = 0.05, mac: bool = True, similarity: str = "cosine") -> nn.Module:
    """The training loss by name, for bundle configs: ``"drkd"`` (the paper's: per-pixel
    ``1 - cos`` + ``beta`` × MAC, :class:`DRKDLoss`) or ``"rd4ad"`` (RD4AD's ``1 - cos`` of each
    level's flattened map, :class:`RD4ADLoss`; ``beta``, ``mac`` and ``similarity`` do not apply).

    >>> build_loss("rd4ad").__class__.__name__
    'RD4ADLoss'
    """
    if kind == "drkd":
        return DRKDLoss(beta=beta, mac=mac, similarity=similarity)
    if kind == "rd4ad":
        return RD4ADLoss()
    raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")
