"""Export the whole inference path (image -> anomaly map, score) to TorchScript and ONNX.

The exported graph is :class:`~monai_skipts.inferers.SkipTSPredictor`: teacher, student, per-scale
cosine maps, bilinear up-sampling, the Gaussian filter (separable convolution with symmetric index
padding, so it traces and exports where ``scipy``/kornia-style reflect padding does not, cf.
anomalib issue #1513) and the image score (map maximum).

- :class:`SkipTSExportModel`: the predictor plus its decision threshold (buffers ``threshold`` and
  ``threshold_scale``); its ``load_state_dict`` also takes a whole monai-skipts checkpoint, which is
  what ``python -m monai.bundle ckpt_export`` hands it (see the README of the bundles). The model's
  per-level map statistics (buffer ``map_level_stats`` of the ``SkipTS``, see
  :func:`~monai_skipts.inferers.set_level_stats`), when present, are part of the traced graph, so
  exports standardise the levels as the eager model does.
- :func:`export_torchscript`, :func:`export_onnx`: trace at a fixed ``spatial_size`` (the
  EfficientNet teachers' "same" padding and the up-sampling sizes are fixed at trace time; the batch
  size stays dynamic), write atomically, embed :func:`export_metadata` (TorchScript extra file
  ``metadata.json`` as MONAI's ``save_net_with_metadata`` writes it; ONNX ``metadata_props``), and by
  default check the written file against the eager model.
- CLI: ``python -m monai_skipts.export --checkpoint model.pt --format onnx --out model.onnx``. ONNX
  needs the ``export`` extra (``pip install "monai-skipts[export]"``: onnx, onnxruntime); without it
  the CLI says so (:class:`MissingExtraError`).
- The spatial size: a model is exported at the size it was trained at (the checkpoint's
  ``extra["spatial_size"]``, which the bundles store). Another size is refused, by the CLI and by
  :class:`SkipTSExportModel` loaded from a checkpoint (e.g. ``ckpt_export --input_shape`` of another
  size): the threshold was calibrated on maps of the trained size, and the traced graph of another
  size gives other scores.
- Serving backends (:data:`BACKENDS`): :class:`~monai_skipts.inference.AnomalyPredictor` with
  ``backend="onnxruntime"`` or ``"openvino"`` runs this graph on the CPU; :func:`cached_backend_export`
  makes it once per checkpoint, size and sigma (:func:`backend_cache_paths`), verified against the
  eager model, next to the checkpoint; :func:`make_backend_runner` loads it (OpenVINO in f32: no bf16
  inference precision, no fp16 weight compression, so the maps stay within 1e-4).

Inputs of the exported models: ``image`` ``(B, 3, H, W)`` float32, preprocessed as in training
(:func:`~monai_skipts.transforms.preset_transforms`: intensity to [0, 1], resize, 3 channels,
ImageNet normalisation). The metadata of :func:`export_checkpoint` holds the preset options under
``"preprocessing"`` (:func:`~monai_skipts.transforms.preprocessing_spec` of the checkpoint), and
:func:`export_preprocessing` builds that chain from an export's metadata, so a file fed to an export
gets the tensor training gave it. Outputs: ``anomaly_map`` ``(B, 1, H, W)`` and ``score`` ``(B,)``; an image
is anomalous when ``score >= threshold`` (metadata).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from . import __version__
from .checkpoint import CHECKPOINT_KIND, CheckpointError, check_teacher, load_checkpoint, load_model
from .inferers import SkipTSPredictor, get_level_stats, set_level_stats
from .transforms.presets import build_preprocessing, preprocessing_spec
from .utils import atomic_write_bytes

__all__ = [
    "EXPORT_FORMATS",
    "EXPORT_KIND",
    "MissingExtraError",
    "SkipTSExportModel",
    "as_export_model",
    "export_metadata",
    "export_torchscript",
    "export_onnx",
    "load_torchscript",
    "read_onnx_metadata",
    "export_checkpoint",
    "export_preprocessing",
    "BACKENDS",
    "BackendRunner",
    "backend_cache_paths",
    "cached_backend_export",
    "make_backend_runner",
    "main",
]

EXPORT_FORMATS = ("torchscript", "onnx")
EXPORT_KIND = "monai-skipts/export"
INPUT_NAMES = ("image",)
OUTPUT_NAMES = ("anomaly_map", "score")
EXPORT_EXTRA = 'pip install "monai-skipts[export]" (from a clone of the repository: pip install -e ".[export]")'


class MissingExtraError(ImportError):
    """An optional dependency of the export is not installed; the message says what to install."""


def _require_onnx():
    """``import onnx``, or :class:`MissingExtraError` naming the extra that installs it."""
    try:
        import onnx
    except ImportError as e:
        raise MissingExtraError(
            f"ONNX export needs the onnx package, which is not installed ({e}); "
            f"install the export extra: {EXPORT_EXTRA}"
        ) from e
    return onnx


class SkipTSExportModel(nn.Module):
    """``image (B, 3, H, W) -> (anomaly map (B, 1, H, W), score (B,))`` with its decision threshold.

    Args:
        model: a :class:`~monai_skipts.networks.SkipTS` (teacher with the weights it was trained with).
        sigma, layers, similarity, standardize: see :class:`~monai_skipts.inferers.SkipTSPredictor`.
        threshold: calibration record ``{"value", "scale", "target_fpr", ...}`` or ``None``.

    Buffers ``threshold`` and ``threshold_scale`` (NaN when unknown) travel into TorchScript, as does
    the model's ``map_level_stats`` (per-level map standardisation) when it has one.
    ``load_state_dict`` accepts the module's own state dict or a whole monai-skipts checkpoint
    (``{"kind": "monai-skipts/checkpoint", "student": ..., "threshold": ...}``): the teacher is
    checked against the checkpoint's (name and weights hash), the student loaded, the threshold and
    the per-level map statistics set (cleared when the checkpoint has none), and ``trained_size`` set
    from the checkpoint's ``extra["spatial_size"]``.

    ``trained_size`` (``(H, W)`` or ``None``): when set, ``forward`` (and so tracing and ONNX export)
    refuses inputs of another size with a ``ValueError`` naming both sizes.
    """

    def __init__(
        self,
        model: nn.Module,
        sigma: float = 4.0,
        layers: Sequence[int] | None = None,
        similarity: str = "cosine",
        threshold: Mapping[str, Any] | None = None,
        standardize: bool = True,
    ):
        super().__init__()
        self.predictor = SkipTSPredictor(model, sigma, layers, similarity, standardize)
        self.register_buffer("threshold", torch.tensor(math.nan, dtype=torch.float64), persistent=False)
        self.register_buffer("threshold_scale", torch.tensor(math.nan, dtype=torch.float64), persistent=False)
        self.threshold_record: dict[str, Any] | None = None
        self.set_threshold(threshold)
        self.trained_size: tuple[int, int] | None = None

    @property
    def model(self) -> nn.Module:
        return self.predictor.model

    @property
    def sigma(self) -> float:
        return self.predictor.head.blur.sigma

    def set_threshold(self, threshold: Mapping[str, Any] | None) -> None:
        """Set the decision threshold from a calibration record (``None`` clears it)."""
        self.threshold_record = dict(threshold) if threshold else None
        rec = self.threshold_record or {}
        self.threshold.fill_(float(rec["value"]) if rec.get("value") is not None else math.nan)
        self.threshold_scale.fill_(float(rec["scale"]) if rec.get("scale") is not None else math.nan)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.trained_size is not None:
            got = (int(x.shape[-2]), int(x.shape[-1]))
            if got != self.trained_size:
                h, w = self.trained_size
                raise ValueError(
                    f"input of {got[0]}x{got[1]} pixels, but the model was trained at {h}x{w} (its checkpoint's "
                    f"spatial_size); export and serve it at that size, "
                    f'e.g. ckpt_export --input_shape "[1, 3, {h}, {w}]"'
                )
        return self.predictor(x)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        if state_dict.get("kind") != CHECKPOINT_KIND:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        check_teacher(state_dict, self.model)  # type: ignore[arg-type]
        result = self.model.student.load_state_dict(state_dict["student"], strict=strict, assign=assign)
        self.set_threshold(state_dict.get("threshold"))
        set_level_stats(self.model, state_dict.get("map_level_stats"))
        size = (state_dict.get("extra") or {}).get("spatial_size")
        self.trained_size = None if size is None else _size2(size)
        return result

    @classmethod
    def from_checkpoint(
        cls,
        path_or_ckpt: str | os.PathLike | dict[str, Any],
        teacher_weights: str | os.PathLike | None = None,
        sigma: float | None = None,
        map_location: str | torch.device = "cpu",
    ) -> "SkipTSExportModel":
        """Rebuild from a checkpoint (:func:`~monai_skipts.checkpoint.load_model`); ``sigma`` defaults
        to the checkpoint's ``extra["sigma"]`` or 4."""
        model, ckpt = load_model(path_or_ckpt, teacher_weights=teacher_weights, map_location=map_location)
        extra = ckpt.get("extra") or {}
        sigma = float(extra.get("sigma", 4.0)) if sigma is None else float(sigma)
        out = cls(model, sigma=sigma, threshold=ckpt.get("threshold")).eval()
        out.trained_size = None if extra.get("spatial_size") is None else _size2(extra["spatial_size"])
        return out


