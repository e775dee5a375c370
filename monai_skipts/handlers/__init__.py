"""Ignite/MONAI handlers: score collection and metrics, plots, checkpoints with resume,
threshold calibration, loss components, MLflow."""

from .mlflow import SkipTSMLFlowHandler, default_run_name, run_params
from .plots import AnomalyPlotsHandler, colorize_map, heatmap_panel, overlay_heatmap, safe_name, save_map_png
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
    "colorize_map",
    "heatmap_panel",
    "overlay_heatmap",
    "safe_name",
    "save_map_png",
]
