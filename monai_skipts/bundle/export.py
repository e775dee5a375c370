"""Export a trained model as a standard MONAI bundle: a zip in MONAI's layout that runs anywhere
``monai-skipts`` is installed, with nothing from this repository.

Command line (see :mod:`monai_skipts.bundle.__main__`)::

    python -m monai_skipts.bundle export --config_file bundles/brainmri/train.json \\
        --checkpoint runs/brainmri/model.pt --out skipts_brainmri.zip

The zip holds one folder named after it (``skipts_brainmri/``, as MONAI's model-zoo zips do)::

    skipts_brainmri/
      configs/metadata.json    MONAI's metadata fields (version, changelog, monai/pytorch/numpy versions,
                               required_packages_version, task, description, authors, copyright,
                               network_data_format {inputs, outputs}, ...), the decision threshold, and
                               the SHA-256 of each model file (``model_files_sha256``)
      configs/inference.json   self-contained: MONAI components and the installed monai_skipts package only;
                               files are found through ``@bundle_root``
      configs/logging.conf     MONAI's usual console logging
      models/model.pt          the detector's checkpoint (version 2) with the teacher's weights in its state
                               (no download); ``"model"``: the same state, where MONAI Label reads it
      models/model.ts          TorchScript of ``network_def`` (image -> anomaly map, score), metadata embedded
      docs/README.md           what the model does, how to run it, inputs and outputs
      LICENSE                  Apache-2.0

Run it from any working directory::

    python -m monai.bundle run --config_file skipts_brainmri/configs/inference.json --input /path/to/images

Its ``run`` is ``python -m monai_skipts.inference`` (:func:`~monai_skipts.bundle.runtime.run_bundle_inference`):
the model loaded by :func:`~monai_skipts.checkpoint.load_detector` (``weights_only``; a file holding
pickled code is refused), both model files checked against their recorded SHA-256, then
:class:`~monai_skipts.inference.AnomalyPredictor`'s ``run``: the same ``predictions.csv``,
``errors.csv``, maps, progress bar, exit status and one-line errors. ``inference.json`` also holds
MONAI's inference layout (``network_def``, ``preprocessing``, ``inferer``, ``postprocessing``), so MONAI
Label's ``BundleInferTask`` serves the unzipped folder as it is: through
:class:`~monai_skipts.inferers.SkipTSInferer` the network maps a preprocessed image ``(B, 3, S, S)`` to
the anomaly map ``(B, 1, S, S)``; the postprocessing adds the image score (the map's maximum) and the
decision against the calibrated threshold. ``bundle_root`` defaults to the folder of the config being
run (:func:`~monai_skipts.bundle.runtime.running_bundle_root`; MONAI's runner does not set it, MONAI
Label does), so no ``--bundle_root`` is needed.

This module writes the zip (:func:`export_bundle`); the pieces live beside it:
:mod:`monai_skipts.bundle.metadata` (``metadata.json``), :mod:`monai_skipts.bundle.inference_config`
(``inference.json``, ``logging.conf``), :mod:`monai_skipts.bundle.readme` (README, LICENSE) and
:mod:`monai_skipts.bundle.runtime` (what the bundle calls at inference).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import warnings
import zipfile
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from monai_skipts.bundle.inference_config import LOGGING_CONF, inference_config
from monai_skipts.bundle.metadata import bundle_metadata, check_metadata
from monai_skipts.bundle.readme import bundle_readme, license_text
from monai_skipts.bundle.runtime import MODEL_FILES_KEY
from monai_skipts.checkpoint import (
    CHECKPOINT_KIND,
    CHECKPOINT_VERSION,
    detector_from_config,
    load_checkpoint,
    load_detector,
)
from monai_skipts.transforms.presets import spatial_size_2d
from monai_skipts.utils import atomic_write_bytes

__all__ = ["export_bundle"]

logger = logging.getLogger(__name__)


def _eval_metrics(checkpoint: Path) -> dict[str, float]:
    """The numeric test metrics of the training run (``metrics.json`` beside the checkpoint), if any."""
    f = checkpoint.parent / "metrics.json"
    if not f.is_file():
        return {}
    try:
        m = json.loads(f.read_text())
    except (OSError, ValueError):
        return {}
    keys = ("auroc", "auprc", "pixel_auroc", "aupro", "dice", "f1", "sensitivity", "specificity")
    return {k: float(m[k]) for k in keys if isinstance(m.get(k), (int, float)) and math.isfinite(m[k])}


def _trace(net: nn.Module, size: Sequence[int]) -> torch.jit.ScriptModule:
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        return torch.jit.trace(net, x, check_trace=False)


def _close(name: str, want: torch.Tensor, got: torch.Tensor, atol: float) -> None:
    if want.shape != got.shape or not torch.allclose(want, got, rtol=0.0, atol=atol):
        diff = (want - got).abs().max().item() if want.shape == got.shape else float("nan")
        raise RuntimeError(f"{name} differs from the checkpoint's model (max difference {diff:.3g}, atol {atol})")


def export_bundle(
    config_file: str | os.PathLike,
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    version: str | None = None,
    teacher_weights: str | os.PathLike | None = None,
    batch_size: int = 4,
    verify: bool = True,
    atol: float = 1e-4,
) -> Path:
    """Write a trained model as a standard MONAI bundle zip (layout: module docstring).

    Args:
        config_file: the training bundle config (e.g. ``bundles/brainmri/train.json``); its folder's
            ``metadata.json`` gives the name, task, description, authors, copyright, data source and
            references. Only read, never run: modality and spatial size come from the checkpoint
            (the values the model was trained with, overrides included).
        checkpoint: the run's ``model.pt``; its ``metrics.json`` neighbour, when present, gives
            ``eval_metrics``.
        out: the zip to write (``.zip``); the folder inside is named after it.
        version: the bundle version (default: the source metadata's).
        teacher_weights: the teacher's weights file, when not in the default place (needed to rebuild
            the checkpoint's model; the bundle then holds the weights itself).
        batch_size: the bundle's default inference batch size.
        verify: check ``network_def`` loaded from ``model.pt`` and ``model.ts`` against the
            checkpoint's detector (:func:`~monai_skipts.checkpoint.load_detector`) on random images:
            maps within ``atol``; a mismatch raises ``RuntimeError`` and writes nothing.

    Returns:
        ``out``.
    """
    from monai.bundle import ConfigParser
    from monai.data import save_net_with_metadata

    config_file, checkpoint, out = Path(config_file), Path(checkpoint), Path(out)
    if out.suffix != ".zip":
        raise ValueError(f"{out}: the bundle is written as a .zip file")
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: config file not found")
    name = out.stem
    ckpt = load_checkpoint(checkpoint)
    train_cfg = ConfigParser.load_config_file(str(config_file))  # plain content; references stay unresolved
    base_meta_file = config_file.parent / "metadata.json"
    base = json.loads(base_meta_file.read_text()) if base_meta_file.is_file() else {}
    extra = dict(ckpt.get("extra") or {})
    extra.setdefault("dataset", train_cfg.get("dataset"))
    reference = load_detector(ckpt, teacher_weights=teacher_weights)
    prep = reference.config["preprocessing"]  # the checkpoint's; the bundle's values only fill what it lacks
    if prep.get("modality") is None and isinstance(train_cfg.get("modality"), str):
        prep["modality"] = train_cfg["modality"]
    if prep.get("spatial_size") is None and isinstance(train_cfg.get("spatial_size"), int):
        prep["spatial_size"] = list(spatial_size_2d(train_cfg["spatial_size"]))
    ckpt = {**ckpt, "config": reference.config, "extra": extra}
    size = list(spatial_size_2d(prep.get("spatial_size") or 256))

    config = inference_config(ckpt, batch_size)
    meta = bundle_metadata(ckpt, base, version, _eval_metrics(checkpoint))
    check_metadata(meta)

    net = reference
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    payload = {
        "kind": CHECKPOINT_KIND,
        "version": CHECKPOINT_VERSION,
        "config": reference.config,
        "state_dict": state,  # the teacher's weights included: nothing to download
        "model": state,  # the same tensors (stored once), where MONAI Label's BundleInferTask reads them
        "extra": extra,
    }
    buf = io.BytesIO()  # in memory: the zip is written atomically below
    torch.save(payload, buf)

    traced = _trace(net, size)
    ts = io.BytesIO()
    with warnings.catch_warnings():  # as MONAI's ckpt_export writes it: metadata and config embedded
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.save.*deprecated")
        save_net_with_metadata(
            traced, ts, meta_values=meta, more_extra_files={"inference.json": json.dumps(config).encode()}
        )

    if verify:
        x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            want = reference(x)[0]
            stored = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
            _close("models/model.pt", want, load_detector(stored)(x)[0], atol)  # as the bundle's run loads it
            kwargs = {k: v for k, v in config["network_def"].items() if k != "_target_"}
            fresh = detector_from_config(**kwargs).eval()  # as MONAI Label loads it
            fresh.load_state_dict(stored["model"])
            _close("network_def with models/model.pt", want, fresh(x)[0], atol)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*deprecated")
                _close("models/model.ts", want, torch.jit.load(io.BytesIO(ts.getvalue()))(x)[0], atol)

    meta[MODEL_FILES_KEY] = {  # checked before the bundle scores (after embedding the metadata in model.ts)
        "models/model.pt": hashlib.sha256(buf.getvalue()).hexdigest(),
        "models/model.ts": hashlib.sha256(ts.getvalue()).hexdigest(),
    }
    files = {
        f"{name}/configs/metadata.json": json.dumps(meta, indent=2).encode(),
        f"{name}/configs/inference.json": json.dumps(config, indent=2).encode(),
        f"{name}/configs/logging.conf": LOGGING_CONF.encode(),
        f"{name}/models/model.pt": buf.getvalue(),
        f"{name}/models/model.ts": ts.getvalue(),
        f"{name}/docs/README.md": bundle_readme(meta, name).encode(),
        f"{name}/LICENSE": license_text().encode(),
    }
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for arc, data in files.items():
            z.writestr(zipfile.ZipInfo(arc, date_time=(2024, 1, 1, 0, 0, 0)), data, compress_type=zipfile.ZIP_DEFLATED)
    logger.info("bundle %s: %s", out, ", ".join(files))
    return atomic_write_bytes(out, buf.getvalue())
