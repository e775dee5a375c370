"""The trainer, evaluator and bundle on a CUDA device: AMP (fp16 autocast + GradScaler) training,
agreement of GPU and CPU predictions, and a GPU-trained bundle checkpoint that serves on the CPU.

Skipped where no CUDA device is visible (CI has none); run on a GPU machine with
``pytest tests/test_cuda.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO
from ignite.engine import Events
from monai.data import DataLoader, Dataset

from monai_skipts.apps import make_phantom_dataset
from monai_skipts.checkpoint import load_detector
from monai_skipts.engines import SkipTSEvaluator, SkipTSTrainer, TeacherFeatureCache
from monai_skipts.networks import SkipTS
from monai_skipts.transforms import build_preprocessing

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _phantom_items(tmp_path, size=128):
    root = make_phantom_dataset(
        tmp_path / "ph",
        n_train=16,
        n_test_normal=8,
        n_test_abnormal=8,
        size=size,
        seed=3,
        lesion_contrast=(0.5, 0.8),
        lesion_polarity="bright",
    )
    pre = build_preprocessing("xray", spatial_size=size)

    def items(pattern, label):
        return [{"image": str(p), "label": label, "id": str(p)} for p in sorted(root.glob(pattern))]

    return pre, items("train/good/*.png", 0), items("test/good/*.png", 0) + items("test/lesion/*.png", 1)


def _train(amp: bool, pre, train, epochs=6):
    torch.manual_seed(0)
    model = SkipTS("efficientnet_lite0")
    loader = DataLoader(Dataset(train, pre), batch_size=8, shuffle=False)
    trainer = SkipTSTrainer("cuda", epochs, loader, model, amp=amp, prepare_batch=TeacherFeatureCache(model, pre))
    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output["loss"])))
    trainer.run()
    return trainer, model, losses


def test_amp_training_on_cuda_matches_fp32(tmp_path):
    pre, train, _ = _phantom_items(tmp_path)
    t32, m32, l32 = _train(False, pre, train)
    t16, m16, l16 = _train(True, pre, train)
    assert not t32.amp and t32.scaler is None
    assert t16.amp and t16.scaler is not None  # fp16 autocast with a GradScaler
    assert all(np.isfinite(l16)) and all(np.isfinite(l32))
    assert l16[-1] < 0.8 * l16[0] and l32[-1] < 0.8 * l32[0]
    # master weights stay fp32 on the GPU; the frozen teacher is untouched by AMP
    assert all(p.dtype == torch.float32 and p.is_cuda for p in m16.student.parameters())
    assert not any(p.requires_grad for p in m16.teacher.parameters())
    # the same run in fp16 autocast ends where the fp32 run ends, within a few percent
    assert abs(l16[-1] - l32[-1]) < 0.05 * l32[-1], (l16[-1], l32[-1])


def _scores(model, items, pre, device, amp):
    ev = SkipTSEvaluator(device, DataLoader(Dataset(items, pre), batch_size=8), model, amp=amp)
    out = []
    ev.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: out.append((e.state.output["score"].cpu(), e.state.output["pred"].cpu()))
    )
    ev.run()
    return torch.cat([s for s, _ in out]).numpy(), torch.cat([p for _, p in out]).numpy()


def test_gpu_and_cpu_predictions_agree(tmp_path):
    pre, train, test = _phantom_items(tmp_path)
    _, model, _ = _train(True, pre, train, epochs=3)
    s_gpu32, p_gpu32 = _scores(model, test, pre, "cuda", amp=False)
    s_gpu16, p_gpu16 = _scores(model, test, pre, "cuda", amp=True)
    s_cpu, p_cpu = _scores(model.to("cpu"), test, pre, "cpu", amp=False)
    assert p_gpu16.dtype == np.float32  # maps are returned in fp32 whatever the autocast
    np.testing.assert_allclose(s_gpu32, s_cpu, rtol=2e-3, atol=1e-4)
    np.testing.assert_allclose(p_gpu32, p_cpu, rtol=5e-3, atol=1e-4)
    np.testing.assert_allclose(s_gpu16, s_cpu, rtol=2e-2, atol=1e-3)
    # AMP does not change which images rank as more anomalous (beyond near-ties)
    order_cpu, order_16 = np.argsort(s_cpu), np.argsort(s_gpu16)
    assert np.mean(order_cpu == order_16) > 0.8


def test_bundle_trains_on_cuda_and_its_model_serves_on_cpu(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "bundles/demo/train.json",
        "--output_dir",
        str(out),
        "--device_name",
        "cuda",
        "--amp",
        "True",
        "--epochs",
        "3",
        "--mlflow",
        "False",
        "--teacher",
        "efficientnet_lite0",
    ]
    r = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env={**os.environ, "MONAI_SKIPTS_OFFLINE": "1"}
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert np.isfinite(metrics["auroc"]) and metrics["epochs"] == 3
    model = load_detector(out / "model.pt", map_location="cpu")
    assert all(not p.is_cuda for p in model.parameters())
    x = torch.randn(2, 3, 64, 64)
    amap, score = model(x)
    assert amap.shape == (2, 1, 64, 64) and torch.isfinite(score).all()


@pytest.mark.xfail(
    strict=False,
    reason="on an H200 (2026-11-29) the rescored scores were finite but 1-2 % below the "
    "fp32 reference (max abs diff 0.062); cause not found yet",
)
def test_amp_overflow_in_evaluation_is_rescored_in_fp32(tmp_path):
    """An fp16 overflow in the student's features (forced by scaling them by 1e6; cosine maps do not
    depend on that scale in fp32) gives NaN maps under autocast; the evaluator scores such a batch
    again in fp32 and returns the fp32 result."""
    pre, train, test = _phantom_items(tmp_path)
    _, model, _ = _train(True, pre, train, epochs=2)
    ref, _ = _scores(model, test, pre, "cuda", amp=False)
    hook = model.student.register_forward_hook(lambda m, i, o: [t * 1e6 for t in o])
    try:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
            _, raw = model.predict(torch.stack([pre(dict(test[0]))["image"].as_tensor() for _ in range(2)]).cuda())
        assert not torch.isfinite(raw).all()  # the overflow is real
        rescored, _ = _scores(model, test, pre, "cuda", amp=True)
    finally:
        hook.remove()
    np.testing.assert_allclose(rescored, ref, rtol=1e-3, atol=1e-4)
