"""The DICOM objects a scored series becomes, made with highdicom (new UIDs for every object; patient and
study attributes copied from the source, so that a PACS files them under the right patient and study):

- :func:`make_sc`: a Secondary Capture image (RGB) per scored slice, at the source frame's size and
  pixel spacing: the heat-map overlay with score, threshold, decision and ``NOT FOR DIAGNOSTIC USE``
  burned in (:mod:`monai_skipts.dicom.render`);
- :func:`make_sr`: a Comprehensive SR holding a TID 1500 Measurement Report: one measurement group per
  decision (an image, or a volume) with the score, the threshold, the normalised score, the decision
  (SCT Yes/No) and the algorithm (model name, version, teacher, checkpoint digest), referencing the
  source SOP instances (and frames); volumes add one group per slice with the slice score;
- :func:`make_seg`: a binary DICOM SEG of the region where the anomaly map reaches the threshold.

:func:`save_dataset` writes a file atomically (temporary file, then rename). Nothing here logs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .render import DISCLAIMER
from .study import MANUFACTURER

__all__ = [
    "ModelInfo",
    "SCHEME",
    "CODES",
    "make_sc",
    "make_sr",
    "make_seg",
    "save_dataset",
    "patient_orientation",
]

SCHEME = "99SKIPTS"
"""Private coding scheme designator of the Skip-TS concepts (DICOM PS3.16 §8.2: ``99`` + a name)."""


def _code(value: str, meaning: str, scheme: str = SCHEME):
    from pydicom.sr.coding import Code

    return Code(value, scheme, meaning)


CODES = {
    "score": ("SKIPTS-001", "Anomaly score"),
    "threshold": ("SKIPTS-002", "Anomaly decision threshold"),
    "normalized_score": ("SKIPTS-003", "Normalized anomaly score"),
    "anomalous": ("SKIPTS-004", "Anomalous"),
    "slice_score": ("SKIPTS-005", "Slice anomaly score"),
    "region": ("SKIPTS-006", "Region above anomaly threshold"),
    "threshold_applied": ("SKIPTS-007", "Decision threshold applied"),
    "threshold_fpr": ("SKIPTS-008", "False-positive rate of the threshold"),
    "outline_threshold": ("SKIPTS-009", "Outline threshold"),
}
"""``key: (code value, code meaning)`` of the private concepts (scheme :data:`SCHEME`)."""


@dataclass
class ModelInfo:
    """What the objects say about the model (the SR's algorithm identification, SC/SEG attributes)."""

    name: str = "Skip-TS"
    version: str = ""
    teacher: str = ""
    checkpoint_sha256: str = ""
    aggregation: str = "max"
    parameters: dict[str, str] = field(default_factory=dict)

    def parameter_list(self) -> list[str]:
        out = {
            "teacher": self.teacher,
            "checkpoint_sha256": self.checkpoint_sha256[:16],
            "aggregation": self.aggregation,
        }
        out.update(self.parameters)
        return [f"{k}={v}" for k, v in out.items() if v]

    @property
    def software_version(self) -> str:
        return self.version or "0"

    @property
    def identity(self) -> str:
        """The algorithm identification in one string: name, version and parameters."""
        return "|".join([self.name, self.software_version, *self.parameter_list()])


def save_dataset(ds, path: str | os.PathLike) -> Path:
    """Write ``ds`` as a DICOM file (with its file meta) to ``path`` atomically."""
    from monai_skipts.utils import atomic_save

    return atomic_save(path, lambda f: ds.save_as(f, enforce_file_format=True))


_AXIS = {(0, 1): "L", (0, -1): "R", (1, 1): "P", (1, -1): "A", (2, 1): "H", (2, -1): "F"}


def _direction(v: np.ndarray) -> str:
    """A direction cosine as patient orientation letters (strongest axis first, others above 0.25)."""
    out = ""
    for axis in np.argsort(-np.abs(v)):
        if abs(v[axis]) > 0.25 or not out:
            out += _AXIS[(int(axis), 1 if v[axis] > 0 else -1)]
    return out


def patient_orientation(ds) -> tuple[str, str] | None:
    """The (row, column) patient orientation of a source image: its PatientOrientation, or derived from
    ImageOrientationPatient (also the enhanced multi-frame shared group); None when unknown."""
    po = ds.get("PatientOrientation")
    if po is not None and len(po) == 2 and all(str(x) for x in po):
        return str(po[0]), str(po[1])
    iop = ds.get("ImageOrientationPatient")
    if iop is None:
        try:
            iop = ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
        except (AttributeError, IndexError):
            iop = None
    if iop is None or len(iop) != 6:
        return None
    v = np.asarray([float(x) for x in iop])
    return _direction(v[:3]), _direction(v[3:])


def _pixel_spacing(ds) -> tuple[float, float] | None:
    """The source's pixel spacing (row, column) in mm; None when absent or invalid (a value not a
    positive finite number, e.g. the ``0\\0`` some CR write): never copied into a result."""
    ps = ds.get("PixelSpacing")
    if ps is None:
        try:
            ps = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        except (AttributeError, IndexError):
            ps = None
    if ps is None or len(ps) != 2:
        return None
    try:
        out = float(ps[0]), float(ps[1])
    except (TypeError, ValueError):
        return None
    return out if all(np.isfinite(v) and v > 0 for v in out) else None


def _without_invalid_geometry(ds):
    """``ds``, or a copy without its ``PixelSpacing`` when that is invalid (highdicom copies the source's
    spacing into a SEG); ``ds`` itself is left as it is."""
    from pydicom.dataset import Dataset

    if "PixelSpacing" not in ds or _pixel_spacing(ds) is not None:
        return ds
    clean = Dataset()
    clean.file_meta = ds.file_meta
    for elem in ds.elements():
        if elem.tag != 0x00280030:  # PixelSpacing
            clean[elem.tag] = elem
    return clean


def make_sc(
    source,
    frame: int,
    rgb: np.ndarray,
    series_uid: str,
    series_number: int,
    instance_number: int,
    model: ModelInfo,
    description: str,
):
    """A Secondary Capture image (RGB, uncompressed) of the overlay ``rgb`` for frame ``frame`` (0-based)
    of ``source``, in the source's study (patient and study attributes copied), with a new SOP
    instance UID, referencing the source instance (and frame)."""
    import highdicom as hd
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    orientation = patient_orientation(source)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=np.ascontiguousarray(rgb, dtype=np.uint8),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        pixel_spacing=_pixel_spacing(source),
        patient_orientation=orientation or ("L", "P"),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )
    if orientation is None:  # PatientOrientation is type 2C: empty when unknown (never invented)
        sc.PatientOrientation = None
    sc.Modality = "OT"
    sc.SeriesDescription = description
    sc.ImageComments = f"{DISCLAIMER}. {model.name} anomaly heat map (overlay on the source image)."
    sc.BurnedInAnnotation = "YES"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.ManufacturerModelName = model.name
    sc.SoftwareVersions = model.software_version
    sc.DerivationDescription = f"{model.name} anomaly map over the source image; {DISCLAIMER}"[:1024]
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if int(source.get("NumberOfFrames", 1) or 1) > 1:
        ref.ReferencedFrameNumber = frame + 1
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = (
        "121322",
        "DCM",
        "Source image for image processing operation",
    )
    ref.PurposeOfReferenceCodeSequence = [purpose]
    sc.SourceImageSequence = [ref]
    if source.get("BodyPartExamined") and "BodyPartExamined" not in sc:
        sc.BodyPartExamined = source.BodyPartExamined
    if "Laterality" in source:  # type 2C (paired body parts): the source's, even empty (unknown)
        sc.Laterality = source.Laterality
    elif "ImageLaterality" not in source and not source.get("BodyPartExamined"):
        sc.Laterality = None  # body part unknown: it may be paired, the side is unknown
    return sc


