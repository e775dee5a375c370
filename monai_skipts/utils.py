"""Small shared utilities: the input-error type, atomic file writes and the output-folder lock.

Everything the package writes (checkpoints, metrics, splits, maps, CSVs) goes through the
``atomic_*`` helpers: the data is written to a temporary file in the destination folder, flushed
and fsynced, then renamed over the destination (and the folder fsynced). A failure (full disk,
killed process) leaves the previous file intact; the temporary file is removed on any error the
process sees (a process killed mid-write can leave a ``.<name>.*.tmp`` beside it, which
:class:`~monai_skipts.handlers.SkipTSCheckpointHandler` removes when the run is resumed).
A write that stops part-way (a full disk: torch reports it as ``RuntimeError: [enforce fail at
inline_container.cc:672] unexpected pos``) is an ``OSError`` naming the destination and saying the disk
may be full.

:func:`lock_output_dir` gives one training at a time an output folder (an OS lock on
``<output_dir>/.lock``, which holds the owner's PID and dies with its process).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator

__all__ = [
    "check_flags",
    "is_rank0",
    "file_sha256",
    "InputDataError",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_save",
    "remove_stale_temp_files",
    "OutputDirLockedError",
    "lock_output_dir",
    "unlock_output_dir",
    "resolve_device",
    "save_map_png",
]

logger = logging.getLogger(__name__)


def resolve_device(device: Any = None):
    """``None``/``"auto"``: CUDA (this process's local rank under torchrun) when present, else CPU;
    anything else as ``torch.device(device)``."""
    import torch

    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(device)


def save_map_png(path: str | os.PathLike, amap: Any, vmax: float) -> None:
    """An anomaly map as a 16-bit PNG, written atomically: pixel = round(65535 · map / vmax), clipped
    (``vmax`` in map units)."""
    import numpy as np
    from PIL import Image

    arr = (np.clip(np.asarray(amap) / max(vmax, 1e-8), 0, 1) * 65535).round().astype(np.uint16)
    atomic_save(path, lambda f: Image.fromarray(arr).save(f, format="PNG"))


class InputDataError(ValueError):
    """Bad input data. The message always names the offending file and the problem.

    Args:
        path: the file (or folder) at fault.
        problem: what is wrong with it, in words a user can act on.
    """

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path is not None else problem)

    def __reduce__(self):  # keep picklable (DataLoader workers re-raise in the main process)
        return (type(self), (self.path, self.problem))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success fsync and rename it to ``path``.

    On any exception the temporary file is removed, the previous ``path`` (if any) is left as it
    was, and the error is re-raised as ``OSError`` naming the destination when it was an ``OSError``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would give
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, InputDataError):
            raise OSError(e.errno, f"could not write {path}: {e.strerror or e}") from e
        raise


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (power loss); best effort where folders cannot be fsynced."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any, **dump_kwargs: Any) -> Path:
    """Serialise ``obj`` as JSON (indent 2, sorted keys unless told otherwise) atomically."""
    dump_kwargs.setdefault("indent", 2)
    dump_kwargs.setdefault("sort_keys", True)
    return atomic_write_text(path, json.dumps(obj, **dump_kwargs) + "\n")


#: what torch's zip writer says when the file it writes came out shorter than what it wrote (a full
#: disk or a file size limit: the kernel wrote part of the data and Python reported no error)
_SHORT_WRITE = re.compile(r"inline_container|unexpected pos|PytorchStreamWriter failed", re.IGNORECASE)


def _free_space(folder: Path) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
        free /= 1024
    return "unknown"  # pragma: no cover


def atomic_save(path: str | os.PathLike, writer: Callable[[IO], Any]) -> Path:
    """Call ``writer(f)`` on a binary temp file (e.g. ``lambda f: torch.save(obj, f)``) then rename.

    Raises:
        OSError: the data could not be written in full; the message names ``path`` (nothing is left
            half-written: the temp file is removed and a previous ``path`` is kept). torch's
            ``RuntimeError: [enforce fail at inline_container.cc:...] unexpected pos`` (what a full disk
            gives ``torch.save``) becomes ``OSError(ENOSPC, "could not write <path>: ... the disk may
            be full ...")`` with the original error as its cause.
    """
    path = Path(path)
    try:
        with atomic_open(path, "wb") as f:
            writer(f)
    except RuntimeError as e:
        if not _SHORT_WRITE.search(str(e)):
            raise
        raise OSError(
            errno.ENOSPC,
            f"could not write {path}: the data was written only in part, the disk may be full "
            f"({_free_space(path.parent)} free in {path.parent}) or a file size limit reached; "
            f"the previous {path.name}, if any, is unchanged (torch: {str(e).strip()})",
        ) from e
    return path


_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # what atomic_open's mkstemp names look like


def remove_stale_temp_files(folder: str | os.PathLike, exclude: tuple[str, ...] = ("mlruns",)) -> list[Path]:
    """Remove the temporary files of :func:`atomic_open` that a killed process left under ``folder``
    (sub-folders included, except those named in ``exclude``). Call it only where no other process
    is writing. Returns the removed paths."""
    removed = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d not in exclude]
        for name in files:
            if _TEMP_NAME.match(name):
                path = Path(root) / name
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed.append(path)
    return removed


def check_flags(**flags: Any) -> None:
    """Refuse a bundle switch that is not a real boolean.

    ``python -m monai.bundle run ... --mlflow false`` passes the *string* ``'false'`` (the command
    line is read as Python literals: ``False`` is a boolean, ``false`` is not), and a non-empty string
    is true: MLflow would run although the user switched it off. Bundles call this first.
    """
    bad = {k: v for k, v in flags.items() if not isinstance(v, bool)}
    if bad:
        k, v = next(iter(bad.items()))
        hint = f" (write {str(v).strip().capitalize()})" if str(v).strip().lower() in ("true", "false") else ""
        raise ValueError(
            f"--{k} must be True or False, got {v!r}{hint}; "
            f"bad switches: {', '.join(f'{n}={w!r}' for n, w in bad.items())}"
        )


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of the file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# one training per output folder


class OutputDirLockedError(RuntimeError):
    """Another process holds the output folder (see :func:`lock_output_dir`)."""


#: folders this process holds: resolved folder -> open file descriptor of its ``.lock``
_HELD_LOCKS: dict[str, int] = {}


def is_rank0() -> bool:
    """Whether this process is rank 0 of ``torch.distributed`` (or the only process)."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def lock_output_dir(output_dir: str | os.PathLike, name: str = ".lock") -> Path:
    """Take the output folder for this process, or stop at once if another process has it.

    An exclusive ``fcntl.flock`` on ``<output_dir>/<name>``, which holds this process's PID. The
    lock belongs to the process: the OS releases it when the process ends however it ends (crash,
    ``kill -9``), so a lock file left by a dead process never blocks (its stale PID is overwritten).
    Calling it again in the same process for the same folder is a no-op. Under ``torch.distributed``
    only rank 0 takes it. Where ``fcntl`` does not exist (Windows) nothing is locked.

    Bundles call it in ``initialize`` before anything is written into the folder (split, checkpoint,
    MLflow store); :class:`~monai_skipts.handlers.SkipTSCheckpointHandler` calls it too.

    Returns:
        the lock file's path.

    Raises:
        OutputDirLockedError: naming the folder and the PID of the process that holds it.
    """
    folder = Path(output_dir)
    path = folder / name
    if not is_rank0():
        return path
    key = str(folder.resolve())
    if key in _HELD_LOCKS:
        return path
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        logger.warning("no fcntl on this system: %s is not locked against a second training", folder)
        return path
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            os.close(fd)
            raise OSError(e.errno, f"could not lock {path}: {e.strerror or e}") from e
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise OutputDirLockedError(
            f"{folder} is in use by another training (PID {holder}, lock file {path}); wait for it to "
            "finish or stop it, or give this run another --output_dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD_LOCKS[key] = fd
    return path


def unlock_output_dir(output_dir: str | os.PathLike) -> None:
    """Release what :func:`lock_output_dir` took (the process's exit releases it as well)."""
    fd = _HELD_LOCKS.pop(str(Path(output_dir).resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the flock
