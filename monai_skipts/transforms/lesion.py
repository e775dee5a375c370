"""Synthetic lesions inside the anatomy, for denoising distillation.

:class:`RandSyntheticLesion` (array) and :class:`RandSyntheticLesiond` (dictionary) corrupt a share
``prob`` of images inside an anatomy mask (given, or computed with
:class:`~monai_skipts.transforms.anatomy.AnatomyMask`) and give the exact mask of the pixels they
changed. Families (``families``, one drawn per corrupted image, mixable by listing several):

- ``"intensity"``: one irregular blob (a smooth-noise field under a Gaussian envelope, thresholded to
  cover 0.5-15 % of the anatomy), soft edges, filled darker or brighter than the tissue around it
  (by 1-3 of the anatomy's standard deviations), homogeneous or textured (smooth noise added);
- ``"fpi"``: foreign-patch interpolation (Tan et al. 2020): the pixels of another normal image (another
  image of the batch, or a given source) under an irregular region, taken from a shifted place,
  their mean matched to the local tissue (a cheap stand-in for NSA's Poisson blending, Schlüter et al.
  2022) and interpolated in with a random factor;
- ``"elastic"``: a local radial deformation (a mass effect): pixels pushed out from a centre inside
  the anatomy by up to ``max_displacement`` of the image side, fading to nothing at its radius.

The lesions are generic by design: shapes, contrasts and textures are drawn from wide ranges, not
fitted to any data set's lesions. The images may be in any intensity convention (values in [0, 1], in
HU, ImageNet-normalised): the fill values are taken from the image's own statistics inside the anatomy.
Every channel gets the same relative change (a grey image stays grey).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable, RandomizableTransform
from monai.utils import convert_to_dst_type

from monai_skipts.transforms.anatomy import AnatomyMask

__all__ = ["LESION_FAMILIES", "RandSyntheticLesion", "RandSyntheticLesiond"]

LESION_FAMILIES = ("intensity", "fpi", "elastic")
_ALPHA_FLOOR = 0.05  # soft edges are cut below this weight, so the mask of changed pixels is exact


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of a ``(H, W)`` field (reflect padding)."""
    if sigma <= 0:
        return x
    r = max(1, int(3 * sigma))
    k = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-(k**2) / (2 * sigma**2))
    k = k / k.sum()
    y = x[None, None]
    h, w = x.shape
    pad_h, pad_w = min(r, h - 1), min(r, w - 1)
    y = F.pad(y, (pad_w, pad_w, 0, 0), mode="reflect") if pad_w > 0 else y
    kw = k[r - pad_w : r + pad_w + 1] if pad_w < r else k
    y = F.conv2d(y, (kw / kw.sum()).view(1, 1, 1, -1))
    y = F.pad(y, (0, 0, pad_h, pad_h), mode="reflect") if pad_h > 0 else y
    kh = k[r - pad_h : r + pad_h + 1] if pad_h < r else k
    y = F.conv2d(y, (kh / kh.sum()).view(1, 1, -1, 1))
    return y[0, 0]


