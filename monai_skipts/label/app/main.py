"""Sample MONAI Label app: Skip-TS anomaly maps for 2-D images and volumes.

Serve a folder of studies (PNG/JPEG, NIfTI, NRRD) with a trained checkpoint, from the repository root::

    APP=$(python -c "import monai_skipts.label as l; print(l.APP_DIR)")
    monailabel start_server --app "$APP" --studies /data/studies \
        --conf checkpoint runs/headct/model.pt

Conf keys (``--conf KEY VALUE``): ``checkpoint`` (required unless ``$SKIPTS_CHECKPOINT`` is set or
``<app>/model/model.pt`` exists; a relative path, here and in ``teacher_weights``, is taken against
the folder ``monailabel start_server`` was started from, not the app folder), and optionally
``modality``, ``spatial_size``, ``window``, ``mri_norm``, ``sigma``, ``teacher_weights``,
``batch_size``, ``volume_aggregation``, ``slice_axis``
(defaults: the checkpoint's), ``output`` (``map``/``mask``). The model is named ``skipts_anomaly``.

``--conf site_normals <folder or datalist>`` recalibrates the model on the site's normal images when
the app starts (:func:`~monai_skipts.calibrate.recalibrate`: scored with the same serving options;
``--conf target_fpr`` optional) and serves the site model, written to ``<app>/model/site_model.pt``.
"""

import logging
import os
from pathlib import Path

from monailabel.interfaces.app import MONAILabelApp

import monai_skipts
from monai_skipts.calibrate import recalibrate
from monai_skipts.label.infer import SkipTSAnomalyInfer
from monai_skipts.label.scorer import scorer_options

logger = logging.getLogger(__name__)

MODEL_NAME = "skipts_anomaly"


class SkipTSAnomalyApp(MONAILabelApp):
    """MONAI Label app with one infer task, :class:`~monai_skipts.label.infer.SkipTSAnomalyInfer`."""

    def __init__(self, app_dir, studies, conf):
        conf = dict(conf or {})
        conf.setdefault("checkpoint", os.environ.get("SKIPTS_CHECKPOINT") or os.path.join(app_dir, "model", "model.pt"))
        self.checkpoint, self.scorer_kwargs = scorer_options(conf)  # relative paths: against the start folder
        if not self.checkpoint.is_file():
            raise FileNotFoundError(
                f"{self.checkpoint}: checkpoint not found (a relative --conf checkpoint is taken against the folder "
                f"MONAI Label was started from, {os.getcwd()}); start the app with --conf checkpoint <path to model.pt>"
            )
        if conf.get("site_normals"):
            self.checkpoint = self._site_model(app_dir, conf)
        logger.info("Skip-TS checkpoint: %s (%s)", self.checkpoint, self.scorer_kwargs)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="Skip-TS anomaly detection",
            description="Anomaly maps and image/volume anomaly scores from a Skip-TS teacher-student model",
            version=monai_skipts.__version__,
            labels={"anomaly": 1},
        )

    def _site_model(self, app_dir, conf):
        """The checkpoint recalibrated on ``conf["site_normals"]``, written to ``<app>/model/site_model.pt``."""
        out = os.path.join(app_dir, "model", "site_model.pt")
        keys = ("teacher_weights", "backend", "batch_size", "device", "volume_aggregation")
        options = {k: v for k, v in self.scorer_kwargs.items() if k in keys}
        if "slice_axis" in self.scorer_kwargs:
            options["volume_axis"] = self.scorer_kwargs["slice_axis"]
        target = float(conf["target_fpr"]) if conf.get("target_fpr") else None
        normals = os.path.abspath(os.path.expanduser(str(conf["site_normals"])))  # against the start folder
        record = recalibrate(self.checkpoint, normals, out, target_fpr=target, **options)
        logger.info("site recalibration: threshold %.6g from %s normals", record["value"], record.get("n_normals"))
        return Path(out).resolve()

    def init_infers(self):
        config = {"output": self.conf.get("output", "map")}
        return {MODEL_NAME: SkipTSAnomalyInfer(self.checkpoint, self.scorer_kwargs, config=config)}
