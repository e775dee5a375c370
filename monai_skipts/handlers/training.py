"""Training-side handlers: loss components as metrics, atomic checkpoints with resume, the
decision-threshold calibration on held-out normals, and the check of the calibration split that
bundles run before training."""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from monai_skipts.calibration import (
    DEFAULT_PIXEL_FPR,
    check_calibration_data,
    threshold_record,
    uncertainty_warning,
    volume_threshold,
)

from ..checkpoint import CheckpointError, check_teacher, load_checkpoint, save_checkpoint, set_rng_state
from ..utils import atomic_write_json, atomic_write_text, is_rank0, lock_output_dir, remove_stale_temp_files

__all__ = [
    "LossComponentsHandler",
    "SkipTSCheckpointHandler",
    "ThresholdCalibrator",
    "resumed_run_name",
    "check_calibration_split",
]

logger = logging.getLogger(__name__)


class LossComponentsHandler:
    """Puts the epoch means of the DRKD loss terms (``loss``, ``loss_sim``, ``loss_mac``) and the
    learning rate into ``engine.state.metrics`` so StatsHandler/MLflow/TensorBoard log them."""

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._complete)

    def _reset(self, engine: Engine) -> None:
        self._sums: dict[str, float] = {}
        self._n = 0

    def _collect(self, engine: Engine) -> None:
        last = getattr(engine.loss_function, "last", None) or {"total": float(engine.state.output["loss"])}
        for k, v in last.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
        self._n += 1

    def _complete(self, engine: Engine) -> None:
        names = {"total": "loss", "sim": "loss_sim", "mac": "loss_mac"}
        for k, v in self._sums.items():
            engine.state.metrics[names.get(k, f"loss_{k}")] = v / max(self._n, 1)
        engine.state.metrics["lr"] = float(engine.optimizer.param_groups[0]["lr"])


