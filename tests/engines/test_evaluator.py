"""The evaluator on monai.engines (:mod:`monai_skipts.engines.evaluator`), with the real offline teacher."""

from __future__ import annotations

import torch
from ignite.engine import Events
from monai.data import DataLoader

from monai_skipts.engines import SkipTSEvaluator
from monai_skipts.networks import AnomalyDetector, SkipTS


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
