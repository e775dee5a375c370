"""Issue 14 items 5 and 6: the code moves the review asked for, and the evaluation path's tensors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import REPO
from monai.data import DataLoader, MetaTensor
from monai.engines import SupervisedEvaluator, SupervisedTrainer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_engines_use_monai_iteration_unchanged():
    """The AMP retry and the non-finite-loss stop are event handlers: MONAI's iteration is not overridden."""
    from monai_skipts.engines import SkipTSEvaluator, SkipTSTrainer

    assert SkipTSTrainer._iteration is SupervisedTrainer._iteration
    assert SkipTSEvaluator._iteration is SupervisedEvaluator._iteration


def test_evaluator_feeds_plain_channels_last_tensors_with_the_same_maps():
    from monai_skipts.engines import SkipTSEvaluator
    from monai_skipts.networks import AnomalyDetector, SkipTS

    torch.manual_seed(0)
    model = SkipTS("efficientnet_lite0").eval()
    data = [{"image": MetaTensor(torch.randn(3, 64, 64)), "label": i % 2, "id": str(i)} for i in range(4)]
    seen, scores = [], {}
    hook = model.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        for fast in (False, True):
            loader = DataLoader(data, batch_size=4)
            ev = SkipTSEvaluator("cpu", loader, AnomalyDetector(model), channels_last=fast, plain_tensors=fast)
            ev.run()
            scores[fast] = ev.state.output["score"]
            assert ev.state.output["id"] == ["0", "1", "2", "3"]
    finally:
        hook.remove()
    assert isinstance(seen[0], MetaTensor) and not seen[0].is_contiguous(memory_format=torch.channels_last)
    assert type(seen[1]) is torch.Tensor and seen[1].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(scores[True], scores[False], rtol=1e-5, atol=1e-5)
    assert next(model.parameters()).is_contiguous()  # the (shared) network's weights are not converted


def test_rd4ad_checkpoint_round_trip(tmp_path):
    from monai_skipts.checkpoint import load_checkpoint, load_detector, save_checkpoint
    from monai_skipts.networks import RD4AD, AnomalyDetector

    torch.manual_seed(0)
    detector = AnomalyDetector(RD4AD("efficientnet_lite0"), preprocessing={"modality": "xray"}).eval()
    detector.set_calibration({"value": 1.0})
    path = save_checkpoint(tmp_path / "rd4ad.pt", detector)
    loaded = load_detector(path)
    assert isinstance(loaded.model, RD4AD) and load_checkpoint(path)["config"]["model"]["model"] == "rd4ad"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), detector(x))


def test_one_predictor_and_one_decision():
    from monai_skipts.inference import AnomalyPredictor
    from monai_skipts.label import AnomalyScorer
    from monai_skipts.metrics import normalize_score
    from monai_skipts.networks import decide

    assert AnomalyScorer is AnomalyPredictor
    assert decide(1.0, None) == {"score": 1.0, "threshold": None, "anomalous": None, "normalized_score": None}
    d = decide(2.5, 2.0, 0.5)
    assert d["anomalous"] is True and d["normalized_score"] == pytest.approx(normalize_score(2.5, 2.0, 0.5))
    assert decide(1.9, 2.0)["anomalous"] is False and decide(2.0, 2.0, 0)["normalized_score"] is None


def test_moved_helpers_and_the_teacher_name():
    import monai_skipts.engines as engines
    from monai_skipts.networks import SkipTS, teacher_name_of
    from monai_skipts.transforms import has_random_transforms
    from monai_skipts.utils import resolve_device

    assert engines.resolve_device is resolve_device and engines.has_random_transforms is has_random_transforms
    model = SkipTS("auto", pretrained=False)
    assert teacher_name_of(model) == model.teacher.name != "auto"


def test_inference_does_not_import_the_plot_handlers():
    code = "import sys, monai_skipts.inference; print('monai_skipts.handlers.plots' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "False"
