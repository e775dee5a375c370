"""Checks the bundles run first, for the command line ``python -m monai.bundle run ...``.

- :func:`check_command_line`: refuse a ``--key`` override that is not a top-level id of the bundle's
  config files (``--epoch 1`` would otherwise add an unused id and train the default 25 epochs), with
  the closest known id (``did you mean --epochs?``). MONAI's own arguments of ``run``
  (``--config_file``, ``--meta_file``, ``--logging_file``, ``--run_id``, ``--init_id``, ``--final_id``,
  ``--args_file``, ``--tracking``, ...) are allowed; ``--args_file`` contents are checked too. A
  bundle's ``evaluate.json`` or ``inference.json`` given without its ``train.json`` (they are overrides
  merged over it) is refused first, with the command that works.
- :func:`install_root_cause_hook`: MONAI's config parser wraps an error raised inside a ``$``
  expression in ``RuntimeError: Failed to evaluate <the whole expression>`` (and ``apply_transform``
  wraps a transform's error in ``RuntimeError: applying transform <object at 0x...>``), so the line
  naming the file and the problem ends up in the middle of the traceback. The hook prints the traceback as
  before, then the root cause last, where a user reads it.

- :func:`check_seg_head`: refuse a bad ``seg_head`` option, or a head with cross-fitted calibration,
  and warn when the head's ``"map"`` would be calibrated with a parametric fit, before the student
  trains (:class:`~monai_skipts.engines.SegHeadCalibrationWarning`).

- :func:`expression_share`: how much of a bundle config file is Python in ``$`` expressions (the
  bundles keep it under 10 %: logic lives in :mod:`monai_skipts.bundle`'s functions, JSON keeps the
  wiring); ``python bundles/expression_share.py [FILE...]`` prints it.

The bundles (``bundles/common/{train,evaluate,inference}.json``) call :func:`check_command_line` as the
first step of ``initialize``; it does nothing when the bundle is run from Python (``monai.bundle.run(...)``,
``ConfigWorkflow``): the overrides are then the caller's keyword arguments, which are not visible from
here. ``train.json`` calls :func:`check_seg_head` after the flag check, however the bundle is run.
"""

from __future__ import annotations

import ast
import difflib
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

__all__ = [
    "MONAI_RUN_ARGS",
    "UnknownOptionError",
    "check_base_config",
    "check_command_line",
    "check_overrides",
    "check_seg_head",
    "command_line_overrides",
    "expression_share",
    "install_root_cause_hook",
    "root_cause",
]

#: arguments of ``monai.bundle.run`` / ``create_workflow`` / ``ConfigWorkflow`` that are not config ids
MONAI_RUN_ARGS = frozenset(
    {
        "run_id",
        "init_id",
        "final_id",
        "meta_file",
        "config_file",
        "logging_file",
        "tracking",
        "args_file",
        "workflow_name",
        "workflow_type",
        "properties_path",
    }
)
#: messages of the RuntimeErrors MONAI wraps the real error in (its config parser, and ``apply_transform``)
_WRAPPERS = ("Failed to evaluate", "Failed to instantiate", "applying transform")
_REFERENCE = re.compile(r"@(\w+)")


class UnknownOptionError(ValueError):
    """A command-line option that is neither a top-level id of the bundle nor an argument of MONAI's
    ``run``."""


def _is_bundle_run(argv: Sequence[str]) -> bool:
    """True when this process is ``python -m monai.bundle run ...`` (torchrun included)."""
    if not argv:
        return False
    main = Path(argv[0])
    if main.name != "__main__.py" or main.parent.name != "bundle" or main.parent.parent.name != "monai":
        return False
    words = [a for a in argv[1:] if not a.startswith("-")]
    return bool(words) and words[0] == "run"


def command_line_overrides(argv: Sequence[str]) -> dict[str, Any]:
    """The ``--key value`` / ``--key=value`` / ``--key`` pairs of a ``monai.bundle`` command line, as
    python-fire reads them (``-`` in a key becomes ``_``; values stay strings; after a lone ``--``
    come fire's own flags, which are skipped)."""
    out: dict[str, Any] = {}
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            break
        if a.startswith("--") and len(a) > 2:
            key, eq, value = a[2:].partition("=")
            if not eq:
                if i + 1 < len(args) and not args[i + 1].startswith("--"):
                    value, i = args[i + 1], i + 1
                else:
                    value = "True"
            out[key.replace("-", "_")] = value
        i += 1
    return out


