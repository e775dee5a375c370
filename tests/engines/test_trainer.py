"""The trainer on monai.engines (:mod:`monai_skipts.engines.trainer`), with the real offline teacher."""

from __future__ import annotations

import glob

import numpy as np
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


def test_engines_use_monai_iteration_unchanged():
    """The AMP retry and the non-finite-loss stop are event handlers: MONAI's iteration is not overridden."""
    from monai.engines import SupervisedEvaluator, SupervisedTrainer

    assert SkipTSTrainer._iteration is SupervisedTrainer._iteration
    assert SkipTSEvaluator._iteration is SupervisedEvaluator._iteration


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
