"""Recalibration on site: a trained model's thresholds set again from the site's own normal images,
without retraining.

The site's normals are scored with the serving path (:class:`~monai_skipts.inference.AnomalyPredictor`:
the checkpoint's preprocessing, the chosen backend, volumes sliced and aggregated as served). From
their scores come the image threshold and its uncertainty (:func:`~monai_skipts.calibration.threshold_record`),
the volume threshold when volumes are given (:func:`~monai_skipts.calibration.volume_threshold`) and
the pixel threshold of the outlines (:func:`~monai_skipts.calibration.pixel_threshold`). A new
checkpoint is written atomically with that record (the detector's ``config["calibration"]`` and its
threshold buffers, :meth:`~monai_skipts.networks.AnomalyDetector.set_calibration`); the student's
weights, the per-level statistics and everything else are copied unchanged, which is checked by hash
on the written file.

Command line::

    python -m monai_skipts.calibrate --checkpoint runs/headct/model.pt --normals site_normals/ \\
        --out site_model.pt --target_fpr 0.05 [--register skipts-headct --alias site-a \\
        --tracking_uri sqlite:///runs/headct/mlruns.db]

``--register NAME`` logs the site model as a new version of the registered model ``NAME``
(:func:`~monai_skipts.registry.log_and_register`) with its own ``--alias`` (default ``site``), the
threshold record as metrics (``calibration/fpr_bound``, ...) and the tag ``calibration=site``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from monai_skipts.calibration import (
    CALIBRATION_METHODS,
    DEFAULT_PIXEL_FPR,
    PixelScoreSketch,
    min_calibration_normals,
    pixel_threshold,
    threshold_record,
    uncertainty_warning,
    volume_threshold,
)
from monai_skipts.checkpoint import TEACHER_PREFIX, load_checkpoint, save_checkpoint
from monai_skipts.engines.seg_head import warn_parametric_map_calibration
from monai_skipts.inference import AnomalyPredictor, list_inputs
from monai_skipts.networks.detector import SCALAR_STATE
from monai_skipts.utils import InputDataError

__all__ = ["RecalibrationError", "main", "recalibrate", "site_normals", "weights_sha256"]

logger = logging.getLogger(__name__)

#: the detector config entries that make the model's maps: copied unchanged and hashed before and after
MODEL_CONFIG_KEYS = ("model", "sigma", "similarity", "preprocessing")


class RecalibrationError(ValueError):
    """The recalibration was refused (too few normals, a checkpoint that is not a calibrated model,
    abnormal items in the list, a changed model); the message says which file and why."""


def weights_sha256(ckpt: dict[str, Any]) -> str:
    """SHA-256 over the model of a (version-2) checkpoint: its architecture, sigma, similarity and
    preprocessing (``config``) and its state dict's weight tensors by name (the student's, the
    per-level statistics; not the teacher's, nor the threshold buffers the calibration sets): equal
    for the same model, whatever its calibration.

    Example:
        >>> a = {"config": {"model": {"teacher": "t"}}, "state_dict": {"model.student.w": torch.ones(2)}}
        >>> b = {"config": {**a["config"], "calibration": {"value": 1.0}}, "state_dict": {**a["state_dict"], "threshold": torch.tensor(1.0)}}
        >>> weights_sha256(a) == weights_sha256(b)
        True
    """
    h = hashlib.sha256()

    def raw(t: torch.Tensor) -> bytes:
        t = t.detach().cpu().contiguous().reshape(-1)
        return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""

    config = ckpt.get("config") or {}
    for key in MODEL_CONFIG_KEYS:
        value = config.get(key)
        h.update(key.encode() + repr(sorted(value.items()) if isinstance(value, dict) else value).encode())
    state = ckpt.get("state_dict") or {}
    for name in sorted(state):
        if name in SCALAR_STATE or name.startswith(TEACHER_PREFIX):
            continue
        t = state[name]
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode() + raw(t))
    return h.hexdigest()


def site_normals(normals: str | os.PathLike | Sequence[str | os.PathLike]) -> list[dict]:
    """The site's normal images as datalist items: a folder (every image file below it), a CSV/JSON
    datalist (:func:`~monai_skipts.data.layouts.file_datalist`; every item must be labelled 0), a file,
    or a list of paths.

    Raises:
        RecalibrationError: a datalist lists abnormal items.
        InputDataError: a missing input or an empty folder.
    """
    path = Path(normals) if isinstance(normals, (str, os.PathLike)) else None
    if path is not None and path.is_file() and path.suffix.lower() in (".csv", ".json"):
        from monai_skipts.data.layouts import file_datalist

        items = file_datalist(path)
        abnormal = [it["id"] for it in items if it.get("label") == 1]
        if abnormal:
            raise RecalibrationError(
                f"{path}: {len(abnormal)} items are labelled abnormal ({', '.join(abnormal[:5])}"
                f"{', ...' if len(abnormal) > 5 else ''}); recalibration needs the site's normal images only"
            )
        return [{"image": it["image"], "id": it["id"]} for it in items]
    return list_inputs(normals)


def recalibrate(
    checkpoint: str | os.PathLike,
    normals: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    target_fpr: float | None = None,
    method: str | None = None,
    pixel_fpr: float | None = None,
    teacher_weights: str | os.PathLike | None = None,
    device: str = "auto",
    backend: str = "torch",
    batch_size: int = 16,
    volume_axis: int = 2,
    volume_aggregation: str = "max",
) -> dict[str, Any]:
    """Set a trained model's thresholds from a site's normal images and write ``out``.

    Args:
        checkpoint: the trained model (``model.pt`` of a training run: a monai-skipts checkpoint with
            a calibration record).
        normals: the site's normal images (:func:`site_normals`).
        out: the new checkpoint (written atomically; may not be ``checkpoint`` itself).
        target_fpr, method: default the checkpoint record's (else 0.05 and ``"lognormal"``).
        pixel_fpr: the pixel threshold's target (default the record's, else 0.5 %).
        teacher_weights, device, backend, batch_size, volume_axis, volume_aggregation: the serving
            options (:class:`~monai_skipts.inference.AnomalyPredictor`).

    Returns:
        the new threshold record: :func:`~monai_skipts.calibration.threshold_record`'s keys with
        ``method`` as calibrated, plus ``source: "site"``, ``site_normals`` (the input), ``previous``
        (the training record), ``weights_sha256``, ``pixel`` and, for volumes, ``volume``.

    Raises:
        RecalibrationError: too few normals for the target and method, ``checkpoint`` not a
            calibrated model (a training-state checkpoint or another kind of file), abnormal items in
            a datalist, or the written weights differing from the input's.
        InputDataError: a normal image that cannot be scored (named).
    """
    if normals is None:
        raise RecalibrationError("no site normals given: --normals (bundle: --site_normals) <folder or datalist>")
    src, dst = Path(checkpoint), Path(out)
    if dst.exists() and dst.resolve() == src.resolve():
        raise RecalibrationError(f"{dst}: --out is the input checkpoint; write the site model to another file")
    try:
        ckpt = load_checkpoint(src)
    except (ValueError, OSError) as e:  # CheckpointError, UnsafeCheckpointError, FileNotFoundError
        raise RecalibrationError(f"{e}; recalibration needs the model.pt of a monai-skipts training") from None
    old = ckpt["config"].get("calibration")
    if not isinstance(old, dict) or old.get("value") is None:
        raise RecalibrationError(
            f"{src}: not a calibrated model (no calibration record): use the training run's model.pt, "
            "not its checkpoint.pt (training state) or another file"
        )
    target = float(target_fpr if target_fpr is not None else old.get("target_fpr", 0.05))
    method = method or old.get("estimator") or old.get("method") or "lognormal"
    if method not in CALIBRATION_METHODS:  # e.g. "cross_fit": its estimator decides
        method = "lognormal"
    warn_parametric_map_calibration((ckpt["config"].get("seg_head") or {}).get("mode"), method)
    pixel_target = float(
        pixel_fpr if pixel_fpr is not None else (old.get("pixel") or {}).get("target_fpr", DEFAULT_PIXEL_FPR)
    )
    items = site_normals(normals)
    need = min_calibration_normals(target, method)
    if len(items) < need:
        raise RecalibrationError(
            f"{normals}: {len(items)} site normal images cannot calibrate target_fpr={target:g} with the "
            f"{method!r} method (needs at least {need}); add normal images or raise --target_fpr"
        )
    before = weights_sha256(ckpt)
    predictor = AnomalyPredictor(
        ckpt,
        teacher_weights=teacher_weights,
        device=device,
        backend=backend,
        batch_size=batch_size,
        volume_axis=volume_axis,
        volume_aggregation=volume_aggregation,
    )
    results = predictor.predict_items(items)
    scores = np.array([r["score"] for r in results], dtype=np.float64)
    sketch = PixelScoreSketch()
    for r in results:
        sketch.update(np.asarray(r["map"])[None])
    volumes = [r for r in results if "volume_id" in r]
    images = [r for r in results if "volume_id" not in r]
    n_units = len(images) + len({r["volume_id"] for r in volumes})
    if n_units < need:
        raise RecalibrationError(
            f"{normals}: {n_units} site normal images/volumes cannot calibrate target_fpr={target:g} with the "
            f"{method!r} method (needs at least {need}); add normal images or raise --target_fpr"
        )
    record = threshold_record(scores, target, method, source="site", site_normals=str(normals))
    if volumes:
        record["volume"] = volume_threshold(
            [r["score"] for r in volumes],
            target,
            method,
            volume_ids=[r["volume_id"] for r in volumes],
            aggregation=predictor.volume_aggregation,
            topk=predictor.topk,
        )
    record["pixel"] = pixel_threshold(sketch, pixel_target)
    record["previous"] = {k: v for k, v in old.items() if k != "previous"}
    record["weights_sha256"] = before
    detector = predictor.detector  # load_detector's: the checkpoint's config and state
    detector.set_calibration(record)
    save_checkpoint(
        dst,
        detector,
        epoch=ckpt.get("epoch", 0),
        iteration=ckpt.get("iteration", 0),
        extra=ckpt.get("extra"),
        with_rng=False,
    )
    after = weights_sha256(load_checkpoint(dst))
    if after != before:
        dst.unlink(missing_ok=True)
        raise RecalibrationError(f"{dst}: the written model's weights differ from {src}'s (sha256); removed")
    logger.info(
        "%s: threshold %.5f (was %.5f) at target FPR %g from %d site normals (%s); FPR expected %.3f, at most "
        "%.3f with %g %% confidence; weights sha256 %s unchanged",
        dst,
        record["value"],
        float(old["value"]),
        target,
        record["n_normals"],
        method,
        record["fpr_expected"],
        record["fpr_bound"],
        100 * record["fpr_bound_confidence"],
        before[:12],
    )
    if (msg := uncertainty_warning(record)) is not None:
        logger.warning(
            msg.replace("(--val_fraction, more normal images, or --calibration_folds K)", "(more site normals)")
        )
    return record


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m monai_skipts.calibrate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="the trained model.pt")
    p.add_argument("--normals", required=True, help="the site's normal images: a folder, or a CSV/JSON datalist")
    p.add_argument("--out", required=True, help="the site model to write (e.g. site_model.pt)")
    p.add_argument("--target_fpr", type=float, default=None, help="default: the checkpoint's")
    p.add_argument("--method", choices=CALIBRATION_METHODS, default=None, help="default: the checkpoint's")
    p.add_argument("--pixel_fpr", type=float, default=None, help="the outline threshold's pixel FPR (default 0.005)")
    p.add_argument("--teacher_weights", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", default="torch", help="torch | onnxruntime | openvino (score as served)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--volume_axis", type=int, default=2)
    p.add_argument("--volume_aggregation", default="max", choices=("max", "mean", "topk"))
    p.add_argument("--register", default=None, metavar="NAME", help="register the site model as a version of NAME")
    p.add_argument("--alias", default="site", help="the registered version's alias (e.g. site-<name>)")
    p.add_argument("--tracking_uri", default=None, help="MLflow store, e.g. sqlite:///runs/x/mlruns.db")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        record = recalibrate(
            a.checkpoint,
            a.normals,
            a.out,
            a.target_fpr,
            a.method,
            a.pixel_fpr,
            a.teacher_weights,
            a.device,
            a.backend,
            a.batch_size,
            a.volume_axis,
            a.volume_aggregation,
        )
    except (RecalibrationError, InputDataError) as e:
        print(f"monai_skipts.calibrate: refused: {e}", file=sys.stderr)
        return 2
    if a.register:
        from monai_skipts.registry import log_and_register

        info = log_and_register(
            a.out,
            name=a.register,
            alias=a.alias,
            tracking_uri=a.tracking_uri,
            volume_aggregation=a.volume_aggregation,
            metrics={"calibration": record},
            teacher_weights=a.teacher_weights,
            run_name=f"calibrate-{a.alias}",
            tags={"calibration": "site", "site_normals": str(a.normals)},
            backend=a.backend,
        )
        logger.info("registered %s (version %s)", info["model_uri"], info["version"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
