"""Serving backends: the exported detector graph on the CPU through ONNX Runtime or OpenVINO.

:class:`~monai_skipts.inference.AnomalyPredictor` with ``backend="onnxruntime"`` or ``"openvino"``
runs the graph :func:`~monai_skipts.export_cache.cached_backend_export` made (the detector's whole
forward: a segmentation head and the anatomy mask included, so the served map is the one the threshold
was calibrated on); :func:`make_backend_runner` loads it (OpenVINO in f32: no bf16 inference precision,
so the maps stay within 1e-4 of eager PyTorch).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from monai_skipts.export import OUTPUT_NAMES, MissingExtraError

__all__ = [
    "BACKENDS",
    "BACKEND_EXTRAS",
    "require_backend",
    "BackendRunner",
    "OnnxRuntimeRunner",
    "OpenVINORunner",
    "make_backend_runner",
]

#: the network runtimes :class:`~monai_skipts.inference.AnomalyPredictor` can serve with: eager PyTorch
#: (any device) or the exported graph on the CPU through ONNX Runtime or OpenVINO
BACKENDS = ("torch", "onnxruntime", "openvino")
BACKEND_EXTRAS = {
    "onnxruntime": 'pip install "monai-skipts[onnxruntime]" (from a clone: pip install -e ".[onnxruntime]")',
    "openvino": 'pip install "monai-skipts[openvino]" (from a clone: pip install -e ".[openvino]")',
}


def require_backend(backend: str):
    """Import the backend's runtime, or :class:`MissingExtraError` naming the extra that installs it."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return torch
    try:
        if backend == "onnxruntime":
            import onnxruntime as mod
        else:
            import openvino as mod
    except ImportError as e:
        raise MissingExtraError(
            f"backend {backend!r} needs the {backend} package, which is not installed ({e}); "
            f"install its extra: {BACKEND_EXTRAS[backend]}"
        ) from e
    return mod


class BackendRunner:
    """``images (B, 3, H, W)`` (torch or numpy float32) -> ``(maps (B, 1, H, W), scores (B,))`` as CPU
    float32 torch tensors, through an exported graph."""

    backend = "?"

    def __call__(self, x) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


class OnnxRuntimeRunner(BackendRunner):
    backend = "onnxruntime"

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None):
        ort = require_backend("onnxruntime")
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(num_threads or 0)  # 0: onnxruntime's default (the physical cores)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def __call__(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        x = np.ascontiguousarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
        amap, score = self.session.run(list(OUTPUT_NAMES), {"image": x})
        return torch.from_numpy(amap), torch.from_numpy(score)


class OpenVINORunner(BackendRunner):
    backend = "openvino"

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None):
        ov = require_backend("openvino")
        core = ov.Core()
        cfg = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}  # f32: no bf16
        if num_threads:
            cfg["INFERENCE_NUM_THREADS"] = str(int(num_threads))
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", cfg)
        self.request = self.compiled.create_infer_request()
        self._outs = [self.compiled.output(n) for n in OUTPUT_NAMES]

    def __call__(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        x = np.ascontiguousarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
        res = self.request.infer({0: x})
        return torch.from_numpy(np.array(res[self._outs[0]])), torch.from_numpy(np.array(res[self._outs[1]]))


def make_backend_runner(backend: str, files: Sequence[Path], num_threads: int | None = None) -> BackendRunner:
    """The runner of ``backend`` over its exported ``files`` (:func:`cached_backend_export`)."""
    if backend == "onnxruntime":
        return OnnxRuntimeRunner(files[0], num_threads)
    if backend == "openvino":
        return OpenVINORunner(files[0], num_threads)
    raise ValueError(f"no exported-graph runner for backend {backend!r} (one of {BACKENDS[1:]})")
