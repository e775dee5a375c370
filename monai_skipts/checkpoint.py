"""Checkpoints: written atomically, loaded safely, rebuilt identically.

A checkpoint holds the student's weights, the model configuration (teacher name and the SHA-256 of
its weights file, student options), the calibrated decision threshold, and, for resuming, the
optimizer state, epoch/iteration and RNG states. The teacher's weights are not copied into it (they
are public and large); :func:`load_model` rebuilds the teacher from the registry and refuses a
teacher other than the one the student was trained against.

Loading always uses ``torch.load(weights_only=True)``: a file holding pickled objects that could
execute code is refused with :class:`UnsafeCheckpointError`.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .utils import atomic_save, file_sha256

__all__ = [
    "CHECKPOINT_KIND",
    "CheckpointError",
    "UnsafeCheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "load_model",
    "model_from_config",
    "check_teacher",
    "rng_state",
    "set_rng_state",
]

logger = logging.getLogger(__name__)

CHECKPOINT_KIND = "monai-skipts/checkpoint"
CHECKPOINT_VERSION = 1


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
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    epoch: int = 0,
    iteration: int = 0,
    threshold: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    with_rng: bool = True,
) -> Path:
    """Write a checkpoint atomically (temp file + rename; the previous file survives any failure).

    Args:
        model: a :class:`~monai_skipts.networks.SkipTS` (or DDP-wrapped one).
        threshold: calibration record, e.g. ``{"value": 1.7, "target_fpr": 0.05, "n_normals": 6}``.
        extra: more plain data (tensors, numbers, strings, lists, dicts) to keep.

    The model's per-level map statistics (buffer ``map_level_stats``, ``(L, 2)``, see
    :func:`~monai_skipts.inferers.set_level_stats`), when it has them, are kept under
    ``"map_level_stats"`` (float32, CPU); :func:`load_model` restores them.
    """
    net = getattr(model, "module", model)
    payload: dict[str, Any] = {
        "kind": CHECKPOINT_KIND,
        "version": CHECKPOINT_VERSION,
        "model_config": dict(net.config),
        "student": net.student.state_dict(),
        "epoch": int(epoch),
        "iteration": int(iteration),
        "threshold": threshold,
        "extra": extra or {},
    }
    stats = getattr(net, "map_level_stats", None)
    if stats is not None:
        payload["map_level_stats"] = stats.detach().to("cpu", torch.float32).clone()
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
    return ckpt


def check_teacher(ckpt: dict[str, Any], model: torch.nn.Module, source: str = "checkpoint") -> None:
    """Refuse a student trained against another teacher (name or weights)."""
    cfg = ckpt["model_config"]
    teacher = getattr(model, "module", model).teacher
    if cfg["teacher"] != teacher.name:
        raise CheckpointError(
            f"{source}: trained with teacher '{cfg['teacher']}', but the model's teacher is '{teacher.name}'"
        )
    want, have = cfg.get("teacher_weights_sha256"), teacher.weights_sha256
    if want != have:
        raise CheckpointError(
            f"{source}: trained with teacher '{cfg['teacher']}' weights sha256 {str(want)[:12]}…, but the "
            f"teacher loaded here has weights sha256 {str(have)[:12]}… (another weights file)"
        )


def _identify_teacher_weights(sha256: str) -> str | None:
    """The registered teacher whose locally available weights file has ``sha256`` (no downloads)."""
    from .networks.teacher import TEACHERS

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


#: ``model_config["model"]`` -> the class rebuilt (a config without the key is a Skip-TS one)
MODEL_KINDS = ("skipts", "rd4ad")


def model_from_config(
    cfg: dict[str, Any],
    teacher_weights: str | os.PathLike | None = None,
    download: bool = True,
    source: str = "checkpoint",
) -> torch.nn.Module:
    """An untrained model of the architecture ``cfg`` (a model's ``config``, a checkpoint's
    ``model_config``) describes: :class:`~monai_skipts.networks.SkipTS`, or
    :class:`~monai_skipts.networks.RD4AD` for ``cfg["model"] == "rd4ad"``; its teacher is built with
    ImageNet weights (``teacher_weights``: the file) as in training."""
    kind = cfg.get("model", "skipts")
    if kind == "rd4ad":
        from .networks import RD4AD

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
    from .networks import SkipTS

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


def load_model(
    path_or_ckpt: str | os.PathLike | dict[str, Any],
    teacher_weights: str | os.PathLike | None = None,
    map_location: str | torch.device = "cpu",
    download: bool = True,
):
    """Rebuild the trained model (:class:`~monai_skipts.networks.SkipTS`, or
    :class:`~monai_skipts.networks.RD4AD`: :func:`model_from_config`) from a checkpoint, in eval mode.

    The teacher is rebuilt by name (``teacher_weights`` may point at the file) and must have the
    weights the student was trained against. The checkpoint's per-level map statistics
    (``"map_level_stats"``), when present, are restored as the model's ``map_level_stats`` buffer, so
    :class:`~monai_skipts.inferers.SkipTSPredictor` / ``SkipTSInferer`` give the trained model's maps.
    Returns ``(model, checkpoint_dict)``.
    """
    ckpt = path_or_ckpt if isinstance(path_or_ckpt, dict) else load_checkpoint(path_or_ckpt, map_location)
    source = "checkpoint" if isinstance(path_or_ckpt, dict) else str(path_or_ckpt)
    cfg = ckpt["model_config"]
    if teacher_weights is not None and Path(teacher_weights).is_file() and cfg.get("teacher_weights_sha256"):
        _check_teacher_weights_file(cfg, Path(teacher_weights), source)
    model = model_from_config(cfg, teacher_weights, download, source)
    check_teacher(ckpt, model, source)
    model.student.load_state_dict(ckpt["student"])
    if ckpt.get("map_level_stats") is not None:  # per-level map standardisation (absent: none)
        from .inferers import set_level_stats

        set_level_stats(model, ckpt["map_level_stats"])
    return model.to(map_location).eval(), ckpt
