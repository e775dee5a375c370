"""Trainer and evaluator on monai.engines, with the real offline teacher."""

from __future__ import annotations

import glob

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader, Dataset
from monai.engines.utils import IterationEvents

from monai_skipts.apps import make_phantom_dataset
from monai_skipts.engines import SkipTSEvaluator, SkipTSTrainer, TeacherFeatureCache, build_optimizer
from monai_skipts.metrics import image_metrics
from monai_skipts.networks import AnomalyDetector, SkipTS
from monai_skipts.transforms import build_preprocessing


def _items(root, pattern, label):
    return [{"image": p, "label": label, "id": p} for p in sorted(glob.glob(str(root / pattern)))]


def _run_eval(model, items, pre):
    ev = SkipTSEvaluator("cpu", DataLoader(Dataset(items, pre), batch_size=8), AnomalyDetector(model))
    scores, labels, ids = [], [], []

    @ev.on(Events.ITERATION_COMPLETED)
    def _c(engine):
        scores.extend(engine.state.output["score"].tolist())
        labels.extend(engine.state.output["label"].view(-1).tolist())
        ids.extend(engine.state.output["id"])

    ev.run()
    return np.array(scores), np.array(labels), ids


def test_only_student_gets_gradients_and_teacher_bn_never_changes():
    torch.manual_seed(0)
    model = SkipTS("efficientnet_lite0")
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    data = [{"image": torch.randn(3, 64, 64), "label": 0} for _ in range(8)]
    trainer = SkipTSTrainer("cpu", 2, DataLoader(data, batch_size=4), model, amp=True)
    grads = {}

    @trainer.on(Events.ITERATION_COMPLETED)
    def _grads(engine):
        for n, p in model.named_parameters():
            grads.setdefault(n, False)
            grads[n] |= p.grad is not None and bool(p.grad.abs().sum() > 0)

    trainer.run()
    assert all(grads[n] for n in grads if n.startswith("student."))
    assert not any(grads[n] for n in grads if n.startswith("teacher."))
    after = model.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN running stats
    assert not trainer.amp  # AMP is for CUDA; on CPU the trainer falls back to fp32
    opt = build_optimizer(model)
    assert opt.defaults["lr"] == 0.005 and opt.defaults["betas"] == (0.5, 0.999)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(
        p.numel() for p in model.student.parameters()
    )


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


def test_quality_on_lesion_phantom_with_offline_teacher(tmp_path):
    """Normals: deformed Shepp-Logan slices; anomalies: the same with a local bright lesion (dark
    ones can hide in the dark ventricles, invisible to a reader too). Real
    ImageNet EfficientNet-Lite0 teacher, a few epochs: image AUROC > 0.9."""
    torch.manual_seed(0)
    root = make_phantom_dataset(
        tmp_path / "ph",
        n_train=32,
        n_test_normal=16,
        n_test_abnormal=16,
        size=128,
        seed=1,
        lesion_contrast=(0.5, 0.8),
        lesion_polarity="bright",
    )
    pre = build_preprocessing("xray", spatial_size=128)
    train = _items(root, "train/good/*.png", 0)
    test = _items(root, "test/good/*.png", 0) + _items(root, "test/lesion/*.png", 1)
    model = SkipTS("efficientnet_lite0")
    loader = DataLoader(Dataset(train, pre), batch_size=16, shuffle=True)
    trainer = SkipTSTrainer("cpu", 30, loader, model, prepare_batch=TeacherFeatureCache(model, pre))
    losses = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: losses.append(e.state.output["loss"].item()))
    trainer.run()
    assert losses[-1] < 0.6 * losses[0]
    scores, labels, ids = _run_eval(model, test, pre)
    assert len(ids) == len(test) and np.isfinite(scores).all()
    m = image_metrics(scores, labels)
    assert m["auroc"] > 0.9, m


