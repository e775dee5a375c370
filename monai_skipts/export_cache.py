"""The export cache of the serving backends: one verified export per checkpoint, backend, size and
sigma, made once and kept next to the checkpoint (:func:`backend_cache_paths`,
:func:`cached_backend_export`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from monai_skipts.backends import BackendRunner, OpenVINORunner, make_backend_runner, require_backend
from monai_skipts.export import check_close, example_input, export_onnx
from monai_skipts.transforms.presets import spatial_size_2d
from monai_skipts.utils import atomic_write_bytes, atomic_write_text

logger = logging.getLogger(__name__)

__all__ = ["BACKEND_CACHE_VERSION", "backend_cache_paths", "cached_backend_export"]

#: bumped when the exported graph or the cache layout changes (part of every cache key)
BACKEND_CACHE_VERSION = 2
_CACHE_SUFFIX = {"onnxruntime": ".onnx", "openvino": ".openvino.xml"}


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
    hh, ww = spatial_size_2d(spatial_size)
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
    atomic_write_text(_record(files), json.dumps({f.name: _sha256_file(f) for f in files}, indent=1) + "\n")


def _export_for_backend(
    module: nn.Module,
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
        ov = require_backend("openvino")
        files[0].parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=files[0].parent, prefix=".skipts-ov-") as tmp:
            onnx_path = Path(tmp) / "model.onnx"
            export_onnx(module, onnx_path, spatial_size, metadata=metadata, verify=False)
            ov_model = ov.convert_model(str(onnx_path))
            xml = Path(tmp) / "model.xml"
            ov.save_model(ov_model, str(xml), compress_to_fp16=False)  # fp16 weights would break the 1e-4 parity
            runner = OpenVINORunner(xml, num_threads=None)
            x = example_input(spatial_size, 2)
            with torch.no_grad():
                want = module(x)
            check_close(files[0], want, runner(x), atol)
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
    :func:`backend_cache_paths`); ``module_factory()`` gives the detector to export
    when the cache is missing or invalid. The export is checked against that eager model (``atol``)
    before it is kept."""
    require_backend(backend)
    files = backend_cache_paths(checkpoint, backend, spatial_size, options, cache_dir)
    if _cache_valid(files):
        return files
    with contextlib.suppress(OSError):
        _record(files).unlink()
    _export_for_backend(module_factory(), backend, files, spatial_size, metadata, atol)
    return files


def cached_backend_runner(
    checkpoint: str | os.PathLike,
    backend: str,
    module_factory,
    spatial_size,
    options: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
    num_threads: int | None = None,
) -> tuple[BackendRunner, list[Path]]:
    """``(runner, files)``: the backend's runner over the cached export (:func:`cached_backend_export`).
    A cached export the runtime refuses (valid bytes, e.g. made by another runtime version) is exported
    again once."""
    files = cached_backend_export(checkpoint, backend, module_factory, spatial_size, options, metadata, cache_dir)
    try:
        return make_backend_runner(backend, files, num_threads), files
    except (RuntimeError, ValueError, OSError) as e:
        logger.warning("%s: cached export could not be loaded (%s); exporting again", files[0], e)
        _record(files).unlink(missing_ok=True)
        files = cached_backend_export(checkpoint, backend, module_factory, spatial_size, options, metadata, cache_dir)
        return make_backend_runner(backend, files, num_threads), files