def _as_files(value: Any) -> list[str]:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith(("[", "(")):
            value = ast.literal_eval(text)
        elif "," in text and not Path(text).is_file():
            value = text.split(",")
        else:
            value = [text]
    return [str(v).strip() for v in value]


#: a bundle's config files that are overrides merged over the ``train.json`` beside them
OVERRIDE_CONFIGS = ("evaluate.json", "inference.json")


def check_base_config(config_files: Sequence[str]) -> None:
    """Raise :class:`ValueError` when a bundle's ``evaluate.json`` or ``inference.json`` is given without
    the ``train.json`` beside it, which it overrides (a config with no ``train.json`` beside it, such as
    an exported bundle's ``configs/inference.json``, stands alone and passes).

    Args:
        config_files: the ``--config_file`` files, in their order.

    Raises:
        ValueError: naming the file and the ``--config_file`` that works.

    Example:
        >>> check_base_config(["bundles/demo/train.json", "bundles/demo/evaluate.json"])
    """
    given = [Path(f).resolve() for f in config_files]
    for k, path in enumerate(given):
        base = path.with_name("train.json")
        if path.name in OVERRIDE_CONFIGS and base.is_file() and base not in given[:k]:
            files = ",".join(f"'{f}'" for f in (str(Path(config_files[k]).with_name("train.json")), config_files[k]))
            raise ValueError(
                f"{config_files[k]} is an override merged over the train.json beside it: give both, "
                f'--config_file "[{files}]"'
            )


def check_overrides(overrides: Iterable[str], config_files: Sequence[str], extra_ids: Iterable[str] = ()) -> None:
    """Raise :class:`UnknownOptionError` for the first override that names no top-level id of the
    config files (``net#x``: its first part ``net``), nor an id they reference (``"input":
    "@dataset_dir"`` makes ``--dataset_dir`` meaningful), nor an argument of MONAI's ``run``.

    Args:
        overrides: the override keys, as given (``"epochs"``, ``"train#trainer#max_epochs"``).
        config_files: the bundle's config files (JSON/YAML), merged as MONAI merges them.
        extra_ids: more ids to accept (e.g. those a ``--tracking`` setting adds).
    """
    from monai.bundle import ConfigParser

    config = ConfigParser.load_config_files(list(config_files))
    known = set(config) | set(_references(config)) | set(extra_ids) | {"_meta_"}
    for key in overrides:
        if key in MONAI_RUN_ARGS or key.split("#")[0] in known:
            continue
        close = difflib.get_close_matches(key, sorted(known | MONAI_RUN_ARGS), n=1, cutoff=0.6)
        ids = ", ".join(sorted(k for k in known if not k.startswith("_")))
        hint = f"; did you mean --{close[0]}?" if close else f"; known ids: {ids}"
        raise UnknownOptionError(
            f"unknown option --{key}: not a top-level id of {', '.join(config_files)} nor an argument of "
            f"monai.bundle run{hint}"
        )


def _references(config: Any) -> Iterable[str]:
    """The top-level ids that ``@id`` / ``@id#...`` references in the config's strings name."""
    if isinstance(config, str):
        yield from _REFERENCE.findall(config)
    elif isinstance(config, dict):
        for v in config.values():
            yield from _references(v)
    elif isinstance(config, (list, tuple)):
        for v in config:
            yield from _references(v)


def check_command_line(argv: Sequence[str] | None = None) -> None:
    """The bundles' first step: on ``python -m monai.bundle run`` install :func:`install_root_cause_hook`
    and check the command line's overrides (and those of its ``--args_file``) with
    :func:`check_overrides`. Elsewhere (the bundle run from Python) it does nothing."""
    argv = sys.argv if argv is None else argv
    if not _is_bundle_run(argv):
        return
    install_root_cause_hook()
    args = command_line_overrides(argv[1:])
    if args.get("args_file"):
        from monai.bundle import ConfigParser

        args = {**ConfigParser.load_config_file(args["args_file"]), **args}
    if not args.get("config_file"):
        return  # MONAI refuses this itself
    check_base_config(_as_files(args["config_file"]))
    extra: set[str] = set()
    if args.get("tracking"):
        from monai.bundle.utils import DEFAULT_EXP_MGMT_SETTINGS

        settings = DEFAULT_EXP_MGMT_SETTINGS.get(str(args["tracking"]), {})
        extra |= set(settings.get("configs", {}))
    check_overrides(args, _as_files(args["config_file"]), extra)


