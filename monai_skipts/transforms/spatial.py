"""MONAI's ``Resize`` / ``Resized`` with the anti-aliasing smoothing computed on fixed-shape tiles.

MONAI smooths an image before downsizing it (``anti_aliasing=True``) with a separable Gaussian run as one
depthwise convolution per axis over the whole image. On the CPU, PyTorch hands these to oneDNN, which
compiles one primitive per distinct input shape and keeps it in a process-wide cache; a data set whose
images all differ in size therefore adds primitives for every image. :class:`TiledResize` computes the
same convolutions on tiles of a fixed size (with the halo the kernel needs, the image zero-padded to
whole tiles), so the convolutions see one input shape per (channel count, kernel length, axis), and
returns the same tensor, bit for bit, as MONAI's ``Resize`` with the same arguments.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import DtypeLike, KeysCollection
from monai.data import MetaTensor, get_track_meta
from monai.data.meta_tensor import get_spatial_ndim
from monai.networks.layers.convutils import gaussian_1d
from monai.networks.layers.simplelayers import GaussianFilter
from monai.transforms import Resize, Resized
from monai.utils import convert_to_dst_type, convert_to_tensor, ensure_tuple, ensure_tuple_rep, fall_back_tuple
from monai.utils.enums import InterpolateMode
from monai.utils.type_conversion import get_equivalent_dtype

__all__ = ["DEFAULT_TILE", "MIN_TILE_SAMPLES", "TiledResize", "TiledResized", "tiled_gaussian_smooth"]

#: tile side per number of spatial dimensions (output samples per axis of one convolution call)
DEFAULT_TILE = {1: 32768, 2: 256, 3: 64}

#: the fewest samples per channel a tile holds; smaller tiles are enlarged to it (PyTorch runs small
#: single-channel convolutions without oneDNN, and their last bits differ from the whole image's)
MIN_TILE_SAMPLES = 32768


def _tile_side(tile: int | None, spatial_ndim: int) -> int:
    """The tile side used: ``tile`` (default :data:`DEFAULT_TILE`), at least :data:`MIN_TILE_SAMPLES` per tile."""
    side = int(tile) if tile is not None else DEFAULT_TILE.get(spatial_ndim, 32)
    if side < 1:
        raise ValueError(f"tile must be positive, got {tile}")
    return max(side, math.ceil(MIN_TILE_SAMPLES ** (1 / spatial_ndim) - 1e-9))


def _conv_along(x: torch.Tensor, kernel: torch.Tensor, axis: int, tile: int) -> torch.Tensor:
    """MONAI's one-axis pass of ``separable_filtering`` (zero padding, depthwise), tile by tile."""
    spatial = x.shape[2:]
    n = len(spatial)
    halo = (kernel.shape[0] - 1) // 2
    tiles = [max(1, math.ceil(s / tile)) for s in spatial]
    pad: list[int] = []  # torch.nn.functional.pad order: last axis first
    for a in reversed(range(n)):
        extra = tiles[a] * tile - spatial[a]
        pad += [halo, halo + extra] if a == axis else [0, extra]
    padded = F.pad(x, pad, mode="constant")
    shape = [1] * (n + 2)
    shape[axis + 2] = -1
    channels = x.shape[1]
    weight = kernel.reshape(shape).repeat([channels, 1] + [1] * n)
    conv = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    out = x.new_empty((x.shape[0], channels, *(t * tile for t in tiles)))
    for index in itertools.product(*(range(t) for t in tiles)):
        src = [slice(i * tile, (i + 1) * tile + (2 * halo if a == axis else 0)) for a, i in enumerate(index)]
        dst = [slice(i * tile, (i + 1) * tile) for i in index]
        out[(slice(None), slice(None), *dst)] = conv(padded[(slice(None), slice(None), *src)], weight, groups=channels)
    return out[(slice(None), slice(None), *(slice(0, s) for s in spatial))]


