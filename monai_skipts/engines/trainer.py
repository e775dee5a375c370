"""The Skip-TS trainer: :class:`SkipTSTrainer` on :class:`monai.engines.SupervisedTrainer`, its
optimizer over the student only (:func:`build_optimizer`, the paper's :data:`PAPER_HPARAMS`), the
student's DDP wrapper (:func:`distribute_student`) and the stop on a non-finite loss
(:class:`NonFiniteLossError`).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Sequence

import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents, default_prepare_batch
from monai.utils import CommonKeys as Keys

from monai_skipts.engines.prepare_batch import batch_ids, engine_batch
from monai_skipts.losses import DRKDLoss
from monai_skipts.utils import resolve_device

__all__ = ["PAPER_HPARAMS", "NonFiniteLossError", "SkipTSTrainer", "build_optimizer", "distribute_student"]

logger = logging.getLogger(__name__)

#: the paper's training hyper-parameters
PAPER_HPARAMS = {"lr": 0.005, "betas": (0.5, 0.999), "batch_size": 16, "max_epochs": 200, "spatial_size": 256}


def _student(network: torch.nn.Module) -> torch.nn.Module:
    net = getattr(network, "module", network)  # DistributedDataParallel wraps the model
    return net.student


def distribute_student(network: torch.nn.Module) -> torch.nn.Module:
    """Under ``torch.distributed`` (torchrun), wrap the student, and only the student, in
    :class:`~torch.nn.parallel.DistributedDataParallel` (the frozen teacher needs no gradient sync).

    The wrapper is kept outside the module tree (``SkipTS.student`` stays the plain decoder), so
    checkpoints and state dicts are the same with or without DDP. Without a process group this
    returns ``network`` unchanged.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return network
    device = next(network.student.parameters()).device
    ddp = torch.nn.parallel.DistributedDataParallel(
        network.student, device_ids=[device.index] if device.type == "cuda" else None
    )
    network.__dict__["_student_ddp"] = ddp  # not registered as a submodule on purpose
    return network


def build_optimizer(
    network: torch.nn.Module, lr: float = 0.005, betas: Sequence[float] = (0.5, 0.999)
) -> torch.optim.Adam:
    """Adam over the student's parameters only (the teacher is frozen)."""
    return torch.optim.Adam(_student(network).parameters(), lr=lr, betas=tuple(betas))


class NonFiniteLossError(RuntimeError):
    """The training loss is NaN or infinite (in fp32): training stops before the optimizer step, so
    the weights stay finite and no ``model.pt`` is written. The message names the batch's images."""


def _nonfinite_images(batchdata: Any) -> list[str]:
    """Ids (or batch positions) of the images in the batch that hold NaN/inf pixel values."""
    image = batchdata.get("image") if isinstance(batchdata, dict) else None
    if not isinstance(image, torch.Tensor) or image.ndim < 1:
        return []
    bad = (~torch.isfinite(image.detach().reshape(image.shape[0], -1))).any(dim=1).tolist()
    ids = batch_ids(batchdata) or [f"#{i}" for i in range(len(bad))]
    return [k for k, b in zip(ids, bad) if b]


