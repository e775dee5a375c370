"""The engines' ``prepare_batch`` callables (:mod:`monai_skipts.engines.prepare_batch`): the teacher
feature cache trains as recomputing does, denoising distillation corrupts the student's input only."""

from __future__ import annotations

import pytest
import torch
from conftest import run_doctests
from ignite.engine import Events
from monai.data import DataLoader

from monai_skipts.engines import SkipTSTrainer, TeacherFeatureCache, prepare_batch
from monai_skipts.networks import SkipTS


def test_docstring_examples_run():
    run_doctests(prepare_batch)


def test_teacher_cache_gives_the_same_training_as_recomputing(tmp_path):
    data = [{"image": torch.randn(3, 64, 64), "label": 0, "id": str(i)} for i in range(6)]
    finals = []
    for cached in (False, True):
        torch.manual_seed(0)
        model = SkipTS("efficientnet_lite0")
        kw = {"prepare_batch": TeacherFeatureCache(model)} if cached else {}
        SkipTSTrainer("cpu", 2, DataLoader(data, batch_size=3), model, **kw).run()
        finals.append(torch.cat([p.detach().flatten() for p in model.student.parameters()]))
    assert torch.allclose(finals[0], finals[1], atol=1e-5)


def test_cache_refuses_random_transforms():
    from monai.transforms import Compose, RandFlipd

    with pytest.raises(ValueError, match="random"):
        TeacherFeatureCache(SkipTS("resnet18", pretrained=False), Compose([RandFlipd("image", prob=0.5)]))


@pytest.mark.parametrize("arch", [{}, {"bottleneck": True, "skip": "none"}], ids=["skips", "bottleneck"])
def test_denoising_step_student_reads_corrupted_features_and_is_compared_with_clean(arch):
    from monai.engines import IterationEvents

    from monai_skipts.bundle import training_prepare_batch
    from monai_skipts.engines import DenoisingBatch, LevelStatsFitter
    from monai_skipts.losses import build_loss

    torch.manual_seed(0)
    model = SkipTS("efficientnet_lite0", **arch)
    gen = torch.Generator().manual_seed(0)
    data = []
    for i in range(4):  # a textured "body" on a dark background, as the preprocessed images are
        img = torch.full((3, 64, 64), -2.0)
        img[:, 8:56, 10:54] = torch.rand(1, 48, 44, generator=gen).expand(3, -1, -1) + 0.5
        data.append({"image": img, "label": 0, "id": f"img{i}"})
    prep = training_prepare_batch(
        model, None, cache_teacher=True, synthetic_lesions={"prob": 1.0, "families": ["intensity", "fpi"]}, seed=0
    )
    assert isinstance(prep, DenoisingBatch) and isinstance(prep.features, TeacherFeatureCache)
    loss = build_loss("rd4ad")
    trainer = SkipTSTrainer("cpu", 1, DataLoader(data, batch_size=4), model, loss_function=loss, prepare_batch=prep)
    seen = {}

    @trainer.on(IterationEvents.FORWARD_COMPLETED)
    def _forward(engine):  # before the optimizer step: the student's weights are those of the forward
        seen["image"] = engine.state.output["image"].detach().clone()
        seen["target"] = [t.detach().clone() for t in engine.state.output["label"]]
        seen["pred"] = [[f.detach().clone() for f in part] for part in engine.state.output["pred"]]
        x = seen["image"]
        t_corrupt = model.teacher_features(x)
        with torch.no_grad():
            seen["student_on_corrupt"] = [f.clone() for f in model.student_features(t_corrupt, x)]

    @trainer.on(Events.ITERATION_COMPLETED)
    def _loss(engine):
        seen["loss"] = float(engine.state.output["loss"])

    trainer.run()
    clean = torch.stack([d["image"] for d in data])
    masks = prep.last_masks[:, 0] > 0
    assert masks.any(dim=(1, 2)).all()  # prob 1: every image corrupted
    changed = (seen["image"] != clean).any(1)
    assert torch.equal(changed, masks)  # the student's input is the corrupted image, exactly there
    t_clean = model.teacher_features(clean)
    for level in range(3):  # target: the teacher's features of the clean image (from the cache)
        assert torch.allclose(seen["target"][level], t_clean[level], atol=1e-5)
        assert torch.equal(prep.store["img0"][level], seen["target"][level][0])
        assert not torch.allclose(seen["pred"][0][level], t_clean[level], atol=1e-3)  # forward's: corrupted
    for a, b in zip(seen["pred"][1], seen["student_on_corrupt"]):  # the student read the corrupted features
        assert torch.allclose(a, b, atol=1e-5)
    # the loss is the clean comparison, not the corrupted one
    assert seen["loss"] == pytest.approx(float(loss((seen["target"], seen["pred"][1]))), rel=1e-5)
    assert seen["loss"] != pytest.approx(float(loss((seen["pred"][0], seen["pred"][1]))), rel=1e-3)
    # the per-level statistics are fitted on the clean normals
    assert LevelStatsFitter(model, DataLoader(data, batch_size=4), prepare_batch=prep).prepare_batch is prep.features
