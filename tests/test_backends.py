"""Serving backends of :class:`~monai_skipts.inference.AnomalyPredictor`: the exported graph
(standardisation, blur and score included; a segmentation head in each mode) through ONNX Runtime and
OpenVINO against eager PyTorch on the same checkpoint, the export cache next to the checkpoint (reuse,
invalidation, a corrupted file), and the inference bundle's ``--backend``.

A backend whose runtime is not installed is skipped, saying which extra installs it.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_test_checkpoint
from PIL import Image

from monai_skipts.export_cache import backend_cache_paths
from monai_skipts.inference import AnomalyPredictor
from monai_skipts.inferers import fit_level_stats
from monai_skipts.networks import SkipTS

REPO = Path(__file__).resolve().parents[1]
SIZE = 32
THRESHOLD = {"value": 2.0, "target_fpr": 0.05, "n_normals": 20, "scale": 0.1}


def _installed(backend: str):
    try:
        __import__(backend)
    except ImportError as e:
        pytest.skip(f"{backend} is not installed ({e}): pip install -e '.[{backend}]'")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny real checkpoint: lite0 teacher (ImageNet weights), the default student, per-level map
    statistics (so the exported graph must hold the standardisation), 32² MRI."""
    torch.manual_seed(0)
    model = SkipTS("efficientnet_lite0").eval()
    x = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    stats = fit_level_stats(model, [x])
    stats[:, 0] += 0.05  # not the identity, so a graph without the standardisation would differ
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_test_checkpoint(
        path,
        model,
        threshold=THRESHOLD,
        extra={"modality": "mri", "spatial_size": SIZE},
        level_stats=stats,
        with_rng=False,
    )
    return path


