"""Score a DICOM study and write the results as DICOM objects in the same study.

:func:`score_study` reads a study folder (:func:`~monai_skipts.dicom.study.read_study`), scores every
scorable series with an :class:`~monai_skipts.inference.AnomalyPredictor` (each instance, or each frame
of a multi-frame instance, as a 2-D image, exactly as ``python -m monai_skipts.inference`` scores the
files; a stack's slice scores aggregate to a volume score with the checkpoint's aggregation) and writes,
per source series, under ``<output>/<series-NNN-MODALITY>/``:

- ``SC/NNNN.dcm``: a Secondary Capture series, one RGB image per scored slice (heat map over the
  source image, result burned in);
- ``SR.dcm``: a Comprehensive SR (TID 1500) with the scores and decisions, referencing the source;
- ``SEG-NN.dcm`` (``seg=True``): a DICOM SEG of the region at or above the threshold, per decision unit.

and ``<output>/dicom_results.json``: the scores and decisions per series and the files written (names
free of patient data: no UID, no header value). Logs say the same. Warnings that pydicom or highdicom
raise while the objects are made (they can quote header values) are counted, not shown.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from monai_skipts.progress import progress_bar

from .render import DISCLAIMER, burn_in_text, frame_to_grey, overlay_rgb
from .study import Series, read_study
from .writers import ModelInfo, make_sc, make_seg, make_sr, save_dataset

__all__ = ["score_study", "model_info", "scrub", "quiet_loggers"]

logger = logging.getLogger(__name__)

SERIES_NUMBER_BASE = {"SC": 9000, "SR": 9300, "SEG": 9600}
"""New series are numbered ``base + source series index`` (viewers list them after the source)."""

_PHI_KEYS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "AccessionNumber",
    "InstitutionName",
    "StudyID",
    "ReferringPhysicianName",
    "StudyDescription",
    "SeriesDescription",
    "OperatorsName",
    "PatientAddress",
    "OtherPatientIDs",
    "InstitutionAddress",
    "PerformingPhysicianName",
)
_UID = re.compile(r"\b\d+(?:\.\d+){3,}\b")


@contextlib.contextmanager
def quiet_loggers(*names: str, level: int = logging.ERROR):
    """Keep the loggers ``names`` at ``level`` or above meanwhile: highdicom logs the source SOP
    instance UIDs it copies from (INFO), dicomweb-client the request URLs (which hold UIDs)."""
    saved = [(lg, lg.level) for lg in map(logging.getLogger, names)]
    for lg, old in saved:
        lg.setLevel(max(level, old))
    try:
        yield
    finally:
        for lg, old in saved:
            lg.setLevel(old)


def scrub(message: str, headers=()) -> str:
    """``message`` without UIDs and without the identifying header values of ``headers`` (for the logs
    and ``dicom_results.json``: library error messages can quote them)."""
    text = _UID.sub("<uid>", " ".join(str(message).split()))
    for ds in headers:
        for key in _PHI_KEYS:
            value = str(ds.get(key, "") or "")
            for form in {value, value.replace("^", " ")}:
                if len(form) >= 3:
                    text = text.replace(form, "<redacted>")
    return text[:500]


def model_info(predictor, checkpoint: str | os.PathLike | None = None) -> ModelInfo:
    """What the objects say about the model: name, package version, teacher, checkpoint digest,
    volume aggregation, preprocessing preset."""
    import monai_skipts

    digest = ""
    if checkpoint is not None and os.path.isfile(str(checkpoint)):
        from monai_skipts.utils import file_sha256

        digest = file_sha256(checkpoint)
    extra = {"modality_preset": str(getattr(predictor, "modality", "") or "")}
    return ModelInfo(
        name="Skip-TS",
        version=f"monai-skipts {monai_skipts.__version__}",
        teacher=str(getattr(predictor, "teacher", "")),
        checkpoint_sha256=digest,
        aggregation=str(getattr(predictor, "volume_aggregation", "max")),
        parameters=extra,
    )


def _fit(amap: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The map at the frame's size (it already is, for DICOM sources; resized bilinearly otherwise)."""
    amap = np.asarray(amap, dtype=np.float32)
    if amap.shape == tuple(shape):
        return amap
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(amap)[None, None]
    return F.interpolate(t, size=tuple(shape), mode="bilinear", align_corners=False)[0, 0].numpy()


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def _score_series(predictor, s: Series) -> dict[tuple[int, int], dict[str, Any]]:
    """``{(instance index, frame): result}`` for every slice of the series (predictor results: score,
    threshold, anomalous, normalized_score, map)."""
    items = [{"image": str(p), "id": f"{s.name}/{i + 1:04d}"} for i, p in enumerate(s.files)]
    index = {it["id"]: i for i, it in enumerate(items)}
    out = {}
    for rec in predictor.predict_items(items):
        i = index[rec["id"]]
        frame = int(rec.get("slice_index", 0) or 0) if s.n_frames(i) > 1 else 0
        out[(i, frame)] = rec
    return out


