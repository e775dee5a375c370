"""MONAI Label integration: an anomaly-map infer task and a sample app.

- :func:`~monai_skipts.label.scorer.scorer_from_conf`: the serving core,
  :class:`~monai_skipts.inference.AnomalyPredictor` (checkpoint -> maps, scores, decisions for 2-D images
  and volumes; bundle inference and the MLflow model use it too), built from ``--conf`` settings; needs
  no monailabel.
- :class:`~monai_skipts.label.infer.SkipTSAnomalyInfer`: a MONAI Label ``BasicInferTask`` returning the
  anomaly map as the label and ``{score, threshold, anomalous, ...}`` as the result JSON.
- ``APP_DIR`` (``monai_skipts/label/app``): the sample app, served by
  ``monailabel start_server --app <APP_DIR> --studies <folder> --conf checkpoint <model.pt>``.

monailabel (which pins numpy < 2) is an optional extra, ``pip install 'monai-skipts[label]'``, best in
its own environment (``.ci/label_env.sh``). Nothing here imports it until the infer task is used.
"""

from __future__ import annotations

from pathlib import Path

from monai_skipts.label.scorer import scorer_from_conf, scorer_options

__all__ = [
    "APP_DIR",
    "scorer_options",
    "scorer_from_conf",
    "SkipTSAnomalyInfer",
]

#: the sample MONAI Label app (``main.py``)
APP_DIR = Path(__file__).resolve().parent / "app"


def __getattr__(name: str):
    if name == "SkipTSAnomalyInfer":  # imports monailabel: only on demand
        from monai_skipts.label.infer import SkipTSAnomalyInfer

        return SkipTSAnomalyInfer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
