"""Modality presets: the whole 2-D preprocessing chain for one modality, as a MONAI ``Compose``.

Chain (dictionary transforms on ``keys``, plus ``mask_key`` when given)::

    LoadMedicalImaged -> intensity to [0, 1] -> TiledResized to spatial_size^2 (bilinear, anti-aliased;
    masks: binarised then nearest) -> ToThreeChannelsd -> ImageNetNormalized

(:class:`~monai_skipts.transforms.spatial.TiledResized`: MONAI's ``Resized``, same output, with the
anti-aliasing convolutions on fixed-shape tiles.)

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
their bit range instead (see :class:`WindowIntensity`).

One definition, every path: the repository's ``transforms/<preset>.json`` (what the bundles pull,
``%transforms/mri.json#preprocessing``) is a ``_target_`` call of :func:`preset_transforms` with
``keys="image"``, ``mask_key="mask"``; the evaluation bundle, :class:`~monai_skipts.inference.AnomalyPredictor`
(bundle inference, MONAI Label, the MLflow model) and the exports' documented input all build the chain
with this function from the options a checkpoint stores (:func:`preprocessing_spec`), so a file gives
the same tensor on every path (``tests/test_preprocessing_once.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from monai.transforms import Compose, Transform

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
from monai_skipts.transforms.spatial import TiledResized

__all__ = [
    "PRESETS",
    "preset_transforms",
    "build_preprocessing",
    "preprocessing_spec",
    "spatial_size_2d",
    "has_random_transforms",
]

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
    size = spatial_size_2d(spatial_size)
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
    out.append(TiledResized(keys, spatial_size=size, mode="bilinear", anti_aliasing=True))
    if mask_key:
        out.append(TiledResized(mask_key, spatial_size=size, mode="nearest", allow_missing_keys=True))
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


def spatial_size_2d(spatial_size: int | Sequence[int]) -> tuple[int, int]:
    """The one normalised form of a spatial size: ``S``, ``(S,)`` or ``(H, W)`` -> ``(H, W)``.

    Raises:
        ValueError: anything else, or a side that is not a positive integer.

    >>> spatial_size_2d(64), spatial_size_2d([32, 48])
    ((64, 64), (32, 48))
    """
    if isinstance(spatial_size, (int, float)) and not isinstance(spatial_size, bool):
        size = [int(spatial_size)] * 2
    elif isinstance(spatial_size, Sequence) and not isinstance(spatial_size, str) and len(spatial_size) in (1, 2):
        size = [int(s) for s in spatial_size]
        size = size * 2 if len(size) == 1 else size
    else:
        raise ValueError(f"spatial_size must be S, (S,) or (H, W), got {spatial_size!r}")
    if min(size) <= 0:
        raise ValueError(f"spatial_size must be positive, got {spatial_size!r}")
    return size[0], size[1]


#: the options of :func:`preset_transforms` that define a model's preprocessing (a checkpoint keeps them)
SPEC_KEYS = ("modality", "spatial_size", "window", "mri_norm")


def preprocessing_spec(
    source: Any = None,
    modality: str | None = None,
    spatial_size: int | Sequence[int] | None = None,
    window: str | Sequence[float] | None = None,
    mri_norm: str | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The preset options ``{"modality", "spatial_size", "window", "mri_norm"}`` a model was trained
    with, for :func:`preset_transforms` / :func:`build_preprocessing` (``**spec``).

    Args:
        source: a checkpoint dict (its ``extra``), a checkpoint's ``extra`` dict, or ``None``. The
            options are read from ``extra["preprocessing"]`` (a dict of these keys) when present, else
            from the flat ``extra`` entries (``modality``, ``spatial_size``, ``window``, ``mri_norm``, as
            the bundles store them).
        modality, spatial_size, window, mri_norm: overrides (``None``: the source's).
        defaults: entries for what neither the overrides nor the source give (e.g. the bundle's own
            ``modality`` and ``spatial_size`` for a checkpoint that stores none).

    Missing entries get :func:`preset_transforms`' defaults (spatial size 256, percentile MRI
    normalisation, the preset's own CT window). ``modality`` stays ``None`` when neither the source nor
    the caller gives one (callers refuse that).
    """
    extra: Any = source or {}
    if isinstance(extra, Mapping) and "extra" in extra and "kind" in extra:  # a whole checkpoint
        extra = extra.get("extra") or {}
    nested = extra.get("preprocessing") if isinstance(extra, Mapping) else None
    stored = {k: v for k, v in (nested if isinstance(nested, Mapping) else extra).items() if k in SPEC_KEYS}
    for k in SPEC_KEYS:  # flat entries complete a partial nested record
        if k not in stored and isinstance(extra, Mapping) and k in extra:
            stored[k] = extra[k]
    given = {"modality": modality, "spatial_size": spatial_size, "window": window, "mri_norm": mri_norm}
    spec = {k: given[k] if given[k] not in (None, "") else stored.get(k) for k in SPEC_KEYS}
    for k, v in (defaults or {}).items():
        if k in SPEC_KEYS and spec[k] in (None, ""):
            spec[k] = v
    spec["spatial_size"] = list(spatial_size_2d(spec["spatial_size"] or 256))
    spec["mri_norm"] = spec["mri_norm"] or "percentile"
    spec["window"] = list(spec["window"]) if isinstance(spec["window"], tuple) else spec["window"]
    return spec


def has_random_transforms(transform: Any) -> bool:
    """Whether ``transform`` (a MONAI ``Compose``, list, or single transform) holds a random one."""
    from monai.transforms import Randomizable

    if transform is None:
        return False
    if isinstance(transform, Compose):
        return any(has_random_transforms(t) for t in transform.transforms)
    if isinstance(transform, (list, tuple)):
        return any(has_random_transforms(t) for t in transform)
    return isinstance(transform, Randomizable)