class RandSyntheticLesion(RandomizableTransform):
    """Corrupt an image with a synthetic lesion inside its anatomy (see the module docstring).

    Args:
        prob: probability of corrupting an image.
        families: lesion families to draw from (``LESION_FAMILIES``), uniformly.
        area: (min, max) share of the anatomy a lesion covers (intensity and FPI).
        contrast: (min, max) fill offset in the anatomy's standard deviations (intensity).
        textured_fraction: share of intensity lesions with texture (the rest homogeneous).
        edge_sigma: (min, max) Gaussian softness of the edges, in pixels.
        fpi_blend: (min, max) interpolation factor of the foreign patch.
        max_displacement: largest push of the elastic family, as a share of the image side.
        modality: the :class:`AnatomyMask` preset used when no anatomy is given.

    Call: ``(img, anatomy=None, source=None, randomize=True) -> (image, lesion_mask)``; ``img`` is
    ``(C, H, W)`` (tensor or array), ``anatomy`` a ``(1, H, W)`` mask (computed when ``None``),
    ``source`` another normal ``(C, H, W)`` image for ``"fpi"`` (without one, ``"fpi"`` is not drawn).
    Returns the corrupted image (a new tensor; the input is not modified) and the ``(1, H, W)`` float
    mask of exactly the pixels changed (zero when the image was not corrupted). :attr:`last_family`
    names the family drawn (``None`` when not corrupted).

    Raises:
        ValueError: unknown families or bad ranges.

    Example:
        >>> import torch
        >>> t = RandSyntheticLesion(prob=1.0, families=("intensity",)); _ = t.set_random_state(0)
        >>> img = torch.rand(3, 64, 64); anatomy = torch.zeros(1, 64, 64); anatomy[:, 8:56, 8:56] = 1
        >>> out, mask = t(img, anatomy)
        >>> bool(((out != img).any(0) <= (mask[0] > 0)).all()) and bool((mask <= anatomy).all())
        True
    """

    def __init__(
        self,
        prob: float = 0.5,
        families: Sequence[str] = LESION_FAMILIES,
        area: tuple[float, float] = (0.005, 0.15),
        contrast: tuple[float, float] = (1.0, 3.0),
        textured_fraction: float = 0.5,
        edge_sigma: tuple[float, float] = (0.5, 2.5),
        fpi_blend: tuple[float, float] = (0.5, 1.0),
        max_displacement: float = 0.06,
        modality: str = "mri",
    ):
        RandomizableTransform.__init__(self, prob)
        families = (families,) if isinstance(families, str) else tuple(families)
        bad = [f for f in families if f not in LESION_FAMILIES]
        if not families or bad:
            raise ValueError(f"families must be a non-empty subset of {LESION_FAMILIES}, got {list(families)}")
        for name, (lo, hi) in {
            "area": area,
            "contrast": contrast,
            "edge_sigma": edge_sigma,
            "fpi_blend": fpi_blend,
        }.items():
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must be a range (min, max) with 0 <= min <= max, got {(lo, hi)}")
        if not 0 < area[1] <= 1:
            raise ValueError(f"area must lie in (0, 1], got {area}")
        self.families = families
        self.area, self.contrast, self.edge_sigma = tuple(area), tuple(contrast), tuple(edge_sigma)
        self.textured_fraction, self.fpi_blend = float(textured_fraction), tuple(fpi_blend)
        self.max_displacement = float(max_displacement)
        self.masker = AnatomyMask(modality)
        self.last_family: str | None = None
        self._family: str | None = None

    def randomize(self, data: Any = None) -> None:
        """Draw whether to corrupt and which family (``data``: whether a source image is available)."""
        super().randomize(None)
        allowed = [f for f in self.families if f != "fpi" or data]
        if not allowed:
            self._do_transform = False
        self._family = allowed[int(self.R.randint(len(allowed)))] if allowed else None

    # ------------------------------------------------------------------ shapes
    def _centre(self, anatomy: torch.Tensor) -> tuple[int, int]:
        idx = torch.nonzero(anatomy > 0)
        i = int(self.R.randint(len(idx)))
        return int(idx[i, 0]), int(idx[i, 1])

    def _blob(self, anatomy: torch.Tensor) -> torch.Tensor:
        """Soft irregular blob weights ``(H, W)`` in [0, 1], zero outside the anatomy and below the floor."""
        h, w = anatomy.shape
        n_anat = float(anatomy.sum())
        target = self.R.uniform(*self.area) * n_anat
        cy, cx = self._centre(anatomy)
        radius = max(1.0, float(np.sqrt(target / np.pi)))
        yy, xx = torch.meshgrid(
            torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
        )
        aspect = self.R.uniform(0.6, 1.6)
        angle = self.R.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = dx * np.cos(angle) + dy * np.sin(angle)
        v = -dx * np.sin(angle) + dy * np.cos(angle)
        env = torch.exp(-((u / (radius * aspect)) ** 2 + (v * aspect / radius) ** 2))
        noise = torch.as_tensor(self.R.standard_normal((h, w)), dtype=torch.float32)
        noise = _blur(noise, max(1.0, radius / 3))
        noise = noise / noise.std().clamp_min(1e-6)
        field = env * torch.exp(0.5 * noise)
        field = torch.where(anatomy > 0, field, torch.zeros_like(field))
        k = int(min(max(1, round(target)), int(n_anat)))
        level = torch.topk(field.flatten(), k).values[-1]
        hard = (field >= level) & (anatomy > 0) & (field > 0)
        alpha = _blur(hard.float(), self.R.uniform(*self.edge_sigma))
        alpha = torch.clamp(alpha * 1.5, 0, 1)  # the core at full weight, the rim soft
        alpha = torch.where((alpha >= _ALPHA_FLOOR) & (anatomy > 0), alpha, torch.zeros_like(alpha))
        return alpha

    # ------------------------------------------------------------------ families
    def _intensity(self, img: torch.Tensor, anatomy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = self._blob(anatomy)
        inside = anatomy > 0
        sd = img[:, inside].std(dim=1).clamp_min(1e-6)  # (C,)
        local = (img * alpha).flatten(1).sum(1) / alpha.sum().clamp_min(1e-6)  # tissue under the blob
        sign = 1.0 if self.R.rand() < 0.5 else -1.0
        k = self.R.uniform(*self.contrast)
        fill = (local + sign * k * sd)[:, None, None].expand_as(img).clone()
        if self.R.rand() < self.textured_fraction:
            tex = torch.as_tensor(self.R.standard_normal(img.shape[-2:]), dtype=torch.float32)
            tex = _blur(tex, self.R.uniform(0.5, 2.0))
            tex = tex / tex.std().clamp_min(1e-6)
            fill = fill + self.R.uniform(0.2, 0.6) * sd[:, None, None] * tex[None]
        lo = img[:, inside].amin(dim=1)[:, None, None]
        hi = img[:, inside].amax(dim=1)[:, None, None]
        fill = torch.minimum(torch.maximum(fill, lo), hi)  # stay within the anatomy's own range
        out = img * (1 - alpha) + fill * alpha
        return out, alpha

    def _fpi(self, img: torch.Tensor, anatomy: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = self._blob(anatomy)
        h, w = img.shape[-2:]
        sy, sx = int(self.R.randint(-h // 4, h // 4 + 1)), int(self.R.randint(-w // 4, w // 4 + 1))
        patch = torch.roll(source.to(img.dtype), shifts=(sy, sx), dims=(-2, -1))
        wsum = alpha.sum().clamp_min(1e-6)
        offset = (img * alpha).flatten(1).sum(1) / wsum - (patch * alpha).flatten(1).sum(1) / wsum
        patch = patch + offset[:, None, None]
        alpha = alpha * self.R.uniform(*self.fpi_blend)
        alpha = torch.where(alpha >= _ALPHA_FLOOR, alpha, torch.zeros_like(alpha))
        return img * (1 - alpha) + patch * alpha, alpha

    def _elastic(self, img: torch.Tensor, anatomy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = img.shape[-2:]
        cy, cx = self._centre(anatomy)
        n_anat = float(anatomy.sum())
        radius = float(np.sqrt(self.R.uniform(*self.area) * n_anat / np.pi)) * 2.0 + 2.0
        amp = self.R.uniform(0.3, 1.0) * self.max_displacement * min(h, w)
        yy, xx = torch.meshgrid(
            torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
        )
        dy, dx = yy - cy, xx - cx
        r = torch.sqrt(dy**2 + dx**2).clamp_min(1e-6)
        # sample from closer to the centre: content pushed outwards; a bump that is zero beyond the radius
        bump = torch.clamp(1 - (r / radius) ** 2, min=0) ** 2
        shift = amp * bump * torch.clamp(r / (0.3 * radius), max=1.0)
        sy, sx = yy - shift * dy / r, xx - shift * dx / r
        grid = torch.stack([2 * sx / max(w - 1, 1) - 1, 2 * sy / max(h - 1, 1) - 1], dim=-1)[None]
        warped = F.grid_sample(img[None].float(), grid, mode="bilinear", padding_mode="border", align_corners=True)[0]
        changed = (shift > 0.5) & (anatomy > 0)
        alpha = changed.float()
        return torch.where(changed[None], warped.to(img.dtype), img), alpha

    def __call__(self, img: Any, anatomy: Any = None, source: Any = None, randomize: bool = True):
        t = torch.as_tensor(img)
        if hasattr(t, "as_tensor"):
            t = t.as_tensor()
        t = t.detach().float().cpu()
        if t.ndim != 3:
            raise ValueError(f"RandSyntheticLesion needs a (C, H, W) image, got shape {tuple(t.shape)}")
        if randomize:
            self.randomize(source is not None)
        zero = torch.zeros((1, *t.shape[-2:]), dtype=torch.float32)
        self.last_family = None
        if not self._do_transform:
            return convert_to_dst_type(t.clone(), img)[0], zero
        anat = self.masker(t) if anatomy is None else torch.as_tensor(anatomy)
        anat = (anat.reshape(t.shape[-2:]) > 0).cpu()
        if int(anat.sum()) < 4:
            return convert_to_dst_type(t.clone(), img)[0], zero
        if self._family == "intensity":
            out, alpha = self._intensity(t, anat)
        elif self._family == "fpi":
            src = torch.as_tensor(source)
            src = (src.as_tensor() if hasattr(src, "as_tensor") else src).detach().float().cpu()
            out, alpha = self._fpi(t, anat, src)
        else:
            out, alpha = self._elastic(t, anat)
        changed = (out != t).any(dim=0)
        out = torch.where(changed[None], out, t)
        self.last_family = self._family
        return convert_to_dst_type(out, img)[0], ((alpha > 0) & changed).float()[None]


class RandSyntheticLesiond(Randomizable, MapTransform):
    """Dictionary version of :class:`RandSyntheticLesion`.

    Args:
        keys: the image key (one).
        prob, families, area, contrast, textured_fraction, edge_sigma, fpi_blend, max_displacement,
            modality: as for :class:`RandSyntheticLesion`.
        anatomy_key: key of a ``(1, H, W)`` anatomy mask (computed from the image when absent).
        source_key: key of another normal ``(C, H, W)`` image for the ``"fpi"`` family.
        mask_key: where the ``(1, H, W)`` mask of the changed pixels goes.
        clean_key: where the uncorrupted image is kept (for the teacher); ``None``: not kept.
        allow_missing_keys: skip a missing image key.

    Example:
        >>> import torch
        >>> t = RandSyntheticLesiond("image", prob=1.0, families=("intensity", "elastic"))
        >>> _ = t.set_random_state(0)
        >>> d = t({"image": torch.rand(3, 64, 64)})
        >>> sorted(d), bool(torch.equal(d["clean_image"][:, d["lesion_mask"][0] == 0], d["image"][:, d["lesion_mask"][0] == 0]))
        (['clean_image', 'image', 'lesion_mask'], True)
    """

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.5,
        families: Sequence[str] = LESION_FAMILIES,
        area: tuple[float, float] = (0.005, 0.15),
        contrast: tuple[float, float] = (1.0, 3.0),
        textured_fraction: float = 0.5,
        edge_sigma: tuple[float, float] = (0.5, 2.5),
        fpi_blend: tuple[float, float] = (0.5, 1.0),
        max_displacement: float = 0.06,
        modality: str = "mri",
        anatomy_key: str | None = "anatomy",
        source_key: str | None = None,
        mask_key: str = "lesion_mask",
        clean_key: str | None = "clean_image",
        allow_missing_keys: bool = False,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.lesion = RandSyntheticLesion(
            prob, families, area, contrast, textured_fraction, edge_sigma, fpi_blend, max_displacement, modality
        )
        self.anatomy_key, self.source_key = anatomy_key, source_key
        self.mask_key, self.clean_key = mask_key, clean_key

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.lesion.set_random_state(seed, state)
        return self

    def randomize(self, data: Any = None) -> None:
        self.lesion.randomize(data)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            source = d.get(self.source_key) if self.source_key else None
            anatomy = d.get(self.anatomy_key) if self.anatomy_key else None
            self.randomize(source is not None)
            out, mask = self.lesion(d[key], anatomy=anatomy, source=source, randomize=False)
            if self.clean_key is not None:
                d[self.clean_key] = d[key]
            d[key] = out
            d[self.mask_key] = mask
            break
        return d