def tiled_gaussian_smooth(img: torch.Tensor, sigma: Sequence[float], tile: int | None = None) -> torch.Tensor:
    """MONAI's ``GaussianSmooth(sigma)`` (erf kernel truncated at 4 sigma, zero padding) of a channel-first
    float32 tensor ``(C, *spatial)``, computed on tiles of ``tile`` samples per axis; bit-identical.

    Args:
        img: ``(C, *spatial)`` float32 tensor, 1 to 3 spatial dimensions.
        sigma: one standard deviation per spatial axis (0: the axis is copied through a ``[0, 1, 0]`` kernel,
            as MONAI does).
        tile: tile side; default :data:`DEFAULT_TILE` for the number of spatial dimensions; raised to
            hold at least :data:`MIN_TILE_SAMPLES` samples.
    """
    n = img.ndim - 1
    if len(sigma) != n:
        raise ValueError(f"sigma needs one value per spatial dimension ({n}), got {sigma!r}")
    tile = _tile_side(tile, n)
    # the kernels exactly as GaussianSmooth -> GaussianFilter -> separable_filtering build them
    gaussian = GaussianFilter(n, [torch.as_tensor(s, device=img.device) for s in sigma])
    kernels = [gaussian_1d(s, truncated=gaussian.truncated, approx=gaussian.approx).to(img) for s in gaussian.sigma]
    x = img.unsqueeze(0)
    for axis, kernel in enumerate(kernels):  # separable_filtering convolves axis 0 first
        if kernel.numel() == 1 and kernel[0] == 1:
            continue
        x = _conv_along(x, kernel, axis, tile)
    return x.squeeze(0)


class TiledResize(Resize):
    """MONAI's :class:`~monai.transforms.Resize` with the anti-aliasing smoothing computed on fixed-shape tiles.

    Same arguments, output values, dtype, metadata and inverse as ``Resize`` (the applied operation is
    recorded under this class's name). When the image is downsized with ``anti_aliasing``, the Gaussian
    smoothing (MONAI's ``GaussianSmooth`` with MONAI's default or given sigma) runs as 1-D convolutions on
    tiles of ``tile`` samples per axis plus the kernel's halo, so every convolution has one of a few input
    shapes whatever the image size; the interpolation that follows is MONAI's. MONAI's own computation is
    used unchanged where the smoothing is not applied (no anti-aliasing, upsizing only, lazy execution)
    and where tiling brings nothing or cannot keep the result identical: an image with fewer samples than
    one tile, ``dtype`` other than float32, pending lazy operations, or ``spatial_size`` with more
    dimensions than the image.

    Args:
        spatial_size, size_mode, mode, align_corners, anti_aliasing, anti_aliasing_sigma, dtype, lazy: as
            :class:`~monai.transforms.Resize`.
        tile: tile side in samples per axis; default :data:`DEFAULT_TILE` for the image's number of
            spatial dimensions (256 in 2-D, 64 in 3-D); raised to hold at least :data:`MIN_TILE_SAMPLES`
            samples (182 in 2-D).
    """

    def __init__(
        self,
        spatial_size: Sequence[int] | int,
        size_mode: str = "all",
        mode: str = InterpolateMode.AREA,
        align_corners: bool | None = None,
        anti_aliasing: bool = False,
        anti_aliasing_sigma: Sequence[float] | float | None = None,
        dtype: DtypeLike | torch.dtype = torch.float32,
        lazy: bool = False,
        tile: int | None = None,
    ) -> None:
        super().__init__(spatial_size, size_mode, mode, align_corners, anti_aliasing, anti_aliasing_sigma, dtype, lazy)
        if tile is not None and int(tile) < 1:
            raise ValueError(f"tile must be positive, got {tile}")
        self.tile = None if tile is None else int(tile)

    def _out_size(self, img: torch.Tensor) -> tuple[int, ...] | None:
        """``Resize``'s output spatial size for ``img``, or None where the tiled path does not apply."""
        in_size = tuple(int(s) for s in img.shape[1:])
        if self.size_mode == "all":
            if len(ensure_tuple(self.spatial_size)) != get_spatial_ndim(img) or len(in_size) != get_spatial_ndim(img):
                return None  # Resize adds singleton dimensions (or refuses): its own computation
            return tuple(int(s) for s in fall_back_tuple(self.spatial_size, in_size))
        if not isinstance(self.spatial_size, int):
            return None  # Resize raises
        scale = self.spatial_size / max(in_size)
        return tuple(int(round(s * scale)) for s in in_size)

    def __call__(
        self,
        img: torch.Tensor,
        mode: str | None = None,
        align_corners: bool | None = None,
        anti_aliasing: bool | None = None,
        anti_aliasing_sigma: Sequence[float] | float | None = None,
        dtype: DtypeLike | torch.dtype = None,
        lazy: bool | None = None,
    ) -> torch.Tensor:
        """As :meth:`monai.transforms.Resize.__call__`."""
        args = (mode, align_corners, anti_aliasing, anti_aliasing_sigma, dtype, lazy)
        smooth = self.anti_aliasing if anti_aliasing is None else anti_aliasing
        sigma = self.anti_aliasing_sigma if anti_aliasing_sigma is None else anti_aliasing_sigma
        lazy_ = self.lazy if lazy is None else lazy
        _dtype = get_equivalent_dtype(dtype or self.dtype or img.dtype, torch.Tensor)
        pending = isinstance(img, MetaTensor) and bool(img.pending_operations)
        if not smooth or lazy_ or pending or _dtype != torch.float32:
            return super().__call__(img, *args)
        img = convert_to_tensor(img, track_meta=get_track_meta())  # as monai.transforms.spatial.functional.resize
        if img.device.type != "cpu":
            return super().__call__(img, *args)
        out_size = self._out_size(img)
        in_size = tuple(int(s) for s in img.shape[1:])
        n = len(in_size)
        tile = _tile_side(self.tile, n)
        if out_size is None or not any(o < i for o, i in zip(out_size, in_size)) or math.prod(in_size) < tile**n:
            return super().__call__(img, *args)
        # the smoothing of monai.transforms.spatial.functional.resize, on tiles
        factors = torch.div(torch.Tensor(list(in_size)), torch.Tensor(out_size))
        if sigma is None:
            sigmas = torch.maximum(torch.zeros(factors.shape), (factors - 1) / 2).tolist()
        else:
            sigmas = list(ensure_tuple_rep(sigma, n))
            sigmas = [sigmas[a] * int(factors[a] > 1) for a in range(n)]
        plain = convert_to_tensor(img, dtype=torch.float32, track_meta=False)
        smoothed = tiled_gaussian_smooth(plain, sigmas, tile)
        smoothed, *_ = convert_to_dst_type(smoothed, dst=img, dtype=torch.float32)
        mode, align_corners, _, _, dtype, lazy = args
        return super().__call__(smoothed, mode, align_corners, False, None, dtype, lazy)