class SkipTSTrainer(SupervisedTrainer):
    """Skip-TS trainer.

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ...
        max_epochs: epochs (paper 200; the last epoch's model is the result, no early stopping).
        train_data_loader: batches of dicts with ``"image"`` ``(B, 3, H, W)``.
        network: :class:`~monai_skipts.networks.SkipTS` (optionally wrapped in DDP).
        optimizer: default :func:`build_optimizer` with ``lr`` and ``betas``.
        loss_function: default :class:`~monai_skipts.losses.DRKDLoss` (beta 0.05).
        amp: mixed precision; honoured on CUDA only (on CPU it is switched off with a log line).
            A batch whose loss is non-finite under fp16 (an overflow) is trained again in fp32
            (a warning names its images); AMP stays on for the next batches.
        prepare_batch: e.g. :class:`~monai_skipts.engines.TeacherFeatureCache` to feed cached teacher
            features; default: MONAI's ``(image, label)``.
        kwargs: passed to :class:`monai.engines.SupervisedTrainer` (``train_handlers``,
            ``epoch_length``, ``iteration_update``, ...; ``optim_set_to_none`` defaults to True here). The non-finite-loss handling is an
            ``IterationEvents.LOSS_COMPLETED`` handler, so it also guards a custom ``iteration_update``
            that fires that event.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        loss_function: Callable | None = None,
        lr: float = PAPER_HPARAMS["lr"],
        betas: Sequence[float] = PAPER_HPARAMS["betas"],
        amp: bool = True,
        prepare_batch: Callable = default_prepare_batch,
        **kwargs: Any,
    ):
        device = resolve_device(device)
        if amp and torch.device(device).type != "cuda":
            logger.info("AMP requested but the device is %s: training in fp32", device)
            amp = False
        network = network.to(device)
        kwargs.setdefault("decollate", False)
        # gradients freed before each forward pass (not zero-filled and kept through it): the same
        # weights, and the student's gradients (0.5 GB for the wide_resnet50_2 student) are not
        # held next to the activations at the step's memory peak
        kwargs.setdefault("optim_set_to_none", True)
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer if optimizer is not None else build_optimizer(network, lr, betas),
            loss_function=loss_function if loss_function is not None else DRKDLoss(),
            amp=amp,
            prepare_batch=prepare_batch,
            **kwargs,
        )
        self.add_event_handler(IterationEvents.LOSS_COMPLETED, self._check_loss)

    @staticmethod
    def _check_loss(engine: SupervisedTrainer) -> None:
        """``LOSS_COMPLETED`` (before backward and the optimizer step): a non-finite loss is computed
        again in fp32 when it came from AMP, and stops the run when it is (still) non-finite in fp32."""
        loss = engine.state.output[Keys.LOSS]
        if bool(torch.isfinite(loss.detach()).all()):
            return
        batchdata = engine.state.batch
        if not engine.amp:
            raise SkipTSTrainer._stop(engine, batchdata, float(loss.detach().float()))
        # fp16 autocast can overflow where fp32 does not: this batch's forward and loss again in fp32
        # (the backward and the step that follow use this loss; AMP stays on for the next batches)
        logger.warning(
            "non-finite loss under AMP (%s) for batch %s: trained again in fp32",
            float(loss.detach().float()),
            batch_ids(batchdata) or engine.state.iteration,
        )
        inputs, targets, args, kwargs = engine_batch(engine, batchdata)
        with torch.autocast(torch.device(engine.state.device).type, enabled=False):
            pred = engine.inferer(inputs, engine.network, *args, **kwargs)
            loss32 = engine.loss_function(pred, targets).mean()
        if not bool(torch.isfinite(loss32.detach()).all()):
            raise SkipTSTrainer._stop(engine, batchdata, float(loss32.detach()))
        engine.state.output[Keys.PRED], engine.state.output[Keys.LOSS] = pred, loss32

    @staticmethod
    def _stop(engine: SupervisedTrainer, batchdata: Any, loss: float) -> NonFiniteLossError:
        ids = batch_ids(batchdata)
        bad = _nonfinite_images(batchdata)
        what = (
            f"images with non-finite pixel values: {bad}"
            if bad
            else "no image of the batch holds non-finite pixel values (look at the model's weights, the "
            "learning rate and these images' intensities)"
        )
        msg = (
            f"non-finite training loss ({loss}) at epoch {engine.state.epoch}, iteration "
            f"{engine.state.iteration}, batch {ids or '(no ids)'}: {what}. Training stopped before this "
            "step, so the weights stay finite; model.pt is not written (checkpoint.pt, if any, keeps the "
            "last complete epoch)"
        )
        return NonFiniteLossError(msg)
