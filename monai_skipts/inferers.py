"""From features to the anomaly map and image score (paper eq 7-8): the one implementation used by
the evaluator, bundle inference, MONAI Label, the MLflow model and the TorchScript/ONNX exports.

``M_ano = G_sigma * sum_l Upsample(M_l)`` (bilinear up-sampling to the input size, Gaussian
filter sigma = 4), image score ``S = max M_ano``. With an anatomy mask ``A`` (in {0, 1}), the sum is
zeroed outside the anatomy before the filter and the filtered map again after it:
``M_ano = A * G_sigma * (A * sum_l Upsample(M_l))``, ``S = max`` over ``A = 1``; so nothing outside the
anatomy (a burned-in caption, a ruler) reaches the map inside it through the filter. The Gaussian
filter is a separable convolution in torch with scipy's defaults (``truncate=4``, boundary mode ``reflect`` = half-sample symmetric),
so it matches ``scipy.ndimage.gaussian_filter`` and exports to TorchScript and ONNX.

Optional per-level standardisation: the levels' maps differ in scale, so the sum is dominated by the
loudest level. With per-level statistics of the training normals (:func:`fit_level_stats`, held by the
:class:`~monai_skipts.networks.AnomalyDetector` as its buffer ``level_stats`` of shape ``(L, 2)``: mean,
std), each map is standardised before up-sampling: ``M_l' = (M_l - mean_l) / std_l``, and
``M_ano = G_sigma * sum_l Upsample(M_l')``. Without statistics (``None``, the default) the map is
bit-identical to the plain eq 7.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from monai.inferers import Inferer
from torch import nn

from .losses import anomaly_maps

__all__ = [
    "GaussianBlur2d",
    "fuse_anomaly_maps",
    "mask_map_and_score",
    "standardize_level_maps",
    "anomaly_map_and_score",
    "fit_level_stats",
    "AnomalyMapHead",
    "SkipTSInferer",
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


def fuse_anomaly_maps(
    maps: Sequence[torch.Tensor],
    size: Sequence[int],
    blur: nn.Module | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sum_l Upsample(M_l)`` to ``size`` (bilinear, ``align_corners=False``), set to zero where
    ``mask <= 0``, then ``blur``. The blurred map is not masked again: it is not zero outside the mask
    near its edge.

    Args:
        maps: ``(B, 1, h_l, w_l)`` maps.
        size: ``(H, W)`` of the input image.
        blur: the filter (``None``: none).
        mask: ``(B, 1, H, W)`` anatomy mask, or ``None`` (every pixel counts).
    Returns:
        ``(B, 1, H, W)`` float32 map.
    """
    size = (int(size[0]), int(size[1]))
    fused = torch.zeros((maps[0].shape[0], 1) + size, device=maps[0].device, dtype=torch.float32)
    for m in maps:
        fused = fused + F.interpolate(m.float(), size=size, mode="bilinear", align_corners=False)
    if mask is not None:
        fused = fused.masked_fill(mask <= 0, 0.0)
    return blur(fused) if blur is not None else fused


def standardize_level_maps(
    maps: Sequence[torch.Tensor], level_stats: torch.Tensor | None, layers: Sequence[int] | None = None
) -> list[torch.Tensor]:
    """``M_l' = (M_l - mean_l) / std_l`` per level, in float32 (identity when ``level_stats`` is None).

    Args:
        maps: ``(B, 1, h_l, w_l)`` maps in the order of ``layers`` (as :func:`~monai_skipts.losses.anomaly_maps` gives).
        level_stats: ``(L, 2)`` rows ``(mean_l, std_l)`` for levels ``1..L`` (:func:`fit_level_stats`),
            or ``None``.
        layers: 1-based levels of ``maps`` (``None``: ``1..len(maps)``); the statistics are indexed by
            level, so a subset such as ``(1, 3)`` uses rows 0 and 2.

    Returns:
        the maps, unchanged (the same tensors) when ``level_stats`` is None.
    """
    if level_stats is None:
        return list(maps)
    levels = tuple(layers) if layers is not None else tuple(range(1, len(maps) + 1))
    if level_stats.dim() != 2 or level_stats.shape[1] != 2 or max(levels) > level_stats.shape[0]:
        raise ValueError(f"level_stats must be (L, 2) with L >= {max(levels)}, got {tuple(level_stats.shape)}")
    out = []
    for m, level in zip(maps, levels):
        st = level_stats[level - 1].to(device=m.device, dtype=torch.float32)
        out.append((m.float() - st[0]) / st[1])
    return out


