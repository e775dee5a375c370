"""What an exported bundle's ``inference.json`` calls: its root folder, its ``run``
(:func:`run_bundle_inference`: the package's own inference on the bundle's model files, checked
first), and, for MONAI Label's ``BundleInferTask``, the image score of a map and MONAI's image
layout for its writers."""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from monai_skipts.checkpoint import CheckpointError
from monai_skipts.inference import AnomalyPredictor
from monai_skipts.inference_cli import run_and_report
from monai_skipts.utils import file_sha256

__all__ = [
    "MODEL_FILES_KEY",
    "running_bundle_root",
    "check_model_files",
    "run_bundle_inference",
    "map_score",
    "ToMonaiLayoutd",
]

#: the key of ``configs/metadata.json`` recording the SHA-256 of each model file (``models/model.pt``,
#: ``models/model.ts``), written by the export and checked before the bundle scores anything
MODEL_FILES_KEY = "model_files_sha256"


def running_bundle_root(default: str = ".") -> str:
    """The root folder of the bundle whose config MONAI is running: the parent of the ``configs``
    folder of the config file given to ``python -m monai.bundle run`` (or ``monai.bundle.run``,
    ``create_workflow``), found on the call stack's :class:`monai.bundle.ConfigWorkflow`.

    ``inference.json`` sets ``"bundle_root": "$monai_skipts.bundle.runtime.running_bundle_root()"``
    so that the bundle finds ``models/`` from any working directory without ``--bundle_root`` (MONAI's
    runner does not set it; MONAI Label and ``--bundle_root`` replace the expression). ``default``
    when no running workflow is found.
    """
    from monai.bundle import ConfigWorkflow

    frame = inspect.currentframe()
    try:
        while frame is not None:
            obj = frame.f_locals.get("self")
            root = getattr(obj, "config_root_path", None) if isinstance(obj, ConfigWorkflow) else None
            if root is not None:
                root = Path(root).absolute()
                return str(root.parent if root.name == "configs" else root)
            frame = frame.f_back
    finally:
        del frame
    return default


def check_model_files(bundle_root: str | os.PathLike) -> None:
    """Check every model file ``configs/metadata.json`` records (:data:`MODEL_FILES_KEY`) against its
    SHA-256: a file that is missing, truncated, corrupted or replaced is refused, whichever runtime
    would load it (``model.pt`` here, ``model.ts`` in MONAI Label or a TorchScript server).

    Raises:
        CheckpointError: naming the file and the problem (also when the metadata records no files).
    """
    root = Path(bundle_root)
    meta_file = root / "configs" / "metadata.json"
    try:
        recorded = json.loads(meta_file.read_text(encoding="utf-8")).get(MODEL_FILES_KEY)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{meta_file}: not readable ({type(e).__name__}: {e})") from None
    if not isinstance(recorded, dict) or not recorded:
        raise CheckpointError(
            f"{meta_file}: records no model file checksums ('{MODEL_FILES_KEY}'); re-export the bundle"
        )
    for rel, want in recorded.items():
        path = root / rel
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (the bundle was exported with it)")
        have = file_sha256(path)
        if have != want:
            raise CheckpointError(
                f"{path}: refused: its sha256 {have[:12]}… is not the {want[:12]}… recorded in {meta_file} "
                "(the file is corrupted or was replaced; unzip the bundle again)"
            )


