"""Checkpoints: a trained :class:`~monai_skipts.networks.AnomalyDetector`'s state, written atomically,
loaded safely, rebuilt identically.

Version 2 (written here)::

    {"kind": "monai-skipts/checkpoint", "version": 2,
     "config": AnomalyDetector.config,        # architecture, sigma, preprocessing, calibration, anatomy mask
     "state_dict": AnomalyDetector.state_dict() without the teacher's weights,
     "epoch", "iteration", "optimizer", "rng", # training state (optional)
     "extra": {...}}                           # run information (dataset, run_name, ...)

The teacher's weights are not copied (they are public and large): :func:`load_detector` rebuilds the
teacher from the registry and refuses a teacher other than the one the student was trained against
(name and weights SHA-256). Version-1 files (student weights, ``threshold`` record, ``extra``
preprocessing entries, ``map_level_stats``) are upgraded on load by :func:`upgrade_checkpoint`.

Loading always uses ``torch.load(weights_only=True)``: a file holding pickled objects that could
execute code is refused with :class:`UnsafeCheckpointError`.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_skipts.networks import RD4AD, TEACHERS, AnomalyDetector, SkipTS
from monai_skipts.transforms.presets import SPEC_KEYS, spatial_size_2d
from monai_skipts.utils import atomic_save, file_sha256

__all__ = [
    "CHECKPOINT_KIND",
    "CHECKPOINT_VERSION",
    "CheckpointError",
    "UnsafeCheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "upgrade_checkpoint",
    "load_detector",
    "detector_from_config",
    "restore_detector",
    "model_from_config",
    "check_teacher",
    "rng_state",
    "set_rng_state",
]

logger = logging.getLogger(__name__)

CHECKPOINT_KIND = "monai-skipts/checkpoint"
CHECKPOINT_VERSION = 2
#: the prefix of the teacher's entries in the detector's state dict (not stored in checkpoints)
TEACHER_PREFIX = "model.teacher."


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: wrong kind, or made with another teacher."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that would need arbitrary unpickling (possible code execution) to load."""


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states in a form ``weights_only`` loading accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(
    path: str | os.PathLike,
    detector: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    epoch: int = 0,
    iteration: int = 0,
    extra: dict[str, Any] | None = None,
    with_rng: bool = True,
) -> Path:
    """Write a detector's checkpoint (version 2) atomically (temp file + rename; the previous file
    survives any failure).

    Args:
        detector: an :class:`~monai_skipts.networks.AnomalyDetector` (its config and state dict, less the
            teacher's weights, are the checkpoint).
        optimizer, epoch, iteration, with_rng: training state, for resuming.
        extra: run information (plain data: tensors, numbers, strings, lists, dicts).
    """
    state = {
        k: v.detach().to("cpu").clone() for k, v in detector.state_dict().items() if not k.startswith(TEACHER_PREFIX)
    }
    payload: dict[str, Any] = {
        "kind": CHECKPOINT_KIND,
        "version": CHECKPOINT_VERSION,
        "config": copy.deepcopy(detector.config),
        "state_dict": state,
        "epoch": int(epoch),
        "iteration": int(iteration),
        "extra": extra or {},
    }
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
    if with_rng:
        payload["rng"] = rng_state()
    return atomic_save(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; clear errors for missing, unsafe or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise UnsafeCheckpointError(
            f"{path}: refused: the file holds pickled Python objects{what} that could execute code when loaded "
            "(only tensors and plain data are accepted; it was not loaded)"
        ) from None
    except Exception as e:  # noqa: BLE001 - truncated/corrupt files
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != CHECKPOINT_KIND:
        raise CheckpointError(f"{path}: not a monai-skipts checkpoint (no kind '{CHECKPOINT_KIND}')")
    return upgrade_checkpoint(ckpt, str(path))


def _scalar(value: Any) -> torch.Tensor:
    return torch.tensor(math.nan if value is None else float(value), dtype=torch.float64)


def upgrade_checkpoint(ckpt: dict[str, Any], source: str = "checkpoint") -> dict[str, Any]:
    """A checkpoint dict in the current layout (version 2); version 1 is converted, version 2 returned
    as it is.

    Version 1 kept the student's state dict (``"student"``), the architecture (``"model_config"``),
    the calibration record (``"threshold"``), the preprocessing and sigma as entries of ``"extra"``,
    and the per-level statistics as ``"map_level_stats"``; they become the detector's config and
    state (``level_stats`` ``(0, 2)`` when absent; ``threshold``/``scale`` NaN when not calibrated).

    Raises:
        CheckpointError: an unknown version.
    """
    version = ckpt.get("version", 1)
    if version == CHECKPOINT_VERSION:
        return ckpt
    if version != 1:
        raise CheckpointError(
            f"{source}: checkpoint version {version} is not known to this monai-skipts (it reads 1 and "
            f"{CHECKPOINT_VERSION}); upgrade the package"
        )
    extra = dict(ckpt.get("extra") or {})
    nested = extra.get("preprocessing") if isinstance(extra.get("preprocessing"), dict) else {}
    prep = {k: nested.get(k, extra.get(k)) for k in SPEC_KEYS}
    if prep["spatial_size"] is not None:
        prep["spatial_size"] = list(spatial_size_2d(prep["spatial_size"]))
    if isinstance(prep["window"], tuple):
        prep["window"] = list(prep["window"])
    thr = ckpt.get("threshold")
    rec = dict(thr) if thr else {}
    stats = ckpt.get("map_level_stats")
    state = {f"model.student.{k}": v for k, v in ckpt["student"].items()}
    state["level_stats"] = (
        torch.zeros(0, 2, dtype=torch.float32) if stats is None else torch.as_tensor(stats, dtype=torch.float32)
    )
    state["threshold"] = _scalar(rec.get("value"))
    state["scale"] = _scalar(rec.get("scale"))
    state["volume_threshold"] = _scalar(None)
    state["pixel_threshold"] = _scalar(None)
    out = {
        "kind": CHECKPOINT_KIND,
        "version": CHECKPOINT_VERSION,
        "config": {
            "model": dict(ckpt["model_config"]),
            "sigma": float(extra.get("sigma", 4.0)),
            "similarity": "cosine",
            "preprocessing": prep,
            "calibration": rec or None,
            "anatomy_mask": None,
        },
        "state_dict": state,
        "epoch": int(ckpt.get("epoch", 0)),
        "iteration": int(ckpt.get("iteration", 0)),
        "extra": {k: v for k, v in extra.items() if k not in (*SPEC_KEYS, "sigma", "preprocessing")},
    }
    for key in ("optimizer", "rng"):
        if key in ckpt:
            out[key] = ckpt[key]
    return out


def check_teacher(
    cfg: dict[str, Any], model: torch.nn.Module, source: str = "checkpoint", weights: bool = True
) -> None:
    """Refuse a student trained against another teacher (name or weights).

    Args:
        cfg: the architecture the student was trained with (a checkpoint's ``config["model"]``).
        model: the teacher-student model (or a detector holding it as ``model``).
        weights: check the teacher's weights file too (``False``: the name only, for a state that
            brings the teacher's weights itself).
    """
    model = getattr(model, "model", model)
    teacher = getattr(model, "module", model).teacher
    if cfg["teacher"] != teacher.name:
        raise CheckpointError(
            f"{source}: trained with teacher '{cfg['teacher']}', but the model's teacher is '{teacher.name}'"
        )
    want, have = cfg.get("teacher_weights_sha256"), teacher.weights_sha256
    if weights and want != have:
        raise CheckpointError(
            f"{source}: trained with teacher '{cfg['teacher']}' weights sha256 {str(want)[:12]}…, but the "
            f"teacher loaded here has weights sha256 {str(have)[:12]}… (another weights file)"
        )


def _identify_teacher_weights(sha256: str) -> str | None:
    """The registered teacher whose locally available weights file has ``sha256`` (no downloads)."""
    for name, spec in TEACHERS.items():
        try:
            path = spec.weights_file(None, False)
        except Exception:  # noqa: BLE001 - not on this machine
            continue
        if Path(path).is_file() and file_sha256(Path(path)) == sha256:
            return name
    return None


def _check_teacher_weights_file(cfg: dict[str, Any], path: Path, source: str) -> None:
    """Refuse a teacher weights file other than the one the student was trained against, naming both."""
    want, have = cfg["teacher_weights_sha256"], file_sha256(path)
    if want == have:
        return
    other = _identify_teacher_weights(have)
    what = f"the weights of teacher '{other}'" if other else "other weights"
    raise CheckpointError(
        f"{source}: trained with teacher '{cfg['teacher']}' (weights sha256 {want[:12]}…), but the teacher "
        f"weights file {path} holds {what} (sha256 {have[:12]}…); pass the '{cfg['teacher']}' weights the "
        "student was trained against"
    )


#: ``config["model"]["model"]`` -> the class rebuilt (a config without the key is a Skip-TS one)
MODEL_KINDS = ("skipts", "rd4ad")


def model_from_config(
    cfg: dict[str, Any],
    teacher_weights: str | os.PathLike | None = None,
    download: bool = True,
    source: str = "checkpoint",
) -> torch.nn.Module:
    """An untrained model of the architecture ``cfg`` (a model's ``config``, a checkpoint's
    ``config["model"]``) describes: :class:`~monai_skipts.networks.SkipTS`, or
    :class:`~monai_skipts.networks.RD4AD` for ``cfg["model"] == "rd4ad"``; its teacher is built with
    ImageNet weights (``teacher_weights``: the file) as in training."""
    kind = cfg.get("model", "skipts")
    if kind == "rd4ad":
        return RD4AD(
            teacher=cfg["teacher"],
            pretrained=cfg["teacher_pretrained"],
            teacher_weights=teacher_weights,
            upsample_kernel=cfg["upsample_kernel"],
            student_kind=cfg["student_kind"],
            student_blocks=cfg["student_blocks"],
            download=download,
        )
    if kind != "skipts":
        raise CheckpointError(f"{source}: unknown model kind '{kind}' (known: {', '.join(MODEL_KINDS)})")
    return SkipTS(
        teacher=cfg["teacher"],
        pretrained=cfg["teacher_pretrained"],
        teacher_weights=teacher_weights,
        student=cfg["student"],
        skip=cfg["skip"],
        upsample_kernel=cfg["upsample_kernel"],
        student_kind=cfg["student_kind"],
        student_blocks=cfg["student_blocks"],
        student_widths=cfg.get("student_widths"),
        student_up_widths=cfg.get("student_up_widths"),
        download=download,
        # options added later: a checkpoint without them was trained with the paper's skips and the
        # teacher's default taps
        skip_levels=cfg.get("skip_levels", (3, 2)),
        skip_dropout=cfg.get("skip_dropout", 0.0),
        skip_noise=cfg.get("skip_noise", 0.0),
        teacher_taps=cfg.get("teacher_taps"),
        bottleneck=cfg.get("bottleneck", False),
    )


def load_detector(
    path_or_ckpt: str | os.PathLike | dict[str, Any],
    teacher_weights: str | os.PathLike | None = None,
    map_location: str | torch.device = "cpu",
    download: bool = True,
):
    """The trained :class:`~monai_skipts.networks.AnomalyDetector` of a checkpoint (a file, or a loaded
    dict of either version), in eval mode on ``map_location``: the one loader of every serving path.

    The teacher is rebuilt by name (``teacher_weights`` may point at the file) and must have the
    weights the student was trained against. A checkpoint whose state holds the teacher's weights too
    (an exported bundle's ``models/model.pt``, :func:`~monai_skipts.bundle.export.export_bundle`) is
    rebuilt from its state alone: nothing is downloaded, ``teacher_weights`` is not used.

    Raises:
        FileNotFoundError, UnsafeCheckpointError, CheckpointError: see :func:`load_checkpoint`; a
            teacher other than the trained one; a state that does not fit the architecture.
    """
    source = "checkpoint" if isinstance(path_or_ckpt, dict) else str(path_or_ckpt)
    if isinstance(path_or_ckpt, dict):
        ckpt = upgrade_checkpoint(path_or_ckpt, source)
    else:
        ckpt = load_checkpoint(path_or_ckpt, map_location)
    config = ckpt["config"]
    cfg = config["model"]
    if _holds_teacher(ckpt):  # an exported bundle's model.pt: the teacher's weights are in the state
        detector = detector_from_config(config, pretrained=False, download=False, source=source)
        restore_detector(detector, ckpt, source)
        return detector.to(map_location).eval()
    if teacher_weights is not None and Path(teacher_weights).is_file() and cfg.get("teacher_weights_sha256"):
        _check_teacher_weights_file(cfg, Path(teacher_weights), source)
    detector = detector_from_config(config, teacher_weights=teacher_weights, download=download, source=source)
    restore_detector(detector, ckpt, source)
    return detector.to(map_location).eval()


def _holds_teacher(ckpt: dict[str, Any]) -> bool:
    """Whether a (version-2) checkpoint's state holds the teacher's weights (an exported bundle's)."""
    return any(k.startswith(TEACHER_PREFIX) for k in (ckpt.get("state_dict") or {}))


def detector_from_config(
    config: dict[str, Any],
    pretrained: bool | None = None,
    teacher_weights: str | os.PathLike | None = None,
    download: bool = True,
    source: str = "checkpoint",
) -> AnomalyDetector:
    """An :class:`~monai_skipts.networks.AnomalyDetector` of a detector config (architecture, sigma,
    preprocessing, calibration, anatomy mask, segmentation head), its student (and head) untrained and its state unset.

    Args:
        config: a detector's ``config`` (a checkpoint's ``"config"``).
        pretrained: build the teacher with its ImageNet weights (``None``: as trained; ``False``: random,
            for a state dict that holds the teacher's weights, as an exported bundle's ``model.pt``).
        teacher_weights, download: where the teacher's weights are, and whether to download them.
    """
    cfg = dict(config["model"])
    if pretrained is not None:
        cfg["teacher_pretrained"] = bool(pretrained)
    detector = AnomalyDetector(
        model_from_config(cfg, teacher_weights, download, source),
        sigma=config.get("sigma", 4.0),
        preprocessing=config.get("preprocessing"),
        anatomy_mask=config.get("anatomy_mask"),
        similarity=config.get("similarity", "cosine"),
        seg_head=config.get("seg_head"),
    )
    detector.config["model"] = dict(config["model"])
    detector.config["calibration"] = copy.deepcopy(config.get("calibration"))
    return detector


def restore_detector(detector: torch.nn.Module, ckpt: dict[str, Any], source: str = "checkpoint"):
    """Set a built detector to a checkpoint's config and state (any version); the teacher must be the
    trained one. Returns ``load_state_dict``'s result (the teacher's entries are the missing keys).

    Raises:
        CheckpointError: another teacher, or a state that does not fit the architecture.
    """
    ckpt = upgrade_checkpoint(ckpt, source)
    config = ckpt["config"]
    if _holds_teacher(ckpt):  # the stored teacher replaces the built one: its name must still match
        check_teacher(config["model"], detector, source, weights=False)
    else:
        check_teacher(config["model"], detector, source)
    if float(config.get("sigma", 4.0)) != detector.sigma:
        detector.set_sigma(config.get("sigma", 4.0))
    detector.config.update({k: copy.deepcopy(config.get(k)) for k in ("preprocessing", "calibration")})
    detector.set_anatomy_mask(config.get("anatomy_mask"))
    if config.get("seg_head") != detector.config.get("seg_head"):  # the stored head (or none) replaces the built one
        detector.set_seg_head(copy.deepcopy(config.get("seg_head")))
    result = torch.nn.Module.load_state_dict(detector, ckpt["state_dict"], strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(TEACHER_PREFIX)]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{source}: the stored state does not fit the architecture in its config (missing "
            f"{missing[:5]}, unexpected {result.unexpected_keys[:5]})"
        )
    return result
