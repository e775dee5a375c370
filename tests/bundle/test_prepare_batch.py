"""The trainer's ``prepare_batch`` from the bundle's switches (:mod:`monai_skipts.bundle.prepare_batch`)."""

from __future__ import annotations

from conftest import run_doctests

from monai_skipts import bundle
from monai_skipts.bundle import prepare_batch


def test_docstring_examples_run():
    run_doctests(prepare_batch)


def test_default_is_the_feature_cache_without_denoising_and_the_switch_gives_monai_default(skipts):
    from monai.engines import default_prepare_batch
    from monai.transforms import Compose

    from monai_skipts.engines import TeacherFeatureCache
    from monai_skipts.transforms import preset_transforms

    transform = Compose(preset_transforms("xray", 32))
    assert type(bundle.training_prepare_batch(skipts, transform)) is TeacherFeatureCache  # not a DenoisingBatch
    assert bundle.training_prepare_batch(skipts, transform, cache_teacher=False) is default_prepare_batch
