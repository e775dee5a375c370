"""The anatomy mask inside the detector: a foreground mask in torch ops, computed from the image the
network sees, so every serving path (the predictor, the DICOM app, MONAI Label, the MLflow model, the
exported bundle, the TorchScript and ONNX graphs) bounds its maps and scores by the anatomy with no
code of its own.

:class:`AnatomyMaskLayer` ``(B, C, H, W) -> (B, 1, H, W)`` in {0, 1}:

1. the channels averaged into one grey image, scaled per image to [0, 1] (so an ImageNet-normalised,
   a [0, 1] or a windowed image give the same mask);
2. a threshold per image, by ``method`` (per modality: ``ANATOMY_MASK_METHODS``, ``"ct"`` for the CT
   presets, ``"nonzero"`` for the others):

   ============  ========================================================================
   ``"otsu"``    Otsu's threshold (``bins`` levels) on a copy average-pooled to about 64 px
   ``"nonzero"`` above the background (the minimum) by ``floor_fraction`` of the robust
                 range (minimum to 99th percentile)
   ``"ct"``      above the window floor (the minimum) by ``floor_fraction`` of the range
   ============  ========================================================================

3. for CT (``fill_first``), the holes filled (as in 5.): a ring of thin bright bone in a CT whose
   window leaves soft tissue black encloses the body;
4. a morphological opening (max-pool erosion then dilation, radius ``opening`` × the shorter side):
   captions, rulers and calipers outside the body are thin strokes and fall away; then a closing
   (radius ``closing`` × the shorter side);
5. holes filled: a pixel with foreground to its left, right, top and bottom (in its row and column)
   joins the mask (dark ventricles, lungs, cysts inside the tissue).

An image whose mask comes out empty (a constant image) is all anatomy. All steps are fixed-shape
tensor ops (no data-dependent Python control flow), so the layer traces to TorchScript and ONNX.

:class:`~monai_skipts.transforms.AnatomyMask` is the MONAI-based mask (largest connected component,
CT in HU, Otsu for X-ray, ultrasound and RGB) for offline use and the training transforms; this layer
is the serving one: exportable, and cautious (it keeps the tissue a lesion lies in).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from monai_skipts.transforms.presets import PRESETS

__all__ = [
    "ANATOMY_MASK_DEFAULTS",
    "ANATOMY_MASK_METHODS",
    "ANATOMY_METHODS",
    "AnatomyMaskLayer",
    "anatomy_mask_config",
]

#: the threshold rules of :class:`AnatomyMaskLayer`
ANATOMY_METHODS = ("otsu", "nonzero", "ct")

#: the threshold rule per modality preset. Low thresholds ("above the background") everywhere: Otsu
#: on chest X-rays puts the lungs, and on breast ultrasound the hypoechoic tissue and cysts, in the
#: background (looked at on the Covid-19 X-ray and BUSI layout samples), and a mask must never drop the
#: tissue a lesion lies in; with ``"nonzero"`` they keep all but the black surround
ANATOMY_MASK_METHODS: dict[str, str] = {
    "ct_brain": "ct",
    "ct_lung": "ct",
    "mri": "nonzero",
    "xray": "nonzero",
    "ultrasound": "nonzero",
    "rgb": "nonzero",
}
assert set(ANATOMY_MASK_METHODS) == set(PRESETS)

#: the settings of :class:`AnatomyMaskLayer` besides ``method`` (radii are shares of the shorter side)
ANATOMY_MASK_DEFAULTS: dict[str, Any] = {
    "floor_fraction": 0.05,
    "bins": 128,
    "opening": 0.03,
    "closing": 0.03,
    "fill_holes": True,
    "fill_first": None,
}

_POOLED_SIDE = 64  # Otsu's histogram and the percentile are taken on a copy pooled to about this side


def anatomy_mask_config(spec: Any, modality: str | None = None) -> dict[str, Any] | None:
    """The full, JSON-able settings of an anatomy mask (what ``AnomalyDetector.config["anatomy_mask"]``
    stores), or ``None`` (off).

    Args:
        spec: ``None`` or ``False``: off; ``True``: the preset of ``modality``; a mapping: settings
            (``method``, ``modality`` and the keys of ``ANATOMY_MASK_DEFAULTS``), the missing ones from
            the defaults and ``method`` from the modality.
        modality: the model's modality preset (``ANATOMY_MASK_METHODS``), for the threshold rule.

    Raises:
        ValueError: an unknown key, method or modality, or a mask asked for with no method and no modality.

    >>> anatomy_mask_config(True, "mri")["method"], anatomy_mask_config(False, "mri")
    ('nonzero', None)
    """
    if spec is None or spec is False:
        return None
    given = {} if spec is True else dict(spec) if isinstance(spec, Mapping) else None
    if given is None:
        raise ValueError(f"anatomy_mask must be true, false, null or a mapping of settings, got {spec!r}")
    unknown = set(given) - {"method", "modality", *ANATOMY_MASK_DEFAULTS}
    if unknown:
        raise ValueError(
            f"unknown anatomy_mask settings {sorted(unknown)}; known: method, modality, {', '.join(ANATOMY_MASK_DEFAULTS)}"
        )
    mod = given.get("modality") or modality
    if mod is not None and mod not in ANATOMY_MASK_METHODS:
        raise ValueError(
            f"unknown modality {mod!r} for the anatomy mask; choose one of {', '.join(ANATOMY_MASK_METHODS)}"
        )
    method = given.get("method") or (ANATOMY_MASK_METHODS[mod] if mod else None)
    if method is None:
        raise ValueError("the anatomy mask needs a modality (the model's preprocessing['modality']) or a method")
    if method not in ANATOMY_METHODS:
        raise ValueError(f"unknown anatomy mask method {method!r}; choose one of {', '.join(ANATOMY_METHODS)}")
    out: dict[str, Any] = {"method": method, "modality": mod}
    for key, default in ANATOMY_MASK_DEFAULTS.items():
        if key != "fill_first":
            out[key] = type(default)(given.get(key, default))
    first = given.get("fill_first")
    out["fill_first"] = method == "ct" if first is None else bool(first)
    if not 0.0 <= out["floor_fraction"] < 1.0 or out["bins"] < 2 or out["opening"] < 0 or out["closing"] < 0:
        raise ValueError(f"anatomy mask settings out of range: {out}")
    return out


def _dilate(m: torch.Tensor, r: int) -> torch.Tensor:
    """Square dilation of radius ``r`` (separable max-pool; the image border is not foreground)."""
    k = 2 * r + 1
    m = F.max_pool2d(m, (k, 1), stride=1, padding=(r, 0))
    return F.max_pool2d(m, (1, k), stride=1, padding=(0, r))


def _erode(m: torch.Tensor, r: int) -> torch.Tensor:
    """Square erosion of radius ``r`` (the padding is ignored: the border does not erode)."""
    return -_dilate(-m, r)


def _fill_holes(m: torch.Tensor) -> torch.Tensor:
    """Pixels with foreground to their left, right, top and bottom (in their row and column) join ``m``."""
    row = m.cumsum(-1)
    col = m.cumsum(-2)
    left, right = row > 0, (row[..., -1:] - row + m) > 0
    up, down = col > 0, (col[..., -1:, :] - col + m) > 0
    return torch.maximum(m, (left & right & up & down).to(m.dtype))


class AnatomyMaskLayer(nn.Module):
    """Foreground (body, brain, tissue) mask of a batch of images, in torch ops (see the module docstring).

    Args:
        method: ``"otsu"``, ``"nonzero"`` or ``"ct"``.
        modality: the modality preset the method was chosen for (recorded only).
        floor_fraction: ``"nonzero"`` and ``"ct"``: the share of the range above the minimum.
        bins: ``"otsu"``: the number of histogram levels.
        opening, closing: radii of the opening and the closing as shares of the shorter image side
            (at least one pixel when positive; ``0``: skipped).
        fill_holes: fill the holes enclosed by the foreground.
        fill_first: fill the holes of the thresholded image before the opening too (``None``: for
            ``"ct"`` only), so a ring of thin bright bone in a CT whose window leaves soft tissue black
            still encloses the body; a caption's letters enclose each other's gaps too, and its
            block then falls to the opening only when it is thinner than the opening's square.

    Returns:
        ``(B, 1, H, W)`` float32 mask in {0, 1}; an image with an empty mask is all ones.

    Example:
        >>> img = torch.zeros(1, 3, 64, 64); img[:, :, 16:48, 16:48] = 0.6; img[:, :, 3, 2:20] = 1.0  # body + ruler
        >>> m = AnatomyMaskLayer("otsu")(img)
        >>> int(m.sum()), float(m[0, 0, 3, 5])
        (1024, 0.0)
    """

    def __init__(
        self,
        method: str = "otsu",
        modality: str | None = None,
        floor_fraction: float = 0.05,
        bins: int = 128,
        opening: float = 0.03,
        closing: float = 0.03,
        fill_holes: bool = True,
        fill_first: bool | None = None,
    ):
        super().__init__()
        cfg = anatomy_mask_config(
            {
                "method": method,
                "modality": modality,
                "floor_fraction": floor_fraction,
                "bins": bins,
                "opening": opening,
                "closing": closing,
                "fill_holes": fill_holes,
                "fill_first": fill_first,
            }
        )
        self.config: dict[str, Any] = cfg  # type: ignore[assignment]

    @staticmethod
    def _radius(share: float, side: int) -> int:
        return 0 if share <= 0 else max(1, int(round(share * side)))

    def _pooled(self, unit: torch.Tensor) -> torch.Tensor:
        k = max(1, min(int(unit.shape[-2]), int(unit.shape[-1])) // _POOLED_SIDE)
        small = F.avg_pool2d(unit, k) if k > 1 else unit
        return small.flatten(1)

    def _level(self, unit: torch.Tensor) -> torch.Tensor:
        """The threshold ``(B,)`` on the [0, 1] scaled grey image ``(B, 1, H, W)``."""
        method = self.config["method"]
        frac = float(self.config["floor_fraction"])
        if method == "ct":
            return torch.full((unit.shape[0],), frac, dtype=unit.dtype, device=unit.device)
        small = self._pooled(unit)
        if method == "nonzero":
            n = int(small.shape[1])
            p99 = torch.sort(small, dim=1).values[:, int(0.99 * (n - 1))]
            return frac * p99
        bins = int(self.config["bins"])
        edges = torch.arange(1, bins, dtype=unit.dtype, device=unit.device) / bins  # candidate thresholds
        below = (small[:, None, :] <= edges[None, :, None]).to(unit.dtype)  # (B, bins-1, N)
        w0 = below.mean(-1)
        s0 = (below * small[:, None, :]).mean(-1)
        mu = small.mean(-1, keepdim=True)
        between = (mu * w0 - s0).pow(2) / (w0 * (1 - w0)).clamp_min(1e-12)
        between = torch.where((w0 > 0) & (w0 < 1), between, torch.zeros_like(between))
        return edges[between.argmax(dim=1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grey = x.float().mean(dim=1, keepdim=True)
        b = grey.shape[0]
        flat = grey.flatten(1)
        lo, hi = flat.amin(dim=1).view(b, 1, 1, 1), flat.amax(dim=1).view(b, 1, 1, 1)
        unit = (grey - lo) / (hi - lo).clamp_min(1e-12)
        mask = (unit > self._level(unit).view(b, 1, 1, 1)).float()
        if self.config["fill_holes"] and self.config["fill_first"]:
            mask = _fill_holes(mask)
        side = min(int(x.shape[-2]), int(x.shape[-1]))
        r = self._radius(float(self.config["opening"]), side)
        if r:
            mask = _dilate(_erode(mask, r), r)
        r = self._radius(float(self.config["closing"]), side)
        if r:
            mask = _erode(_dilate(mask, r), r)
        if self.config["fill_holes"]:
            mask = _fill_holes(mask)
        empty = mask.flatten(1).amax(dim=1).view(b, 1, 1, 1) <= 0
        return torch.where(empty, torch.ones_like(mask), mask)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items())
