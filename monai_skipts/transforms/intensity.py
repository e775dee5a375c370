"""Intensity normalisation to [0, 1], channel handling and ImageNet normalisation.

All transforms take a channel-first tensor ``(C, *spatial)`` (``MetaTensor`` or plain tensor/array;
arrays come back as tensors), keep its meta, and never produce NaN: a constant image (or any degenerate
range) becomes all zeros, and an image holding NaN/inf is refused (InputDataError naming the file). Per-image statistics are taken over all channels together.

- :class:`WindowIntensity`: CT window (centre, width) in HU -> [0, 1]; presets ``WINDOW_PRESETS``.
- :class:`PercentileScaleIntensity`: MRI, clip to the 0.5/99.5 percentiles and scale to [0, 1].
- :class:`ForegroundZScore`: MRI alternative, z-score over foreground voxels, background 0.
- :class:`BitRangeScaleIntensity`: X-ray/ultrasound/endoscopy/microscopy, min-max on the bit range
  (0..255 for 8-bit, 0..65535 for 16-bit, BitsStored for DICOM) recorded by the loader.
- :class:`ToThreeChannels`: grey -> 3 channels, RGB kept, alpha dropped.
- :class:`ImageNetNormalize`: ``(x - mean) / std`` per channel with ImageNet statistics.
- :class:`BinarizeMask`: any non-alpha channel above a threshold -> ``(1, *spatial)`` in {0, 1}.

Each has a dictionary version (``...d``) taking ``keys`` and ``allow_missing_keys``; other keyword
arguments go to the array transform.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from monai_skipts.utils import InputDataError

__all__ = [
    "WINDOW_PRESETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "WindowIntensity",
    "WindowIntensityd",
    "PercentileScaleIntensity",
    "PercentileScaleIntensityd",
    "ForegroundZScore",
    "ForegroundZScored",
    "BitRangeScaleIntensity",
    "BitRangeScaleIntensityd",
    "ToThreeChannels",
    "ToThreeChannelsd",
    "ImageNetNormalize",
    "ImageNetNormalized",
    "BinarizeMask",
    "BinarizeMaskd",
]

#: CT windows as (centre = level, width) in Hounsfield units.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (80.0, 200.0),
    "lung": (-600.0, 1500.0),
    "abdomen": (40.0, 400.0),
    "bone": (400.0, 1800.0),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _as_float(img) -> torch.Tensor:
    img = torch.as_tensor(img) if not isinstance(img, torch.Tensor) else img
    return img if img.dtype == torch.float32 else img.to(torch.float32)


def _meta(img) -> dict:
    return img.meta if isinstance(img, MetaTensor) else {}


def _require_finite(img: torch.Tensor) -> None:
    """InputDataError naming the file when ``img`` holds NaN/inf: scaling would spread them silently."""
    x = img.as_tensor() if isinstance(img, MetaTensor) else img
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        problem = f"contains {bad} NaN/inf values; intensity scaling needs finite values (load with nonfinite='replace' to replace them)"
        raise InputDataError(_meta(img).get("filename_or_obj"), problem)


def _scale(img: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """``(img - lo) / (hi - lo)`` clipped to [0, 1]; zeros when ``hi <= lo`` (or not finite)."""
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        return torch.zeros_like(img)
    return ((img - lo) / (hi - lo)).clamp(0.0, 1.0)


class WindowIntensity(Transform):
    """CT window/level: ``clip((x - (c - w/2)) / w, 0, 1)``, input in HU, output in [0, 1].

    Args:
        window: a name in ``WINDOW_PRESETS`` (brain 40/80, subdural 80/200, lung -600/1500, abdomen
            40/400, bone 400/1800, as centre/width), a ``(centre, width)`` pair, or ``"dicom"`` for the
            file's own WindowCenter/WindowWidth (first value) from the loader's meta.
        window_pictures: pictures (PNG/JPEG/...) are display images that were windowed when exported, so
            by default they are scaled by their bit range (:class:`BitRangeScaleIntensity`) instead;
            set True to window their raw values anyway.
    """

    def __init__(self, window: str | Sequence[float] = "brain", window_pictures: bool = False):
        if isinstance(window, str):
            if window != "dicom" and window not in WINDOW_PRESETS:
                choices = f"one of {sorted(WINDOW_PRESETS)}, 'dicom' or (centre, width)"
                raise ValueError(f"unknown window {window!r}; use {choices}")
            self.window = window if window == "dicom" else WINDOW_PRESETS[window]
        else:
            center, width = (float(v) for v in window)
            if not width > 0:
                raise ValueError(f"window width must be positive, got {width}")
            self.window = (center, width)
        self.window_pictures = window_pictures

    def __call__(self, img) -> torch.Tensor:
        img, meta = _as_float(img), _meta(img)
        _require_finite(img)
        if meta.get("source_format") == "picture" and not self.window_pictures:
            return BitRangeScaleIntensity()(img)
        if self.window == "dicom":
            center, width = float(meta.get("window_center", math.nan)), float(meta.get("window_width", math.nan))
            if not (math.isfinite(center) and width > 0):
                problem = "has no WindowCenter/WindowWidth; give an explicit window (centre, width) or a preset name"
                raise InputDataError(meta.get("filename_or_obj"), problem)
        else:
            center, width = self.window
        return _scale(img, center - width / 2, center + width / 2)


class PercentileScaleIntensity(Transform):
    """Clip to the ``lower``/``upper`` percentiles (default 0.5 and 99.5) and scale that range to [0, 1].

    Args:
        lower, upper: the percentiles mapped to 0 and 1.
        channel_wise: percentiles of each channel separately (channel first), for images whose
            channels are different acquisitions, e.g. MRI sequences stacked as channels (LGG's
            pre-contrast / FLAIR / post-contrast), each on its own intensity scale. ``False`` (the
            default): one pair of percentiles over all channels, which keeps an RGB image's colours.

    >>> import torch
    >>> img = torch.stack([torch.linspace(0, 1, 100), torch.linspace(0, 50, 100)]).reshape(2, 10, 10)
    >>> [round(float(c.max()), 2) for c in PercentileScaleIntensity(0, 100)(img)]
    [0.02, 1.0]
    >>> [round(float(c.max()), 2) for c in PercentileScaleIntensity(0, 100, channel_wise=True)(img)]
    [1.0, 1.0]
    """

    def __init__(self, lower: float = 0.5, upper: float = 99.5, channel_wise: bool = False):
        if not 0 <= lower < upper <= 100:
            raise ValueError(f"need 0 <= lower < upper <= 100, got {lower}, {upper}")
        self.lower, self.upper, self.channel_wise = lower, upper, bool(channel_wise)

    def __call__(self, img) -> torch.Tensor:
        img = _as_float(img)
        _require_finite(img)
        x = (img.as_tensor() if isinstance(img, MetaTensor) else img).detach().cpu().numpy()
        if not self.channel_wise or x.ndim < 2:
            lo, hi = np.percentile(x.reshape(-1), [self.lower, self.upper])
            return _scale(img, float(lo), float(hi))
        bounds = np.percentile(x.reshape(x.shape[0], -1), [self.lower, self.upper], axis=1)
        return torch.cat([_scale(img[c : c + 1], float(lo), float(hi)) for c, (lo, hi) in enumerate(bounds.T)])


class ForegroundZScore(Transform):
    """Z-score with the mean and standard deviation of the foreground voxels (above ``threshold``,
    default above the image minimum); background voxels are set to 0. No foreground or zero spread -> zeros."""

    def __init__(self, threshold: float | None = None):
        self.threshold = threshold

    def __call__(self, img) -> torch.Tensor:
        img = _as_float(img)
        _require_finite(img)
        x = img.as_tensor() if isinstance(img, MetaTensor) else img
        fg = x > (x.min() if self.threshold is None else self.threshold)
        vals = x[fg]
        if vals.numel() < 2 or not float(vals.std()) > 0:
            return torch.zeros_like(img)
        return torch.where(fg, (img - vals.mean()) / vals.std(), torch.zeros_like(img))


class BitRangeScaleIntensity(Transform):
    """Min-max scale to [0, 1].

    Args:
        value_range: ``"bits"`` (default) uses the representable range the loader put in meta
            (``value_min``/``value_max``: 0..255, 0..65535, DICOM BitsStored), falling back to the image's
            own min/max when unknown (NIfTI, float TIFF, plain tensors); ``"image"`` always uses the image's
            min/max; or an explicit ``(low, high)``. Output is clipped to [0, 1]; a constant image under
            ``"image"`` scaling becomes zeros.
    """

    def __init__(self, value_range: str | Sequence[float] = "bits"):
        if isinstance(value_range, str) and value_range not in ("bits", "image"):
            raise ValueError(f"value_range must be 'bits', 'image' or (low, high), got {value_range!r}")
        self.value_range = value_range if isinstance(value_range, str) else tuple(float(v) for v in value_range)

    def __call__(self, img) -> torch.Tensor:
        img, meta = _as_float(img), _meta(img)
        _require_finite(img)
        if isinstance(self.value_range, tuple):
            lo, hi = self.value_range
        else:
            lo, hi = float(meta.get("value_min", math.nan)), float(meta.get("value_max", math.nan))
            if self.value_range == "image" or not (math.isfinite(lo) and math.isfinite(hi)):
                lo, hi = (float(img.min()), float(img.max())) if img.numel() else (0.0, 0.0)
        return _scale(img, lo, hi)


class ToThreeChannels(Transform):
    """``(C, *spatial)`` -> ``(3, *spatial)``: grey (C=1) and grey+alpha (C=2) replicate the grey channel,
    RGB (C=3) is kept, RGBA (C=4) drops alpha. Other channel counts raise InputDataError."""

    def __call__(self, img) -> torch.Tensor:
        img = _as_float(img)
        c = img.shape[0]
        if c in (1, 2):
            return img[:1].repeat(3, *([1] * (img.ndim - 1)))
        if c in (3, 4):
            return img[:3]
        problem = f"has {c} channels; expected 1 (grey), 2 (grey+alpha), 3 (RGB) or 4 (RGBA)"
        raise InputDataError(_meta(img).get("filename_or_obj"), problem)


class ImageNetNormalize(Transform):
    """``(x - mean[c]) / std[c]`` per channel of a ``(3, *spatial)`` image in [0, 1] (ImageNet statistics)."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        if len(self.mean) != len(self.std) or min(self.std) <= 0:
            raise ValueError("mean and std need the same length and std must be positive")

    def __call__(self, img) -> torch.Tensor:
        img = _as_float(img)
        if img.shape[0] != len(self.mean):
            problem = f"has {img.shape[0]} channels, normalisation expects {len(self.mean)}"
            raise InputDataError(_meta(img).get("filename_or_obj"), problem)
        shape = (-1,) + (1,) * (img.ndim - 1)
        mean = torch.tensor(self.mean, dtype=img.dtype, device=img.device).reshape(shape)
        std = torch.tensor(self.std, dtype=img.dtype, device=img.device).reshape(shape)
        return (img - mean) / std


