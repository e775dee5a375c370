"""Trainer and evaluator for Skip-TS, built on :mod:`monai.engines` so every MONAI/ignite handler
(StatsHandler, ValidationHandler, TensorBoard, MLflowHandler, checkpoints, LR schedulers) plugs in.

- :class:`SkipTSTrainer` is a :class:`monai.engines.SupervisedTrainer` whose network is a
  :class:`~monai_skipts.networks.SkipTS`, whose optimizer holds only the student's parameters
  (Adam, lr 0.005, betas (0.5, 0.999): the paper's), and whose loss is
  :class:`~monai_skipts.losses.DRKDLoss`. The teacher runs without autograd; AMP is used on CUDA.
  A non-finite loss stops the run before the optimizer step, naming the batch's images
  (:class:`NonFiniteLossError`); under AMP the batch is first trained again in fp32. Both are an
  ``IterationEvents.LOSS_COMPLETED`` handler: MONAI's iteration itself is not overridden.
- :class:`SkipTSEvaluator` is a :class:`monai.engines.SupervisedEvaluator` whose inferer gives the
  anomaly map; each iteration's output also holds ``"score"`` (B,) and the batch's ``"id"`` list.
  The map is standardised per level when the detector has statistics (``level_stats``). Batches
  reach the network as plain tensors in channels-last memory format (:class:`PlainTensorBatch`, a
  ``prepare_batch``); an AMP batch whose map is non-finite is scored again in fp32
  (``IterationEvents.FORWARD_COMPLETED`` handler), score and ids are added at ``MODEL_COMPLETED``.
- :class:`DenoisingBatch` (a ``prepare_batch``) trains the student to denoise: it reads the teacher's
  features of images with synthetic lesions and is compared with the teacher's features of the clean
  images (off unless a bundle's ``synthetic_lesions`` or a benchmark method asks for it).
- :class:`LevelStatsFitter` fits those per-level statistics on the training normals after training
  and sets them on the detector (bundle: ``$@fit_level_stats()`` between the trainer's run and the
  calibration).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Sequence

import torch
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents, default_prepare_batch
from monai.utils import CommonKeys as Keys

from .inferers import SkipTSInferer, fit_level_stats
from .losses import DRKDLoss
from .transforms.presets import has_random_transforms
from .utils import resolve_device

__all__ = [
    "SkipTSTrainer",
    "SkipTSEvaluator",
    "NonFiniteLossError",
    "LevelStatsFitter",
    "TeacherFeatureCache",
    "PlainTensorBatch",
    "DenoisingBatch",
    "build_optimizer",
    "distribute_student",
    "PAPER_HPARAMS",
]

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


def _uses_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


class NonFiniteLossError(RuntimeError):
    """The training loss is NaN or infinite (in fp32): training stops before the optimizer step, so
    the weights stay finite and no ``model.pt`` is written. The message names the batch's images."""


class _NonFiniteLoss(Exception):
    """Internal: raised at ``LOSS_COMPLETED`` (before backward and the optimizer step)."""


def _batch_ids(batchdata: Any) -> list[str]:
    if isinstance(batchdata, dict) and "id" in batchdata:
        return [str(i) for i in batchdata["id"]]
    return []


def _nonfinite_images(batchdata: Any) -> list[str]:
    """Ids (or batch positions) of the images in the batch that hold NaN/inf pixel values."""
    image = batchdata.get("image") if isinstance(batchdata, dict) else None
    if not isinstance(image, torch.Tensor) or image.ndim < 1:
        return []
    bad = (~torch.isfinite(image.detach().reshape(image.shape[0], -1))).any(dim=1).tolist()
    ids = _batch_ids(batchdata) or [f"#{i}" for i in range(len(bad))]
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
        prepare_batch: e.g. :class:`TeacherFeatureCache` to feed cached teacher
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
        if amp and not _uses_cuda(device):
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
            _batch_ids(batchdata) or engine.state.iteration,
        )
        inputs, targets, args, kwargs = _prepared(engine, batchdata)
        with torch.autocast(torch.device(engine.state.device).type, enabled=False):
            pred = engine.inferer(inputs, engine.network, *args, **kwargs)
            loss32 = engine.loss_function(pred, targets).mean()
        if not bool(torch.isfinite(loss32.detach()).all()):
            raise SkipTSTrainer._stop(engine, batchdata, float(loss32.detach()))
        engine.state.output[Keys.PRED], engine.state.output[Keys.LOSS] = pred, loss32

    @staticmethod
    def _stop(engine: SupervisedTrainer, batchdata: Any, loss: float) -> NonFiniteLossError:
        ids = _batch_ids(batchdata)
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


