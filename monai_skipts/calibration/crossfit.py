"""More calibration normals, none lost: :class:`CrossFitScorer`, the cross-fitted, out-of-fold scores of the
training normals that calibrate the final model's threshold."""

from __future__ import annotations

import copy
import csv
import io
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import DataLoader, Dataset

from monai_skipts.bundle.data import seeded_generator
from monai_skipts.bundle.prepare_batch import training_prepare_batch
from monai_skipts.engines import LevelStatsFitter, SkipTSEvaluator, SkipTSTrainer, build_optimizer
from monai_skipts.utils import atomic_write_text

__all__ = ["CrossFitScorer"]

logger = logging.getLogger(__name__)


class CrossFitScorer:
    """Cross-fitted calibration scores: K students trained on K folds of the training normals, each
    fold's held-out normals scored by the student that did not see them; the pooled out-of-fold
    scores calibrate the threshold of the final model, trained on all normals (the cross-validation
    form of conformal calibration, CV+ / Jackknife+: Barber et al. 2021). No normal is lost to
    calibration and ``n`` is the training set's size.

    The fold detectors are copies of ``network`` as it is when the scorer is constructed (call it
    before the final training; the bundle's ``run`` does); each one's model is trained like the final
    one (same loss, optimizer settings, epochs, batch size, per-level statistics) on the other folds,
    and the detector (same sigma, similarity and map head) scores the held-out fold.

    Args:
        folds: K (at least 2); 0 or 1: off (``__call__`` returns ``None``).
        network: the untrained :class:`~monai_skipts.networks.AnomalyDetector` (its ``model`` is trained).
        data: the training datalist (normals).
        transform: the training preprocessing.
        loss_function: the training loss.
        epochs, batch_size, lr, betas, amp, device: as for the final training.
        level_stats: fit the per-level map statistics on each fold's training part.
        cache_teacher: cache teacher features (:class:`~monai_skipts.engines.TeacherFeatureCache`).
        seed: fold assignment and data order.
        output_dir: ``cross_fit_scores.csv`` (``id, fold, score``) is written there and reused by a
            resumed run with the same folds and ids.

    ``scorer()`` returns the pooled scores (``float64``, one per training normal) and sets ``records``
    (``[{"id", "fold", "score"}]``); a second call returns them again without training.

    Example:
        >>> scorer = CrossFitScorer(0, network=None, data=[], transform=None, loss_function=None)
        >>> scorer() is None
        True
    """

    def __init__(
        self,
        folds: int,
        network: torch.nn.Module | None,
        data: Sequence[Mapping[str, Any]],
        transform: Callable | None,
        loss_function: Callable | None,
        epochs: int = 1,
        batch_size: int = 16,
        lr: float = 0.005,
        betas: Sequence[float] = (0.5, 0.999),
        amp: bool = True,
        device: str | torch.device = "cpu",
        level_stats: bool = True,
        cache_teacher: bool = True,
        seed: int = 0,
        output_dir: str | Path | None = None,
        num_workers: int = 0,
    ):
        self.folds = int(folds or 0)
        self.data, self.transform, self.loss_function = list(data), transform, loss_function
        self.epochs, self.batch_size, self.lr, self.betas = int(epochs), int(batch_size), float(lr), tuple(betas)
        self.amp, self.device, self.level_stats, self.cache_teacher = amp, device, level_stats, cache_teacher
        self.seed, self.num_workers = int(seed), int(num_workers)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.records: list[dict[str, Any]] = []
        self.network = None
        if self.folds >= 2 and torch.distributed.is_available() and torch.distributed.is_initialized():
            raise ValueError("calibration_folds is not supported in multi-GPU training; train in one process")
        if self.folds >= 2:
            if len(self.data) < self.folds:
                raise ValueError(f"calibration_folds={self.folds} needs at least {self.folds} training normals")
            self.network = copy.deepcopy(network).cpu()  # the untrained starting point of every fold

    @property
    def enabled(self) -> bool:
        return self.folds >= 2

    def fold_of(self) -> list[int]:
        """The fold of every training item (seeded permutation, sizes differing by at most one)."""
        perm = np.random.default_rng(self.seed).permutation(len(self.data))
        fold = np.empty(len(self.data), dtype=int)
        fold[perm] = np.arange(len(self.data)) % self.folds
        return fold.tolist()

    def _cached(self, ids: list[str], fold: list[int]) -> list[dict[str, Any]] | None:
        path = self.output_dir / "cross_fit_scores.csv" if self.output_dir is not None else None
        if path is None or not path.is_file():
            return None
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if [r["id"] for r in rows] != ids or [int(r["fold"]) for r in rows] != fold:
            return None
        logger.info("cross-fitted calibration scores reused from %s", path)
        return [{"id": r["id"], "fold": int(r["fold"]), "score": float(r["score"])} for r in rows]

    def _train_and_score(self, train: list, held_out: list, k: int) -> list[float]:
        detector = copy.deepcopy(self.network)
        net = detector.model
        loader = DataLoader(
            Dataset(train, self.transform),
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            generator=seeded_generator(self.seed + 1000 * (k + 1)),
        )
        prepare = training_prepare_batch(net, self.transform, self.cache_teacher)
        trainer = SkipTSTrainer(
            device=self.device,
            max_epochs=self.epochs,
            train_data_loader=loader,
            network=net,
            optimizer=build_optimizer(net, self.lr, self.betas),
            loss_function=self.loss_function,
            amp=self.amp,
            prepare_batch=prepare,
        )
        trainer.run()
        LevelStatsFitter(detector, loader, prepare_batch=prepare, enabled=self.level_stats)()
        scores: list[float] = []

        def collect(engine: Engine) -> None:
            scores.extend(engine.state.output["score"].detach().float().cpu().view(-1).tolist())

        ev = SkipTSEvaluator(
            device=self.device,
            val_data_loader=DataLoader(Dataset(held_out, self.transform), batch_size=self.batch_size),
            network=detector,
            amp=self.amp,
        )
        ev.add_event_handler(Events.ITERATION_COMPLETED, collect)
        ev.run()
        return scores

    def __call__(self) -> np.ndarray | None:
        if not self.enabled:
            return None
        if self.records:  # already run (the bundle runs it before training; the calibrator asks again)
            return np.array([r["score"] for r in self.records], dtype=np.float64)
        ids = [str(d.get("id", d.get("image"))) for d in self.data]
        fold = self.fold_of()
        records = self._cached(ids, fold)
        if records is None:
            by_id: dict[int, float] = {}
            for k in range(self.folds):
                train = [d for d, f in zip(self.data, fold) if f != k]
                idx = [i for i, f in enumerate(fold) if f == k]
                logger.info(
                    "cross-fitted calibration: fold %d of %d (%d training, %d held-out normals)",
                    k + 1,
                    self.folds,
                    len(train),
                    len(idx),
                )
                for i, s in zip(idx, self._train_and_score(train, [self.data[i] for i in idx], k)):
                    by_id[i] = float(s)
            records = [{"id": ids[i], "fold": fold[i], "score": by_id[i]} for i in range(len(ids))]
            if self.output_dir is not None:
                buf = io.StringIO()
                csv.writer(buf).writerows(
                    [("id", "fold", "score")] + [(r["id"], r["fold"], repr(r["score"])) for r in records]
                )
                atomic_write_text(self.output_dir / "cross_fit_scores.csv", buf.getvalue())
        self.records = records
        return np.array([r["score"] for r in records], dtype=np.float64)
