"""Inference with a trained checkpoint on files a hospital has: PNG/JPG, DICOM (single, multi-frame,
series folders), NIfTI/NRRD volumes. Volumes are scored slice-wise and aggregated to a volume score.

The files a run writes under ``output_dir`` (tables and maps) are described in
:mod:`monai_skipts.inference_writers`.

One bad input does not lose the batch: everything else is scored and written, every failure is listed
in ``errors.csv``, and :class:`InferenceIncompleteError` is raised at the end (the command line and
``python -m monai.bundle run`` exit non-zero). ``fail_fast=True`` stops at the first bad input instead.

``status.json`` says how the run ended (:func:`~monai_skipts.progress.write_run_status`): ``running``
while it scores (a run killed outright leaves that; not with ``fail_fast``), ``complete``, ``incomplete`` (see ``errors.csv``) or
``interrupted``: on Ctrl-C the inputs scored so far are written (their rows and maps; a volume only
when all its slices were scored), the rest are not, and the command line exits 130 with one line. A
progress bar shows on a terminal (``--progress on|off`` forces it).

Command line::

    python -m monai_skipts.inference --checkpoint runs/brainmri/model.pt --input scans/ --output_dir out/
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor

from monai_skipts.backends import BACKENDS
from monai_skipts.checkpoint import load_checkpoint, load_detector
from monai_skipts.data import is_image_file
from monai_skipts.data.files import relative_id
from monai_skipts.inference_writers import map_names, write_maps, write_tables
from monai_skipts.progress import ScoringInterrupted, progress_bar, write_run_status
from monai_skipts.transforms import (
    LoadMedicalImage,
    VolumeToSlices,
    aggregate_volume_scores,
    build_preprocessing,
    expand_volume_datalist,
    preprocessing_spec,
    slice_to_plane,
)
from monai_skipts.transforms.presets import SPEC_KEYS
from monai_skipts.utils import InputDataError, atomic_save, resolve_device

__all__ = ["AnomalyPredictor", "InferenceIncompleteError", "list_inputs"]

logger = logging.getLogger(__name__)


class InferenceIncompleteError(InputDataError):
    """Some inputs could not be scored. Everything else was scored and written; ``errors.csv`` (the
    error's ``path``) lists every failure with its reason.

    Attributes:
        summary: the run's summary (``n_images``, ``n_volumes``, ``n_anomalous``, ``n_errors``).
        errors: ``[{"file": id, "reason": ...}]``.
    """

    def __init__(
        self,
        path: str | os.PathLike | None,
        problem: str,
        summary: dict | None = None,
        errors: list[dict] | None = None,
    ):
        super().__init__(path, problem)
        self.summary = dict(summary or {})
        self.errors = list(errors or [])


def list_inputs(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[dict]:
    """Datalist items ``{"image": path, "id": ...}`` from a folder (every image file below it), a file
    (a folder holding one DICOM series counts as a file in a list), or a list of paths.

    Ids are POSIX paths relative to the input root: the folder given; the file's folder for one file;
    for a list, the deepest folder holding every entry (``[".../p1/ct.nii.gz", ".../p2/ct.nii.gz"]`` ->
    ``p1/ct.nii.gz``, ``p2/ct.nii.gz``). Entries of a list are not checked here: a missing one fails on
    its own when scored.
    """
    if isinstance(inputs, (str, os.PathLike)):
        root = Path(inputs)
        if root.is_dir():
            files = sorted(
                p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".") and is_image_file(p)
            )
            if not files:
                raise InputDataError(root, "no image files (PNG/JPG/DICOM/NIfTI/NRRD) found in this folder")
            return [{"image": str(p), "id": p.relative_to(root).as_posix()} for p in files]
        if not root.exists():
            raise InputDataError(root, "input not found")
        return [{"image": str(root), "id": root.name}]
    paths = [os.path.abspath(p) for p in inputs]
    if not paths:
        raise InputDataError(None, "no inputs given (an empty list of files)")
    try:
        base = os.path.commonpath([os.path.dirname(p) for p in paths])
    except ValueError:  # different drives (Windows): file names only
        return [{"image": str(p), "id": Path(p).name} for p in inputs]
    return [{"image": str(p), "id": relative_id(a, base)} for p, a in zip(inputs, paths)]


def _input_error(exc: BaseException) -> InputDataError | None:
    """The :class:`InputDataError` behind ``exc`` (MONAI's ``Compose`` wraps it in a RuntimeError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, InputDataError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


class AnomalyPredictor:
    """A trained model ready to score files, datalists, loaded images, arrays and volumes.

    The one predictor of the package: bundle inference (``run``), MONAI Label
    (:mod:`monai_skipts.label`) and the MLflow model
    (:mod:`monai_skipts.registry`) all score through it.

    - Preprocessing is the training's: :func:`~monai_skipts.transforms.preset_transforms` with the
      options the checkpoint stores (:func:`~monai_skipts.transforms.preprocessing_spec`: modality,
      spatial size, CT window, MRI normalisation), on files (``run``, :meth:`predict_items`: the
      bundle's chain from the path) and on loaded images (:meth:`score_images`, :meth:`score_volume`,
      :meth:`score_file`: the same chain after :class:`~monai_skipts.transforms.LoadMedicalImage`).
    - Volumes are scored slice-wise along ``volume_axis``; slice scores aggregate to a volume score
      (:func:`~monai_skipts.transforms.aggregate_volume_scores`).
    - The network is the checkpoint's :class:`~monai_skipts.networks.AnomalyDetector`
      (:func:`~monai_skipts.checkpoint.load_detector`); it sees plain tensors in channels-last memory
      format, batched, under :func:`torch.inference_mode`; its ``decide`` is the decision.

    Args:
        checkpoint: the training run's ``model.pt`` (holds the threshold and the preprocessing
            options), or the loaded checkpoint dict.
        teacher_weights: the teacher's weights file when not in the default place.
        device: ``"auto"`` / ``"cpu"`` / ``"cuda"``.
        volume_axis: slicing axis for volumes (2 = axial); ``slice_axis`` is the same option under
            the name MONAI Label's settings use.
        volume_aggregation: ``"max"``, ``"mean"`` or ``"topk"`` slice scores → volume score.
        batch_size: images per forward pass.
        topk: slices averaged by the ``"topk"`` aggregation.
        max_pixels: largest picture or DICOM frame accepted (see
            :class:`~monai_skipts.transforms.LoadMedicalImage`); ``None``: ``$MONAI_SKIPTS_MAX_PIXELS``
            or the default (40 megapixels); 0: no limit.
        modality, spatial_size, window, mri_norm: override the checkpoint's preprocessing options.
        sigma: Gaussian sigma of the map; default the checkpoint's.
        backend: the network's runtime: ``"torch"`` (eager PyTorch, any device; the default),
            ``"onnxruntime"`` or ``"openvino"`` (the exported graph: the detector's whole forward, so
            standardisation, anatomy mask, blur, segmentation head and score included, on the CPU;
            extras ``onnxruntime`` / ``openvino``). The preprocessing stays
            the same Python chain; only the forward pass is swapped. The export is made once, checked
            against the eager model (1e-4) and cached next to the checkpoint
            (:func:`~monai_skipts.export_cache.backend_cache_paths`: keyed by the checkpoint's SHA-256, the
            input size and sigma; a partial or corrupted file is rebuilt), or in ``export_cache_dir``.
        num_threads: CPU threads of the forward pass (``None``: the runtime's default; for
            ``"torch"`` it sets ``torch.set_num_threads``, which is process-wide).

    Attributes:
        threshold, scale: the calibrated decision threshold and the scale of the normalised score
            (``None`` when the checkpoint has none); ``threshold_record`` the whole calibration record.
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike | dict[str, Any],
        teacher_weights: str | os.PathLike | None = None,
        device: str | torch.device = "auto",
        volume_axis: int = 2,
        volume_aggregation: str = "max",
        batch_size: int = 16,
        topk: int = 3,
        max_pixels: int | None = None,
        modality: str | None = None,
        spatial_size: int | Sequence[int] | None = None,
        window: str | Sequence[float] | None = None,
        mri_norm: str | None = None,
        sigma: float | None = None,
        slice_axis: int | None = None,
        backend: str = "torch",
        num_threads: int | None = None,
        export_cache_dir: str | os.PathLike | None = None,
    ):
        backend = str(backend or "torch").lower()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.num_threads = None if num_threads in (None, "", 0) else int(num_threads)
        if backend != "torch":  # the exported graph runs on the CPU
            if str(device) not in ("auto", "cpu"):
                raise ValueError(
                    f"backend {backend!r} runs on the CPU; got device={device!r} (use backend='torch' for a GPU)"
                )
            device = "cpu"
        elif self.num_threads:
            torch.set_num_threads(self.num_threads)
        self.device = resolve_device(device)
        source = "checkpoint" if isinstance(checkpoint, dict) else str(checkpoint)
        ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
        #: the trained detector: the one image -> (map, score) path and the one decision
        self.detector = load_detector(ckpt, teacher_weights, map_location=self.device)
        if sigma is not None and float(sigma) != self.detector.sigma:
            self.detector.set_sigma(sigma)
        spec = preprocessing_spec(self.detector.config["preprocessing"], modality, spatial_size, window, mri_norm)
        if not spec["modality"]:
            raise ValueError(f"{source}: the checkpoint stores no modality; pass modality=<preset name>")
        self.spec = spec
        self.modality, self.spatial_size, self.window, self.mri_norm = (spec[k] for k in SPEC_KEYS)
        self.sigma = self.detector.sigma
        self.teacher: str = self.detector.config["model"]["teacher"]
        self.threshold_record: dict[str, Any] | None = self.detector.config["calibration"]
        self.threshold: float | None = self.detector.decide(0.0)["threshold"]
        scale = float(self.detector.scale)
        self.scale: float | None = None if scale != scale else scale
        self._loader_kwargs: dict[str, Any] = {} if max_pixels is None else {"max_pixels": int(max_pixels)}
        self.loader = LoadMedicalImage(**self._loader_kwargs)
        #: the bundle's chain from a path (``{"image": path[, "slice_index", ...]}``)
        self.preprocess = build_preprocessing(**spec, **self._loader_kwargs)
        #: the same chain from a loaded image (``{"image": (C, H, W)}``)
        self.preprocess_loaded = build_preprocessing(**spec, load=False)
        self.volume_axis = int(volume_axis if slice_axis is None else slice_axis)
        self.volume_aggregation, self.topk = volume_aggregation, int(topk)
        self.batch_size = int(batch_size)
        self._runner = None
        if backend != "torch":
            self._runner = self._backend_runner(checkpoint, export_cache_dir)

    def _backend_runner(self, checkpoint: Any, cache_dir: str | os.PathLike | None):
        """The exported graph's runner, from the cache (made and verified when missing or invalid)."""
        import tempfile

        from monai_skipts.export_cache import cached_backend_runner

        if isinstance(checkpoint, dict):  # no file to key the cache by: a private export for this predictor
            self._export_tmp = tempfile.TemporaryDirectory(prefix="skipts-export-")
            checkpoint_path = Path(self._export_tmp.name) / "checkpoint.pt"
            atomic_save(checkpoint_path, lambda f: torch.save(checkpoint, f))
            cache_dir = self._export_tmp.name
        else:
            checkpoint_path = Path(checkpoint)
        meta = {"preprocessing": dict(self.spec), "checkpoint": {"file": checkpoint_path.name}}
        runner, files = cached_backend_runner(
            checkpoint_path,
            self.backend,
            lambda: self.detector,
            self.spatial_size,
            {"sigma": self.sigma},
            meta,
            cache_dir,
            self.num_threads,
        )
        self.export_files = files
        logger.info("backend %s: %s", self.backend, files[0])
        return runner

    @property
    def slice_axis(self) -> int:
        """The volume slicing axis (``volume_axis``)."""
        return self.volume_axis

    def config(self) -> dict[str, Any]:
        """The serving configuration (JSON-able), enough to rebuild this predictor from the checkpoint."""
        return {
            "modality": self.modality,
            "spatial_size": list(self.spatial_size),
            "window": self.window,
            "mri_norm": self.mri_norm,
            "sigma": self.sigma,
            "volume_aggregation": self.volume_aggregation,
            "topk": self.topk,
            "slice_axis": self.volume_axis,
            "batch_size": self.batch_size,
            "backend": self.backend,
            "num_threads": self.num_threads,
        }

    # ---- model --------------------------------------------------------------------------------------

    @torch.inference_mode()
    def predict_tensor(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Preprocessed images ``(B, 3, S, S)`` → maps ``(B, 1, S, S)`` and scores ``(B,)`` (CPU, float32),
        in one forward pass.

        Raises:
            ValueError: the images hold NaN or infinite values (they would give a NaN score, or a
                meaningless one); the message says which images of the batch.
        """
        images = images.as_tensor() if hasattr(images, "as_tensor") else torch.as_tensor(images)
        bad = ~torch.isfinite(images)
        if bool(bad.any()):
            per_image = bad.reshape(bad.shape[0], -1).sum(1) if bad.ndim > 1 else bad.reshape(1, -1).sum(1)
            idx = [int(i) for i in per_image.nonzero().flatten()]
            which = ", ".join(f"{i} ({int(per_image[i])} values)" for i in idx[:10]) + (
                ", ..." if len(idx) > 10 else ""
            )
            raise ValueError(
                f"input is not finite: NaN/inf values in image{'s' if len(idx) > 1 else ''} {which} of a batch of "
                f"{per_image.numel()}; the tensor API scores finite, preprocessed images only (score files "
                "with predict_items/run, which refuse such files by name, or replace the values first)"
            )
        x = images.to(self.device)
        if x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        amap, score = self.detector(x) if self._runner is None else self._runner(x)
        return amap.float().cpu().contiguous(), score.float().cpu()

    def predict(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Preprocessed ``(N, 3, S, S)`` -> maps ``(N, 1, S, S)`` and scores ``(N,)`` (CPU, float32), in
        forward passes of ``batch_size``."""
        maps, scores = [], []
        for i in range(0, len(batch), self.batch_size):
            m, s = self.predict_tensor(batch[i : i + self.batch_size])
            maps.append(m)
            scores.append(s)
        if not maps:
            return torch.zeros(0, 1, 1, 1), torch.zeros(0)
        return torch.cat(maps), torch.cat(scores)

    def decide(self, score: float) -> dict[str, Any]:
        """``{"score", "threshold", "anomalous", "normalized_score"}`` for one score (the detector's
        :meth:`~monai_skipts.networks.AnomalyDetector.decide`)."""
        return self.detector.decide(score)

    def decide_volume(self, score: float) -> dict[str, Any]:
        """:meth:`decide` for a volume score, plus ``"threshold_kind"``: the volume threshold when the
        checkpoint has one (``"volume"``), else the image threshold (``"image"``) (the detector's
        :meth:`~monai_skipts.networks.AnomalyDetector.decide_volume`)."""
        return self.detector.decide_volume(score)

    # ---- loaded images and volumes (MONAI Label, MLflow) ------------------------------------------

    def model_input(self, image: torch.Tensor | str | os.PathLike) -> torch.Tensor:
        """The network's input ``(3, S, S)`` (plain float32 tensor) for a 2-D image: a file path (the
        bundle's chain from the path, as :meth:`predict_items`) or a loaded ``(C, H, W)`` image (the
        same chain after loading, as :meth:`score_images`)."""
        if isinstance(image, (str, os.PathLike)):
            out = self.preprocess({"image": str(image)})["image"]
        else:
            out = self.preprocess_loaded({"image": image})["image"]
        return out.as_tensor() if hasattr(out, "as_tensor") else torch.as_tensor(out)

    def _score_slices(self, images: Sequence[torch.Tensor], maps: bool):
        maps_s, scores = self.predict(torch.stack([self.model_input(im) for im in images]))
        out = None
        if maps:
            out = [
                F.interpolate(m[None], size=tuple(im.shape[-2:]), mode="bilinear", align_corners=False)[0, 0]
                for m, im in zip(maps_s, images)
            ]
        return scores.numpy().astype(np.float64), out

    def load(self, path: str | os.PathLike) -> MetaTensor:
        """Load a file: ``(C, H, W)`` for 2-D sources, ``(C, X, Y, Z)`` RAS for volumes."""
        return self.loader(str(path))

    def score_images(self, images: Sequence[torch.Tensor], maps: bool = True):
        """Score 2-D images ``(C, H, W)`` (loaded, or from :func:`~monai_skipts.transforms.array_to_image`).

        Returns:
            ``(scores (N,) float64, maps)``: maps is a list of ``(H, W)`` float32 tensors at each
            image's size, or ``None`` when ``maps`` is False.
        """
        if not len(images):
            return np.zeros(0), ([] if maps else None)
        return self._score_slices(images, maps)

    def score_volume(self, volume: torch.Tensor, maps: bool = True):
        """Score a RAS volume ``(C, X, Y, Z)`` slice by slice along ``volume_axis``.

        Returns:
            ``(volume score, slice scores (n,), map)``: map is a ``(X, Y, Z)`` float32 ``MetaTensor``
            with the volume's affine (zeros on slices not scored), or ``None``.
        """
        slicer = VolumeToSlices(axis=self.volume_axis)
        indices = slicer.indices(volume)
        if not indices:
            raise InputDataError(getattr(volume, "meta", {}).get("filename_or_obj"), "volume has no slices to score")
        slices = slicer(volume, indices)
        scores, planes = self._score_slices(slices, maps)
        vid = "volume"
        vscore = aggregate_volume_scores([vid] * len(scores), scores, self.volume_aggregation, self.topk)[vid]
        if not maps:
            return vscore, scores, None
        out = torch.zeros(volume.shape[1:], dtype=torch.float32)
        for k, plane in zip(indices, planes):
            out.select(self.volume_axis, k).copy_(slice_to_plane(plane))
        affine = volume.affine if isinstance(volume, MetaTensor) else None
        return vscore, scores, MetaTensor(out, affine=affine)

    def score_file(self, path: str | os.PathLike, maps: bool = True) -> dict[str, Any]:
        """Score one file (2-D image or volume): ``{"kind", "score", "map", "slice_scores", "image"}``
        plus the decision (:meth:`decide`; a volume's is :meth:`decide_volume`, with ``"threshold_kind"``)."""
        img = self.load(path)
        if img.ndim == 4:
            score, slice_scores, amap = self.score_volume(img, maps)
            out = {"kind": "volume", "score": score, "map": amap, "slice_scores": slice_scores.tolist()}
        else:
            scores, amaps = self.score_images([img], maps)
            out = {"kind": "image", "score": float(scores[0]), "map": amaps[0] if maps else None}
        out["image"] = img
        out.update(self.decide_volume(out["score"]) if img.ndim == 4 else self.decide(out["score"]))
        return out

    # ---- datalists and folders (bundle inference, command line) -----------------------------------

    def predict_items(self, items: Iterable[dict]) -> list[dict[str, Any]]:
        """Score datalist items (volumes expanded to slices); each result holds the decision, the
        map at the input's size (``"map"``, float32 ``(H, W)``), the file (``"image"``) and volume keys
        when a slice. The first input that cannot be scored raises its
        :class:`~monai_skipts.utils.InputDataError` (:meth:`run` scores the others and lists it)."""
        return self._score(items, fail_fast=True)[0]

    def _score(
        self, items: Iterable[dict], fail_fast: bool, progress: bool | str | None = False
    ) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
        """``(results, errors)``: every input scored that can be; ``errors`` holds one ``{"file",
        "reason"}`` per input that cannot (a volume with one bad slice fails as a whole: no volume
        score from part of it). ``fail_fast``: raise the first input's error instead. ``progress``: a
        bar over the inputs (:func:`~monai_skipts.progress.progress_bar`). Ctrl-C raises
        :class:`~monai_skipts.progress.ScoringInterrupted` holding the inputs scored completely."""
        errors: list[dict[str, str]] = []
        failed: set[tuple[str, str]] = set()

        def fail(it: dict, exc: BaseException) -> None:
            err = _input_error(exc)
            if fail_fast:
                raise err if err is not None else exc
            if (it["id"], str(it["image"])) in failed:
                return  # one error per input: this volume has failed already
            failed.add((it["id"], str(it["image"])))
            reason = err.problem if err is not None else f"{type(exc).__name__}: {' '.join(str(exc).split())}"
            reason = reason.replace(str(it["image"]), it["id"])  # relative ids only, as everywhere else
            if it.get("slice_index", -1) not in (None, -1):
                reason = f"slice {it['slice_index']}: {reason}"
            errors.append({"file": it["id"], "reason": reason})
            logger.warning("%s: not scored: %s", it["id"], reason)

        loader = LoadMedicalImage(cache_volumes=0, **self._loader_kwargs)
        results: list[dict[str, Any]] = []
        pending: list[tuple[dict, Any, torch.Tensor]] = []

        def flush() -> None:
            maps, scores = self.predict_tensor(torch.stack([x for _, _, x in pending]))
            for (it, d, _), amap, s in zip(pending, maps, scores):
                if not torch.isfinite(s):
                    fail(
                        it,
                        InputDataError(it["image"], "the anomaly score is not finite; the image holds invalid values"),
                    )
                    continue
                size = tuple(int(v) for v in d["image"].meta.get("spatial_shape", amap.shape[-2:]))[-2:]
                full = F.interpolate(amap[None], size=size, mode="bilinear", align_corners=False)[0, 0].numpy()
                rec = {"id": it["id"], "image": str(it["image"]), **self.decide(float(s)), "map": full}
                if "slice_index" in it:
                    rec.update(volume_id=str(it["volume_id"]), slice_index=int(it["slice_index"]))
                results.append(rec)
            pending.clear()

        current: dict = {}  # the input being read
        try:
            for item in progress_bar(items, desc="scoring", enabled=progress):  # in input order (fail_fast)
                item = dict(item)
                current.clear()
                current.update(item)
                item["id"] = str(item.get("id", item["image"]))
                had_vid = bool(item.get("volume_id"))
                try:  # volumes -> one item per slice, named by the (relative) id, never by the path
                    expanded = expand_volume_datalist(
                        [{**item, "volume_id": item.get("volume_id") or item["id"]}],
                        axis=self.volume_axis,
                        loader=loader,
                    )
                except Exception as e:
                    fail(item, e)
                    continue
                for it in expanded:
                    if "slice_index" not in it and not had_vid:
                        it.pop("volume_id", None)
                    if (it["id"], str(it["image"])) in failed:
                        break  # another slice of this volume failed: no score from part of a volume
                    try:
                        d = self.preprocess(dict(it))
                        x = d["image"].as_tensor() if hasattr(d["image"], "as_tensor") else torch.as_tensor(d["image"])
                        if not bool(torch.isfinite(x).all()):
                            raise InputDataError(it["image"], "preprocessing gave non-finite values")
                    except Exception as e:
                        fail(it, e)
                        continue
                    pending.append((it, d, x))
                    if len(pending) >= self.batch_size:
                        flush()
            if pending:
                flush()
        except KeyboardInterrupt as e:
            if isinstance(e, ScoringInterrupted):
                raise
            partial = {str(it["image"]) for it, _, _ in pending} | {str(current.get("image"))}
            done = [r for r in results if (r["id"], r["image"]) not in failed and r["image"] not in partial]
            n_done = len({r.get("volume_id", r["id"]) for r in done})
            total = len(items) if hasattr(items, "__len__") else None
            raise ScoringInterrupted(done, errors, n_done, total) from None
        results = [r for r in results if (r["id"], r["image"]) not in failed]
        return results, errors

    def run(
        self,
        inputs: str | os.PathLike | Sequence,
        output_dir: str | os.PathLike,
        save_maps: bool = True,
        fail_fast: bool = False,
        progress: bool | str | None = None,
    ) -> dict[str, Any]:
        """Score ``inputs`` (folder, file or list of paths) and write the outputs (see the module
        docstring); returns a summary ``{"n_images", "n_volumes", "n_anomalous", "n_errors"}``.

        Args:
            inputs: a folder (every image file below it), a file, or a list of paths.
            output_dir: where ``predictions.csv``, ``volume_predictions.csv``, ``errors.csv`` and
                ``maps/`` go.
            save_maps: write the anomaly maps.
            fail_fast: stop at the first input that cannot be scored (its error is raised and nothing
                is written), instead of scoring the others.
            progress: a progress bar over the inputs: ``None``/``"auto"`` on a terminal only,
                ``True``/``"on"``, ``False``/``"off"`` (:func:`~monai_skipts.progress.progress_enabled`).

        Raises:
            InferenceIncompleteError: after writing everything, when some inputs could not be scored
                (they are listed in ``errors.csv``).
            InputDataError: with ``fail_fast``, the first bad input; a missing input or empty folder.
            ScoringInterrupted: Ctrl-C: after writing the inputs scored so far and ``status.json``
                ``interrupted``; its message says how many were scored.
        """
        out = Path(output_dir)
        items = list_inputs(inputs)
        if not fail_fast:  # fail_fast writes nothing before the end
            write_run_status(out, "running", n_inputs=len(items))
        interrupted = None
        try:
            results, errors = self._score(items, fail_fast, progress)
        except ScoringInterrupted as e:
            results, errors, interrupted = e.done, e.errors, e
        volumes = self._volumes(results)
        names = map_names(results, list(volumes)) if save_maps else {}
        if save_maps:
            vmax = 2.0 * self.threshold if self.threshold else max((r["score"] for r in results), default=1.0)
            write_maps(out, results, list(volumes), names, vmax, self._load_volume, self.volume_axis)
        rows = write_tables(out, results, volumes, errors, names)
        summary = {
            "n_images": len(results),
            "n_volumes": len(volumes),
            "n_anomalous": sum(bool(r["anomalous"]) for r in rows),
            "n_errors": len(errors),
        }
        logger.info("scored %d images (%d volumes) into %s", len(results), len(volumes), out)
        status = "interrupted" if interrupted else "incomplete" if errors else "complete"
        write_run_status(out, status, n_inputs=len(items), **summary)
        if interrupted:
            interrupted.args = (
                f"interrupted: {interrupted.n_done} of {len(items)} inputs scored and written to "
                f"{out / 'predictions.csv'}; the others were not scored ({out / 'status.json'}: interrupted)",
            )
            raise interrupted
        if errors:
            first = errors[0]
            problem = (
                f"{len(errors)} of {len(items)} inputs could not be scored; each is listed with its reason in "
                f"{out / 'errors.csv'}. The other {len(items) - len(errors)} "
                f"{'was' if len(items) - len(errors) == 1 else 'were'} scored into {out}. First: "
                f"{first['file']}: {first['reason']}"
            )
            logger.error(problem)
            raise InferenceIncompleteError(out / "errors.csv", problem, summary=summary, errors=errors)
        return summary

    def _volumes(self, results: list[dict]) -> dict[str, dict[str, Any]]:
        sl = [r for r in results if "volume_id" in r]
        if not sl:
            return {}
        agg = aggregate_volume_scores(
            [r["volume_id"] for r in sl], [r["score"] for r in sl], self.volume_aggregation, self.topk
        )
        return {
            v: {
                **self.decide_volume(s),
                "n_slices": sum(r["volume_id"] == v for r in sl),
                "aggregation": self.volume_aggregation,
            }
            for v, s in agg.items()
        }

    def _load_volume(self, path: str) -> MetaTensor:
        """A volume loaded afresh (not cached), as scored: ``(C, X, Y, Z)`` RAS."""
        return LoadMedicalImage(cache_volumes=0, **self._loader_kwargs)(path)


if __name__ == "__main__":  # python -m monai_skipts.inference: the command line is monai_skipts.inference_cli
    from monai_skipts.inference_cli import main

    sys.exit(main())