class SkipTSEvaluator(SupervisedEvaluator):
    """Skip-TS evaluator: output ``"pred"`` is the anomaly map ``(B, 1, H, W)``, ``"score"`` its max
    ``(B,)``, ``"label"`` the batch labels (when present) and ``"id"`` the batch's ids (when present).

    Args:
        device: as for :class:`SkipTSTrainer`.
        val_data_loader: batches of dicts with ``"image"`` and optional ``"label"``, ``"id"``.
        network: the :class:`~monai_skipts.networks.AnomalyDetector` (its forward gives the map, with
            the statistics it holds at each iteration, e.g. those :class:`LevelStatsFitter` set).
        inferer: default :class:`~monai_skipts.inferers.SkipTSInferer`.
        amp: honoured on CUDA only. A batch whose map is non-finite under fp16 (an overflow) is scored
            again in fp32 (a warning names its images); AMP stays on for the next batches.
        channels_last, plain_tensors: the batch's image reaches the network as a plain tensor in
            channels-last memory format (:class:`PlainTensorBatch` around ``prepare_batch``); both
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
        amp = bool(amp and _uses_cuda(device))
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
            _batch_ids(batchdata) or engine.state.iteration,
        )
        inputs, _, args, kwargs = _prepared(engine, batchdata)
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
                inside = masker(_plain(output[Keys.IMAGE]))
            if inside is not None:
                output["anatomy"] = inside
                # the score is the maximum inside the anatomy (the map is zero outside it)
                output["score"] = output[Keys.PRED].masked_fill(inside <= 0, float("-inf")).flatten(1).amax(dim=1)
        if isinstance(batchdata, dict) and "id" in batchdata:
            output["id"] = list(batchdata["id"])


def _prepared(engine: Any, batchdata: Any) -> tuple[Any, Any, tuple, dict]:
    """``(inputs, targets, args, kwargs)`` of ``batchdata`` through the engine's ``prepare_batch``."""
    batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
    if len(batch) == 2:
        return batch[0], batch[1], (), {}
    return batch[0], batch[1], tuple(batch[2]), dict(batch[3])


def _plain(x: Any) -> Any:
    return x.as_tensor() if hasattr(x, "as_tensor") else x


