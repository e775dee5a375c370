"""MLflow for the bundles: the store, experiment, run and registered-model names, the switch the
MLflow handlers read (:func:`mlflow_disabled`) and the last step of a training, :func:`register_model`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai_skipts.bundle.processes import is_secondary_rank

__all__ = [
    "evaluation_run_name",
    "experiment_name",
    "mlflow_disabled",
    "register_model",
    "registered_model_name",
    "tracking_uri",
    "training_run_name",
]

logger = logging.getLogger(__name__)

#: files of a training run's ``output_dir`` that the MLflow steps read or write
CHECKPOINT_FILE, MODEL_FILE, METRICS_FILE, MLFLOW_DB = ("checkpoint.pt", "model.pt", "metrics.json", "mlruns.db")


def tracking_uri(output_dir: str | os.PathLike) -> str:
    """The run's MLflow store: ``sqlite:///<absolute output_dir>/mlruns.db``.

    Example:
        >>> tracking_uri("/data/runs/x")
        'sqlite:////data/runs/x/mlruns.db'
    """
    from monai.utils import path_to_sqlite_uri

    return path_to_sqlite_uri(os.path.join(os.path.abspath(output_dir), MLFLOW_DB))


def experiment_name(dataset: str) -> str:
    """The MLflow experiment of a dataset's runs.

    Example:
        >>> experiment_name("brainmri")
        'monai-skipts-brainmri'
    """
    return f"monai-skipts-{dataset}"


def registered_model_name(dataset: str) -> str:
    """The MLflow registry name of a dataset's trained model (``models:/<name>@champion``).

    Example:
        >>> registered_model_name("brainmri")
        'skipts-brainmri'
    """
    return f"skipts-{dataset}"


def training_run_name(
    dataset: str, seed: int, output_dir: str | os.PathLike | None = None, resume: bool = True, mlflow: bool = True
) -> str | None:
    """The MLflow run name of a training: the one stored in ``<output_dir>/checkpoint.pt`` when the run
    resumes (the resumed training continues its MLflow run), else ``<dataset>-seed<seed>-<UTC time>``.

    Args:
        dataset, seed: the bundle's ids.
        output_dir: the run folder (``None``: no resume).
        resume: the bundle's ``resume`` switch.
        mlflow: the bundle's ``mlflow`` switch; False gives ``None`` (nothing to name, nothing stored
            in the checkpoint).

    Example:
        >>> training_run_name("brainmri", 3).startswith("brainmri-seed3-"), training_run_name("brainmri", 3, mlflow=False)
        (True, None)
    """
    from monai_skipts.handlers import default_run_name
    from monai_skipts.handlers.training import resumed_run_name

    if not mlflow:
        return None
    resumed = resumed_run_name(os.path.join(output_dir, CHECKPOINT_FILE), resume) if output_dir is not None else None
    return resumed or default_run_name(dataset, seed)


def evaluation_run_name(dataset: str, seed: int) -> str:
    """The MLflow run name of an evaluation: ``evaluate-<dataset>-seed<seed>-<UTC time>``.

    Example:
        >>> evaluation_run_name("lgg", 0).startswith("evaluate-lgg-seed0-")
        True
    """
    from monai_skipts.handlers import default_run_name

    return "evaluate-" + default_run_name(dataset, seed)


def mlflow_disabled(mlflow: bool = True) -> bool:
    """For the MLflow handlers' ``_disabled_``: True when the ``mlflow`` switch is off or this process
    is not rank 0 (:func:`~monai_skipts.bundle.is_secondary_rank`).

    Example:
        >>> mlflow_disabled(True), mlflow_disabled(False)
        (False, True)
    """
    return not mlflow or is_secondary_rank()


def register_model(
    output_dir: str | os.PathLike,
    name: str,
    tracking_uri: str,
    experiment_name: str,
    modality: str,
    spatial_size: int | Sequence[int],
    bundle_root: str | os.PathLike | None = None,
    mlflow: bool = True,
    register: bool = True,
) -> dict[str, Any] | None:
    """The last step of a training: log ``<output_dir>/model.pt`` with its metrics as an MLflow model,
    register it as ``name`` and move the ``champion`` alias to it
    (:func:`~monai_skipts.registry.log_and_register`), with the bundle's config files.

    Args:
        output_dir: the run folder (``model.pt``, ``metrics.json``).
        name: the registered model name (:func:`registered_model_name`).
        tracking_uri, experiment_name: the run's MLflow store and experiment.
        modality, spatial_size: the serving preprocessing.
        bundle_root: the bundle's folder, logged with the model when it exists (a relative path means
            the working directory, as on the command line; a missing folder is skipped with a warning).
        mlflow, register: the bundle's switches; either off, or a process other than rank 0: nothing
            is done.

    Returns:
        what ``log_and_register`` returns (``model_uri``, ``version``, ...), or ``None`` when skipped.
    """
    if not (mlflow and register) or is_secondary_rank():
        return None
    from monai_skipts.registry import log_and_register

    files: list[str] = []
    if bundle_root is not None:
        if Path(bundle_root).is_dir():
            files.append(str(bundle_root))
        else:
            logger.warning(
                "bundle folder %s not found from %s: the model is registered without its config files",
                bundle_root,
                os.getcwd(),
            )
    return log_and_register(
        os.path.join(output_dir, MODEL_FILE),
        name=name,
        alias="champion",
        tracking_uri=tracking_uri,
        experiment_name=experiment_name,
        modality=modality,
        spatial_size=spatial_size,
        bundle_config_files=files,
        metrics=os.path.join(output_dir, METRICS_FILE),
    )