def as_export_model(obj: nn.Module, threshold: Mapping[str, Any] | None = None) -> SkipTSExportModel:
    """A :class:`SkipTSExportModel` from a ``SkipTS``, a ``SkipTSPredictor`` or an export model
    (``threshold``, when given, replaces the one it holds). The model is moved to CPU, eval mode."""
    if isinstance(obj, SkipTSExportModel):
        out = obj
    elif isinstance(obj, SkipTSPredictor):
        head = obj.head
        out = SkipTSExportModel(obj.model, head.blur.sigma, head.layers, head.similarity, standardize=obj.standardize)
    elif hasattr(obj, "teacher") and hasattr(obj, "student"):
        out = SkipTSExportModel(obj)
    else:
        raise TypeError(f"expected a SkipTS, SkipTSPredictor or SkipTSExportModel, got {type(obj).__name__}")
    if threshold is not None:
        out.set_threshold(threshold)
    return out.cpu().eval()


def _size2(spatial_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(spatial_size, (int, float)):
        return int(spatial_size), int(spatial_size)
    size = [int(s) for s in spatial_size]
    if len(size) not in (1, 2):
        raise ValueError(f"spatial_size must be S, (S,) or (H, W), got {spatial_size!r}")
    return (size[0], size[-1])


def export_metadata(
    model: SkipTSExportModel, spatial_size: int | Sequence[int], extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The metadata embedded in exports: teacher and model configuration, threshold record, spatial
    size, sigma, per-level map statistics (``[[mean, std], ...]`` or ``None``), input/output names and
    shapes, package version. Plain JSON-able data."""
    h, w = _size2(spatial_size)
    net = model.model
    stats = get_level_stats(net) if model.predictor.standardize else None
    meta = {
        "kind": EXPORT_KIND,
        "monai_skipts_version": __version__,
        "teacher": net.config["teacher"],
        "teacher_weights_sha256": net.config.get("teacher_weights_sha256"),
        "model_config": dict(net.config),
        "threshold": model.threshold_record,
        "spatial_size": [h, w],
        "sigma": model.sigma,
        "map_level_stats": stats.detach().cpu().double().tolist() if stats is not None else None,
        "inputs": {
            "image": {
                "shape": ["B", 3, h, w],
                "dtype": "float32",
                "preprocessing": "intensity to [0, 1], resize, 3 channels, ImageNet normalisation",
            }
        },
        "outputs": {
            "anomaly_map": {"shape": ["B", 1, h, w], "dtype": "float32"},
            "score": {"shape": ["B"], "dtype": "float32", "anomalous_if": "score >= threshold.value"},
        },
    }
    meta.update(extra or {})
    return meta


def _example(spatial_size: int | Sequence[int], batch_size: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, 3, *_size2(spatial_size), generator=g)


@contextlib.contextmanager
def _tracing() -> Iterator[None]:
    """No autograd, and no tracer notes: shape-derived Python numbers become constants, which is
    intended (the spatial size is fixed), as are the deprecation notes of ``torch.jit.trace``."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*(torch\.jit\.|legacy TorchScript-based ONNX|will be removed)")
        yield


def _check_close(path: Path, want: Sequence[torch.Tensor], got: Sequence[Any], atol: float) -> None:
    for name, a, b in zip(OUTPUT_NAMES, want, got):
        b = torch.as_tensor(b)
        if a.shape != b.shape:
            raise RuntimeError(f"{path}: exported '{name}' has shape {tuple(b.shape)}, eager {tuple(a.shape)}")
        if not torch.allclose(a, b, rtol=0.0, atol=atol):
            diff = (a - b).abs().max().item()
            raise RuntimeError(f"{path}: exported '{name}' differs from the eager model by {diff:.3g} (atol {atol})")


def export_torchscript(
    model_or_predictor: nn.Module,
    path: str | os.PathLike,
    spatial_size: int | Sequence[int] = 256,
    threshold: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    config_files: Sequence[str | os.PathLike] = (),
    verify: bool = True,
    atol: float = 1e-4,
) -> Path:
    """Trace the inference path and save it as TorchScript (atomically).

    Args:
        model_or_predictor: ``SkipTS``, ``SkipTSPredictor`` or :class:`SkipTSExportModel`.
        path: destination ``.ts``/``.pt`` file.
        spatial_size: input ``H`` (= ``W``) or ``(H, W)``; the traced model accepts only this size
            (any batch size).
        threshold: calibration record to embed (default: the export model's own, if any).
        metadata: more entries for the embedded metadata (e.g. ``{"modality": "ct_brain"}``).
        config_files: JSON/YAML files (bundle configs) to embed as extra files ``<stem>.json``.
        verify: reload the serialised model and compare it with the eager model on a batch of 2
            before writing (a mismatch raises ``RuntimeError`` and writes nothing).
        atol: tolerance of that check.

    Returns:
        ``path``. Load with :func:`load_torchscript` (or ``monai.data.load_net_with_metadata``).
    """
    from monai.bundle import ConfigParser
    from monai.data import save_net_with_metadata

    path = Path(path)
    module = as_export_model(model_or_predictor, threshold)
    meta = export_metadata(module, spatial_size, metadata)
    extra = {}
    for f in config_files:
        extra[f"{Path(f).stem}.json"] = json.dumps(ConfigParser.load_config_file(str(f))).encode()
    buf = io.BytesIO()
    with _tracing():
        traced = torch.jit.trace(module, _example(spatial_size), check_trace=False)
        save_net_with_metadata(traced, buf, meta_values=meta, more_extra_files=extra)
        if verify:  # check the serialised bytes before anything is written
            x = _example(spatial_size, 2)
            _check_close(path, module(x), torch.jit.load(io.BytesIO(buf.getvalue()))(x), atol)
    return atomic_write_bytes(path, buf.getvalue())


def export_onnx(
    model_or_predictor: nn.Module,
    path: str | os.PathLike,
    spatial_size: int | Sequence[int] = 256,
    threshold: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    opset: int = 17,
    verify: bool = True,
    atol: float = 1e-4,
    constant_folding: bool = True,
) -> Path:
    """Export the inference path to ONNX (atomically), batch axis dynamic.

    Uses torch's TorchScript-based exporter (``dynamo=False``: it needs no ``onnxscript``). Metadata:
    ``metadata_props`` holds ``monai_skipts`` (the whole :func:`export_metadata` as JSON) and the flat
    keys ``teacher``, ``threshold``, ``threshold_scale``, ``spatial_size``, ``sigma``,
    ``map_level_stats`` (JSON ``[[mean, std], ...]`` or ``null``). With
    ``verify``, onnxruntime (when installed) runs the file on a batch of 2 and it is compared with the
    eager model. ``constant_folding`` is torch's (off: a faster export; onnxruntime folds at load
    anyway). Other arguments: see :func:`export_torchscript`.

    Raises:
        MissingExtraError: ``onnx`` is not installed (``pip install "monai-skipts[export]"``).
    """
    onnx = _require_onnx()

    path = Path(path)
    module = as_export_model(model_or_predictor, threshold)
    meta = export_metadata(module, spatial_size, metadata)
    buf = io.BytesIO()
    axes = {"image": {0: "batch"}, "anomaly_map": {0: "batch"}, "score": {0: "batch"}}
    with _tracing():
        torch.onnx.export(
            module,
            (_example(spatial_size),),
            buf,
            dynamo=False,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=constant_folding,
        )
    proto = onnx.load_from_string(buf.getvalue())
    thr = meta["threshold"] or {}
    props = {
        "monai_skipts": json.dumps(meta),
        "teacher": meta["teacher"],
        "threshold": "" if thr.get("value") is None else repr(float(thr["value"])),
        "threshold_scale": "" if thr.get("scale") is None else repr(float(thr["scale"])),
        "spatial_size": json.dumps(meta["spatial_size"]),
        "sigma": repr(meta["sigma"]),
        "map_level_stats": json.dumps(meta["map_level_stats"]),
    }
    onnx.helper.set_model_props(proto, props)
    proto.producer_name, proto.producer_version = "monai-skipts", __version__
    proto.doc_string = "Skip-TS anomaly detection: image (B,3,H,W) -> anomaly_map (B,1,H,W), score (B,)"
    data = proto.SerializeToString()
    if verify:
        _verify_onnx(path, module, data, spatial_size, atol)
    return atomic_write_bytes(path, data)


def _verify_onnx(path: Path, module: nn.Module, data: bytes, spatial_size, atol: float) -> None:
    try:
        import onnxruntime as ort
    except ImportError:  # pragma: no cover - depends on the install
        warnings.warn(
            f"{path}: onnxruntime is not installed, the ONNX export was not verified; {EXPORT_EXTRA}", stacklevel=3
        )
        return
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    x = _example(spatial_size, 2)
    with torch.no_grad():
        want = module(x)
    _check_close(path, want, sess.run(list(OUTPUT_NAMES), {"image": x.numpy()}), atol)


def load_torchscript(
    path: str | os.PathLike, map_location: str | torch.device | None = "cpu", more_extra_files: Sequence[str] = ()
):
    """``(module, metadata dict, extra files dict)`` of a TorchScript export; ``more_extra_files``
    names the embedded files to read (e.g. ``["train.json"]``)."""
    from monai.data import load_net_with_metadata

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: TorchScript file not found")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*deprecated")
        return load_net_with_metadata(str(path), map_location=map_location, more_extra_files=more_extra_files)


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The :func:`export_metadata` dict embedded in an ONNX export (``{}`` when there is none)."""
    onnx = _require_onnx()

    proto = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    return json.loads(props["monai_skipts"]) if "monai_skipts" in props else {}


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    fmt: str = "onnx",
    spatial_size: int | Sequence[int] | None = None,
    teacher_weights: str | os.PathLike | None = None,
    sigma: float | None = None,
    config_files: Sequence[str | os.PathLike] = (),
    verify: bool = True,
) -> Path:
    """Export a monai-skipts checkpoint at the size it was trained at.

    ``spatial_size`` defaults to the checkpoint's ``extra["spatial_size"]`` (the bundles store it),
    else 256; another size than the checkpoint's is refused (``ValueError`` naming both). ONNX without
    the ``onnx`` package: :class:`MissingExtraError`, before anything is loaded."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {EXPORT_FORMATS}, got {fmt!r}")
    if fmt == "onnx":
        _require_onnx()
    ckpt = load_checkpoint(checkpoint)
    extra = ckpt.get("extra") or {}
    trained = extra.get("spatial_size")
    if spatial_size is None:
        spatial_size = 256 if trained is None else trained
    elif trained is not None and _size2(spatial_size) != _size2(trained):
        raise ValueError(
            f"{checkpoint}: the model was trained at {'x'.join(map(str, _size2(trained)))} pixels; exporting it at "
            f"{'x'.join(map(str, _size2(spatial_size)))} would change its scores (the threshold was calibrated at the "
            f"trained size): leave out --spatial-size (spatial_size=None) to export at the trained size"
        )
    model = SkipTSExportModel.from_checkpoint(ckpt, teacher_weights=teacher_weights, sigma=sigma)
    meta = {k: extra[k] for k in ("modality", "window", "mri_norm") if k in extra}
    if preprocessing_spec(ckpt)["modality"]:  # the training's preset (export_preprocessing rebuilds it)
        meta["preprocessing"] = preprocessing_spec(ckpt, spatial_size=list(_size2(spatial_size)))
    meta["checkpoint"] = {"file": Path(checkpoint).name, "epoch": ckpt.get("epoch"), "iteration": ckpt.get("iteration")}
    if fmt == "onnx":
        return export_onnx(model, out, spatial_size, metadata=meta, verify=verify)
    return export_torchscript(model, out, spatial_size, metadata=meta, config_files=config_files, verify=verify)


