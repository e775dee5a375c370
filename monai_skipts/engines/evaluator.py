"""The Skip-TS evaluator: :class:`SkipTSEvaluator` on :class:`monai.engines.SupervisedEvaluator`,
whose output holds the anomaly map, its score and the batch's ids."""

from __future__ import annotations

import logging
from typing import Any, Iterable

import torch
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents, default_prepare_batch
from monai.utils import CommonKeys as Keys

from monai_skipts.engines.prepare_batch import PlainTensorBatch, batch_ids, engine_batch, plain_tensor
from monai_skipts.inferers import SkipTSInferer
from monai_skipts.utils import resolve_device

__all__ = ["SkipTSEvaluator"]

logger = logging.getLogger(__name__)


class SkipTSEvaluator(SupervisedEvaluator):
    """Skip-TS evaluator: output ``"pred"`` is the anomaly map ``(B, 1, H, W)``, ``"score"`` its max
    ``(B,)``, ``"label"`` the batch labels (when present) and ``"id"`` the batch's ids (when present).

    Args:
        device: as for :class:`~monai_skipts.engines.SkipTSTrainer`.
        val_data_loader: batches of dicts with ``"image"`` and optional ``"label"``, ``"id"``.
        network: the :class:`~monai_skipts.networks.AnomalyDetector` (its forward gives the map, with
            the statistics it holds at each iteration, e.g. those :class:`~monai_skipts.engines.LevelStatsFitter` set).
        inferer: default :class:`~monai_skipts.inferers.SkipTSInferer`.
        amp: honoured on CUDA only. A batch whose map is non-finite under fp16 (an overflow) is scored
            again in fp32 (a warning names its images); AMP stays on for the next batches.
        channels_last, plain_tensors: the batch's image reaches the network as a plain tensor in
            channels-last memory format (:class:`~monai_skipts.engines.PlainTensorBatch` around ``prepare_batch``); both
            ``False``: MONAI's ``MetaTensor`` batches as they come (the slower path before issue 14,
            which ``benchmarks/speed.py`` times side by side). The maps are the same either way.
        kwargs: passed to :class:`monai.engines.SupervisedEvaluator` (``val_handlers``,
            ``prepare_batch``, ``iteration_update``, ...).
    """

    def __init__(
        self,
        device: str | torch.device,
        val_data_loader: Iterable,
        network: torch.nn.Module,
        inferer: SkipTSInferer | None = None,
        amp: bool = True,
        channels_last: bool = True,
        plain_tensors: bool = True,
        **kwargs: Any,
    ):
        device = resolve_device(device)
        amp = bool(amp and torch.device(device).type == "cuda")
        kwargs.setdefault("decollate", False)
        if channels_last or plain_tensors:
            inner = kwargs.get("prepare_batch", default_prepare_batch)
            if isinstance(inner, PlainTensorBatch):  # another evaluator's (e.g. a re-scoring pass): wrap once
                inner = inner.prepare_batch
            kwargs["prepare_batch"] = PlainTensorBatch(inner, channels_last)
        super().__init__(
            device=device,
            val_data_loader=val_data_loader,
            network=network.to(device),
            inferer=inferer if inferer is not None else SkipTSInferer(),
            amp=amp,
            **kwargs,
        )
        self.add_event_handler(IterationEvents.FORWARD_COMPLETED, self._rescore_nonfinite)
        self.add_event_handler(IterationEvents.MODEL_COMPLETED, self._add_scores)

    @staticmethod
    def _rescore_nonfinite(engine: SupervisedEvaluator) -> None:
        """``FORWARD_COMPLETED``: fp16 autocast can overflow on an unusual image (seen on IQ-OTH/NCCD on
        an H200: one validation image's map was NaN at epoch 80 while the training loss was finite):
        score this batch again in fp32 rather than fail or report a NaN score."""
        if not engine.amp or bool(torch.isfinite(engine.state.output[Keys.PRED]).all()):
            return
        batchdata = engine.state.batch
        logger.warning(
            "non-finite anomaly map under AMP (batch %s): recomputed in fp32",
            batch_ids(batchdata) or engine.state.iteration,
        )
        inputs, _, args, kwargs = engine_batch(engine, batchdata)
        with engine.mode(engine.network), torch.autocast(torch.device(engine.state.device).type, enabled=False):
            engine.state.output[Keys.PRED] = engine.inferer(inputs, engine.network, *args, **kwargs)

    @staticmethod
    def _add_scores(engine: SupervisedEvaluator) -> None:
        """``MODEL_COMPLETED``: the map in float32, its ``"score"``, the batch's ``"id"`` and, when the
        detector bounds its maps by the anatomy, the ``(B, 1, H, W)`` mask as ``"anatomy"`` (where the
        :class:`~monai_skipts.calibration.PixelThresholdHandler` finds it)."""
        output, batchdata = engine.state.output, engine.state.batch
        output[Keys.PRED] = output[Keys.PRED].float()
        output["score"] = SkipTSInferer.score(output[Keys.PRED])
        masker = getattr(engine.network, "anatomy_mask", None)
        if masker is not None and output.get(Keys.IMAGE) is not None:
            with torch.no_grad():
                inside = masker(plain_tensor(output[Keys.IMAGE]))
            if inside is not None:
                output["anatomy"] = inside
                # the score is the maximum inside the anatomy (the map is zero outside it)
                output["score"] = output[Keys.PRED].masked_fill(inside <= 0, float("-inf")).flatten(1).amax(dim=1)
        if isinstance(batchdata, dict) and "id" in batchdata:
            output["id"] = list(batchdata["id"])
