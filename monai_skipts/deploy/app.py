"""Skip-TS as a MONAI Deploy App SDK application (``monai-deploy-app-sdk`` 4.0, Holoscan operators)::

    DICOMDataLoaderOperator -> DICOMSeriesSelectorOperator -> DICOMSeriesToVolumeOperator
        -> SkipTSOperator (the package's AnomalyPredictor) -> DICOMTextSRWriterOperator

Command line (the SDK's arguments; also ``HOLOSCAN_INPUT_PATH`` / ``HOLOSCAN_OUTPUT_PATH`` /
``HOLOSCAN_MODEL_PATH`` as in any MONAI Deploy app)::

    python -m monai_skipts.deploy -i <folder of DICOM files> -o <output folder> -m runs/headct/model.pt

The series scored is the first one matching the selection rules (default: the first CT or MR series;
``$SKIPTS_SELECTION_RULES``: rules JSON as :class:`DICOMSeriesSelectorOperator` documents). The volume
from :class:`DICOMSeriesToVolumeOperator` (rescaled values, ``(slices, rows, columns)`` with its RAS
affine) is oriented to RAS and scored slice-wise by
:meth:`~monai_skipts.inference.AnomalyPredictor.score_volume`, i.e. as
``AnomalyPredictor.score_file(<series folder>)`` scores the same series (checked in
``python -m monai_skipts.deploy.check``).

Outputs in the output folder: a DICOM Basic Text SR in the source study (score, threshold, decision,
normalised score, per-slice scores), ``skipts_result.json`` (the same, for machines) and
``anomaly_map.nii.gz`` (the map, with the volume's RAS affine).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.deploy.conditions import CountCondition
from monai.deploy.core import AppContext, Application, ConditionType, Fragment, Operator, OperatorSpec
from monai.deploy.operators import (
    DICOMDataLoaderOperator,
    DICOMSeriesSelectorOperator,
    DICOMSeriesToVolumeOperator,
    DICOMTextSRWriterOperator,
)
from monai.deploy.operators.dicom_utils import EquipmentInfo, ModelInfo
from monai.transforms import Orientation

from monai_skipts.inference import AnomalyPredictor
from monai_skipts.utils import atomic_write_bytes, atomic_write_json

__all__ = ["SkipTSOperator", "SkipTSDeployApp", "DEFAULT_RULES", "volume_to_ras", "main"]

DEFAULT_RULES = json.dumps({"selections": [{"name": "CT or MR series", "conditions": {"Modality": "(?i)^(CT|MR)$"}}]})


def volume_to_ras(image) -> MetaTensor:
    """A MONAI Deploy ``Image`` (``(slices, rows, columns)``, RAS ``affine`` in its metadata for the
    ``(columns, rows, slices)`` index order) -> a float32 ``(1, X, Y, Z)`` RAS :class:`MetaTensor`, the
    form :class:`~monai_skipts.transforms.LoadMedicalImage` gives a DICOM series."""
    meta = image.metadata()
    data = np.ascontiguousarray(np.transpose(np.asarray(image.asnumpy()), (2, 1, 0)), dtype=np.float32)
    affine = torch.as_tensor(np.asarray(meta["nifti_affine_transform"], dtype=np.float64))
    vol = MetaTensor(torch.from_numpy(data)[None], affine=affine)
    vol = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(vol)
    vol.meta.update(
        source_format="dicom_series",
        spatial_shape=tuple(vol.shape[1:]),
        series_instance_uid=str(meta.get("SeriesInstanceUID", "")),
    )
    return vol


class SkipTSOperator(Operator):
    """Scores the selected series' volume with :class:`~monai_skipts.inference.AnomalyPredictor`.

    Named input: ``image`` (the volume :class:`DICOMSeriesToVolumeOperator` emits). Named output:
    ``result_text`` (the SR's text). Files: ``skipts_result.json``, ``anomaly_map.nii.gz``.
    """

    def __init__(
        self,
        fragment: Fragment,
        *args,
        checkpoint: str | os.PathLike,
        output_folder: str | os.PathLike,
        device: str = "auto",
        **kwargs,
    ):
        self.checkpoint = Path(checkpoint)
        self.output_folder = Path(output_folder)
        self.device = device
        self.predictor: AnomalyPredictor | None = None
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("image")
        spec.input("study_selected_series_list").condition(ConditionType.NONE)  # the files, for one-image series
        spec.output("result_text").condition(ConditionType.NONE)

    def start(self):
        self.predictor = AnomalyPredictor(self.checkpoint, device=self.device)

    def compute(self, op_input, op_output, context):
        import nibabel as nib

        image = op_input.receive("image")
        if image is None:
            raise ValueError("no volume: no series matched the selection rules")
        meta = image.metadata()
        pred = self.predictor
        pixels = np.asarray(image.asnumpy())
        if pixels.shape[0] == 1 or "nifti_affine_transform" not in meta:
            # one image (the SDK gives it no volume geometry): its file is scored as a single DICOM file is
            if pixels.shape[0] != 1:
                raise ValueError(f"series of {pixels.shape[0]} slices without a volume geometry")
            selected = op_input.receive("study_selected_series_list")
            sop = selected[0].selected_series[0].series.get_sop_instances()[0]
            one = pred.score_file(sop.get_native_sop_instance().filename, maps=True)
            score, slice_scores = float(one["score"]), [float(one["score"])]
            amap = MetaTensor(one["map"][..., None], affine=torch.eye(4, dtype=torch.float64))
        else:
            vol = volume_to_ras(image)
            score, slice_scores, amap = pred.score_volume(vol, maps=True)
        # a volume is decided with the volume threshold when the checkpoint has one (threshold_kind says which)
        decision = pred.decide(score) if len(slice_scores) == 1 else pred.decide_volume(score)
        decision.setdefault("threshold_kind", None if decision["threshold"] is None else "image")

        def plain(k: str, v: Any) -> Any:
            return None if v is None else bool(v) if k == "anomalous" else v if k == "threshold_kind" else float(v)

        result = {
            **{k: plain(k, v) for k, v in decision.items()},
            "slice_scores": [float(s) for s in slice_scores],
            "volume_aggregation": pred.volume_aggregation,
            "series_instance_uid": str(meta.get("SeriesInstanceUID", "")),
            "study_instance_uid": str(meta.get("StudyInstanceUID", "")),
            "modality": str(meta.get("Modality", "")),
            "map_shape": list(amap.shape),
            "checkpoint": str(self.checkpoint),
        }
        self.output_folder.mkdir(parents=True, exist_ok=True)
        # no UIDs in files outside DICOM (as dicom_app): they stay in the SR only
        atomic_write_json(
            self.output_folder / "skipts_result.json",
            {k: v for k, v in result.items() if not k.endswith("_instance_uid")},
            indent=2,
        )
        nifti = nib.Nifti1Image(amap.numpy(), np.asarray(amap.affine, dtype=np.float64))
        atomic_write_bytes(self.output_folder / "anomaly_map.nii.gz", gzip.compress(nifti.to_bytes()))
        thr = (
            "not calibrated"
            if decision["threshold"] is None
            else f"{decision['threshold_kind']} {decision['threshold']:.6g}"
        )
        verdict = {True: "ANOMALOUS", False: "normal"}.get(decision["anomalous"], "undecided")
        text = (
            f"Skip-TS anomaly detection (research use only, not for diagnosis). Series {result['series_instance_uid']}: "
            f"score {score:.6g} ({pred.volume_aggregation} of {len(slice_scores)} slice scores), threshold {thr}: "
            f"{verdict}."
        )
        if decision.get("normalized_score") is not None:
            text += f" Normalised score {decision['normalized_score']:.3f} (0.5 at the threshold)."
        logging.getLogger(__name__).info(text)
        op_output.emit(text, "result_text")


class SkipTSDeployApp(Application):
    """The DICOM app: load the study folder, select a series, build its volume, score it, write the SR."""

    def compose(self):
        ctx: AppContext = Application.init_app_context(self.argv)
        input_path, output_path = Path(ctx.input_path), Path(ctx.output_path)
        checkpoint = Path(ctx.model_path)
        if checkpoint.is_dir():  # a models folder: the one checkpoint in it
            found = sorted(checkpoint.glob("*.pt"))
            if len(found) != 1:
                raise ValueError(f"{checkpoint}: expected one monai-skipts checkpoint (*.pt), found {len(found)}")
            checkpoint = found[0]
        rules = os.environ.get("SKIPTS_SELECTION_RULES") or DEFAULT_RULES
        loader = DICOMDataLoaderOperator(self, CountCondition(self, 1), input_folder=input_path, name="dicom_loader")
        selector = DICOMSeriesSelectorOperator(self, rules=rules, name="series_selector")
        to_volume = DICOMSeriesToVolumeOperator(self, name="series_to_volume")
        skipts = SkipTSOperator(self, checkpoint=checkpoint, output_folder=output_path, name="skipts")
        model_info = ModelInfo("monai-skipts", "Skip-TS anomaly detection", "0.1.0", "")
        sr_writer = DICOMTextSRWriterOperator(
            self,
            copy_tags=True,
            model_info=model_info,
            equipment_info=EquipmentInfo(manufacturer="monai-skipts"),
            output_folder=output_path,
            custom_tags={"SeriesDescription": "Skip-TS anomaly score (not for diagnosis)"},
            name="sr_writer",
        )
        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector, to_volume, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(to_volume, skipts, {("image", "image")})
        self.add_flow(selector, skipts, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(skipts, sr_writer, {("result_text", "text")})
        self.add_flow(selector, sr_writer, {("study_selected_series_list", "study_selected_series_list")})


def main() -> None:
    SkipTSDeployApp().run()


if __name__ == "__main__":
    main()
