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

Safe to run twice: the result series of a source series are numbered from the source series' index
(this app's own earlier results take no index) and their SeriesInstanceUIDs derive from the source
series and the algorithm identification (:func:`result_series_uid`): the same model's earlier results
in the study are found and skipped (or, with ``replace``, scored again). The output folder must be new,
empty or hold this app's results of the same study (they are replaced), and lie outside the study
folder; it is checked for writing before any scoring (:func:`~monai_skipts.dicom.preflight.check_output`). A series with a file
that cannot be used (0 bytes, cut short) is not scored, and the summary names the file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from monai_skipts.progress import ScoringInterrupted, progress_bar

from .preflight import check_output, quiet_loggers
from .render import DISCLAIMER, burn_in_text, frame_to_grey, overlay_rgb
from .study import MANUFACTURER, Series, Study, read_study, scrub
from .writers import ModelInfo, make_sc, make_seg, make_sr, save_dataset

__all__ = [
    "score_study",
    "model_info",
    "result_series_uid",
    "earlier_results",
    "problems",
]

logger = logging.getLogger(__name__)

SERIES_NUMBER_BASE = {"SC": 9000, "SR": 9300, "SEG": 9600}
"""New series are numbered ``base + source series index`` (viewers list them after the source)."""


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
    return predictor.decide_volume(agg)


def _pct(x: Any) -> str:
    return f"{100 * float(x):.1f} %"


def threshold_texts(decision: dict[str, Any], record: dict[str, Any] | None, outline: tuple) -> dict[str, str]:
    """The SR's text items about the thresholds of one decision: ``{"threshold_applied",
    "threshold_fpr", "outline_threshold"}`` (keys of :data:`~monai_skipts.dicom.writers.CODES`;
    absent when unknown).

    Args:
        decision: the decision (``threshold``, ``threshold_kind``: ``"image"`` or ``"volume"``).
        record: the checkpoint's calibration record (``config["calibration"]``; its ``"volume"`` and
            ``"pixel"`` sub-records), or ``None``.
        outline: ``(value, kind)`` of the outline threshold
            (:meth:`~monai_skipts.networks.AnomalyDetector.outline_threshold`).
    """
    out: dict[str, str] = {}
    kind = decision.get("threshold_kind") or "image"
    if decision.get("threshold") is None:
        out["threshold_applied"] = "none: the checkpoint has no calibrated threshold; no decision"
    else:
        what = {"volume": "volume threshold (calibrated on volume scores)", "image": "image threshold"}[kind]
        out["threshold_applied"] = f"{what} {_fmt(decision['threshold'])}"
        rec = (record or {}).get("volume") if kind == "volume" else record
        if rec and rec.get("fpr_bound") is not None:
            conf = float(rec.get("fpr_bound_confidence") or 0.9)
            out["threshold_fpr"] = (
                f"target FPR {_pct(rec['target_fpr'])}; expected {_pct(rec['fpr_expected'])}; at most "
                f"{_pct(rec['fpr_bound'])} with {100 * conf:g} % confidence "
                f"({rec.get('n_normals', '?')} calibration normals, {rec.get('method', '?')})"
            )
    value, okind = outline
    if value is not None:
        pixel = (record or {}).get("pixel") or {}
        at = f" at pixel FPR {_pct(pixel['target_fpr'])}" if okind == "pixel" and pixel.get("target_fpr") else ""
        out["outline_threshold"] = f"{okind} threshold {_fmt(value)}{at}"
    return out


def _process_series(predictor, s: Series, out: Path, model: ModelInfo, seg: bool) -> dict[str, Any]:
    results = _score_series(predictor, s)
    folder = out / s.name
    threshold = getattr(predictor, "threshold", None)
    outline = predictor.detector.outline_threshold()  # the pixel threshold when calibrated, else the image one
    record = predictor.threshold_record
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
            dec["threshold_kind"] = None if dec["threshold"] is None else "image"
        verdict = "n/a" if dec["anomalous"] is None else ("ANOMALOUS" if dec["anomalous"] else "normal")
        units.append(
            {
                "unit": u.label,
                "kind": u.kind,
                "n_slices": len(u.slices),
                **dec,
                "outline_threshold": outline[0],
                "outline_kind": outline[1],
            }
        )
        groups.append(
            {
                "kind": u.kind,
                "label": f"{s.name} {u.label}",
                "slices": u.slices,
                "decision": dec,
                "texts": threshold_texts(dec, record, outline),
            }
        )
        for n, sl in enumerate(u.slices):
            r = results[sl]
            sv = "n/a" if r["anomalous"] is None else ("above" if r["anomalous"] else "below")
            if u.kind == "volume":
                groups.append(
                    {"kind": "slice", "label": f"{s.name} {u.label} slice {n + 1}", "slices": [sl], "decision": r}
                )
                slice_text[sl] = [
                    f"Skip-TS slice {n + 1}/{len(u.slices)}: score {_fmt(r['score'])} ({sv} threshold {_fmt(threshold)})",
                    f"Volume ({aggregation} of {len(u.slices)} slices): {_fmt(dec['score'])} {verdict}"
                    f" ({dec['threshold_kind'] or 'no'} threshold {_fmt(dec['threshold'])})",
                ]
                slice_alarm[sl] = bool(dec["anomalous"])
                slice_short[sl] = [f"{_fmt(r['score'])}/{_fmt(threshold)}", f"vol {_fmt(dec['score'])} {verdict}"]
            else:
                norm = "" if r["normalized_score"] is None else f", normalised {r['normalized_score']:.2f}"
                slice_text[sl] = [f"Skip-TS score {_fmt(r['score'])}, threshold {_fmt(threshold)}{norm}", verdict]
                slice_alarm[sl] = bool(r["anomalous"])
                slice_short[sl] = [f"{_fmt(r['score'])}/{_fmt(threshold)}", verdict]

    written: list[str] = []
    sc_uid = result_series_uid(s.series_uid, model, "SC")
    desc = f"Skip-TS heat map {s.modality} #{s.index} {DISCLAIMER}"[:64]
    ordered = [sl for u in s.units for sl in u.slices]
    for n, (i, f) in enumerate(ordered, start=1):
        src = s.headers[i]
        r = results[(i, f)]
        grey = frame_to_grey(src, f)
        rgb = overlay_rgb(grey, _fit(r["map"], grey.shape[:2]), threshold, vmax, outline_threshold=outline[0])
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
        result_series_uid(s.series_uid, model, "SR"),
        SERIES_NUMBER_BASE["SR"] + s.index,
        f"Skip-TS anomaly report {s.modality} #{s.index}"[:64],
    )
    save_dataset(sr, folder / "SR.dcm")
    written.append(f"{s.name}/SR.dcm")

    seg_notes = []
    if seg:
        if outline[0] is None:
            seg_notes.append("no SEG: the checkpoint has no threshold")
        else:
            seg_uid = result_series_uid(s.series_uid, model, "SEG")
            for k, u in enumerate(s.units, start=1):
                masks = np.stack(
                    [
                        _fit(results[sl]["map"], (int(s.headers[sl[0]].Rows), int(s.headers[sl[0]].Columns)))
                        >= outline[0]
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


RESULT_KINDS = ("SC", "SR", "SEG")


def result_series_uid(source_series_uid: str, model: ModelInfo, kind: str) -> str:
    """The SeriesInstanceUID of the ``kind`` (SC, SR or SEG) result series of a source series by a model:
    derived from the source SeriesInstanceUID and the algorithm identification (name, version,
    parameters: teacher, checkpoint digest, aggregation), so that a second run of the same model on
    the same series finds its earlier results (:func:`earlier_results`), and a different model does
    not."""
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[MANUFACTURER, kind, source_series_uid, model.identity])


def earlier_results(study: Study, model: ModelInfo) -> dict[str, dict[str, str]]:
    """``{source series name: {kind: result SeriesInstanceUID}}``: this model's earlier results of each
    series of ``study`` found in the study (by :func:`result_series_uid`)."""
    out = {}
    for s in study.series:
        found = {k: u for k in RESULT_KINDS if (u := result_series_uid(s.series_uid, model, k)) in study.earlier}
        if found:
            out[s.name] = found
    return out


def _claim_output(out: Path, study: Study) -> list[str]:
    """Make ``out`` ready for the results of ``study``: refuse a folder holding other files or another
    study's results; remove this app's own files from an earlier run on the same study (stale SEG...).
    Returns the removed files (relative)."""
    import pydicom

    from monai_skipts.utils import InputDataError, remove_stale_temp_files

    remove_stale_temp_files(out)
    own, foreign, studies = [], [], set()
    for p in sorted(x for x in out.rglob("*") if not x.is_dir()):
        rel = p.relative_to(out)
        if rel.as_posix() == "dicom_results.json":
            own.append(p)
            continue
        if rel.parts[0].startswith("series-") and p.suffix == ".dcm":
            try:
                ds = pydicom.dcmread(str(p), specific_tags=["Manufacturer", "StudyInstanceUID"])
            except Exception:
                ds = None
            if ds is not None and str(ds.get("Manufacturer", "")) == MANUFACTURER:
                own.append(p)
                studies.add(str(ds.get("StudyInstanceUID", "")))
                continue
        foreign.append(rel.as_posix())
    if foreign:
        raise InputDataError(
            out,
            f"the output folder is not empty: it holds {len(foreign)} files this app did not write "
            f"(e.g. {scrub(foreign[0])}); give an empty or new folder",
        )
    if studies - study.study_uids:
        raise InputDataError(
            out,
            "the output folder holds the results of another study; give an empty or new folder (one per study)",
        )
    for p in own:
        p.unlink()
    for d in sorted((x for x in out.rglob("*") if x.is_dir()), key=lambda x: -len(x.parts)):
        with contextlib.suppress(OSError):
            d.rmdir()  # only empty ones
    return [p.relative_to(out).as_posix() for p in own]


def problems(summary: dict[str, Any]) -> list[str]:
    """One line per reason why the run did not score the whole study (empty when it did): series not
    scored, files that cannot be read, nothing to score."""
    out = [f"{e['series']}: not scored: {e['reason']}" for e in summary.get("errors", [])]
    out += [f"{u['file']}: cannot be read: {u['reason']}" for u in summary.get("unreadable", [])]
    if not summary.get("series") and not summary.get("already_scored") and not out:
        parts = [f"{len(summary.get('skipped', []))} series are no images to score"]
        if summary.get("ignored"):
            ignored = summary["ignored"]
            parts.append(
                f"{len(ignored)} files are not DICOM ({', '.join(ignored[:3])}{', ...' if len(ignored) > 3 else ''})"
            )
        out.append("nothing to score: " + "; ".join(parts))
    return out


def score_study(
    predictor,
    study: str | os.PathLike,
    output: str | os.PathLike,
    seg: bool = False,
    checkpoint: str | os.PathLike | None = None,
    replace: bool = False,
) -> dict[str, Any]:
    """Score the study in folder ``study`` and write the DICOM results under ``output`` (see the module
    docstring).

    Args:
        predictor: an :class:`~monai_skipts.inference.AnomalyPredictor`.
        study: the folder holding the study's DICOM files.
        output: where the results go: a new or empty folder, or one holding this app's results of the
            same study (they are replaced: stale files removed).
        seg: also write a SEG per decision unit.
        checkpoint: the model file (its digest goes into the algorithm identification).
        replace: score again the series whose results by this model are already in the study (a
            pulled PACS study); by default they are skipped (``already_scored``).

    Returns:
        The summary that ``dicom_results.json`` holds: ``series`` (per scored series: units with
        score/threshold/anomalous/normalized_score, files written, notes), ``skipped`` (series that are
        no images), ``errors`` (series not scored, with the reason: incomplete series name the file at
        fault), ``unreadable`` (files that should be DICOM and cannot be read), ``ignored`` (files that
        are not DICOM), ``already_scored``, ``earlier_results`` (count of this app's series found in the
        study), ``files`` (every file written, relative to ``output``), ``complete`` (every image series
        scored, no file unreadable).

    Raises:
        InputDataError: ``study`` is no folder or holds no file; ``output`` is inside ``study``, holds
            other files or another study's results.
        OSError: ``output`` cannot be written (found before any scoring).

    A series that fails is listed in ``errors`` and the others are still written.
    """
    from monai_skipts.utils import atomic_write_json

    out = check_output(output, study)
    model = model_info(predictor, checkpoint)
    st = read_study(study)
    _claim_output(out, st)
    earlier = earlier_results(st, model)
    done, errors, already = [], [], []
    names = {s.name for s in st.series}
    for name, files in st.broken.items():
        if name not in names:
            errors.append({"series": name, "reason": _incomplete_reason(files)})
    n_warnings = 0
    current: list[Series] = []  # the series being scored: its partial results go on Ctrl-C
    try:
        for s in progress_bar(st.series, desc="scoring series", unit="series"):  # a bar on a terminal only
            current[:] = [s]
            bad = st.incomplete(s)
            if bad:
                errors.append({"series": s.name, "reason": _incomplete_reason(bad)})
                continue
            if s.name in earlier and not replace:
                kinds = ", ".join(earlier[s.name])
                already.append({"series": s.name, "results": list(earlier[s.name])})
                logger.info(
                    "%s: already scored by this model (%s in the study): skipped; --replace scores it again",
                    s.name,
                    kinds,
                )
                continue
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
            if s.not_volume:
                rec["notes"].insert(0, f"not scored as one volume: {s.not_volume}; each instance is scored as an image")
            if s.name in earlier:
                rec["replaces"] = list(earlier[s.name])
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
    except KeyboardInterrupt:  # Ctrl-C: keep the series written in full, drop the one being written
        if current and current[0].name not in {r["series"] for r in done}:
            shutil.rmtree(out / current[0].name, ignore_errors=True)
        summary = _summary(st, done, errors, already, seg, "interrupted")
        path = atomic_write_json(out / "dicom_results.json", summary, indent=1)
        interrupted = ScoringInterrupted(summary, errors, len(done), len(st.series))
        interrupted.args = (
            f"interrupted: {len(done)} of {len(st.series)} series scored and written to {out}; the others were not "
            f"scored ({path}: status interrupted)",
        )
        raise interrupted from None
    for e in errors:
        if e["reason"].startswith("incomplete"):
            logger.error("%s: not scored: %s", e["series"], e["reason"])
    for u in st.unreadable:
        logger.error("%s: cannot be read: %s", u["file"], u["reason"])
    if st.ignored:
        more = ", ..." if len(st.ignored) > 5 else ""
        logger.warning(
            "%d files are not DICOM and were not read: %s%s", len(st.ignored), ", ".join(st.ignored[:5]), more
        )
    for sk in st.skipped:
        logger.info("%s: skipped: %s", sk["series"], sk["reason"])
    if st.earlier:
        logger.info("%d series of earlier results by %s in the study: not scored", len(st.earlier), MANUFACTURER)
    if n_warnings:
        logger.debug(
            "%d warnings from pydicom/highdicom while writing (not shown: they can quote header values)", n_warnings
        )
    summary = _summary(st, done, errors, already, seg, "incomplete" if errors or st.unreadable else "complete")
    atomic_write_json(out / "dicom_results.json", summary, indent=1)
    logger.info("wrote %d DICOM files for %d series into %s", len(summary["files"]), len(done), out)
    return summary


def _summary(st: Study, done: list, errors: list, already: list, seg: bool, status: str) -> dict[str, Any]:
    """What ``dicom_results.json`` holds (:func:`score_study`); ``status``: one of
    :data:`~monai_skipts.progress.RUN_STATUSES` but ``running``."""
    return {
        "series": done,
        "skipped": st.skipped,
        "errors": errors,
        "unreadable": [{"file": u["file"], "reason": u["reason"]} for u in st.unreadable],
        "ignored": st.ignored,
        "already_scored": already,
        "earlier_results": len(st.earlier),
        "files": [f for r in done for f in r["files"]],
        "seg": bool(seg),
        "complete": status == "complete",
        "status": status,
    }


def _incomplete_reason(files: list[dict[str, str]]) -> str:
    listed = "; ".join(f"{f['file']}: {f['reason']}" for f in files[:5])
    more = f"; and {len(files) - 5} more" if len(files) > 5 else ""
    return f"incomplete: {len(files)} file(s) of this series or its folder cannot be used ({listed}{more})"