def _volume_decision(predictor, scores: list[float]) -> dict[str, Any]:
    from monai_skipts.transforms import aggregate_volume_scores

    agg = aggregate_volume_scores(
        [0] * len(scores), scores, getattr(predictor, "volume_aggregation", "max"), int(getattr(predictor, "topk", 3))
    )[0]
    return predictor.decide(agg)


def _process_series(predictor, s: Series, out: Path, model: ModelInfo, seg: bool) -> dict[str, Any]:
    from pydicom.uid import generate_uid

    results = _score_series(predictor, s)
    folder = out / s.name
    threshold = getattr(predictor, "threshold", None)
    scores = [float(r["score"]) for r in results.values()]
    vmax = 2.0 * threshold if threshold else max(scores + [1e-6])
    units, groups = [], []
    slice_text: dict[tuple[int, int], list[str]] = {}
    slice_alarm: dict[tuple[int, int], bool] = {}
    slice_short: dict[tuple[int, int], list[str]] = {}  # for small images
    aggregation = str(getattr(predictor, "volume_aggregation", "max"))
    for u in s.units:
        missing = [sl for sl in u.slices if sl not in results]
        if missing:
            raise RuntimeError(f"{len(missing)} slices of {u.label} were not scored")
        if u.kind == "volume":
            dec = _volume_decision(predictor, [float(results[sl]["score"]) for sl in u.slices])
        else:
            dec = {k: results[u.slices[0]][k] for k in ("score", "threshold", "anomalous", "normalized_score")}
        verdict = "n/a" if dec["anomalous"] is None else ("ANOMALOUS" if dec["anomalous"] else "normal")
        units.append({"unit": u.label, "kind": u.kind, "n_slices": len(u.slices), **dec})
        groups.append({"kind": u.kind, "label": f"{s.name} {u.label}", "slices": u.slices, "decision": dec})
        for n, sl in enumerate(u.slices):
            r = results[sl]
            sv = "n/a" if r["anomalous"] is None else ("above" if r["anomalous"] else "below")
            if u.kind == "volume":
                groups.append(
                    {"kind": "slice", "label": f"{s.name} {u.label} slice {n + 1}", "slices": [sl], "decision": r}
                )
                slice_text[sl] = [
                    f"Skip-TS slice {n + 1}/{len(u.slices)}: score {_fmt(r['score'])} ({sv} threshold {_fmt(threshold)})",
                    f"Volume ({aggregation} of {len(u.slices)} slices): {_fmt(dec['score'])} {verdict}",
                ]
                slice_alarm[sl] = bool(dec["anomalous"])
                slice_short[sl] = [f"{_fmt(r['score'])}/{_fmt(threshold)}", f"vol {_fmt(dec['score'])} {verdict}"]
            else:
                norm = "" if r["normalized_score"] is None else f", normalised {r['normalized_score']:.2f}"
                slice_text[sl] = [f"Skip-TS score {_fmt(r['score'])}, threshold {_fmt(threshold)}{norm}", verdict]
                slice_alarm[sl] = bool(r["anomalous"])
                slice_short[sl] = [f"{_fmt(r['score'])}/{_fmt(threshold)}", verdict]

    written: list[str] = []
    sc_uid = generate_uid()
    desc = f"Skip-TS heat map {s.modality} #{s.index} {DISCLAIMER}"[:64]
    ordered = [sl for u in s.units for sl in u.slices]
    for n, (i, f) in enumerate(ordered, start=1):
        src = s.headers[i]
        r = results[(i, f)]
        grey = frame_to_grey(src, f)
        rgb = overlay_rgb(grey, _fit(r["map"], grey.shape[:2]), threshold, vmax)
        rgb = burn_in_text(
            rgb, slice_text[(i, f)], [DISCLAIMER], alarm=slice_alarm[(i, f)], compact=slice_short[(i, f)]
        )
        sc = make_sc(src, f, rgb, sc_uid, SERIES_NUMBER_BASE["SC"] + s.index, n, model, desc)
        path = folder / "SC" / f"{n:04d}.dcm"
        save_dataset(sc, path)
        written.append(path.relative_to(out).as_posix())

    sr = make_sr(
        s.headers,
        groups,
        model,
        generate_uid(),
        SERIES_NUMBER_BASE["SR"] + s.index,
        f"Skip-TS anomaly report {s.modality} #{s.index}"[:64],
    )
    save_dataset(sr, folder / "SR.dcm")
    written.append(f"{s.name}/SR.dcm")

    seg_notes = []
    if seg:
        if threshold is None:
            seg_notes.append("no SEG: the checkpoint has no threshold")
        else:
            seg_uid = generate_uid()
            for k, u in enumerate(s.units, start=1):
                masks = np.stack(
                    [
                        _fit(results[sl]["map"], (int(s.headers[sl[0]].Rows), int(s.headers[sl[0]].Columns)))
                        >= threshold
                        for sl in u.slices
                    ]
                )
                try:
                    obj = make_seg(
                        s.headers,
                        u.slices,
                        masks,
                        model,
                        seg_uid,
                        SERIES_NUMBER_BASE["SEG"] + s.index,
                        f"Skip-TS region above threshold {s.modality} #{s.index}"[:64],
                    )
                except Exception as e:  # highdicom refuses some geometries (mixed orientations...)
                    seg_notes.append(f"no SEG for {u.label}: {type(e).__name__}: {scrub(e, s.headers)}")
                    continue
                obj.InstanceNumber = k
                save_dataset(obj, folder / f"SEG-{k:02d}.dcm")
                written.append(f"{s.name}/SEG-{k:02d}.dcm")
    return {
        "series": s.name,
        "modality": s.modality,
        "n_instances": len(s.files),
        "units": units,
        "files": written,
        "notes": seg_notes,
    }


