"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022) on a
Skip-TS teacher.

Patch features: the frozen teacher's ``E2`` and ``E3`` (PatchCore's ``layer2`` + ``layer3``), each
averaged over its 3×3 neighbourhood (locally aware patch features), ``E3`` bilinearly up-sampled
to ``E2``'s grid, concatenated along channels (and, above ``embed_dim`` channels, average-pooled
down to ``embed_dim`` as PatchCore does for Wide-ResNet50). The memory bank is a greedy coreset
(k-center) of all training patch features, chosen on a random projection of the features.

A test patch's score is the Euclidean distance to its nearest memory entry. Anomaly map: the
patch-score grid bilinearly up-sampled to the input size and Gaussian-filtered (σ = 4), as for
Skip-TS; image score: the largest patch score (PatchCore's ``s*``, without its optional
re-weighting).
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..inferers import GaussianBlur2d
from ..networks.teacher import TeacherEncoder, build_teacher

__all__ = ["PatchCore", "greedy_coreset", "nearest_distances"]


def greedy_coreset(features: torch.Tensor, n: int, projection_dim: int | None = 128, seed: int = 0) -> torch.Tensor:
    """Indices of ``n`` rows of ``features`` ``(N, D)`` chosen by greedy k-center selection (each
    new row is the one farthest from those already chosen), on a Gaussian random projection to
    ``projection_dim`` dimensions when ``D`` is larger (Johnson-Lindenstrauss, as in PatchCore).
    The first row is drawn at random with ``seed``. Returns a ``(n,)`` long tensor."""
    n_all = features.shape[0]
    if n >= n_all:
        return torch.arange(n_all)
    g = torch.Generator().manual_seed(int(seed))
    x = features.float()
    if projection_dim and x.shape[1] > projection_dim:
        proj = torch.randn(x.shape[1], projection_dim, generator=g).to(x.device) / math.sqrt(projection_dim)
        x = x @ proj
    x = x.contiguous()
    sq = (x * x).sum(1)
    chosen = torch.empty(n, dtype=torch.long)
    last = int(torch.randint(n_all, (1,), generator=g))
    min_d = torch.full((n_all,), float("inf"), device=x.device)
    for i in range(n):
        chosen[i] = last
        d = sq + sq[last] - 2.0 * torch.mv(x, x[last])
        torch.minimum(min_d, d, out=min_d)
        last = int(torch.argmax(min_d))
    return chosen