class BinarizeMask(Transform):
    """``(C, *spatial)`` mask -> ``(1, *spatial)`` float {0, 1}: 1 where any colour channel (alpha of a
    2- or 4-channel mask ignored) is above ``threshold`` (default 0: every non-black pixel)."""

    def __init__(self, threshold: float = 0.0):
        self.threshold = threshold

    def __call__(self, mask) -> torch.Tensor:
        mask = _as_float(mask)
        if mask.shape[0] in (2, 4):
            mask = mask[:-1]
        return (mask > self.threshold).any(0, keepdim=True).to(torch.float32)


class _Dictionary(MapTransform):
    """Apply ``array_class(**kwargs)`` to every key."""

    array_class: type = Transform

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False, **kwargs: Any):
        super().__init__(keys, allow_missing_keys)
        self.transform = self.array_class(**kwargs)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d


class WindowIntensityd(_Dictionary):
    """Dictionary version of :class:`WindowIntensity`."""

    array_class = WindowIntensity


class PercentileScaleIntensityd(_Dictionary):
    """Dictionary version of :class:`PercentileScaleIntensity`."""

    array_class = PercentileScaleIntensity


class ForegroundZScored(_Dictionary):
    """Dictionary version of :class:`ForegroundZScore`."""

    array_class = ForegroundZScore


