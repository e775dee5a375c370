"""The trainer's ``prepare_batch`` as the bundle's switches choose it: the teacher-feature cache or
MONAI's default, optionally wrapped for denoising distillation
(:mod:`monai_skipts.engines.prepare_batch` holds the classes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["denoising_prepare_batch", "training_prepare_batch"]


def training_prepare_batch(
    network: torch.nn.Module,
    transform: Callable,
    cache_teacher: bool = True,
    synthetic_lesions: dict[str, Any] | None = None,
    modality: str = "mri",
    seed: int | None = 0,
) -> Callable:
    """The trainer's ``prepare_batch``: a :class:`~monai_skipts.engines.TeacherFeatureCache` (each
    image's teacher features computed once; ``transform`` must not be random) when ``cache_teacher``,
    else MONAI's ``default_prepare_batch``; with ``synthetic_lesions``, that clean path wrapped in a
    :class:`~monai_skipts.engines.DenoisingBatch` (denoising distillation: the student reads the
    teacher's features of images with synthetic lesions, its target is the clean images' features,
    which stay cached).

    Args:
        network: the :class:`~monai_skipts.networks.SkipTS` being trained.
        transform: the training preprocessing (checked to be deterministic for the cache).
        cache_teacher: the bundle's ``cache_teacher`` switch.
        synthetic_lesions: the bundle's ``synthetic_lesions``: ``None`` (off, the default) or keyword
            arguments of :class:`~monai_skipts.transforms.RandSyntheticLesion` (``{"prob": 0.5,
            "families": ["intensity", "fpi", "elastic"]}``; ``{}``: its defaults). The key
            ``"annotations"`` (a probability) also pastes burned-in captions and markers into that
            share of the clean images as normal content
            (:class:`~monai_skipts.transforms.RandBurnedInAnnotation`).
        modality: the bundle's modality preset (the anatomy the lesions are placed in, and the
            lesions' default ``modality``).
        seed: seeds the lesions' (and annotations') random state.

    >>> training_prepare_batch(None, None, cache_teacher=False).__name__
    'default_prepare_batch'
    """
    from monai.engines import default_prepare_batch

    from monai_skipts.engines import TeacherFeatureCache

    clean = TeacherFeatureCache(network, transform) if cache_teacher else default_prepare_batch
    return denoising_prepare_batch(network, clean, synthetic_lesions, modality, seed)


def denoising_prepare_batch(
    network: torch.nn.Module,
    features: Callable,
    synthetic_lesions: dict[str, Any] | None,
    modality: str = "mri",
    seed: int | None = 0,
) -> Callable:
    """``features`` (a clean ``prepare_batch``) as it is when ``synthetic_lesions`` is ``None``, else
    wrapped in a :class:`~monai_skipts.engines.DenoisingBatch` built from ``synthetic_lesions``
    (see :func:`training_prepare_batch`, whose second half this is; ``benchmarks/quality.py`` calls it
    with its shared feature cache)."""
    from monai_skipts.engines import DenoisingBatch
    from monai_skipts.transforms import RandBurnedInAnnotation, RandSyntheticLesion

    if synthetic_lesions is None:
        return features
    opts = dict(synthetic_lesions)
    annotations = opts.pop("annotations", None)
    opts.setdefault("modality", modality)
    lesion = RandSyntheticLesion(**opts)
    lesion.set_random_state(seed)
    annotation = None
    if annotations:
        annotation = RandBurnedInAnnotation(prob=float(annotations))
        annotation.set_random_state(None if seed is None else seed + 1)
    return DenoisingBatch(network, lesion, features=features, modality=modality, annotation=annotation)