def score_study(
    predictor,
    study: str | os.PathLike,
    output: str | os.PathLike,
    seg: bool = False,
    checkpoint: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Score the study in folder ``study`` and write the DICOM results under ``output`` (see the module
    docstring). Returns the summary that ``dicom_results.json`` holds: ``series`` (per scored series:
    units with score/threshold/anomalous/normalized_score, files written), ``skipped`` and ``errors``
    (series not scored, with the reason), ``files`` (every file written, relative to ``output``).

    A series that fails is listed in ``errors`` and the others are still written.
    """
    from monai_skipts.utils import atomic_write_json

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    model = model_info(predictor, checkpoint)
    series, skipped = read_study(study)
    done, errors = [], []
    n_warnings = 0
    for s in progress_bar(series, desc="scoring series", unit="series"):  # a bar on a terminal only
        with warnings.catch_warnings(record=True) as caught, quiet_loggers("highdicom", "pydicom"):
            warnings.simplefilter("always")
            try:
                rec = _process_series(predictor, s, out, model, seg)
            except Exception as e:
                reason = f"{type(e).__name__}: {scrub(e, s.headers)}"
                errors.append({"series": s.name, "reason": reason})
                logger.warning("%s: not scored: %s", s.name, reason)
                continue
            finally:
                n_warnings += len(caught)
        done.append(rec)
        for u in rec["units"]:
            logger.info(
                "%s %s: score %s, threshold %s, %s",
                s.name,
                u["unit"],
                _fmt(u["score"]),
                _fmt(u["threshold"]),
                "no decision" if u["anomalous"] is None else ("ANOMALOUS" if u["anomalous"] else "normal"),
            )
        for note in rec["notes"]:
            logger.warning("%s: %s", s.name, note)
    for sk in skipped:
        logger.info("%s: skipped: %s", sk["series"], sk["reason"])
    if n_warnings:
        logger.debug(
            "%d warnings from pydicom/highdicom while writing (not shown: they can quote header values)", n_warnings
        )
    summary = {
        "series": done,
        "skipped": skipped,
        "errors": errors,
        "files": [f for r in done for f in r["files"]],
        "seg": bool(seg),
    }
    atomic_write_json(out / "dicom_results.json", summary, indent=1)
    logger.info("wrote %d DICOM files for %d series into %s", len(summary["files"]), len(done), out)
    return summary
