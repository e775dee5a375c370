"""Fitting the per-level map statistics after training: :class:`LevelStatsFitter`."""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

import torch
from monai.engines.utils import default_prepare_batch

from monai_skipts.engines.prepare_batch import DenoisingBatch
from monai_skipts.inferers import fit_level_stats
from monai_skipts.utils import resolve_device

__all__ = ["LevelStatsFitter"]

logger = logging.getLogger(__name__)


class LevelStatsFitter:
    """Fit the per-level map statistics on training normals and store them on the network.

    Calls :func:`~monai_skipts.inferers.fit_level_stats` over ``data_loader`` and sets the result on
    the detector (:meth:`~monai_skipts.networks.AnomalyDetector.set_level_stats`: buffer
    ``level_stats``, ``(L, 2)`` mean/std per level); from then on its forward, checkpoints
    (:func:`~monai_skipts.checkpoint.save_checkpoint`) and exports use them. Run it after
    training and before calibration (the threshold must be calibrated on the standardised maps). In a
    bundle config::

        "fit_level_stats": {"_target_": "monai_skipts.engines.LevelStatsFitter",
                            "network": "@detector", "data_loader": "@train#dataloader",
                            "prepare_batch": "@train#prepare_batch"},
        "run": ["$@train#trainer.run()", "$@fit_level_stats()", "$@calibrate()", ...]

    Independent of ignite; also usable as an event handler (``trainer.add_event_handler(
    Events.COMPLETED, fitter)``): the engine argument is ignored.

    Args:
        network: the trained :class:`~monai_skipts.networks.AnomalyDetector`.
        data_loader: batches of dicts with ``"image"`` ``(B, 3, H, W)`` (the training normals), or of
            image tensors.
        device: default the network's device.
        prepare_batch: optional ``prepare_batch(batch, device)`` of the trainer; a
            :class:`~monai_skipts.engines.TeacherFeatureCache` makes the fit reuse its cached teacher features. ``None``
            (or MONAI's default) recomputes the features through the network. A
            :class:`~monai_skipts.engines.DenoisingBatch` is replaced by its clean ``features``: the statistics describe
            the maps of the training normals as they are, not of their corrupted copies.
        similarity: as for :class:`~monai_skipts.inferers.AnomalyMapHead`.
        enabled: ``False`` makes the call a no-op (the maps stay unstandardised), so a config can
            switch the standardisation with one flag.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        data_loader: Iterable,
        device: str | torch.device | None = None,
        prepare_batch: Callable | None = None,
        similarity: str = "cosine",
        enabled: bool = True,
    ):
        self.network = network
        self.data_loader = data_loader
        self.device = None if device is None else resolve_device(device)
        if isinstance(prepare_batch, DenoisingBatch):
            prepare_batch = prepare_batch.features
        self.prepare_batch = None if prepare_batch is default_prepare_batch else prepare_batch
        self.similarity = similarity
        self.enabled = bool(enabled)
        self.stats: torch.Tensor | None = None

    def __call__(self, engine: Any = None) -> torch.Tensor | None:
        """Fit and store the statistics; returns them (``(L, 2)``, CPU), or ``None`` when disabled."""
        if not self.enabled:
            return None
        stats = fit_level_stats(self.network, self.data_loader, self.device, self.similarity, self.prepare_batch)
        self.network.set_level_stats(stats)
        self.stats = stats
        logger.info("per-level map statistics (mean, std): %s", [[round(float(v), 6) for v in row] for row in stats])
        return stats
