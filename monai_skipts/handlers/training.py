"""Training-side handlers: loss components as metrics, atomic checkpoints with resume, and the
decision-threshold calibration on held-out normals."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from ..checkpoint import check_teacher, load_checkpoint, save_checkpoint, set_rng_state
from ..metrics import calibrate_threshold
from ..utils import atomic_write_json

__all__ = ["LossComponentsHandler", "SkipTSCheckpointHandler", "ThresholdCalibrator"]

logger = logging.getLogger(__name__)


def _is_rank0() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0


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
    """Saves ``checkpoint.pt`` atomically every ``save_interval`` epochs (student, optimizer, epoch,
    iteration, RNG states) and, with ``resume=True``, continues from it when the trainer starts:
    running the same command again after a crash resumes instead of starting over.

    Args:
        output_dir: folder of ``checkpoint.pt``.
        network: the trained :class:`~monai_skipts.networks.SkipTS`.
        optimizer: its optimizer.
        save_interval: epochs between saves.
        resume: resume from an existing ``checkpoint.pt``.
    """

    def __init__(self, output_dir: str | Path, network: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 save_interval: int = 1, resume: bool = True, filename: str = "checkpoint.pt"):  # fmt: skip
        self.path = Path(output_dir) / filename
        self.network, self.optimizer = network, optimizer
        self.save_interval, self.resume = int(save_interval), bool(resume)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._resume)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self._save)
        engine.add_event_handler(Events.COMPLETED, self._save)

    def _save(self, engine: Engine) -> None:
        if _is_rank0():
            save_checkpoint(self.path, self.network, self.optimizer, engine.state.epoch, engine.state.iteration)

    def _resume(self, engine: Engine) -> None:
        if not (self.resume and self.path.is_file()):
            return
        ckpt = load_checkpoint(self.path)
        net = getattr(self.network, "module", self.network)
        check_teacher(ckpt, net, str(self.path))
        net.student.load_state_dict(ckpt["student"])
        if "optimizer" in ckpt:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        if "rng" in ckpt:
            set_rng_state(ckpt["rng"])
        engine.state.epoch, engine.state.iteration = ckpt["epoch"], ckpt["iteration"]
        logger.warning("resumed from %s at epoch %d", self.path, ckpt["epoch"])
        if ckpt["epoch"] >= engine.state.max_epochs:
            engine.terminate()


class ThresholdCalibrator:
    """After training: score the held-out normal validation images and set the decision threshold
    at ``target_fpr`` (a fraction of normals allowed above it), then write the final model
    ``model.pt`` (checkpoint with the threshold) and ``threshold.json``.

    Args:
        evaluator: a :class:`~monai_skipts.engines.SkipTSEvaluator` over the validation normals,
            carrying an :class:`~monai_skipts.handlers.AnomalyScoreHandler` (``score_handler``).
        score_handler: that handler (its ``records`` are read).
        network: the trained model; output_dir: where ``model.pt`` goes.
        extra: plain data stored in the checkpoint (e.g. the bundle's modality and spatial size).

    ``calibrator()`` runs it (reusing the validation scores when the evaluator last ran at the
    trainer's final epoch, e.g. through ``ValidationHandler``); afterwards ``threshold`` and ``scale`` are set (``scale`` is the
    validation normals' score standard deviation, for the normalised score).
    """

    def __init__(self, evaluator: Engine, score_handler: Any, network: torch.nn.Module, output_dir: str | Path,
                 target_fpr: float = 0.05, extra: dict | None = None, filename: str = "model.pt",
                 trainer: Engine | None = None):  # fmt: skip
        self.evaluator, self.score_handler, self.network, self.trainer = evaluator, score_handler, network, trainer
        self.output_dir, self.target_fpr, self.extra, self.filename = Path(output_dir), float(target_fpr), extra, filename
        self.threshold: float | None = None
        self.scale: float | None = None
        self.record: dict[str, Any] | None = None

    def __call__(self) -> dict[str, Any]:
        epoch = self.trainer.state.epoch if self.trainer is not None else None
        fresh = epoch is not None and self.evaluator.state.epoch == epoch and self.score_handler.records
        if not fresh:
            self.evaluator.run(epoch or 1)
        scores = np.array([r["score"] for r in self.score_handler.records], dtype=np.float64)
        if scores.size == 0:
            raise ValueError("threshold calibration needs validation normals, but the validation split is empty")
        self.threshold = float(calibrate_threshold(scores, self.target_fpr))
        self.scale = float(max(scores.std(), 1e-6))
        self.record = {
            "value": self.threshold, "target_fpr": self.target_fpr, "n_normals": int(scores.size), "scale": self.scale,
            "fpr_on_calibration_set": float((scores >= self.threshold).mean()),
        }  # fmt: skip
        logger.info("decision threshold %.5f at target FPR %.3f from %d validation normals",
                    self.threshold, self.target_fpr, scores.size)  # fmt: skip
        if _is_rank0():
            save_checkpoint(self.output_dir / self.filename, self.network, threshold=self.record,
                            extra=self.extra or {}, with_rng=False)  # fmt: skip
            atomic_write_json(self.output_dir / "threshold.json", self.record)
        return self.record