def nearest_distances(queries: torch.Tensor, memory: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Euclidean distance of each row of ``queries`` ``(Q, D)`` to its nearest row of ``memory``
    ``(M, D)``, in chunks of ``chunk`` queries (one matrix product per chunk). Returns ``(Q,)``."""
    m_sq = (memory * memory).sum(1)
    out = torch.empty(queries.shape[0], device=queries.device)
    for i in range(0, queries.shape[0], chunk):
        q = queries[i : i + chunk]
        d = (q * q).sum(1, keepdim=True) + m_sq.unsqueeze(0) - 2.0 * (q @ memory.T)
        out[i : i + chunk] = d.amin(dim=1).clamp_min_(0).sqrt_()
    return out


class PatchCore(nn.Module):
    """PatchCore on a frozen Skip-TS teacher.

    Args:
        teacher: registered teacher name, ``"auto"`` or a :class:`TeacherEncoder` instance (shared
            with Skip-TS models for a like-for-like comparison).
        pretrained, teacher_weights, download: as for :class:`~monai_skipts.networks.SkipTS`.
        layers: 1-based teacher levels to use (PatchCore: 2 and 3).
        neighborhood: side of the local averaging window (PatchCore: 3).
        embed_dim: channel count above which the concatenated features are average-pooled down.
        coreset_ratio: fraction of training patches kept in the memory bank (PatchCore: 0.1 or 0.01).
        max_coreset: upper bound on the memory bank size (greedy selection is O(N · size)).
        projection_dim: dimension of the random projection used for coreset selection.
        sigma: Gaussian filter of the anomaly map.
        seed: seed of the coreset's first pick and of the projection.

    Use: ``model.fit(batches)`` on training normals, then ``amap, score = model(x)`` with ``x``
    ``(B, 3, H, W)``: ``amap`` ``(B, 1, H, W)``, ``score`` ``(B,)``.
    """

    def __init__(
        self,
        teacher: str | TeacherEncoder = "auto",
        pretrained: bool = True,
        teacher_weights: str | os.PathLike | None = None,
        layers: Sequence[int] = (2, 3),
        neighborhood: int = 3,
        embed_dim: int = 1024,
        coreset_ratio: float = 0.1,
        max_coreset: int | None = 4096,
        projection_dim: int | None = 128,
        sigma: float = 4.0,
        seed: int = 0,
        download: bool = True,
    ):
        super().__init__()
        self.teacher = (
            teacher
            if isinstance(teacher, TeacherEncoder)
            else build_teacher(teacher, pretrained=pretrained, weights=teacher_weights, download=download)
        )
        if not 0 < coreset_ratio <= 1:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {coreset_ratio}")
        self.layers = tuple(int(i) for i in layers)
        self.neighborhood = int(neighborhood)
        self.embed_dim = int(embed_dim)
        self.coreset_ratio = float(coreset_ratio)
        self.max_coreset = max_coreset
        self.projection_dim = projection_dim
        self.seed = int(seed)
        self.blur = GaussianBlur2d(sigma)
        self.register_buffer("memory", torch.empty(0, 0))
        self.config: dict[str, Any] = {
            "model": "patchcore",
            "teacher": self.teacher.name,
            "teacher_weights_sha256": self.teacher.weights_sha256,
            "layers": list(self.layers),
            "neighborhood": self.neighborhood,
            "coreset_ratio": self.coreset_ratio,
            "max_coreset": max_coreset,
            "sigma": float(sigma),
        }

    def train(self, mode: bool = True) -> "PatchCore":  # noqa: ARG002 - nothing to train
        return super().train(False)

    @torch.inference_mode()
    def teacher_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``[E1, E2, E3, E4]`` of the frozen teacher, computed without autograd (what
        :class:`~monai_skipts.engines.TeacherFeatureCache` caches)."""
        with torch.no_grad():
            return [f.detach() for f in self.teacher(x)]

    def embed(self, x: torch.Tensor | None = None, teacher_feats: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Patch features ``(B, D, h, w)`` on the grid of the first of ``layers``, from the image
        ``x`` or from precomputed teacher features ``[E1..E4]``."""
        feats = list(teacher_feats) if teacher_feats is not None else self.teacher(x)
        sel = [feats[i - 1].float() for i in self.layers]
        size = sel[0].shape[-2:]
        pad = self.neighborhood // 2
        out = []
        for f in sel:
            if self.neighborhood > 1:
                f = F.avg_pool2d(f, self.neighborhood, stride=1, padding=pad, count_include_pad=False)
            if f.shape[-2:] != size:
                f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
            out.append(f)
        emb = torch.cat(out, dim=1)
        if emb.shape[1] > self.embed_dim:
            b, d, h, w = emb.shape
            emb = F.adaptive_avg_pool1d(emb.permute(0, 2, 3, 1).reshape(-1, 1, d), self.embed_dim)
            emb = emb.reshape(b, h, w, self.embed_dim).permute(0, 3, 1, 2)
        return emb

    def fit(
        self,
        batches: Iterable,
        device: str | torch.device | None = None,
        feature_fn: Callable[[Any], Sequence[torch.Tensor]] | None = None,
    ) -> "PatchCore":
        """Build the memory bank from training normals.

        Args:
            batches: iterable of image tensors ``(B, 3, H, W)`` or of dicts with ``"image"``.
            device: where to compute (default: the teacher's device).
            feature_fn: ``batch -> [E1..E4]`` to use instead of the teacher (e.g. cached features).
        """
        device = torch.device(device) if device is not None else next(self.teacher.parameters()).device
        self.to(device)  # outside inference mode: a shared teacher must stay usable by autograd
        with torch.inference_mode():
            return self._fit(batches, device, feature_fn)

    def _fit(self, batches: Iterable, device: torch.device, feature_fn) -> "PatchCore":
        rows = []
        for batch in batches:
            if feature_fn is not None:
                emb = self.embed(teacher_feats=[f.to(device) for f in feature_fn(batch)])
            else:
                x = batch["image"] if isinstance(batch, dict) else batch
                emb = self.embed(torch.as_tensor(x).to(device))
            rows.append(emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1]))
        if not rows:
            raise ValueError("PatchCore.fit needs at least one training batch")
        bank = torch.cat(rows)
        n = max(1, int(math.ceil(self.coreset_ratio * bank.shape[0])))
        if self.max_coreset is not None:
            n = min(n, int(self.max_coreset))
        idx = greedy_coreset(bank, n, self.projection_dim, self.seed)
        self.memory = bank[idx.to(bank.device)].clone()
        self.config.update(n_patches=int(bank.shape[0]), memory_size=int(self.memory.shape[0]))
        return self

    @torch.inference_mode()
    def patch_scores(
        self, x: torch.Tensor | None = None, teacher_feats: Sequence[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Nearest-memory distance of each patch: ``(B, 1, h, w)``."""
        if self.memory.numel() == 0:
            raise RuntimeError("PatchCore has an empty memory bank: call fit() on training normals first")
        emb = self.embed(x, teacher_feats)
        b, d, h, w = emb.shape
        dist = nearest_distances(emb.permute(0, 2, 3, 1).reshape(-1, d), self.memory.to(emb.device))
        return dist.reshape(b, 1, h, w)

    @torch.inference_mode()
    def forward(
        self, x: torch.Tensor, teacher_feats: Sequence[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly map ``(B, 1, H, W)`` (input size) and image score ``(B,)``."""
        ps = self.patch_scores(x, teacher_feats)
        amap = self.blur(F.interpolate(ps, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False))
        return amap, ps.flatten(1).amax(dim=1)

    predict = forward
