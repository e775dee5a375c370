"""A run's folder and processes: seeding, creating and locking ``output_dir``
(:func:`prepare_output_dir`, :func:`release_output_dir`), the ``torchrun`` process group
(:func:`init_distributed`, :func:`end_distributed`) and the rank switch (:func:`is_secondary_rank`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["end_distributed", "init_distributed", "is_secondary_rank", "prepare_output_dir", "release_output_dir"]


def is_secondary_rank() -> bool:
    """True in a ``torch.distributed`` process other than rank 0 (which alone logs to MLflow and
    registers the model); False without a process group."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_rank() > 0


def prepare_output_dir(output_dir: str | os.PathLike, seed: int | None = None, lock: bool = True) -> Path:
    """Start a run: seed every generator (``monai.utils.set_determinism``), create ``output_dir`` and
    take its lock (:func:`~monai_skipts.utils.lock_output_dir`: a second training into the same folder
    stops at once; the bundle's ``finalize`` releases it). Under ``torchrun`` only rank 0 takes the lock
    (the ranks share the folder), also before the process group is joined: the multi-GPU bundle
    extends ``initialize`` and joins the group after this step.

    Args:
        output_dir: the run folder.
        seed: the run's seed; ``None``: leave the generators alone.
        lock: False to skip the lock (evaluation, which writes into a sub-folder of a training's folder).

    Returns:
        ``output_dir`` as a :class:`~pathlib.Path`.

    Example:
        >>> import tempfile
        >>> out = prepare_output_dir(tempfile.mkdtemp() + "/run", seed=0)
        >>> out.is_dir(), (out / ".lock").is_file()
        (True, True)
        >>> release_output_dir(out)
    """
    from monai.utils import set_determinism

    from monai_skipts.utils import lock_output_dir

    if seed is not None:
        set_determinism(seed=int(seed))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if lock and int(os.environ.get("RANK", "0")) == 0:  # torchrun sets RANK in each process it starts
        lock_output_dir(out)
    return out


def release_output_dir(output_dir: str | os.PathLike) -> None:
    """End a run: release the lock :func:`prepare_output_dir` took (the process's exit releases it too).

    Args:
        output_dir: the run folder.
    """
    from monai_skipts.utils import unlock_output_dir

    unlock_output_dir(output_dir)


def init_distributed(device: str | torch.device | None = None) -> bool:
    """Join the ``torchrun`` process group (NCCL with CUDA, Gloo on CPUs) unless already joined, and
    make ``device`` this process's CUDA device. Returns True when this call created the group."""
    dist = torch.distributed
    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        created = True
    if torch.cuda.is_available() and device is not None and torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))
    return created


def end_distributed() -> None:
    """Leave the process group :func:`init_distributed` joined (no-op without one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
