"""Progress bars for long runs (inference over a folder, the DICOM app's series, the archive benchmark).

:func:`progress_bar` wraps an iterable in a :mod:`tqdm` bar on stderr when a person watches it (stderr is
a terminal), and returns the iterable itself otherwise (logs, CI, a pipe), as MONAI's and ignite's bars
do. ``enabled`` (the command lines' ``--progress on|off|auto``) or ``$MONAI_SKIPTS_PROGRESS``
(``1``/``on``, ``0``/``off``) force it either way.

:class:`ScoringInterrupted` is what a scoring loop raises on Ctrl-C (SIGINT) instead of a bare
``KeyboardInterrupt``: it carries what was done, so that the caller writes it and marks the run
incomplete in ``status.json`` (:func:`write_run_status`; :meth:`monai_skipts.inference.AnomalyPredictor.run`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "PROGRESS_CHOICES",
    "PROGRESS_ENV",
    "RUN_STATUSES",
    "RUN_STATUS_FILE",
    "ScoringInterrupted",
    "progress_bar",
    "progress_enabled",
    "write_run_status",
]

#: environment variable forcing the bars on (``1``, ``on``, ``true``) or off (``0``, ``off``, ``false``)
PROGRESS_ENV = "MONAI_SKIPTS_PROGRESS"
#: the command lines' ``--progress`` values
PROGRESS_CHOICES = ("auto", "on", "off")

#: the file a scoring run writes its state to, and the states (:func:`write_run_status`)
RUN_STATUS_FILE = "status.json"
RUN_STATUSES = ("running", "complete", "incomplete", "interrupted")

T = TypeVar("T")

_ON = {"1", "on", "true", "yes"}
_OFF = {"0", "off", "false", "no"}


def progress_enabled(enabled: bool | str | None = None, stream: Any = None) -> bool:
    """Whether to show a bar: ``enabled`` when it is a bool or ``"on"``/``"off"``; else (``None``,
    ``"auto"``) ``$MONAI_SKIPTS_PROGRESS`` when set; else whether ``stream`` (default stderr) is a terminal.

    Raises:
        ValueError: ``enabled`` or the environment variable is none of the accepted values.

    Example:
        >>> progress_enabled("off"), progress_enabled(True)
        (False, True)
    """
    if isinstance(enabled, bool):
        return enabled
    for value, source in ((enabled, "progress"), (os.environ.get(PROGRESS_ENV), f"${PROGRESS_ENV}")):
        if value is None or str(value).strip().lower() in ("", "auto"):
            continue
        v = str(value).strip().lower()
        if v in _ON:
            return True
        if v in _OFF:
            return False
        raise ValueError(f"{source} must be one of on, off, auto (or 1/0), got {value!r}")
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a file
        return False


def progress_bar(
    iterable: Iterable[T],
    total: int | None = None,
    desc: str | None = None,
    unit: str = "file",
    enabled: bool | str | None = None,
) -> Iterable[T]:
    """``iterable`` with a tqdm bar on stderr when :func:`progress_enabled` says so; otherwise
    ``iterable`` unchanged (nothing is printed).

    Args:
        iterable: what to iterate.
        total: its length when it has none (``len(iterable)`` is used when it has).
        desc: the bar's label.
        unit: what one step is.
        enabled: see :func:`progress_enabled`.

    Example:
        >>> list(progress_bar(range(3), enabled=False))
        [0, 1, 2]
    """
    if not progress_enabled(enabled):
        return iterable
    from tqdm.auto import tqdm

    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, mininterval=0.5)


class ScoringInterrupted(KeyboardInterrupt):
    """Ctrl-C during scoring, with what was scored until then.

    Attributes:
        done: the results so far (whatever the loop produces).
        errors: the failures so far.
        n_done, n_total: inputs finished and inputs given (``n_total`` may be ``None``).
    """

    def __init__(self, done: Any = None, errors: Any = None, n_done: int = 0, n_total: int | None = None):
        super().__init__(f"interrupted after {n_done}{'' if n_total is None else f' of {n_total}'} inputs")
        self.done, self.errors, self.n_done, self.n_total = done, errors, n_done, n_total


def write_run_status(folder: str | os.PathLike, status: str, **info: Any) -> Path:
    """Write ``<folder>/status.json`` (:data:`RUN_STATUS_FILE`): ``{"status": status, **info}``,
    atomically. ``status`` is ``"running"`` (written when a run starts: a run killed outright leaves
    it), ``"complete"``, ``"incomplete"`` (some inputs could not be scored) or ``"interrupted"``
    (stopped by Ctrl-C; only the inputs in the outputs were scored).

    Example:
        >>> import json, tempfile
        >>> d = tempfile.mkdtemp()
        >>> json.loads(write_run_status(d, "interrupted", n_inputs=3, n_scored=1).read_text())["status"]
        'interrupted'
    """
    from monai_skipts.utils import atomic_write_json

    if status not in RUN_STATUSES:
        raise ValueError(f"status must be one of {RUN_STATUSES}, got {status!r}")
    path = Path(folder) / RUN_STATUS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_json(path, {"status": status, **info})
