"""The anatomy in the picture, and burned-in annotations as normal content.

- :class:`AnatomyMask` / :class:`AnatomyMaskd`: a per-modality foreground mask ``(1, H, W)`` in {0, 1}
  built from MONAI's own pieces: a threshold (:class:`monai.transforms.ForegroundMask`), the largest
  connected component (:class:`monai.transforms.KeepLargestConnectedComponent`) and the holes filled
  (:class:`monai.transforms.FillHoles`). Captions, rulers and markers outside the body are separate
  components and fall away; dark structures enclosed by the body (ventricles, lungs, cysts) are
  filled in.
- :class:`RandBurnedInAnnotation` / :class:`RandBurnedInAnnotationd`: paste random text (PIL's default
  font) and markers (calipers ``+``, rulers, arrows) into training normals as *normal* content, so a
  caption or a caliper cannot drive an anomaly score.

Both work at any point of the preprocessing chain (:func:`~monai_skipts.transforms.preset_transforms`):
on the loaded values (HU for DICOM/NIfTI CT, the file's range for pictures), on the [0, 1] scaled
image, or on the ImageNet-normalised 3-channel tensor the networks see. The mask is invariant to a
per-channel affine rescaling of a grey image, except for CT in HU, which is recognised by its values
(anything below -200 cannot be a scaled or normalised image) and thresholded in HU.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    FillHoles,
    ForegroundMask,
    KeepLargestConnectedComponent,
    MapTransform,
    Randomizable,
    RandomizableTransform,
    Transform,
)
from monai.utils import convert_to_dst_type

__all__ = [
    "ANATOMY_MODALITIES",
    "AnatomyMask",
    "AnatomyMaskd",
    "RandBurnedInAnnotation",
    "RandBurnedInAnnotationd",
]

#: the modality presets and how each one's anatomy is thresholded before the largest component and
#: the hole filling: ``"ct"`` body from HU (or above the window floor once windowed), ``"nonzero"``
#: above the background level, ``"otsu"`` Otsu's threshold
ANATOMY_MODALITIES: dict[str, str] = {
    "ct_brain": "ct",
    "ct_lung": "ct",
    "mri": "nonzero",
    "xray": "otsu",
    "ultrasound": "otsu",
    "rgb": "otsu",
}

_HU_FLOOR = -200.0  # a value below this is a CT in HU (scaled images are >= 0, ImageNet-normalised >= -2.2)


class AnatomyMask(Transform):
    """Foreground (body, brain, tissue) mask of a 2-D image, per modality.

    Steps: the channels averaged into one grey image; a threshold by modality (below);
    :class:`~monai.transforms.ForegroundMask`; :class:`~monai.transforms.KeepLargestConnectedComponent`;
    :class:`~monai.transforms.FillHoles`.

    ===============  ==============================================================================
    CT (``ct_*``)    HU input (any value < -200): ``> hu_threshold`` (-500 HU, air vs body). Windowed
                     or normalised input: above the window floor (the image minimum) by
                     ``floor_fraction`` of the range (fat clipped to the floor is enclosed by skin and
                     filled back)
    ``mri``          "non-zero": above the background level (the minimum) by ``floor_fraction`` of
                     the robust range (minimum to 99th percentile); tolerant to noise in the background
    ``xray``,        Otsu's threshold on the grey image
    ``ultrasound``,
    ``rgb``
    ===============  ==============================================================================

    Args:
        modality: a preset name (``ANATOMY_MODALITIES``).
        threshold: override: ``"otsu"``, ``"nonzero"``, or a float in the input's own values.
        hu_threshold: CT in HU: the body threshold.
        floor_fraction: for ``"nonzero"`` and windowed CT: the fraction of the range above the minimum.
        largest_component: keep the largest connected component only.
        fill_holes: fill holes enclosed by the foreground.
        frame_fraction: Otsu modalities: when more than this share of the image sits at its maximum
            (within ``saturation_tolerance`` of the range), that saturated part is a frame (X-ray
            collimation, a white border) and is background; Otsu's threshold is taken over the rest.
        saturation_tolerance: see ``frame_fraction``.

    Returns:
        ``(1, H, W)`` float tensor (or array, like the input) in {0, 1}; an empty mask when the
        image is constant.

    Raises:
        ValueError: an unknown modality or threshold, or an input that is not ``(C, H, W)``.

    Example:
        >>> import torch
        >>> img = torch.zeros(1, 64, 64); img[:, 16:48, 16:48] = 0.6; img[:, 2:4, 2:10] = 1.0  # body + caption
        >>> m = AnatomyMask("xray")(img)
        >>> int(m.sum()), float(m[0, 3, 5])
        (1024, 0.0)
    """

    def __init__(
        self,
        modality: str = "mri",
        threshold: str | float | None = None,
        hu_threshold: float = -500.0,
        floor_fraction: float = 0.05,
        largest_component: bool = True,
        fill_holes: bool = True,
        frame_fraction: float = 0.1,
        saturation_tolerance: float = 0.005,
    ):
        if modality not in ANATOMY_MODALITIES:
            raise ValueError(f"unknown modality {modality!r}; choose one of {', '.join(ANATOMY_MODALITIES)}")
        if isinstance(threshold, str) and threshold not in ("otsu", "nonzero"):
            raise ValueError(f"threshold must be 'otsu', 'nonzero' or a number, got {threshold!r}")
        self.modality = modality
        self.threshold = threshold
        self.hu_threshold = float(hu_threshold)
        self.floor_fraction = float(floor_fraction)
        self.frame_fraction, self.saturation_tolerance = float(frame_fraction), float(saturation_tolerance)
        self.largest = KeepLargestConnectedComponent(applied_labels=[1], is_onehot=False) if largest_component else None
        self.fill = FillHoles(applied_labels=[1]) if fill_holes else None

    def _level(self, grey: np.ndarray) -> str | float:
        """The threshold in the grey image's values (or ``"otsu"``)."""
        if self.threshold is not None and not isinstance(self.threshold, str):
            return float(self.threshold)
        kind = self.threshold or ANATOMY_MODALITIES[self.modality]
        lo = float(grey.min())
        if kind == "ct":
            if lo < _HU_FLOOR:
                return self.hu_threshold
            return lo + self.floor_fraction * (float(grey.max()) - lo)
        if kind == "nonzero":
            return lo + self.floor_fraction * (float(np.percentile(grey, 99)) - lo)
        return "otsu"

    def __call__(self, img: Any) -> Any:
        arr = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
        if arr.ndim != 3:
            raise ValueError(f"AnatomyMask needs a (C, H, W) image, got shape {tuple(arr.shape)}")
        grey = arr.astype(np.float64).mean(axis=0)
        lo, hi = float(grey.min()), float(grey.max())
        if not np.isfinite([lo, hi]).all() or hi <= lo:
            out = np.zeros((1, *grey.shape), np.float32)
            return convert_to_dst_type(out, img, dtype=torch.float32 if isinstance(img, torch.Tensor) else None)[0]
        level = self._level(grey)
        # ForegroundMask takes dark foreground on a light background; invert=True flips a [0, 1] image,
        # so the threshold is given on the flipped scale (Otsu is computed on it)
        unit = ((grey - lo) / (hi - lo))[None]
        saturated = unit[0] >= 1.0 - self.saturation_tolerance
        frame = level == "otsu" and saturated.mean() > self.frame_fraction
        if level == "otsu" and not frame:
            fg = ForegroundMask(threshold="otsu", invert=True)(unit)
        else:
            if frame:  # a saturated frame (X-ray collimation): Otsu over the rest, the frame is background
                from skimage.filters import threshold_otsu

                level_unit = float(threshold_otsu(unit[0][~saturated]))
            else:
                level_unit = (float(level) - lo) / (hi - lo)
            # strictly above the level: ForegroundMask keeps <= on the flipped scale, so nudge it
            fg = ForegroundMask(threshold=float(np.nextafter(1.0 - level_unit, -np.inf)), invert=True)(unit)
        mask = np.asarray(fg, dtype=np.uint8).reshape(1, *grey.shape)
        if frame:
            mask[0][saturated] = 0
        if mask.any():
            if self.largest is not None:
                mask = np.asarray(self.largest(mask), dtype=np.uint8)
            if self.fill is not None:
                mask = np.asarray(self.fill(mask), dtype=np.uint8)
        out = mask.astype(np.float32)
        if isinstance(img, torch.Tensor):
            return torch.as_tensor(out, device=img.device)
        return out