def check_seg_head(seg_head: Any, calibration_folds: int | None = 0, calibration: str = "empirical") -> None:
    """Check a training bundle's ``seg_head`` against its calibration options, before anything trains.

    Args:
        seg_head: the bundle's ``seg_head`` (``None``: no head, nothing to check).
        calibration_folds: the bundle's ``calibration_folds``.
        calibration: the bundle's ``calibration`` method.

    Raises:
        ValueError: a bad ``seg_head`` option
            (:func:`~monai_skipts.engines.seg_head.seg_head_options`), or a head with
            ``calibration_folds >= 2``; the message names the options and what to change.

    Warns:
        ~monai_skipts.engines.seg_head.SegHeadCalibrationWarning: mode ``"map"`` with a parametric
            ``calibration`` (:func:`~monai_skipts.engines.seg_head.warn_parametric_map_calibration`).
    """
    from monai_skipts.engines.seg_head import seg_head_options, warn_parametric_map_calibration

    opts = seg_head_options(seg_head)
    if opts is None:
        return
    folds = int(calibration_folds or 0)
    if folds >= 2:
        raise ValueError(
            f"seg_head with calibration_folds={folds} is not supported: cross-fitted calibration trains a "
            "student per fold and calibrates on their out-of-fold scores, but the segmentation head is trained "
            "once, on the final student, so those scores would not be the map the model serves; use "
            "--calibration_folds 0 (calibrate on the validation normals) with the head, or --seg_head None"
        )
    warn_parametric_map_calibration(opts["mode"], calibration)


def root_cause(exc: BaseException) -> BaseException:
    """The exception that MONAI's ``Failed to evaluate/instantiate`` wrappers (possibly nested) hide;
    ``exc`` itself when it is not such a wrapper."""
    seen = set()
    while (
        isinstance(exc, RuntimeError)
        and str(exc).startswith(_WRAPPERS)
        and (exc.__cause__ or exc.__context__) is not None
        and id(exc) not in seen
    ):
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return exc


def install_root_cause_hook() -> None:
    """Make an uncaught error end with its root cause: ``sys.excepthook`` prints the traceback as
    before, then (when MONAI wrapped the error) ``monai-skipts: <Type>: <message>`` as the last line.
    Installing it twice is harmless."""
    previous = sys.excepthook
    if getattr(previous, "_monai_skipts_root_cause", False):
        return

    def hook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        previous(exc_type, exc, tb)
        root = root_cause(exc)
        if root is not exc:
            print(f"\nmonai-skipts: the bundle stopped: {type(root).__name__}: {root}", file=sys.stderr, flush=True)

    hook._monai_skipts_root_cause = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def _expressions(config: Any) -> Iterable[str]:
    """Every string value of ``config`` (nested dicts and lists; keys excluded) that starts with ``$``."""
    if isinstance(config, str):
        if config.startswith("$"):
            yield config
    elif isinstance(config, dict):
        for v in config.values():
            yield from _expressions(v)
    elif isinstance(config, (list, tuple)):
        for v in config:
            yield from _expressions(v)


def expression_share(path: str | Path) -> tuple[int, int]:
    """Characters of Python in a JSON bundle config: the length of every ``$...`` string value (the
    ``$`` included, as JSON-decoded) and the file's length in characters.

    Args:
        path: a JSON config file.

    Returns:
        ``(expression_characters, file_characters)``; their ratio is the ``$`` share.

    Example:
        >>> import json, tempfile
        >>> f = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
        >>> _ = f.write(json.dumps({"net": {"_target_": "Net", "size": "@size"}, "run": ["$@net.run()"]})); f.close()
        >>> expression_share(f.name)
        (11, 69)
    """
    import json

    text = Path(path).read_text(encoding="utf-8")
    return sum(len(e) for e in _expressions(json.loads(text))), len(text)