class SkipTSCheckpointHandler:
    """Saves ``checkpoint.pt`` atomically every ``save_interval`` epochs and, with ``resume=True``,
    continues from it when the trainer starts: running the same command again after a crash (even
    ``kill -9``) resumes instead of starting over, and ends with the weights the uninterrupted run
    would have produced (CPU, same seed).

    The checkpoint holds the student, the optimizer, epoch and iteration, the Python/NumPy/torch RNG
    states and, when ``data_loader`` is given, its generator state and a hash of the training ids
    (the split). On resume the teacher must be the one the student was trained against and the
    training split must be the same (:class:`~monai_skipts.checkpoint.CheckpointError` otherwise).
    A checkpoint at or beyond ``max_epochs`` ends the run at once, without training.

    Each epoch it calls ``set_epoch(epoch)`` on the data loader's sampler when it has one (e.g.
    :class:`~monai_skipts.data.EpochSeededSampler`), so that the batch order depends only on
    ``(seed, epoch)``.

    Args:
        output_dir: folder of ``checkpoint.pt``.
        network: the :class:`~monai_skipts.networks.AnomalyDetector` being trained.
        optimizer: its optimizer.
        save_interval: epochs between saves.
        resume: resume from an existing ``checkpoint.pt``.
        data_loader: the training data loader (sampler epochs, generator state, split check).
        run_name: the MLflow run name, stored so that a resumed run continues the same MLflow run
            (see :func:`resumed_run_name`).
    """

    def __init__(
        self,
        output_dir: str | Path,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        save_interval: int = 1,
        resume: bool = True,
        filename: str = "checkpoint.pt",
        data_loader: Any = None,
        run_name: str | None = None,
    ):
        self.path = Path(output_dir) / filename
        self.network, self.optimizer = network, optimizer
        self.save_interval, self.resume = int(save_interval), bool(resume)
        self.data_loader, self.run_name = data_loader, run_name
        self.resumed_from: int | None = None
        self._saved_epoch: int | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._resume)
        engine.add_event_handler(Events.EPOCH_STARTED, self._set_sampler_epoch)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self._save)
        engine.add_event_handler(Events.COMPLETED, self._save_final)

    # ---- pieces of state beyond the model -------------------------------------------------------

    def _generator(self) -> torch.Generator | None:
        return getattr(self.data_loader, "generator", None)

    def _train_ids_sha256(self) -> str | None:
        data = getattr(getattr(self.data_loader, "dataset", None), "data", None)
        if not isinstance(data, (list, tuple)) or not all(isinstance(d, dict) and "id" in d for d in data):
            return None
        return hashlib.sha256("\n".join(sorted(str(d["id"]) for d in data)).encode()).hexdigest()

    def _set_sampler_epoch(self, engine: Engine) -> None:
        sampler = getattr(self.data_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(engine.state.epoch)

    # ---- save / resume --------------------------------------------------------------------------

    def _save(self, engine: Engine) -> None:
        if is_rank0():
            extra: dict[str, Any] = {}
            if self.run_name:
                extra["run_name"] = str(self.run_name)
            ids = self._train_ids_sha256()
            if ids is not None:
                extra["train_ids_sha256"] = ids
            g = self._generator()
            if g is not None:
                extra["loader_generator"] = g.get_state()
            save_checkpoint(
                self.path, self.network, self.optimizer, engine.state.epoch, engine.state.iteration, extra=extra
            )
        self._saved_epoch = engine.state.epoch

    def _save_final(self, engine: Engine) -> None:
        n = engine.state.epoch_length
        if n and engine.state.iteration % n:  # terminated mid-epoch: keep the last complete epoch's checkpoint
            logger.warning(
                "training stopped inside epoch %d: %s keeps epoch %s", engine.state.epoch, self.path, self._saved_epoch
            )
            return
        if self._saved_epoch != engine.state.epoch:
            self._save(engine)

    def _resume(self, engine: Engine) -> None:
        if is_rank0():
            # one training per folder (a no-op when the bundle took the lock already); only then is
            # it safe to remove the temp files of writes a killed run left behind
            lock_output_dir(self.path.parent)
            for tmp in remove_stale_temp_files(self.path.parent):
                logger.info("removed %s, left by an interrupted write", tmp)
        if not (self.resume and self.path.is_file()):
            return
        ckpt = load_checkpoint(self.path)
        check_teacher(ckpt["config"]["model"], self.network, str(self.path))
        extra = ckpt.get("extra") or {}
        want, have = extra.get("train_ids_sha256"), self._train_ids_sha256()
        if want is not None and have is not None and want != have:
            raise CheckpointError(
                f"{self.path}: refused to resume: it was trained on another training split than the one "
                "this run uses (split.json or the dataset changed); delete it to start over, or use another output_dir"
            )
        missing = self.network.load_state_dict(ckpt["state_dict"], strict=False).missing_keys
        if any(not k.startswith("model.teacher.") for k in missing):
            raise CheckpointError(
                f"{self.path}: refused to resume: it holds another architecture (missing {missing[:5]})"
            )
        if "optimizer" in ckpt:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        if "rng" in ckpt:
            set_rng_state(ckpt["rng"])
        g = self._generator()
        if g is not None and isinstance(extra.get("loader_generator"), torch.Tensor):
            g.set_state(extra["loader_generator"])
        engine.state.epoch, engine.state.iteration = ckpt["epoch"], ckpt["iteration"]
        self.resumed_from = self._saved_epoch = int(ckpt["epoch"])
        if ckpt["epoch"] >= engine.state.max_epochs:
            logger.warning(
                "%s is at epoch %d of %d: training already done, nothing to resume",
                self.path,
                ckpt["epoch"],
                engine.state.max_epochs,
            )
            engine.terminate()
        else:
            logger.warning("resumed from %s at epoch %d of %d", self.path, ckpt["epoch"], engine.state.max_epochs)


def check_calibration_split(split: dict[str, Any], target_fpr: float, method: str = "empirical") -> int:
    """Before training: log how many exact duplicates the split removed, and refuse a validation
    split with too few normals to calibrate ``target_fpr`` with ``method``
    (:func:`~monai_skipts.calibration.check_calibration_data`). When duplicates were removed the error says
    so (12 copies of one image are 1 normal). Returns the number of validation normals.

    Args:
        split: what :func:`~monai_skipts.data.prepare_split` returns (``"val"`` and ``"report"``).

    Raises:
        ValueError: naming the split file, the counts, the duplicates removed and what to change.
    """
    report = split.get("report") or {}
    source = report.get("split_file") or report.get("dataset") or "split"
    dedup = report.get("dedup") if isinstance(report.get("dedup"), dict) else {}
    n_removed = int(dedup.get("n_removed", 0))
    n_conflict = int(dedup.get("n_conflict_dropped", 0))
    conflict = f", {n_conflict} dropped as identical copies labelled differently" if n_conflict else ""
    if "n_input" in dedup:
        logger.info(
            "%s: %d exact duplicates removed%s (%d of %d images kept)",
            source,
            n_removed,
            conflict,
            int(dedup.get("n_kept", 0)),
            int(dedup["n_input"]),
        )
    try:
        return check_calibration_data(len(split["val"]), target_fpr, method, report.get("split_file"))
    except ValueError as e:
        if not (n_removed or n_conflict):
            raise
        raise ValueError(
            f"{e}. Note: {n_removed} exact duplicates were removed from the dataset{conflict} "
            f"({dedup.get('n_kept', '?')} distinct images of {dedup.get('n_input', '?')} files; "
            "the list is in split.json under 'dedup')"
        ) from None


def resumed_run_name(checkpoint: str | os.PathLike, resume: bool = True) -> str | None:
    """The MLflow run name stored in ``checkpoint`` (``None`` when there is none or ``resume`` is
    off): bundles use it so that a resumed training continues its MLflow run instead of leaving a
    dangling one. An unreadable checkpoint gives ``None`` here; the resume itself reports it."""
    if not resume or not Path(checkpoint).is_file():
        return None
    try:
        name = (load_checkpoint(checkpoint).get("extra") or {}).get("run_name")
    except CheckpointError:
        return None
    return str(name) if name else None


class ThresholdCalibrator:
    """After training: score the held-out normal validation images and set the decision threshold
    at ``target_fpr`` (a fraction of normals allowed above it), then write the final model
    ``model.pt`` (checkpoint with the threshold) and ``threshold.json``.

    Args:
        evaluator: a :class:`~monai_skipts.engines.SkipTSEvaluator` over the validation normals,
            carrying an :class:`~monai_skipts.handlers.AnomalyScoreHandler` (``score_handler``).
        score_handler: that handler (its ``records`` are read).
        network: the trained :class:`~monai_skipts.networks.AnomalyDetector`, whose threshold, scale
            and calibration record are set (:meth:`~monai_skipts.networks.AnomalyDetector.set_calibration`);
            output_dir: where ``model.pt`` (its checkpoint) goes.
        extra: run information stored in the checkpoint (e.g. the bundle's dataset).
        method: ``"empirical"``, ``"lognormal"`` or ``"gaussian"``
            (:func:`~monai_skipts.calibration.calibrate_threshold`).
        cross_fit: a :class:`~monai_skipts.calibration.CrossFitScorer`; when enabled, its pooled
            out-of-fold scores of the training normals calibrate the threshold instead of the
            validation normals (record ``method`` ``"cross_fit"``, ``estimator`` the ``method``).
        pixel_handler: a :class:`~monai_skipts.calibration.PixelThresholdHandler` attached to the
            validation evaluator: the pixel threshold at ``pixel_fpr`` goes under ``record["pixel"]``
            (``pixel_threshold`` attribute).
        val_data: the validation datalist; when its items carry ``volume_id`` (slices of volumes,
            e.g. LGG's patients), the calibration slices are aggregated into volume scores as served
            (``volume_aggregation``) and the volume threshold is calibrated on them (``record["volume"]``,
            ``volume_threshold`` attribute; with cross-fitting, the training items' ``volume_id``).
        volume_slices: without volume ids: slices per judged volume, for a volume threshold from the
            slices with the Šidák correction; ``None``: none
            (:func:`~monai_skipts.calibration.volume_threshold`).
        volume_aggregation: the serving aggregation of slice scores (``"max"``, ``"mean"``, ``"topk"``).

    The record also states the threshold's uncertainty (:func:`~monai_skipts.calibration.threshold_record`:
    ``fpr_expected``, ``fpr_bound`` at ``fpr_bound_confidence``, ``n_normals_needed``); the training log
    warns when the bound is above twice the target (:func:`~monai_skipts.calibration.uncertainty_warning`).

    ``calibrator()`` runs it (reusing the validation scores when the evaluator last ran at the
    trainer's final epoch, e.g. through ``ValidationHandler``); afterwards ``threshold`` and ``scale`` are set (``scale`` is the
    validation normals' score standard deviation, for the normalised score).
    """

    def __init__(
        self,
        evaluator: Engine,
        score_handler: Any,
        network: torch.nn.Module,
        output_dir: str | Path,
        target_fpr: float = 0.05,
        extra: dict | None = None,
        filename: str = "model.pt",
        trainer: Engine | None = None,
        method: str = "empirical",
        cross_fit: Any = None,
        pixel_handler: Any = None,
        pixel_fpr: float = DEFAULT_PIXEL_FPR,
        volume_slices: int | None = None,
        val_data: Sequence[Mapping[str, Any]] | None = None,
        volume_aggregation: str = "max",
    ):
        self.evaluator, self.score_handler, self.network, self.trainer = evaluator, score_handler, network, trainer
        self.method = method
        self.cross_fit, self.pixel_handler, self.pixel_fpr = cross_fit, pixel_handler, float(pixel_fpr)
        self.volume_slices = None if volume_slices in (None, 0) else int(volume_slices)
        self.val_data, self.volume_aggregation = val_data, volume_aggregation
        self.pixel_threshold: float | None = None
        self.volume_threshold: float | None = None
        self.output_dir, self.target_fpr, self.extra, self.filename = (
            Path(output_dir),
            float(target_fpr),
            extra,
            filename,
        )
        self.threshold: float | None = None
        self.scale: float | None = None
        self.record: dict[str, Any] | None = None

    def _rescore(self) -> None:
        """Score the validation normals with the model as it is now (e.g. after the per-level statistics
        were fitted), collecting into ``score_handler`` only: a scoring pass for calibration, not another
        validation epoch, so the evaluator's own handlers (MLflow, stats) do not log it a second time."""
        from ..engines import SkipTSEvaluator

        ev = self.evaluator
        SkipTSEvaluator(
            device=ev.state.device,
            val_data_loader=ev.data_loader,
            network=self.network,
            inferer=ev.inferer,
            amp=getattr(ev, "amp", False),
            prepare_batch=ev.prepare_batch,
            val_handlers=[self.score_handler] + ([self.pixel_handler] if self.pixel_handler is not None else []),
        ).run()

    def __call__(self) -> dict[str, Any]:
        epoch = self.trainer.state.epoch if self.trainer is not None else None
        fresh = epoch is not None and self.evaluator.state.epoch == epoch and self.score_handler.records
        if fresh and self.network.get_level_stats() is not None:
            # per-level statistics fitted after training changed the maps since that validation:
            # scores from it are on another scale (seen on an H200: every test normal above the threshold)
            fresh = False
        if not fresh:
            self._rescore()
        scores = np.array([r["score"] for r in self.score_handler.records], dtype=np.float64)
        if scores.size == 0:
            raise ValueError("threshold calibration needs validation normals, but the validation split is empty")
        oof = self.cross_fit() if self.cross_fit is not None else None
        if oof is not None:
            self.record = threshold_record(oof, self.target_fpr, "cross_fit", estimator=self.method)
            self.record.update(n_folds=int(self.cross_fit.folds), n_validation_normals=int(scores.size))
            source = f"{oof.size} out-of-fold training normals ({self.cross_fit.folds} folds)"
        else:
            self.record = threshold_record(scores, self.target_fpr, self.method)
            source = f"{scores.size} validation normals"
        self.threshold, self.scale = self.record["value"], self.record["scale"]
        if self.pixel_handler is not None and (pix := self.pixel_handler.record(self.pixel_fpr)) is not None:
            self.record["pixel"] = pix
            self.pixel_threshold = pix["value"]
        if oof is not None:
            ids, cal = [r["id"] for r in self.cross_fit.records], oof
            items = self.cross_fit.data
        else:
            ids, cal, items = [r.get("id") for r in self.score_handler.records], scores, self.val_data or []
        volume_of = {str(it.get("id")): it["volume_id"] for it in items if it.get("volume_id") is not None}
        vol = None
        if volume_of and all(str(i) in volume_of for i in ids):
            vol = volume_threshold(
                cal,
                self.target_fpr,
                self.method,
                volume_ids=[volume_of[str(i)] for i in ids],
                aggregation=self.volume_aggregation,
            )
        elif self.volume_slices is not None:
            vol = volume_threshold(cal, self.target_fpr, self.method, n_slices=self.volume_slices)
        if vol is not None:
            self.record["volume"] = vol
            self.volume_threshold = vol["value"]
        self.network.set_calibration(self.record)
        logger.info(
            "decision threshold %.5f at target FPR %.3f from %s (%s); false-positive rate expected %.3f, "
            "at most %.3f with %g %% confidence",
            self.threshold,
            self.target_fpr,
            source,
            self.method,
            self.record["fpr_expected"],
            self.record["fpr_bound"],
            100 * self.record["fpr_bound_confidence"],
        )
        if (msg := uncertainty_warning(self.record)) is not None:
            logger.warning(msg)
        if is_rank0():
            save_checkpoint(self.output_dir / self.filename, self.network, extra=self.extra or {}, with_rng=False)
            atomic_write_json(self.output_dir / "threshold.json", self.record)
            buf = io.StringIO()
            csv.writer(buf).writerows(
                [("id", "score")] + [(r.get("id", ""), repr(r["score"])) for r in self.score_handler.records]
            )
            atomic_write_text(self.output_dir / "val_scores.csv", buf.getvalue())  # for calibration studies
        return self.record