def _algorithm(model: ModelInfo):
    import highdicom as hd

    return hd.sr.AlgorithmIdentification(
        name=model.name, version=model.software_version, parameters=model.parameter_list() or None
    )


def _measurements(decision: dict[str, Any], model: ModelInfo, score_key: str = "score") -> list:
    import highdicom as hd

    unit = _code("1", "no units", "UCUM")
    algo = _algorithm(model)
    out = [
        hd.sr.Measurement(name=_code(*CODES[score_key]), value=float(decision["score"]), unit=unit, algorithm_id=algo)
    ]
    if decision.get("threshold") is not None:
        out.append(
            hd.sr.Measurement(
                name=_code(*CODES["threshold"]), value=float(decision["threshold"]), unit=unit, algorithm_id=algo
            )
        )
    if decision.get("normalized_score") is not None:
        out.append(
            hd.sr.Measurement(
                name=_code(*CODES["normalized_score"]),
                value=float(decision["normalized_score"]),
                unit=unit,
                algorithm_id=algo,
            )
        )
    return out


def _evaluations(decision: dict[str, Any]) -> list:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if decision.get("anomalous") is None:
        return []
    value = codes.SCT.Yes if decision["anomalous"] else codes.SCT.No
    return [hd.sr.QualitativeEvaluation(name=_code(*CODES["anomalous"]), value=value)]


