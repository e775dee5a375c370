"""Export the trained detector's whole inference path (image -> anomaly map, score) to TorchScript and ONNX.

The exported graph is the :class:`~monai_skipts.networks.AnomalyDetector`'s forward: teacher, student,
per-level cosine maps, the per-level standardisation (its ``level_stats``), bilinear up-sampling, the
Gaussian filter (separable convolution with symmetric index padding, so it traces and exports where
``scipy``/kornia-style reflect padding does not, cf. anomalib issue #1513), the segmentation head when
the detector has one (its map in mode ``"map"`` or ``"fused"``), the anatomy mask and the image score
(map maximum). Its threshold buffers travel with it.

- :func:`export_torchscript`, :func:`export_onnx`: trace at a fixed ``spatial_size`` (the
  EfficientNet teachers' "same" padding and the up-sampling sizes are fixed at trace time; the batch
  size stays dynamic), write atomically, embed :func:`export_metadata` (TorchScript extra file
  ``metadata.json`` as MONAI's ``save_net_with_metadata`` writes it; ONNX ``metadata_props``), and by
  default check the written file against the eager model.
- ``python -m monai.bundle ckpt_export predictor_def``: the bundles' ``predictor_def`` is the
  detector, whose ``load_state_dict`` takes a whole monai-skipts checkpoint.
- CLI: ``python -m monai_skipts.export --checkpoint model.pt --format onnx --out model.onnx``. ONNX
  needs the ``export`` extra (``pip install "monai-skipts[export]"``: onnx, onnxruntime); without it
  the CLI says so (:class:`MissingExtraError`).
- The spatial size: a model is exported at the size it was trained at (the detector's
  ``config["preprocessing"]["spatial_size"]``); the detector's forward refuses another size: the
  threshold was calibrated on maps of the trained size.
- Serving backends: :mod:`monai_skipts.backends` (runners) and :mod:`monai_skipts.export_cache`.

Inputs of the exported models: ``image`` ``(B, 3, H, W)`` float32, preprocessed as in training
(:func:`~monai_skipts.transforms.preset_transforms`); the metadata holds the preset options under
``"preprocessing"``, and :func:`export_preprocessing` builds that chain from an export's metadata.
Outputs: ``anomaly_map`` ``(B, 1, H, W)`` and ``score`` ``(B,)``; an image is anomalous when
``score >= threshold`` (metadata).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from monai_skipts import __version__
from monai_skipts.checkpoint import CheckpointError, load_checkpoint, load_detector
from monai_skipts.transforms.presets import build_preprocessing, preprocessing_spec, spatial_size_2d
from monai_skipts.utils import atomic_write_bytes

__all__ = [
    "EXPORT_FORMATS",
    "EXPORT_KIND",
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "MissingExtraError",
    "export_metadata",
    "example_input",
    "check_close",
    "export_torchscript",
    "export_onnx",
    "load_torchscript",
    "read_onnx_metadata",
    "export_checkpoint",
    "export_preprocessing",
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


def export_metadata(
    detector: nn.Module, spatial_size: int | Sequence[int], extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The metadata embedded in exports: the detector's config (architecture, sigma, preprocessing,
    calibration, anatomy mask, segmentation head), its threshold record, spatial size, per-level map
    statistics (``[[mean, std], ...]`` or ``None``), the segmentation head's config (``None``: none),
    input/output names and shapes (``anomaly_map``'s ``"map"``: the map it is, ``"discrepancy"`` or the
    head's mode), package version. Plain JSON-able data."""
    h, w = spatial_size_2d(spatial_size)
    cfg = detector.config
    stats = detector.get_level_stats()
    head = cfg.get("seg_head")
    meta = {
        "kind": EXPORT_KIND,
        "monai_skipts_version": __version__,
        "teacher": cfg["model"]["teacher"],
        "teacher_weights_sha256": cfg["model"].get("teacher_weights_sha256"),
        "detector_config": json.loads(json.dumps(cfg)),
        "threshold": cfg["calibration"],
        "spatial_size": [h, w],
        "sigma": detector.sigma,
        "level_stats": stats.detach().cpu().double().tolist() if stats is not None else None,
        "seg_head": json.loads(json.dumps(head)),
        "inputs": {
            "image": {
                "shape": ["B", 3, h, w],
                "dtype": "float32",
                "preprocessing": "intensity to [0, 1], resize, 3 channels, ImageNet normalisation",
            }
        },
        "outputs": {
            "anomaly_map": {
                "shape": ["B", 1, h, w],
                "dtype": "float32",
                "map": (head or {}).get("mode", "discrepancy"),
            },
            "score": {"shape": ["B"], "dtype": "float32", "anomalous_if": "score >= threshold.value"},
        },
    }
    meta.update(extra or {})
    return meta