def test_evaluator_rescores_a_non_finite_amp_batch_in_fp32():
    """The fp32 retry's control flow on this CPU: a fault injected into the first forward pass only
    (on a GPU, tests/test_cuda.py forces a real fp16 overflow instead)."""
    torch.manual_seed(0)
    model = SkipTS("efficientnet_lite0").eval()
    data = [{"image": torch.randn(3, 64, 64), "label": i % 2, "id": str(i)} for i in range(4)]
    ev = SkipTSEvaluator("cpu", DataLoader(data, batch_size=4), AnomalyDetector(model))
    ref = []
    ev.add_event_handler(Events.ITERATION_COMPLETED, lambda e: ref.append(e.state.output["score"].clone()))
    ev.run()
    calls = []

    def fault(m, i, o):
        calls.append(1)
        return [t * float("nan") for t in o] if len(calls) == 1 else o

    hook = model.student.register_forward_hook(fault)
    ev.amp = True  # what a CUDA device gets; autocast("cuda") is a no-op on this CPU
    got = []
    ev.add_event_handler(Events.ITERATION_COMPLETED, lambda e: got.append(e.state.output["score"].clone()))
    try:
        ev.run()
    finally:
        hook.remove()
    assert len(calls) == 2 and ev.amp  # scored twice, AMP switched back on for the next batch
    assert torch.isfinite(got[-1]).all() and torch.allclose(got[-1], ref[0], atol=1e-6)


def test_engines_use_monai_iteration_unchanged():
    """The AMP retry and the non-finite-loss stop are event handlers: MONAI's iteration is not overridden."""
    from monai.engines import SupervisedEvaluator, SupervisedTrainer

    assert SkipTSTrainer._iteration is SupervisedTrainer._iteration
    assert SkipTSEvaluator._iteration is SupervisedEvaluator._iteration


def test_evaluator_feeds_plain_channels_last_tensors_with_the_same_maps():
    from monai.data import MetaTensor

    torch.manual_seed(0)
    model = AnomalyDetector(SkipTS("efficientnet_lite0")).eval()
    data = [{"image": MetaTensor(torch.randn(3, 64, 64)), "label": i % 2, "id": str(i)} for i in range(4)]
    seen, scores = [], {}
    hook = model.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        for fast in (False, True):
            ev = SkipTSEvaluator("cpu", DataLoader(data, batch_size=4), model, channels_last=fast, plain_tensors=fast)
            ev.run()
            scores[fast] = ev.state.output["score"]
            assert ev.state.output["id"] == ["0", "1", "2", "3"]
    finally:
        hook.remove()
    assert isinstance(seen[0], MetaTensor) and not seen[0].is_contiguous(memory_format=torch.channels_last)
    assert type(seen[1]) is torch.Tensor and seen[1].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(scores[True], scores[False], rtol=1e-5, atol=1e-5)
    assert next(model.parameters()).is_contiguous()  # the (shared) network's weights are not converted


def test_freeing_gradients_between_steps_trains_the_same_weights():
    """The trainer frees the student's gradients before each forward pass (``optim_set_to_none``, so
    they are not held beside the activations at the step's memory peak); the weights after 2 epochs
    are bit for bit those of zero-filled gradients kept across steps."""
    data = [{"image": torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(i)), "label": 0} for i in range(6)]
    finals, seen = [], []
    for set_to_none in (False, True):
        torch.manual_seed(0)
        model = SkipTS("efficientnet_lite0")
        kw = {} if set_to_none else {"optim_set_to_none": False}
        trainer = SkipTSTrainer("cpu", 2, DataLoader(data, batch_size=3), model, **kw)

        @trainer.on(IterationEvents.FORWARD_COMPLETED)
        def _grads_at_the_peak(engine, model=model):
            seen.append((engine.optim_set_to_none, any(p.grad is not None for p in model.student.parameters())))

        trainer.run()
        finals.append(torch.cat([p.detach().flatten() for p in model.student.parameters()]))
    assert torch.equal(finals[0], finals[1])
    assert (True, True) not in seen and (False, True) in seen  # default: no gradient is kept into a step


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


def test_denoising_is_off_by_default_in_the_bundle_path():
    from monai.engines import default_prepare_batch

    from monai_skipts.bundle import training_prepare_batch

    model = SkipTS("efficientnet_lite0")
    assert isinstance(training_prepare_batch(model, None), TeacherFeatureCache)
    assert training_prepare_batch(model, None, cache_teacher=False) is default_prepare_batch


def test_denoising_batch_docstring_example_runs():
    import doctest

    from monai_skipts import engines

    finder = doctest.DocTestFinder()
    (test,) = [t for t in finder.find(engines.DenoisingBatch, "DenoisingBatch", globs=vars(engines)) if t.examples]
    runner = doctest.DocTestRunner()
    runner.run(test)
    assert runner.failures == 0 and runner.tries > 0
