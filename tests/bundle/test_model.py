"""The trained model an evaluation bundle scores with (:mod:`monai_skipts.bundle.model`)."""

from __future__ import annotations

import pytest
import torch
from conftest import save_test_checkpoint
from monai.transforms import Compose
from PIL import Image

from monai_skipts import bundle


def test_load_trained_model_gives_threshold_and_the_trained_preprocessing(skipts, tmp_path):
    path = tmp_path / "model.pt"
    save_test_checkpoint(
        path,
        skipts,
        threshold={"value": 1.5, "scale": 0.2, "target_fpr": 0.05},
        extra={"modality": "mri", "spatial_size": 32},
    )
    loaded = bundle.load_trained_model(path, device="cpu", modality="xray", spatial_size=256)
    assert loaded.threshold == 1.5 and loaded.score_scale == 0.2 and loaded.teacher == "efficientnet_lite0"
    assert (loaded.modality, loaded.spatial_size) == ("mri", [32, 32])  # the checkpoint's, not the arguments'
    assert not loaded.network.training
    Image.fromarray((torch.rand(40, 48) * 255).byte().numpy()).save(tmp_path / "x.png")
    item = Compose(loaded.preprocessing())({"image": str(tmp_path / "x.png"), "mask": None})
    assert tuple(item["image"].shape) == (3, 32, 32) and tuple(item["mask"].shape) == (1, 32, 32)
    # an older checkpoint without a modality: the bundle's; without either: refused by name
    save_test_checkpoint(tmp_path / "old.pt", skipts, threshold=None, extra={})
    old = bundle.load_trained_model(tmp_path / "old.pt", modality="xray", spatial_size=64)
    assert (old.threshold, old.modality, old.spatial_size) == (None, "xray", [64, 64])
    with pytest.raises(ValueError, match="old.pt: the checkpoint records no modality"):
        bundle.load_trained_model(tmp_path / "old.pt")