def example_input(spatial_size: int | Sequence[int], batch_size: int = 1) -> torch.Tensor:
    """A fixed random batch ``(batch_size, 3, H, W)`` (seed 0): the tracing and verification input."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, 3, *spatial_size_2d(spatial_size), generator=g)


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


def check_close(path: Path, want: Sequence[torch.Tensor], got: Sequence[Any], atol: float) -> None:
    """Raise ``RuntimeError`` naming ``path`` when an exported output differs from the eager one."""
    for name, a, b in zip(OUTPUT_NAMES, want, got):
        b = torch.as_tensor(b)
        if a.shape != b.shape:
            raise RuntimeError(f"{path}: exported '{name}' has shape {tuple(b.shape)}, eager {tuple(a.shape)}")
        if not torch.allclose(a, b, rtol=0.0, atol=atol):
            diff = (a - b).abs().max().item()
            raise RuntimeError(f"{path}: exported '{name}' differs from the eager model by {diff:.3g} (atol {atol})")


def export_torchscript(
    detector: nn.Module,
    path: str | os.PathLike,
    spatial_size: int | Sequence[int] | None = None,
    metadata: Mapping[str, Any] | None = None,
    config_files: Sequence[str | os.PathLike] = (),
    verify: bool = True,
    atol: float = 1e-4,
) -> Path:
    """Trace the inference path and save it as TorchScript (atomically).

    Args:
        detector: the :class:`~monai_skipts.networks.AnomalyDetector` (moved to the CPU, eval mode).
        path: destination ``.ts``/``.pt`` file.
        spatial_size: input ``H`` (= ``W``) or ``(H, W)``; default the detector's trained size, else
            256. The traced model accepts only this size (any batch size).
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
    module = detector.cpu().eval()
    spatial_size = _export_size(module, spatial_size)
    meta = export_metadata(module, spatial_size, metadata)
    extra = {}
    for f in config_files:
        extra[f"{Path(f).stem}.json"] = json.dumps(ConfigParser.load_config_file(str(f))).encode()
    buf = io.BytesIO()
    with _tracing():
        traced = torch.jit.trace(module, example_input(spatial_size), check_trace=False)
        save_net_with_metadata(traced, buf, meta_values=meta, more_extra_files=extra)
        if verify:  # check the serialised bytes before anything is written
            x = example_input(spatial_size, 2)
            check_close(path, module(x), torch.jit.load(io.BytesIO(buf.getvalue()))(x), atol)
    return atomic_write_bytes(path, buf.getvalue())


def export_onnx(
    detector: nn.Module,
    path: str | os.PathLike,
    spatial_size: int | Sequence[int] | None = None,
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
    ``level_stats`` (JSON ``[[mean, std], ...]`` or ``null``), ``seg_head`` (JSON: the head's config or
    ``null``). With
    ``verify``, onnxruntime (when installed) runs the file on a batch of 2 and it is compared with the
    eager model. ``constant_folding`` is torch's (off: a faster export; onnxruntime folds at load
    anyway). Other arguments: see :func:`export_torchscript`.

    Raises:
        MissingExtraError: ``onnx`` is not installed (``pip install "monai-skipts[export]"``).
    """
    onnx = _require_onnx()

    path = Path(path)
    module = detector.cpu().eval()
    spatial_size = _export_size(module, spatial_size)
    meta = export_metadata(module, spatial_size, metadata)
    buf = io.BytesIO()
    axes = {"image": {0: "batch"}, "anomaly_map": {0: "batch"}, "score": {0: "batch"}}
    with _tracing():
        torch.onnx.export(
            module,
            (example_input(spatial_size),),
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
        "level_stats": json.dumps(meta["level_stats"]),
        "seg_head": json.dumps(meta["seg_head"]),
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
    x = example_input(spatial_size, 2)
    with torch.no_grad():
        want = module(x)
    check_close(path, want, sess.run(list(OUTPUT_NAMES), {"image": x.numpy()}), atol)


def _export_size(detector: nn.Module, spatial_size: int | Sequence[int] | None) -> tuple[int, int]:
    """The size to trace at: the given one, else the detector's trained size, else 256."""
    if spatial_size is not None:
        return spatial_size_2d(spatial_size)
    return detector.trained_size or (256, 256)


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

    ``spatial_size`` defaults to the trained size (the detector's ``config["preprocessing"]``), else
    256; another size than the trained one is refused by the detector (``ValueError`` naming both).
    ONNX without the ``onnx`` package: :class:`MissingExtraError`, before anything is loaded."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {EXPORT_FORMATS}, got {fmt!r}")
    if fmt == "onnx":
        _require_onnx()
    ckpt = load_checkpoint(checkpoint)
    detector = load_detector(ckpt, teacher_weights=teacher_weights)
    if sigma is not None:
        detector.set_sigma(sigma)
    spatial_size = _export_size(detector, spatial_size)
    prep = detector.config["preprocessing"]
    meta = {k: prep[k] for k in ("modality", "window", "mri_norm") if prep.get(k) is not None}
    if prep.get("modality"):  # the training's preset (export_preprocessing rebuilds it)
        meta["preprocessing"] = preprocessing_spec(prep, spatial_size=spatial_size)
    meta["checkpoint"] = {"file": Path(checkpoint).name, "epoch": ckpt.get("epoch"), "iteration": ckpt.get("iteration")}
    model = detector
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
    if source.get("kind") == EXPORT_KIND or ("preprocessing" in source and "config" not in source):
        stored = source.get("preprocessing") or {
            k: source[k] for k in ("modality", "window", "mri_norm", "spatial_size") if source.get(k) is not None
        }
        spec = preprocessing_spec(stored)
    else:
        spec = preprocessing_spec(source["config"]["preprocessing"])
    if not spec["modality"]:
        raise ValueError(
            "the export's metadata names no modality preset: preprocess its input with "
            "monai_skipts.transforms.build_preprocessing(<modality>, <spatial size>)"
        )
    return build_preprocessing(**spec, load=load, **kwargs)


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