@pytest.fixture(scope="module")
def images():
    return torch.randn(5, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def eager(checkpoint):
    pred = AnomalyPredictor(checkpoint, device="cpu", batch_size=4)
    assert pred.detector.get_level_stats() is not None
    return pred


def served_like_eager(pred, eager, images: torch.Tensor) -> torch.Tensor:
    """Assert the backend's maps and scores of ``images`` (5 of them) equal eager PyTorch's within 1e-4 and
    decide alike; returns the backend's maps."""
    want_map, want_score = eager.predict(images)
    got_map, got_score = pred.predict(images)
    assert got_map.shape == want_map.shape == (5, 1, SIZE, SIZE) and got_score.shape == (5,)
    assert (got_map - want_map).abs().max().item() <= 1e-4
    assert (got_score - want_score).abs().max().item() <= 1e-4
    assert [pred.decide(float(s))["anomalous"] for s in got_score] == [
        eager.decide(float(s))["anomalous"] for s in want_score
    ]
    return got_map


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_backend_matches_eager(tmp_path, checkpoint, images, eager, backend, one_thread):
    _installed(backend)
    pred = AnomalyPredictor(checkpoint, backend=backend, num_threads=1, batch_size=4, export_cache_dir=tmp_path)
    assert pred.backend == backend and pred.config()["backend"] == backend
    served_like_eager(pred, eager, images)  # batches of 4 and 1: the batch axis is dynamic
    # loaded images through the whole scoring path (preprocessing in Python, the forward swapped)
    img = torch.rand(1, 40, 48)
    s_eager, m_eager = eager.score_images([img])
    s_back, m_back = pred.score_images([img])
    assert abs(s_eager[0] - s_back[0]) <= 1e-4 and (m_eager[0] - m_back[0]).abs().max() <= 1e-4


@pytest.fixture(scope="module")
def head_checkpoints(tmp_path_factory):
    """Checkpoints of one detector (level statistics, anatomy mask on) with a segmentation head trained
    briefly on synthetic lesions (:class:`~monai_skipts.engines.SegHeadTrainer`, which also fits the fused
    normalisation), one per mode, each calibrated."""
    from monai_skipts.checkpoint import save_checkpoint
    from monai_skipts.engines import SegHeadTrainer
    from monai_skipts.networks import AnomalyDetector

    torch.manual_seed(0)
    model = SkipTS("efficientnet_lite0").eval()
    det = AnomalyDetector(model, preprocessing={"modality": "mri", "spatial_size": SIZE}, anatomy_mask=True)
    x = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    det.set_level_stats(fit_level_stats(model, [x]))
    SegHeadTrainer(det, [{"image": x, "id": list("abcd")}], {"mode": "fused", "epochs": 2}, seed=0, device="cpu")()
    assert det.seg_head.map_norm.tolist() != [0.0, 1.0]
    folder = tmp_path_factory.mktemp("head_ckpt")
    paths = {}
    for mode in ("map", "fused"):
        det.set_seg_head_mode(mode)
        det.set_calibration({**THRESHOLD, "value": 0.5})
        paths[mode] = save_checkpoint(folder / f"{mode}.pt", det)
    return paths


@pytest.mark.parametrize("mode", ["map", "fused"])
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_backend_with_segmentation_head_matches_eager(tmp_path, head_checkpoints, backend, mode, one_thread):
    """The served map is the head's (or the fused one), as eager PyTorch gives it, within 1e-4."""
    _installed(backend)
    from monai_skipts.checkpoint import load_detector
    from monai_skipts.export import read_onnx_metadata

    ckpt = head_checkpoints[mode]
    images = torch.rand(5, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    eager = AnomalyPredictor(ckpt, device="cpu", batch_size=4)
    assert eager.detector.seg_head.mode == mode and eager.detector.anatomy is not None
    pred = AnomalyPredictor(ckpt, backend=backend, num_threads=1, batch_size=4, export_cache_dir=tmp_path)
    got_map = served_like_eager(pred, eager, images)
    plain = load_detector(ckpt).eval()  # the same detector serving its discrepancy map: another map
    plain.seg_head.mode = "discrepancy"
    with torch.no_grad():
        assert (plain(images)[0] - got_map).abs().max().item() > 1e-2
    if backend == "onnxruntime":
        meta = read_onnx_metadata(pred.export_files[0])
        assert meta["seg_head"]["mode"] == mode and meta["outputs"]["anomaly_map"]["map"] == mode


def test_cache_reused_invalidated_and_repaired(tmp_path, checkpoint, images, one_thread):
    _installed("onnxruntime")
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(checkpoint.read_bytes())
    p1 = AnomalyPredictor(ckpt, backend="onnxruntime")
    f = p1.export_files[0]
    assert f.parent == tmp_path and f.name.startswith("model.pt.") and f.name.endswith(f".{SIZE}x{SIZE}.onnx")
    record = f.with_name(f.name + ".sha256")
    assert record.is_file()
    mtime = f.stat().st_mtime_ns
    p2 = AnomalyPredictor(ckpt, backend="onnxruntime")  # reused: not written again
    assert p2.export_files == [f] and f.stat().st_mtime_ns == mtime

    # another sigma -> another file; another input size than the trained one is refused
    p3 = AnomalyPredictor(ckpt, backend="onnxruntime", sigma=2.0)
    assert p3.export_files[0] != f and p3.export_files[0].name.endswith(f".{SIZE}x{SIZE}.onnx")
    with pytest.raises(ValueError, match=f"trained at {SIZE}x{SIZE}"):
        AnomalyPredictor(ckpt, backend="onnxruntime", spatial_size=64)

    # another checkpoint (other bytes) -> another key
    torch.manual_seed(1)
    other = tmp_path / "model.pt"
    model = SkipTS("efficientnet_lite0")
    save_test_checkpoint(
        other, model, threshold=THRESHOLD, extra={"modality": "mri", "spatial_size": SIZE}, with_rng=False
    )
    p4 = AnomalyPredictor(other, backend="onnxruntime")
    assert p4.export_files[0] != f and p4.export_files[0].name.endswith(f".{SIZE}x{SIZE}.onnx")
    assert backend_cache_paths(other, "onnxruntime", SIZE, {"sigma": p4.sigma}) == p4.export_files
    want = AnomalyPredictor(other, device="cpu").predict(images)
    got = p4.predict(images)
    assert (got[0] - want[0]).abs().max() <= 1e-4 and (got[1] - want[1]).abs().max() <= 1e-4

    # a truncated (partial) file and a corrupted one are detected and rebuilt
    g = p4.export_files[0]
    data = g.read_bytes()
    g.write_bytes(data[: len(data) // 2])
    p5 = AnomalyPredictor(other, backend="onnxruntime")
    assert g.read_bytes() == data or len(g.read_bytes()) > len(data) // 2
    assert (p5.predict(images)[1] - want[1]).abs().max() <= 1e-4
    flipped = bytearray(g.read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF
    g.write_bytes(bytes(flipped))
    p6 = AnomalyPredictor(other, backend="onnxruntime")
    assert g.read_bytes() != bytes(flipped)
    assert (p6.predict(images)[1] - want[1]).abs().max() <= 1e-4


def test_unknown_backend_and_gpu_refused(checkpoint):
    with pytest.raises(ValueError, match="backend must be one of"):
        AnomalyPredictor(checkpoint, backend="tensorrt")
    with pytest.raises(ValueError, match="runs on the CPU"):
        AnomalyPredictor(checkpoint, backend="onnxruntime", device="cuda")


def test_bundle_run_with_onnxruntime_backend(tmp_path, checkpoint):
    _installed("onnxruntime")
    inp = tmp_path / "in"
    inp.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(inp / f"img{i}.png")
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(checkpoint.read_bytes())
    results = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / f"out_{backend}"
        cmd = [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            str([str(REPO / "bundles/demo/train.json"), str(REPO / "bundles/demo/inference.json")]),
            "--checkpoint",
            str(ckpt),
            "--input",
            str(inp),
            "--inference_dir",
            str(out),
            "--output_dir",
            str(tmp_path),
            "--backend",
            backend,
            "--num_threads",
            "1",
            "--save_maps",
            "False",
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        with open(out / "predictions.csv", newline="") as f:
            results[backend] = {row["id"]: float(row["score"]) for row in csv.DictReader(f)}
    assert results["torch"].keys() == results["onnxruntime"].keys() and len(results["torch"]) == 3
    for k, s in results["torch"].items():
        assert abs(s - results["onnxruntime"][k]) <= 1e-4
    assert list(tmp_path.glob(f"model.pt.*.{SIZE}x{SIZE}.onnx"))


def test_backend_option_in_label_conf_and_mlflow_serving_config(tmp_path, checkpoint, images, eager, one_thread):
    """MONAI Label's ``--conf backend`` and the MLflow model's serving config reach the predictor."""
    _installed("onnxruntime")
    from monai_skipts.label.scorer import scorer_from_conf, scorer_options

    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(checkpoint.read_bytes())
    _, kwargs = scorer_options({"checkpoint": str(ckpt), "backend": "onnxruntime", "num_threads": "1"})
    assert kwargs["backend"] == "onnxruntime" and kwargs["num_threads"] == 1
    scorer = scorer_from_conf({"checkpoint": str(ckpt), "backend": "onnxruntime", "num_threads": "1"})
    assert scorer.backend == "onnxruntime" and scorer.export_files[0].parent == tmp_path
    assert (scorer.predict(images)[1] - eager.predict(images)[1]).abs().max() <= 1e-4

    mlflow = pytest.importorskip("mlflow")  # noqa: F841
    from monai_skipts import registry

    cfg = registry.serving_config(ckpt, backend="onnxruntime", num_threads=1)
    assert cfg["backend"] == "onnxruntime" and cfg["num_threads"] == 1
    assert any(r.startswith("onnxruntime") for r in registry.pip_requirements("efficientnet_lite0", "onnxruntime"))
    with pytest.raises(ValueError, match="backend must be one of"):
        registry.serving_config(ckpt, backend="tvm")
    served = AnomalyPredictor(ckpt, **{k: v for k, v in cfg.items()})  # what SkipTSPyfuncModel.load_context does
    assert served.backend == "onnxruntime" and served.config()["backend"] == "onnxruntime"