def export_preprocessing(source: Mapping[str, Any] | str | os.PathLike, load: bool = True, **kwargs: Any):
    """The preprocessing an export's input needs (file path in ``{"image": path}`` -> ``(3, H, W)``):
    the training's chain, :func:`~monai_skipts.transforms.build_preprocessing` with the preset options.

    Args:
        source: an export's metadata (:func:`load_torchscript`'s second item,
            :func:`read_onnx_metadata`; its ``"preprocessing"`` entry, else its flat ``modality``,
            ``window``, ``mri_norm`` and ``spatial_size``), a checkpoint dict, or a checkpoint's path.
        load: start from a path (``False``: from a loaded image).
        kwargs: more options of :func:`~monai_skipts.transforms.build_preprocessing` (``mask_key``,
            loader options).

    Raises:
        ValueError: the source names no modality (an export of a checkpoint without one).
    """
    if isinstance(source, (str, os.PathLike)):
        source = load_checkpoint(source)
    if source.get("kind") == EXPORT_KIND or "preprocessing" in source:
        stored = source.get("preprocessing") or {
            k: source[k] for k in ("modality", "window", "mri_norm", "spatial_size") if source.get(k) is not None
        }
        spec = preprocessing_spec(stored)
    else:
        spec = preprocessing_spec(source)
    if not spec["modality"]:
        raise ValueError(
            "the export's metadata names no modality preset: preprocess its input with "
            "monai_skipts.transforms.build_preprocessing(<modality>, <spatial size>)"
        )
    return build_preprocessing(**spec, load=load, **kwargs)


