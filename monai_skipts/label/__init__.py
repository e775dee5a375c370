"""MONAI Label integration: an anomaly-map infer task and a sample app.

- ``AnomalyScorer``: the serving core (checkpoint -> maps, scores, decisions for 2-D images and
  volumes), i.e. :class:`~monai_skipts.inference.AnomalyPredictor`, the package's one predictor (bundle
  inference and the MLflow model use it too); needs no monailabel. :mod:`~monai_skipts.label.scorer`
  builds it from ``--conf`` settings.
- :class:`~monai_skipts.label.infer.SkipTSAnomalyInfer`: a MONAI Label ``BasicInferTask`` returning the
  anomaly map as the label and ``{score, threshold, anomalous, ...}`` as the result JSON.
- ``APP_DIR`` (``monai_skipts/label/app``): the sample app, served by
  ``monailabel start_server --app <APP_DIR> --studies <folder> --conf checkpoint <model.pt>``.

monailabel (which pins numpy < 2) is an optional extra, ``pip install 'monai-skipts[label]'``, best in
its own environment (``.ci/label_env.sh``). Nothing here imports it until the infer task is used.
"""

from __future__ import annotations

from pathlib import Path

from monai_skipts.label.scorer import AnomalyScorer, array_to_image, scorer_from_conf, scorer_options, slice_to_plane

__all__ = [
    "APP_DIR",
    "AnomalyScorer",
    "array_to_image",
    "scorer_options",
    "scorer_from_conf",
    "slice_to_plane",
    "SkipTSAnomalyInfer",
]

#: the sample MONAI Label app (``main.py``)
APP_DIR = Path(__file__).resolve().parent / "app"


def __getattr__(name: str):
    if name == "SkipTSAnomalyInfer":  # imports monailabel: only on demand
        from monai_skipts.label.infer import SkipTSAnomalyInfer

        return SkipTSAnomalyInfer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