class TiledResized(Resized):
    """Dictionary wrapper of :class:`TiledResize`: MONAI's :class:`~monai.transforms.Resized` with the
    anti-aliasing smoothing on fixed-shape tiles; same output as ``Resized`` with the same arguments.

    Args:
        keys: keys of the images to resize.
        spatial_size, size_mode, mode, align_corners, anti_aliasing, anti_aliasing_sigma, dtype,
            allow_missing_keys, lazy: as :class:`~monai.transforms.Resized` (``mode``, ``align_corners``,
            ``anti_aliasing``, ``anti_aliasing_sigma`` and ``dtype`` may be given per key).
        tile: tile side, see :class:`TiledResize`.
    """

    def __init__(
        self,
        keys: KeysCollection,
        spatial_size: Sequence[int] | int,
        size_mode: str = "all",
        mode: Sequence[str] | str = InterpolateMode.AREA,
        align_corners: Sequence[bool | None] | bool | None = None,
        anti_aliasing: Sequence[bool] | bool = False,
        anti_aliasing_sigma: Sequence[Sequence[float] | float | None] | Sequence[float] | float | None = None,
        dtype: Sequence[DtypeLike | torch.dtype] | DtypeLike | torch.dtype = np.float32,
        allow_missing_keys: bool = False,
        lazy: bool = False,
        tile: int | None = None,
    ) -> None:
        super().__init__(
            keys,
            spatial_size,
            size_mode,
            mode,
            align_corners,
            anti_aliasing,
            anti_aliasing_sigma,
            dtype,
            allow_missing_keys,
            lazy,
        )
        self.resizer = TiledResize(spatial_size=spatial_size, size_mode=size_mode, lazy=lazy, tile=tile)
