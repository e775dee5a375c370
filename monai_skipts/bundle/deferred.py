"""Values a handler needs that are known only after an earlier step of the bundle: an attribute read
when called (:func:`deferred_attribute`, the calibrated threshold) and the run's entries of
``metrics.json`` gathered when the scores are complete (:func:`metrics_extras`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["deferred_attribute", "metrics_extras"]


def deferred_attribute(obj: Any, name: str) -> Callable[[], Any]:
    """A zero-argument function returning ``obj.<name>`` when called: for handler arguments known
    only after an earlier step (the test scores' ``threshold`` is the calibrator's, set after training).

    Example:
        >>> class Calibrator: threshold = None
        >>> c = Calibrator(); get = deferred_attribute(c, "threshold"); c.threshold = 0.7
        >>> get()
        0.7
    """

    def value() -> Any:
        return getattr(obj, name)

    value.__qualname__ = f"deferred_attribute.<{name}>"
    return value


def metrics_extras(
    split: Mapping[str, Any],
    calibrator: Any = None,
    network: torch.nn.Module | None = None,
    checkpoint: str | os.PathLike | None = None,
    **fields: Any,
) -> Callable[[], dict[str, Any]]:
    """The ``extra_metrics`` of an :class:`~monai_skipts.handlers.AnomalyScoreHandler`: entries written
    into ``metrics.json`` next to the metrics, gathered when the scores are complete.

    Args:
        split: the run's split (:func:`~monai_skipts.bundle.build_split`); its ``report["counts"]`` goes under ``"split"``.
        calibrator: a :class:`~monai_skipts.handlers.ThresholdCalibrator`; its ``record`` (value,
            target FPR, normals, method, FPR expected and bound) goes under ``"calibration"``, and its
            ``fpr_expected``, ``fpr_bound`` and ``n_normals`` also as ``calibration_<key>`` (numbers the
            MLflow handler logs as metrics).
        network: the evaluated model; its teacher goes under ``"teacher"``.
        checkpoint: the evaluated checkpoint, recorded as an absolute path under ``"checkpoint"``.
        fields: more entries as they are (``teacher=..., epochs=..., seed=...``).

    Example:
        >>> extras = metrics_extras({"report": {"counts": {"train": 8}}}, epochs=2, seed=0)
        >>> extras()
        {'split': {'train': 8}, 'epochs': 2, 'seed': 0}
    """

    def extras() -> dict[str, Any]:
        out: dict[str, Any] = {}
        if checkpoint is not None:
            out["checkpoint"] = os.path.abspath(checkpoint)
        if network is not None:
            out["teacher"] = network.config["model"]["teacher"]
        out["split"] = (split.get("report") or {}).get("counts")
        out.update(fields)
        if calibrator is not None:
            out["calibration"] = rec = calibrator.record
            for key in ("fpr_expected", "fpr_bound", "n_normals"):  # flat numbers: MLflow metrics
                if isinstance(rec, Mapping) and rec.get(key) is not None:
                    out[f"calibration_{key}"] = rec[key]
        return out

    return extras
