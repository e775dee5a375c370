"""Small shared utilities: the input-error type and atomic file writes.

Everything the package writes (checkpoints, metrics, splits, maps, CSVs) goes through the
``atomic_*`` helpers: the data is written to a temporary file in the destination folder, flushed
and fsynced, then renamed over the destination (and the folder fsynced). A failure (full disk,
killed process) leaves the previous file intact; the temporary file is removed on any error the
process sees (a process killed mid-write can leave a ``.<name>.*.tmp`` beside it, which
:class:`~monai_skipts.handlers.SkipTSCheckpointHandler` removes when the run is resumed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator

__all__ = [
    "check_flags",
    "file_sha256",
    "InputDataError",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_save",
    "remove_stale_temp_files",
]


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


def atomic_save(path: str | os.PathLike, writer: Callable[[IO], Any]) -> Path:
    """Call ``writer(f)`` on a binary temp file (e.g. ``lambda f: torch.save(obj, f)``) then rename."""
    with atomic_open(path, "wb") as f:
        writer(f)
    return Path(path)


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