def _source_images(headers: Sequence, slices: Sequence[tuple[int, int]]) -> list:
    import highdicom as hd

    by_instance: dict[int, list[int]] = {}
    for i, f in slices:
        by_instance.setdefault(i, []).append(f)
    out = []
    for i, frames in by_instance.items():
        ds = headers[i]
        multi = int(ds.get("NumberOfFrames", 1) or 1) > 1
        out.append(
            hd.sr.SourceImageForMeasurementGroup.from_source_image(
                ds, referenced_frame_numbers=[f + 1 for f in frames] if multi else None
            )
        )
    return out


def make_sr(
    headers: Sequence,
    groups: Sequence[dict[str, Any]],
    model: ModelInfo,
    series_uid: str,
    series_number: int,
    description: str,
):
    """A Comprehensive SR (TID 1500 Measurement Report) of the decisions in ``groups``.

    Args:
        headers: the source instances (their headers: UIDs, study and patient attributes).
        groups: one dict per measurement group: ``label`` (tracking identifier), ``slices``
            (``[(instance index, frame)]`` referenced), ``decision`` (``score``, ``threshold``,
            ``anomalous``, ``normalized_score``) and ``kind`` (``"image"``, ``"volume"`` or ``"slice"``;
            slice groups carry the slice score only); optional ``texts``: ``{CODES key: text}``, TEXT
            items of the group (which threshold was applied, its FPR bound and expected FPR, the
            outline threshold).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(prefix=None, entropy_srcs=[MANUFACTURER, model.name, model.teacher]),
        name=model.name,
        manufacturer_name=MANUFACTURER,
        model_name=f"{model.name} ({model.teacher})",
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )
    measurement_groups = []
    for g in groups:
        kind = g.get("kind", "image")
        decision = g["decision"]
        if kind == "slice":
            measurements, evaluations = _measurements({"score": decision["score"]}, model, "slice_score"), []
        else:
            measurements, evaluations = _measurements(decision, model), _evaluations(decision)
        measurement_groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=g["label"][:64]),
                algorithm_id=_algorithm(model),
                measurements=measurements,
                qualitative_evaluations=evaluations or None,
                source_images=_source_images(headers, g["slices"]),
            )
        )
        for key, text in (g.get("texts") or {}).items():
            measurement_groups[-1][0].ContentSequence.append(
                hd.sr.TextContentItem(name=_code(*CODES[key]), value=str(text)[:1024], relationship_type="CONTAINS")
            )
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=_code("363679005", "Imaging procedure", "SCT"),
        imaging_measurements=measurement_groups,
        title=codes.DCM.ImagingMeasurementReport,
    )
    sr = hd.sr.ComprehensiveSR(
        evidence=list(headers),
        content=report,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    sr.SeriesDescription = description
    return sr


def make_seg(
    headers: Sequence,
    slices: Sequence[tuple[int, int]],
    masks: np.ndarray,
    model: ModelInfo,
    series_uid: str,
    series_number: int,
    description: str,
):
    """A binary DICOM SEG (one segment: the region above the threshold) on the source ``slices``.

    Args:
        headers: the source instances.
        slices: ``[(instance index, frame)]``: all frames of one multi-frame instance, or single-frame
            instances of one series.
        masks: ``(len(slices), H, W)`` bool.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    instances = sorted({i for i, _ in slices})
    sources = [_without_invalid_geometry(headers[i]) for i in instances]
    if len(sources) == 1 and int(sources[0].get("NumberOfFrames", 1) or 1) > 1:
        frames = np.zeros((int(sources[0].NumberOfFrames), *masks.shape[1:]), dtype=bool)
        for (_, f), m in zip(slices, masks):
            frames[f] = m
        masks = frames
    algo = hd.AlgorithmIdentificationSequence(
        name=model.name,
        family=codes.cid7162.ArtificialIntelligence,
        version=model.software_version,
        parameters={k: v for k, v in (p.split("=", 1) for p in model.parameter_list())},
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Anomaly above threshold",
        segmented_property_category=_code("49755003", "Morphologically abnormal structure", "SCT"),
        segmented_property_type=_code(*CODES["region"]),
        algorithm_type="AUTOMATIC",
        algorithm_identification=algo,
    )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=masks.astype(bool),
        segmentation_type="BINARY",
        segment_descriptions=[segment],
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=model.name,
        software_versions=model.software_version,
        device_serial_number="0",
        omit_empty_frames=False,
        content_label="SKIPTS",
        content_description=f"{model.name} region above threshold; {DISCLAIMER}"[:64],
    )
    seg.SeriesDescription = description
    if "FrameOfReferenceUID" not in seg and "PatientOrientation" not in seg:  # type 2C without a frame of reference
        po = patient_orientation(sources[0])
        seg.PatientOrientation = list(po) if po else None
    return seg