def anomaly_map_and_score(
    t_feats: Sequence[torch.Tensor],
    s_feats: Sequence[torch.Tensor],
    size: Sequence[int],
    sigma: float = 4.0,
    layers: Sequence[int] | None = None,
    similarity: str = "cosine",
    level_stats: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anomaly map ``(B, 1, H, W)`` and score ``(B,)`` from teacher/student features (eq 1, 7, 8);
    ``level_stats`` ``(L, 2)``: standardise each level first (see :func:`standardize_level_maps`)."""
    return AnomalyMapHead(sigma, layers, similarity).to(t_feats[0].device)(t_feats, s_feats, size, level_stats)


class AnomalyMapHead(nn.Module):
    """Module form of eq 1, 7, 8: ``(t_feats, s_feats, size[, level_stats, mask]) -> (map (B,1,H,W), score (B,))``.

    ``level_stats`` (forward argument, ``(L, 2)`` mean/std per level, or ``None``) standardises each
    level's map before up-sampling (:func:`standardize_level_maps`); with ``None`` the result is
    bit-identical to the plain eq 7.

    ``mask`` (forward argument, ``(B, 1, H, W)`` anatomy mask, or ``None``): the summed map is zeroed
    where ``mask <= 0`` before the Gaussian filter (:func:`fuse_anomaly_maps`) and the filtered map
    again after it, so the map is exactly zero outside the anatomy and takes nothing from outside it
    inside; the score is the map's maximum over ``mask > 0``. With ``None`` the result is bit-identical
    to no mask.
    """

    def __init__(self, sigma: float = 4.0, layers: Sequence[int] | None = None, similarity: str = "cosine"):
        super().__init__()
        self.blur = GaussianBlur2d(sigma)
        self.layers = tuple(layers) if layers is not None else None
        self.similarity = similarity

    def forward(
        self,
        t_feats: Sequence[torch.Tensor],
        s_feats: Sequence[torch.Tensor],
        size: Sequence[int],
        level_stats: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ):
        maps = anomaly_maps(t_feats, s_feats, self.similarity, self.layers)
        if level_stats is not None:
            maps = standardize_level_maps(maps, level_stats, self.layers)
        return mask_map_and_score(fuse_anomaly_maps(maps, size, self.blur, mask), mask)


def mask_map_and_score(amap: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(map, score)``: ``amap`` ``(B, 1, H, W)`` set to zero where ``mask <= 0``, and its maximum over
    ``mask > 0`` ``(B,)`` (``-inf`` for an empty mask); with ``mask=None``, ``amap`` and its maximum."""
    if mask is None:
        return amap, amap.flatten(1).amax(dim=1)
    outside = mask <= 0
    score = amap.masked_fill(outside, float("-inf")).flatten(1).amax(dim=1)
    return amap.masked_fill(outside, 0.0), score


def _plain_tensor(x: Any) -> torch.Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else x


def _batch_image(batch: Any) -> torch.Tensor:
    image = batch["image"] if isinstance(batch, dict) else batch[0] if isinstance(batch, (list, tuple)) else batch
    return image.as_tensor() if hasattr(image, "as_tensor") else image


def fit_level_stats(
    model: nn.Module,
    batches: Iterable[Any],
    device: str | torch.device | None = None,
    similarity: str = "cosine",
    prepare_batch: Callable | None = None,
) -> torch.Tensor:
    """Per-level mean and std of the maps ``M_l`` over all pixels of ``batches`` (training normals),
    inside the anatomy when ``model`` is a detector with its anatomy mask on (each level's pixels whose
    cell lies at least half inside :meth:`~monai_skipts.networks.AnomalyDetector.anatomy_mask`).

    Streaming: each batch's per-level count, mean and sum of squared deviations (float64) are merged
    (Chan et al.), so any number of images fits in memory. The std is the population one (all pixels
    of all images), clamped to ``>= 1e-6``. The model runs in eval mode (its mode is restored after)
    under :func:`torch.inference_mode`, in float32.

    Args:
        model: an :class:`~monai_skipts.networks.AnomalyDetector` (its ``features``), or the
            teacher-student model (a :class:`~monai_skipts.networks.SkipTS`, optionally DDP-wrapped)
            whose forward gives the features.
        batches: an iterable (e.g. a ``DataLoader``) of image tensors ``(B, 3, H, W)``, of batch dicts
            with ``"image"``, or of ``(image, ...)`` tuples.
        device: where to run (default: the device of the model's parameters).
        similarity: as for :class:`AnomalyMapHead` (``"cosine"``: eq 1).
        prepare_batch: optional MONAI-style ``prepare_batch(batch, device)`` giving ``(image, label[,
            args, kwargs])``, whose ``args``/``kwargs`` are passed to the model, e.g. a
            :class:`~monai_skipts.engines.TeacherFeatureCache` to reuse cached teacher features (run
            under :func:`torch.no_grad` instead of inference mode, so that features it caches here stay
            usable for training).

    Returns:
        ``(L, 2)`` float32 tensor on the CPU, rows ``(mean_l, std_l)`` for levels ``1..L`` (L = 3 for
        Skip-TS); set it with :meth:`~monai_skipts.networks.AnomalyDetector.set_level_stats`.
    """
    features = model.features if hasattr(model, "features") else model
    net = getattr(model, "module", model)
    if device is None:
        ref = next(iter(net.parameters()), None)
        device = ref.device if ref is not None else torch.device("cpu")
    device = torch.device(device)
    n = mean = m2 = None
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad() if prepare_batch is not None else torch.inference_mode():
            for batch in batches:
                if prepare_batch is not None:
                    prepared = prepare_batch(batch, device)
                    args = prepared[2] if len(prepared) > 2 else ()
                    kwargs = prepared[3] if len(prepared) > 3 else {}
                    image = prepared[0]
                    t, s = features(image, *args, **kwargs)
                else:
                    image = _batch_image(batch).to(device=device, dtype=torch.float32)
                    t, s = features(image)
                maps = anomaly_maps(t, s, similarity)
                md = [m.double() for m in maps]
                inside = model.anatomy_mask(_plain_tensor(image)) if hasattr(model, "anatomy_mask") else None
                if inside is None:
                    bn = torch.tensor([float(m.numel()) for m in md], dtype=torch.float64)
                    bmean = torch.stack([m.mean() for m in md])
                    bm2 = torch.stack([(m - mu).pow(2).sum() for m, mu in zip(md, bmean)]).cpu()
                else:  # the pixels of each level whose cell lies mostly inside the anatomy
                    ws = [(F.interpolate(inside.float(), size=m.shape[-2:], mode="area") >= 0.5).double() for m in md]
                    bn = torch.stack([w.sum() for w in ws]).cpu()
                    bmean = torch.stack([(m * w).sum() / w.sum().clamp_min(1.0) for m, w in zip(md, ws)])
                    bm2 = torch.stack([((m - mu) * w).pow(2).sum() for m, mu, w in zip(md, bmean, ws)]).cpu()
                bmean = bmean.cpu()
                if n is None:
                    n, mean, m2 = bn, bmean, bm2
                    continue
                tot = n + bn
                delta = bmean - mean
                # clamped: a level without anatomy pixels so far (tot = 0) changes nothing
                mean = mean + delta * bn / tot.clamp_min(1.0)
                m2 = m2 + bm2 + delta.pow(2) * n * bn / tot.clamp_min(1.0)
                n = tot
    finally:
        net.train(was_training)
    if n is None:
        raise ValueError("fit_level_stats: no batches")
    std = (m2 / n.clamp_min(1.0)).sqrt().clamp_min(1e-6)
    return torch.stack([mean, std], dim=1).float()


class SkipTSInferer(Inferer):
    """MONAI inferer: ``inferer(inputs, detector) -> anomaly map (B, 1, H, W)``, the map of the
    :class:`~monai_skipts.networks.AnomalyDetector`'s forward (its statistics and sigma). The score is
    the map's maximum (:meth:`score`). Used by :class:`monai.engines.SupervisedEvaluator`.
    """

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        amap, _ = network(inputs, *args, **kwargs)
        return amap

    @staticmethod
    def score(amap: torch.Tensor) -> torch.Tensor:
        """Image score: the map's maximum over all but the batch dimension."""
        return amap.flatten(1).amax(dim=1) if amap.dim() > 1 else amap.amax()
