"""Ignite/MONAI handlers: score collection and metrics, plots (drawn by :mod:`monai_skipts.visualize`),
checkpoints with resume, threshold calibration, loss components, MLflow."""

from .mlflow import SkipTSMLFlowHandler, default_run_name, run_params
from .plots import AnomalyPlotsHandler, safe_name
from .scores import AnomalyScoreHandler, gather_objects
from .training import LossComponentsHandler, SkipTSCheckpointHandler, ThresholdCalibrator

__all__ = [
    "AnomalyPlotsHandler",
    "AnomalyScoreHandler",
    "LossComponentsHandler",
    "SkipTSCheckpointHandler",
    "ThresholdCalibrator",
    "SkipTSMLFlowHandler",
    "default_run_name",
    "run_params",
    "gather_objects",
    "safe_name",
]