def run_bundle_inference(
    bundle_root: str | os.PathLike,
    inputs: str | os.PathLike | Sequence[str],
    output_dir: str | os.PathLike,
    device: str = "auto",
    batch_size: int = 16,
    volume_axis: int = 2,
    volume_aggregation: str = "max",
    max_pixels: int | None = None,
    modality: str | None = None,
    spatial_size: int | Sequence[int] | None = None,
    window: str | Sequence[float] | None = None,
    mri_norm: str | None = None,
    save_maps: bool = True,
    fail_fast: bool = False,
    progress: bool | str | None = "auto",
) -> None:
    """An exported bundle's ``run``: ``python -m monai_skipts.inference`` on the bundle's
    ``models/model.pt``. The predictor is :class:`~monai_skipts.inference.AnomalyPredictor` (the model
    loaded by :func:`~monai_skipts.checkpoint.load_detector`, ``weights_only``; then
    :func:`check_model_files`), the outputs are its ``run``'s (``predictions.csv``, ``errors.csv``,
    ``maps/``, ``status.json``, ...), and the ending is :func:`~monai_skipts.inference_cli.run_and_report`'s.

    Args:
        bundle_root: the unzipped bundle's folder.
        inputs, output_dir, save_maps, fail_fast, progress: see
            :meth:`~monai_skipts.inference.AnomalyPredictor.run`.
        device, batch_size, volume_axis, volume_aggregation, max_pixels, modality, spatial_size,
            window, mri_norm: see :class:`~monai_skipts.inference.AnomalyPredictor` (the
            preprocessing options default to the model's own).

    Raises:
        SystemExit: the command line's exit status when not 0 (1: an input not scored, a model file
            refused; 130: Ctrl-C), after one line on stderr.
    """

    def predictor() -> AnomalyPredictor:
        pred = AnomalyPredictor(
            Path(bundle_root) / "models" / "model.pt",
            device=device,
            batch_size=batch_size,
            volume_axis=volume_axis,
            volume_aggregation=volume_aggregation,
            max_pixels=max_pixels,
            modality=modality,
            spatial_size=spatial_size,
            window=window,
            mri_norm=mri_norm,
        )
        check_model_files(bundle_root)
        return pred

    status = run_and_report(predictor, inputs, output_dir, save_maps, fail_fast, progress)
    if status:
        raise SystemExit(status)


def map_score(amap: torch.Tensor) -> torch.Tensor:
    """Image score of one anomaly map ``(1, H, W)``: its maximum, as a float32 tensor of shape ``(1,)``
    (paper eq 8, as :class:`~monai_skipts.networks.AnomalyDetector` scores)."""
    t = amap.as_tensor() if hasattr(amap, "as_tensor") else torch.as_tensor(amap)
    return t.detach().float().amax().reshape(1)


class ToMonaiLayoutd:
    """Dictionary transform: 2-D images from this package's rows-first layout (``(C, rows, columns)``,
    as :class:`~monai_skipts.transforms.LoadMedicalImage` gives them) to MONAI's layout (``(C, x, y)``,
    as ``monai.transforms.LoadImage`` reads a PNG): swaps the last two axes of each key, with the
    ``spatial_shape`` and ``affine`` of its metadata, so MONAI's writers (``SaveImaged``, MONAI Label's
    ``Restored`` and writer) put the anomaly map over the input image, not transposed.

    Args:
        keys: the keys to swap (the bundle: ``["pred", "image"]``); missing keys are skipped.
    """

    def __init__(self, keys: str | Sequence[str]):
        self.keys = [keys] if isinstance(keys, str) else list(keys)

    @staticmethod
    def _swap(x: Any) -> Any:
        from monai.data import MetaTensor

        t = torch.as_tensor(x.as_tensor() if hasattr(x, "as_tensor") else x)
        if t.dim() < 3:
            return x
        y = t.transpose(-1, -2).contiguous()
        if not isinstance(x, MetaTensor):
            return y
        meta = dict(x.meta)
        shape = meta.get("spatial_shape")
        if shape is not None and len(shape) >= 2:
            shape = [int(v) for v in torch.as_tensor(shape).reshape(-1).tolist()]
            meta["spatial_shape"] = shape[:-2] + shape[-2:][::-1]
        aff = torch.as_tensor(x.affine).clone()
        k = t.dim() - 1  # spatial dimensions (channel first); MONAI keeps a 4x4 affine for 2-D images too
        if aff.dim() == 2 and aff.shape[-1] > k >= 2:  # swap the columns of the last two spatial axes
            aff[:, [k - 2, k - 1]] = aff[:, [k - 1, k - 2]]
        meta["affine"] = aff
        return MetaTensor(y, meta=meta)

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        for key in self.keys:
            if key in d:
                d[key] = self._swap(d[key])
        return d