# --------------------------------------------------------------------------- serving backends

#: the network runtimes :class:`~monai_skipts.inference.AnomalyPredictor` can serve with: eager PyTorch
#: (any device) or the exported graph on the CPU through ONNX Runtime or OpenVINO
BACKENDS = ("torch", "onnxruntime", "openvino")
BACKEND_EXTRAS = {
    "onnxruntime": 'pip install "monai-skipts[onnxruntime]" (from a clone: pip install -e ".[onnxruntime]")',
    "openvino": 'pip install "monai-skipts[openvino]" (from a clone: pip install -e ".[openvino]")',
}
#: bumped when the exported graph or the cache layout changes (part of every cache key)
BACKEND_CACHE_VERSION = 1
_CACHE_SUFFIX = {"onnxruntime": ".onnx", "openvino": ".openvino.xml"}


def _require_backend(backend: str):
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


def _sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _writable_dir(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".skipts-write-probe-{os.getpid()}"
        atomic_write_bytes(probe, b"")
        probe.unlink()
        return True
    except OSError:
        return False


def backend_cache_paths(
    checkpoint: str | os.PathLike,
    backend: str,
    spatial_size: int | Sequence[int],
    options: Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> list[Path]:
    """The cached export files of ``checkpoint`` for ``backend`` at ``spatial_size``.

    Named ``<checkpoint name>.<key>.<H>x<W>.onnx`` (ONNX Runtime) or ``... .openvino.xml`` plus its
    ``.bin`` (OpenVINO IR), next to the checkpoint (``cache_dir`` when given; when the checkpoint's
    folder cannot be written, ``$XDG_CACHE_HOME/monai-skipts/exports``). ``key`` is the first 12 hex
    digits of SHA-256 over the checkpoint's bytes, the ``options`` that change the graph (sigma) and
    :data:`BACKEND_CACHE_VERSION`: another checkpoint, size or sigma gives another file, never a
    stale one. A ``<first file>.sha256`` record (written last) holds every file's SHA-256; a file
    that does not match it (partial, corrupted) is rebuilt.
    """
    if backend not in _CACHE_SUFFIX:
        raise ValueError(f"no exported file for backend {backend!r}")
    ckpt = Path(checkpoint)
    h = hashlib.sha256(_sha256_file(ckpt).encode())
    h.update(json.dumps({"v": BACKEND_CACHE_VERSION, **dict(options or {})}, sort_keys=True).encode())
    hh, ww = _size2(spatial_size)
    folder = Path(cache_dir) if cache_dir is not None else ckpt.parent
    if cache_dir is None and not _writable_dir(folder):
        folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "monai-skipts" / "exports"
    first = folder / f"{ckpt.name}.{h.hexdigest()[:12]}.{hh}x{ww}{_CACHE_SUFFIX[backend]}"
    return [first] if backend == "onnxruntime" else [first, first.with_suffix(".bin")]


def _record(files: Sequence[Path]) -> Path:
    return files[0].with_name(files[0].name + ".sha256")


def _cache_valid(files: Sequence[Path]) -> bool:
    """Every file present and matching the ``.sha256`` record written after them."""
    try:
        want = json.loads(_record(files).read_text(encoding="utf-8"))
        return all(want.get(f.name) == _sha256_file(f) for f in files)
    except (OSError, ValueError, AttributeError):
        return False


def _write_record(files: Sequence[Path]) -> None:
    from .utils import atomic_write_text

    atomic_write_text(_record(files), json.dumps({f.name: _sha256_file(f) for f in files}, indent=1) + "\n")


def _export_for_backend(
    module: SkipTSExportModel,
    backend: str,
    files: Sequence[Path],
    spatial_size,
    metadata: Mapping[str, Any] | None,
    atol: float,
) -> None:
    """Write the backend's files (atomically, verified against the eager ``module``), then the record."""
    if backend == "onnxruntime":
        export_onnx(module, files[0], spatial_size, metadata=metadata, verify=True, atol=atol)
    else:
        ov = _require_backend("openvino")
        import tempfile

        files[0].parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=files[0].parent, prefix=".skipts-ov-") as tmp:
            onnx_path = Path(tmp) / "model.onnx"
            export_onnx(module, onnx_path, spatial_size, metadata=metadata, verify=False)
            ov_model = ov.convert_model(str(onnx_path))
            xml = Path(tmp) / "model.xml"
            ov.save_model(ov_model, str(xml), compress_to_fp16=False)  # fp16 weights would break the 1e-4 parity
            runner = OpenVINORunner(xml, num_threads=None)
            x = _example(spatial_size, 2)
            with torch.no_grad():
                want = module(x)
            _check_close(files[0], want, runner(x), atol)
            del runner
            os.replace(xml.with_suffix(".bin"), files[1])  # weights first: the record is the commit
            os.replace(xml, files[0])
    _write_record(files)


def cached_backend_export(
    checkpoint: str | os.PathLike,
    backend: str,
    module_factory,
    spatial_size,
    options: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
    atol: float = 1e-4,
) -> list[Path]:
    """The backend's exported files of ``checkpoint``, made once and cached (see
    :func:`backend_cache_paths`); ``module_factory()`` gives the :class:`SkipTSExportModel` to export
    when the cache is missing or invalid. The export is checked against that eager model (``atol``)
    before it is kept."""
    _require_backend(backend)
    files = backend_cache_paths(checkpoint, backend, spatial_size, options, cache_dir)
    if _cache_valid(files):
        return files
    with contextlib.suppress(OSError):
        _record(files).unlink()
    _export_for_backend(module_factory(), backend, files, spatial_size, metadata, atol)
    return files


class BackendRunner:
    """``images (B, 3, H, W)`` (torch or numpy float32) -> ``(maps (B, 1, H, W), scores (B,))`` as CPU
    float32 torch tensors, through an exported graph."""

    backend = "?"

    def __call__(self, x) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


class OnnxRuntimeRunner(BackendRunner):
    backend = "onnxruntime"

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None):
        ort = _require_backend("onnxruntime")
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
        ov = _require_backend("openvino")
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


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m monai_skipts.export --checkpoint model.pt --format onnx|torchscript --out FILE``."""
    p = argparse.ArgumentParser(prog="python -m monai_skipts.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="monai-skipts checkpoint (model.pt of a bundle run)")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="onnx")
    p.add_argument("--out", required=True, help="output file (.onnx / .ts)")
    p.add_argument("--spatial-size", type=int, nargs="+", default=None, help="H [W] (default: the checkpoint's)")
    p.add_argument("--teacher-weights", default=None, help="teacher weights file, if not in the default place")
    p.add_argument("--sigma", type=float, default=None, help="Gaussian sigma (default: the checkpoint's, or 4)")
    p.add_argument("--config-file", action="append", default=[], help="bundle config to embed (TorchScript)")
    p.add_argument("--no-verify", action="store_true", help="skip the check of the export against eager PyTorch")
    a = p.parse_args(argv)
    size = a.spatial_size
    if size is not None and len(size) not in (1, 2):
        p.error("--spatial-size takes H or H W")
    try:
        out = export_checkpoint(
            a.checkpoint, a.out, a.format, size, a.teacher_weights, a.sigma, a.config_file, not a.no_verify
        )
    except (CheckpointError, FileNotFoundError, ValueError, RuntimeError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"format": a.format, "out": str(out), "bytes": out.stat().st_size}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
