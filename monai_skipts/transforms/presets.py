"""Modality presets: the whole 2-D preprocessing chain for one modality, as a MONAI ``Compose``.

Chain (dictionary transforms on ``keys``, plus ``mask_key`` when given)::

    LoadMedicalImaged -> intensity to [0, 1] -> Resized to spatial_size^2 (bilinear, anti-aliased;
    masks: binarised then nearest) -> ToThreeChannelsd -> ImageNetNormalized

Intensity step per preset:

===============  ==============================================================================
``ct_brain``     :class:`WindowIntensityd`, brain window 40/80 HU (centre/width)
``ct_lung``      :class:`WindowIntensityd`, lung window -600/1500 HU
``mri``          :class:`PercentileScaleIntensityd` 0.5-99.5 (``mri_norm="zscore"``: :class:`ForegroundZScored`)
``xray``         :class:`BitRangeScaleIntensityd` (MONOCHROME1 is already inverted by the loader)
``ultrasound``   :class:`BitRangeScaleIntensityd`
``rgb``          :class:`BitRangeScaleIntensityd` (endoscopy, microscopy; colour kept)
===============  ==============================================================================

CT presets window DICOM/NIfTI values in HU; PNG/JPEG exports are already windowed and are scaled by
their bit range instead (see :class:`WindowIntensity`). The JSON fragments in the repository's
``transforms/`` folder wire the same chains for bundles (``keys="image"``, ``mask_key="mask"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from monai.transforms import Compose, Resized, Transform

from monai_skipts.transforms.intensity import (
    BinarizeMaskd,
    BitRangeScaleIntensityd,
    ForegroundZScored,
    ImageNetNormalized,
    PercentileScaleIntensityd,
    ToThreeChannelsd,
    WindowIntensityd,
)
from monai_skipts.transforms.io import LoadMedicalImaged

__all__ = ["PRESETS", "preset_transforms", "build_preprocessing"]

PRESETS = ("ct_brain", "ct_lung", "mri", "xray", "ultrasound", "rgb")
_CT_WINDOWS = {"ct_brain": "brain", "ct_lung": "lung"}


def preset_transforms(
    modality: str,
    spatial_size: int | Sequence[int] = 256,
    keys: str | Sequence[str] = ("image",),
    mask_key: str | None = None,
    window: str | Sequence[float] | None = None,
    mri_norm: str = "percentile",
    load: bool = True,
    **loader_kwargs: Any,
) -> list[Transform]:
    """The list of transforms of :func:`build_preprocessing` (to splice into a longer chain)."""
    if modality not in PRESETS:
        raise ValueError(f"unknown modality preset {modality!r}; choose one of {', '.join(PRESETS)}")
    if window is not None and modality not in _CT_WINDOWS:
        raise ValueError(f"window applies to the CT presets ({', '.join(_CT_WINDOWS)}), not to {modality!r}")
    if mri_norm not in ("percentile", "zscore"):
        raise ValueError(f"mri_norm must be 'percentile' or 'zscore', got {mri_norm!r}")
    keys = [keys] if isinstance(keys, str) else list(keys)
    size = (int(spatial_size),) * 2 if isinstance(spatial_size, (int, float)) else tuple(int(s) for s in spatial_size)
    out: list[Transform] = []
    if load:
        out.append(LoadMedicalImaged(keys, **loader_kwargs))
        if mask_key:
            out.append(LoadMedicalImaged(mask_key, allow_missing_keys=True))
    if modality in _CT_WINDOWS:
        out.append(WindowIntensityd(keys, window=window or _CT_WINDOWS[modality]))
    elif modality == "mri":
        out.append(PercentileScaleIntensityd(keys) if mri_norm == "percentile" else ForegroundZScored(keys))
    else:
        out.append(BitRangeScaleIntensityd(keys))
    if mask_key:
        out.append(BinarizeMaskd(mask_key, like_key=keys[0], allow_missing_keys=True))
    out.append(Resized(keys, spatial_size=size, mode="bilinear", anti_aliasing=True))
    if mask_key:
        out.append(Resized(mask_key, spatial_size=size, mode="nearest", allow_missing_keys=True))
    out += [ToThreeChannelsd(keys), ImageNetNormalized(keys)]
    return out


def build_preprocessing(
    modality: str,
    spatial_size: int | Sequence[int] = 256,
    keys: str | Sequence[str] = ("image",),
    mask_key: str | None = None,
    window: str | Sequence[float] | None = None,
    mri_norm: str = "percentile",
    load: bool = True,
    **loader_kwargs: Any,
) -> Compose:
    """Preprocessing for one modality preset: file path(s) in a dictionary -> ``(3, S, S)`` float32.

    Args:
        modality: one of ``PRESETS``: ``"ct_brain"``, ``"ct_lung"``, ``"mri"``, ``"xray"``,
            ``"ultrasound"``, ``"rgb"`` (endoscopy/microscopy).
        spatial_size: output side ``S`` (or ``(H, W)``); default 256 as in the paper.
        keys: image keys.
        mask_key: optional mask key: loaded, binarised (any non-black pixel), resized nearest to
            ``(1, S, S)``; a ``None`` value gives an all-zero mask, a missing key stays missing.
        window: CT presets only: another window (preset name, ``(centre, width)`` or ``"dicom"``).
        mri_norm: ``"percentile"`` (0.5-99.5 clip and scale) or ``"zscore"`` (foreground z-score).
        load: False to start from loaded images (e.g. after :class:`VolumeToSlicesd`).
        loader_kwargs: options of :class:`LoadMedicalImage` (``nonfinite``, ``min_size``, ...).
    """
    return Compose(preset_transforms(modality, spatial_size, keys, mask_key, window, mri_norm, load, **loader_kwargs))