class AnatomyMaskd(MapTransform):
    """Dictionary version of :class:`AnatomyMask`: the mask of ``keys`` (the first key's image) is
    written under ``mask_key``.

    Args:
        keys: the image key (one).
        mask_key: where the ``(1, H, W)`` mask goes (default ``"anatomy"``).
        modality, threshold, hu_threshold, floor_fraction, largest_component, fill_holes: as for
            :class:`AnatomyMask`.
        allow_missing_keys: no error (and no mask) when the image key is missing.

    Example:
        >>> import torch
        >>> d = {"image": torch.zeros(3, 32, 32)}; d["image"][:, 8:24, 8:24] = 1.0
        >>> int(AnatomyMaskd("image", modality="mri")(d)["anatomy"].sum())
        256
    """

    def __init__(
        self,
        keys: KeysCollection,
        mask_key: str = "anatomy",
        modality: str = "mri",
        threshold: str | float | None = None,
        hu_threshold: float = -500.0,
        floor_fraction: float = 0.05,
        largest_component: bool = True,
        fill_holes: bool = True,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key
        self.masker = AnatomyMask(modality, threshold, hu_threshold, floor_fraction, largest_component, fill_holes)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.mask_key] = self.masker(d[key])
            break
        return d


# ------------------------------------------------------------------------------ burned-in annotations