class BitRangeScaleIntensityd(_Dictionary):
    """Dictionary version of :class:`BitRangeScaleIntensity`."""

    array_class = BitRangeScaleIntensity


class ToThreeChannelsd(_Dictionary):
    """Dictionary version of :class:`ToThreeChannels`."""

    array_class = ToThreeChannels


class ImageNetNormalized(_Dictionary):
    """Dictionary version of :class:`ImageNetNormalize`."""

    array_class = ImageNetNormalize


class BinarizeMaskd(_Dictionary):
    """Dictionary version of :class:`BinarizeMask`.

    Args:
        like_key: if given (e.g. ``"image"``), a mask key present with value ``None`` (a normal image
            without a mask file) becomes an all-zero ``(1, *spatial)`` mask the size of that key's image,
            and a loaded mask whose size differs from the image raises InputDataError naming the mask.
            A missing key is left missing (with ``allow_missing_keys``).
        extra_key: the key of a list of further mask files of the same image (BUSI's
            ``_mask_1.png``, ``_mask_2.png``: one file per lesion). Each is loaded, checked against
            the mask's size, and joined into the mask (the lesion is their union); the key is then
            removed, so that a batch mixing items with and without extra masks collates. ``None``:
            no such key.
    """

    array_class = BinarizeMask

    def __init__(
        self,
        keys: KeysCollection,
        like_key: str | None = None,
        allow_missing_keys: bool = False,
        extra_key: str | None = "extra_masks",
        **kwargs: Any,
    ):
        super().__init__(keys, allow_missing_keys, **kwargs)
        self.like_key = like_key
        self.extra_key = extra_key
        self._loader = None

    def _join_extra(self, mask, paths) -> Any:
        if self._loader is None:  # built on first use: io imports this module
            from monai_skipts.transforms.io import LoadMedicalImage

            self._loader = LoadMedicalImage()
        mask = self.transform(mask)
        for path in paths:
            extra = self._loader(path)
            if tuple(extra.shape[1:]) != tuple(mask.shape[1:]):
                raise InputDataError(
                    path, f"extra mask size {tuple(extra.shape[1:])} differs from the mask's {tuple(mask.shape[1:])}"
                )
            mask = torch.maximum(mask, self.transform(extra))
        return mask

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        extra = d.pop(self.extra_key, None) if self.extra_key is not None else None
        if extra:
            for key in self.key_iterator(d):
                if d[key] is not None:
                    d[key] = self._join_extra(d[key], extra)
        like = d.get(self.like_key) if self.like_key is not None else None
        for key in self.key_iterator(d):
            if d[key] is None:
                if like is not None:
                    meta = {**_meta(like), "filename_or_obj": ""}
                    d[key] = MetaTensor(torch.zeros((1, *like.shape[1:])), affine=meta.pop("affine", None), meta=meta)
                continue
            if like is not None and tuple(d[key].shape[1:]) != tuple(like.shape[1:]):
                raise InputDataError(
                    _meta(d[key]).get("filename_or_obj"),
                    f"mask size {tuple(d[key].shape[1:])} differs from image size {tuple(like.shape[1:])}",
                )
            d[key] = self.transform(d[key])
        return d