class PlainTensorBatch:
    """``prepare_batch`` for :class:`SkipTSEvaluator` (its default): the batch of ``prepare_batch``
    (MONAI's ``default_prepare_batch`` unless given) with the image and label as plain
    ``torch.Tensor`` s, the image in channels-last memory format.

    MONAI's ``MetaTensor`` carries its metadata through every operation of the network (per-op
    bookkeeping that costs more than the small convolutions of the EfficientNet-Lite models), and
    channels-last is the layout the CPU (oneDNN) and CUDA (cuDNN) convolutions run fastest in; the
    network's weights are not touched (a convolution given a channels-last input computes in
    channels-last). ``benchmarks/speed.py`` measures both paths in one run.

    Args:
        prepare_batch: the inner ``prepare_batch(batchdata, device, non_blocking, **kwargs)``.
        channels_last: put 4-D images in channels-last memory format (values unchanged).
    """

    def __init__(self, prepare_batch: Callable = default_prepare_batch, channels_last: bool = True):
        self.prepare_batch = prepare_batch
        self.channels_last = bool(channels_last)

    def __call__(self, batchdata: Any, device: Any = None, non_blocking: bool = False, **kwargs: Any):
        batch = self.prepare_batch(batchdata, device, non_blocking, **kwargs)
        image, label = _plain(batch[0]), _plain(batch[1])
        if self.channels_last and isinstance(image, torch.Tensor) and image.ndim == 4:
            image = image.contiguous(memory_format=torch.channels_last)
        return (image, label) if len(batch) == 2 else (image, label, *batch[2:])


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
            :class:`TeacherFeatureCache` makes the fit reuse its cached teacher features. ``None``
            (or MONAI's default) recomputes the features through the network. A
            :class:`DenoisingBatch` is replaced by its clean ``features``: the statistics describe
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


class TeacherFeatureCache:
    """``prepare_batch`` for :class:`SkipTSTrainer` that computes each training image's teacher
    features once and reuses them every epoch (the teacher is frozen and, without random
    augmentation, sees the same image every epoch: the paper trains without augmentation).

    Batches must carry a unique ``"id"`` per image. Features are kept on ``storage_device`` in
    ``dtype`` (float16 halves memory: ~3.8 MB per 256² image for wide_resnet50_2, ~0.4 MB for
    efficientnet_lite0). Refuses a ``transform`` with random components, whose output changes
    every epoch and must not be cached.

    Returns ``(image, label, (), {"teacher_feats": [E1..E4]})``, the 4-tuple form that
    :class:`monai.engines.SupervisedTrainer` passes on to ``SkipTS.forward``.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        transform: Any = None,
        key: str = "id",
        dtype: torch.dtype | str = torch.float32,
        storage_device: str | torch.device = "cpu",
    ):
        if has_random_transforms(transform):
            raise ValueError(
                "teacher feature caching needs deterministic training transforms, but the training "
                "transform holds random ones; disable the cache (cache_teacher=false) or the augmentation"
            )
        self.network = network
        self.key = key
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.storage_device = torch.device(storage_device)
        self.store: dict[str, list[torch.Tensor]] = {}

    def __call__(self, batchdata: dict, device: torch.device, non_blocking: bool = False, **kwargs: Any):
        if not isinstance(batchdata, dict) or self.key not in batchdata:
            raise KeyError(f"TeacherFeatureCache needs batches with a unique '{self.key}' per image")
        image = batchdata["image"]
        # plain tensors: MetaTensor bookkeeping on every student op costs ~2x per step (benchmarks/speed.py)
        image = (image.as_tensor() if hasattr(image, "as_tensor") else image).to(
            device=device, non_blocking=non_blocking, **kwargs
        )
        label = batchdata.get("label")
        label = label.to(device=device, non_blocking=non_blocking) if isinstance(label, torch.Tensor) else None
        ids = [str(i) for i in batchdata[self.key]]
        missing = [i for i, k in enumerate(ids) if k not in self.store]
        if missing:
            net = getattr(self.network, "module", self.network)
            feats = net.teacher_features(image[missing])
            for j, i in enumerate(missing):
                self.store[ids[i]] = [f[j].to(self.storage_device, self.dtype) for f in feats]
        feats = [
            torch.stack([self.store[k][level] for k in ids]).to(
                device=device, dtype=image.dtype, non_blocking=non_blocking
            )
            for level in range(4)
        ]
        return image, label, (), {"teacher_feats": feats}


class DenoisingBatch:
    """``prepare_batch`` for denoising distillation (the denoising student of DeSTSeg, Zhang et al.
    CVPR 2023, and RD++, Tien et al. CVPR 2023): the student reads the teacher's features of a
    *corrupted* image, and its loss compares what it produces with the teacher's features of the
    *clean* image, so it learns not to reproduce what does not belong to a normal image.

    Per batch:

    1. the clean image and its teacher features ``[E1..E4]`` from ``features`` (a
       :class:`TeacherFeatureCache`: cached, computed once per image; MONAI's ``default_prepare_batch``:
       the teacher runs here);
    2. optionally ``annotation`` (:class:`~monai_skipts.transforms.RandBurnedInAnnotation`) pastes
       captions and markers into some clean images as *normal* content (their clean features are
       computed again);
    3. ``lesion`` (:class:`~monai_skipts.transforms.RandSyntheticLesion`) corrupts a share ``lesion.prob``
       of the images inside their anatomy (``batchdata[anatomy_key]`` when the batch carries one, else
       :class:`~monai_skipts.transforms.AnatomyMask` of ``modality``, computed once per image id and
       kept); the foreign patches of the ``"fpi"`` family come from the next image of the batch;
    4. the teacher runs on the corrupted images only (the others keep their clean features).

    Returns ``(corrupted image, clean [E1, E2, E3], (), {"teacher_feats": corrupted [E1..E4]})``: MONAI's
    trainer hands the second element to the loss as ``targets`` (:func:`~monai_skipts.losses.teacher_target`:
    the clean features replace the teacher features the model's forward returns), the dictionary to
    the network's ``forward``. What the student sees, by architecture (all through ``teacher_feats``):

    - Skip-TS with skip connections: D3 reads E4 of the corrupted image and the skips E3, E2 of the
      corrupted image (so the skips carry the lesion, and the decoder is trained not to pass it on);
    - without skips (``skip="none"``): E4 of the corrupted image;
    - RD4AD's one-class bottleneck (``bottleneck=True``, :class:`~monai_skipts.networks.RD4AD`): the
      bottleneck's fusion of E1..E3 of the corrupted image;
    - the encoder student (traditional KD): the corrupted image itself.

    The target is always the teacher's E1..E3 of the clean image. :attr:`last_masks` holds the
    ``(B, 1, H, W)`` masks of the pixels changed in the last batch.

    Args:
        network: the :class:`~monai_skipts.networks.SkipTS` / ``RD4AD`` being trained (DDP-wrapped is fine).
        lesion: the corruption; its random state is the one to seed (``lesion.set_random_state``).
        features: the clean ``prepare_batch`` (see 1.).
        modality: :class:`~monai_skipts.transforms.AnatomyMask` preset for the anatomy.
        anatomy_key: batch key of precomputed ``(B, 1, H, W)`` anatomy masks.
        key: batch key of the unique image ids (the anatomy masks are kept per id; without ids they are
            computed every batch).
        annotation: optional burned-in annotations pasted as normal content.

    Example:
        >>> import torch
        >>> from monai_skipts.networks import SkipTS
        >>> from monai_skipts.transforms import RandSyntheticLesion
        >>> net = SkipTS("efficientnet_lite0", pretrained=False)
        >>> lesion = RandSyntheticLesion(prob=1.0, families=("intensity",)); _ = lesion.set_random_state(0)
        >>> prep = DenoisingBatch(net, lesion)
        >>> img = torch.zeros(2, 3, 64, 64); img[:, :, 8:56, 8:56] = torch.rand(2, 3, 48, 48) + 1
        >>> x, clean, _, kw = prep({"image": img, "id": ["a", "b"]}, "cpu")
        >>> len(clean), len(kw["teacher_feats"]), bool((x != img).any())
        (3, 4, True)
    """

    def __init__(
        self,
        network: torch.nn.Module,
        lesion: Any,
        features: Callable = default_prepare_batch,
        modality: str = "mri",
        anatomy_key: str = "anatomy",
        key: str = "id",
        annotation: Any = None,
    ):
        from monai_skipts.transforms.anatomy import AnatomyMask

        self.network = network
        self.lesion = lesion
        self.features = features
        self.masker = AnatomyMask(modality)
        self.anatomy_key, self.key = anatomy_key, key
        self.annotation = annotation
        self.anatomy_store: dict[str, torch.Tensor] = {}
        self.last_masks: torch.Tensor | None = None

    @property
    def store(self) -> dict:
        """The clean features' cache (the inner :class:`TeacherFeatureCache`'s), when there is one."""
        return getattr(self.features, "store", {})

    def _teacher(self, image: torch.Tensor) -> list[torch.Tensor]:
        net = getattr(self.network, "module", self.network)
        return net.teacher_features(image)

    def _anatomy(self, batchdata: dict, clean: torch.Tensor, i: int, ids: list[str] | None) -> torch.Tensor:
        given = batchdata.get(self.anatomy_key) if isinstance(batchdata, dict) else None
        if isinstance(given, torch.Tensor):
            return _plain(given[i]).cpu()
        if ids is not None and ids[i] in self.anatomy_store:
            return self.anatomy_store[ids[i]]
        mask = self.masker(clean[i].detach().float().cpu()).bool()
        if ids is not None:
            self.anatomy_store[ids[i]] = mask
        return mask

    def __call__(self, batchdata: dict, device: Any = None, non_blocking: bool = False, **kwargs: Any):
        batch = self.features(batchdata, device, non_blocking, **kwargs)
        image = _plain(batch[0])
        feats = list(batch[3]["teacher_feats"]) if len(batch) > 3 and "teacher_feats" in batch[3] else None
        if feats is None:
            feats = self._teacher(image)
        ids = [str(k) for k in batchdata[self.key]] if isinstance(batchdata, dict) and self.key in batchdata else None
        n = image.shape[0]
        clean_cpu = image.detach().float().cpu()
        anatomy = [self._anatomy(batchdata, clean_cpu, i, ids) for i in range(n)]
        if self.annotation is not None:
            annotated = []
            for i in range(n):
                out = self.annotation(clean_cpu[i])
                if bool(self.annotation.last_mask.any()):
                    clean_cpu[i] = torch.as_tensor(out)
                    annotated.append(i)
            if annotated:
                image = image.clone()
                image[annotated] = clean_cpu[annotated].to(image.device, image.dtype)
                fresh = self._teacher(image[annotated])
                feats = [f.clone() for f in feats]
                for level, f in enumerate(fresh):
                    feats[level][annotated] = f.to(feats[level].dtype)
        corrupted = clean_cpu.clone()
        masks = torch.zeros((n, 1, *image.shape[-2:]))
        for i in range(n):
            source = clean_cpu[(i + 1) % n] if n > 1 else None
            corrupted[i], masks[i] = self.lesion(clean_cpu[i], anatomy=anatomy[i], source=source)
        changed = [i for i in range(n) if bool(masks[i].any())]
        self.last_masks = masks
        student_feats = feats
        x = image
        if changed:
            x = image.clone()
            x[changed] = corrupted[changed].to(image.device, image.dtype)
            fresh = self._teacher(x[changed])
            student_feats = [f.clone() for f in feats]
            for level, f in enumerate(fresh):
                student_feats[level][changed] = f.to(student_feats[level].dtype)
        if x.ndim == 4 and image.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        return x, feats[:3], (), {"teacher_feats": student_feats}