_WORDS = ("LEFT", "RIGHT", "AXIAL", "L", "R", "TRV", "SAG", "CM", "MM", "DIST", "ID", "SCAN", "HEAD", "A", "P")


def _random_text(rs: np.random.RandomState) -> str:
    n = int(rs.randint(1, 4))
    parts = []
    for _ in range(n):
        if rs.rand() < 0.5:
            parts.append(_WORDS[int(rs.randint(len(_WORDS)))])
        else:
            parts.append(f"{rs.uniform(0, 99):.1f}")
    return " ".join(parts)


class RandBurnedInAnnotation(RandomizableTransform):
    """Paste random burned-in annotations into an image: text (PIL's default bitmap font), caliper
    crosses ``+``, rulers (a line with ticks) and arrows, at random places (inside and outside the
    anatomy), drawn in the image's brightest (or, with ``dark_fraction``, darkest) value per channel.

    Used on training normals as normal content: the student then learns to reproduce captions and
    markers, so they do not drive an anomaly score at test time.

    Args:
        prob: probability of annotating an image.
        max_texts: up to this many text strings (at least one when annotated, if ``max_texts > 0``).
        max_markers: up to this many markers (crosses, rulers, arrows).
        dark_fraction: share of annotations drawn dark instead of bright.

    Returns:
        The annotated image, same type, shape and dtype. :attr:`last_mask` holds the ``(1, H, W)``
        mask of the pixels drawn (all zero when the image was not annotated).

    Example:
        >>> import torch
        >>> t = RandBurnedInAnnotation(prob=1.0); _ = t.set_random_state(0)
        >>> img = torch.linspace(0, 1, 64 * 64).reshape(1, 64, 64)
        >>> out = t(img); bool(t.last_mask.sum() > 0) and bool((out != img).any())
        True
    """

    def __init__(self, prob: float = 0.5, max_texts: int = 2, max_markers: int = 3, dark_fraction: float = 0.1):
        RandomizableTransform.__init__(self, prob)
        self.max_texts, self.max_markers = int(max_texts), int(max_markers)
        self.dark_fraction = float(dark_fraction)
        self.last_mask: torch.Tensor | None = None
        self._drawing: list[tuple[np.ndarray, bool]] = []

    def randomize(self, shape: Sequence[int]) -> None:  # type: ignore[override]
        super().randomize(None)
        self._drawing = []
        if not self._do_transform:
            return
        from PIL import Image, ImageDraw, ImageFont

        h, w = int(shape[-2]), int(shape[-1])
        font = ImageFont.load_default()
        n_text = int(self.R.randint(1, self.max_texts + 1)) if self.max_texts > 0 else 0
        n_mark = int(self.R.randint(0, self.max_markers + 1))
        for i in range(n_text + n_mark):
            canvas = Image.new("L", (w, h), 0)
            draw = ImageDraw.Draw(canvas)
            x, y = int(self.R.randint(0, max(1, w - 8))), int(self.R.randint(0, max(1, h - 8)))
            if i < n_text:
                draw.text((x, y), _random_text(self.R), fill=255, font=font)
            else:
                kind = int(self.R.randint(3))
                s = int(self.R.randint(3, max(4, min(h, w) // 10)))
                if kind == 0:  # caliper cross
                    draw.line([(x - s, y), (x + s, y)], fill=255)
                    draw.line([(x, y - s), (x, y + s)], fill=255)
                elif kind == 1:  # ruler: a line with ticks
                    length = int(self.R.randint(min(h, w) // 6, min(h, w) // 2 + 1))
                    vertical = self.R.rand() < 0.5
                    end = (x, min(h - 1, y + length)) if vertical else (min(w - 1, x + length), y)
                    draw.line([(x, y), end], fill=255)
                    for t in range(0, length, max(2, length // 8)):
                        if vertical:
                            draw.line([(x, y + t), (x + 3, y + t)], fill=255)
                        else:
                            draw.line([(x + t, y), (x + t, y + 3)], fill=255)
                else:  # arrow
                    dx, dy = self.R.randint(-3 * s, 3 * s + 1), self.R.randint(-3 * s, 3 * s + 1)
                    draw.line([(x, y), (x + dx, y + dy)], fill=255, width=1)
                    draw.polygon([(x, y), (x + s // 2 + 1, y + 2), (x + 2, y + s // 2 + 1)], fill=255)
            self._drawing.append((np.asarray(canvas) > 0, bool(self.R.rand() < self.dark_fraction)))

    def __call__(self, img: Any, randomize: bool = True) -> Any:
        t = torch.as_tensor(img)
        if randomize:
            self.randomize(t.shape)
        mask = torch.zeros((1, *t.shape[-2:]), dtype=torch.bool)
        if not self._do_transform or not self._drawing:
            self.last_mask = mask.float()
            return img
        out = t.clone()
        flat = t.reshape(t.shape[0], -1)
        bright, dark = flat.amax(dim=1), flat.amin(dim=1)
        for drawn, is_dark in self._drawing:
            m = torch.as_tensor(drawn, device=t.device)
            value = (dark if is_dark else bright).to(t.dtype)
            out[:, m] = value[:, None]
            mask[0] |= m.cpu()
        self.last_mask = mask.float()
        return convert_to_dst_type(out, img)[0] if not isinstance(img, torch.Tensor) else out


class RandBurnedInAnnotationd(Randomizable, MapTransform):
    """Dictionary version of :class:`RandBurnedInAnnotation`.

    Args:
        keys: image keys (the same annotation is drawn into each).
        prob, max_texts, max_markers, dark_fraction: as for :class:`RandBurnedInAnnotation`.
        mask_key: optional key for the ``(1, H, W)`` mask of the pixels drawn.
        allow_missing_keys: skip missing keys.

    Example:
        >>> import torch
        >>> t = RandBurnedInAnnotationd("image", prob=1.0, mask_key="annotation"); _ = t.set_random_state(0)
        >>> out = t({"image": torch.rand(3, 64, 64)}); bool(out["annotation"].sum() > 0)
        True
    """

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.5,
        max_texts: int = 2,
        max_markers: int = 3,
        dark_fraction: float = 0.1,
        mask_key: str | None = None,
        allow_missing_keys: bool = False,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.annotate = RandBurnedInAnnotation(prob, max_texts, max_markers, dark_fraction)
        self.mask_key = mask_key

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.annotate.set_random_state(seed, state)
        return self

    def randomize(self, data: Any = None) -> None:
        self.annotate.randomize(data)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        first = True
        for key in self.key_iterator(d):
            if first:
                self.randomize(torch.as_tensor(d[key]).shape)
                first = False
            d[key] = self.annotate(d[key], randomize=False)
        if self.mask_key is not None and not first:
            d[self.mask_key] = self.annotate.last_mask
        return d
