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
- :class:`SegHeadTrainer` trains the optional segmentation head on the frozen teacher-student
  discrepancy with synthetic lesions (bundle: ``$@seg_head_stage()`` after the level statistics);
  :func:`seg_head_options` checks a bundle's ``seg_head`` (the bundle does before training).
- :class:`LevelStatsFitter` fits those per-level statistics on the training normals after training
  and sets them on the detector (bundle: ``$@fit_level_stats()`` between the trainer's run and the
  calibration).

Modules: :mod:`~monai_skipts.engines.trainer`, :mod:`~monai_skipts.engines.evaluator`,
:mod:`~monai_skipts.engines.prepare_batch` (the ``prepare_batch`` callables),
:mod:`~monai_skipts.engines.level_stats`, :mod:`~monai_skipts.engines.seg_head`; the names above are this package's API.
"""

from monai_skipts.engines.evaluator import SkipTSEvaluator
from monai_skipts.engines.level_stats import LevelStatsFitter
from monai_skipts.engines.prepare_batch import DenoisingBatch, PlainTensorBatch, TeacherFeatureCache
from monai_skipts.engines.seg_head import (
    SEG_HEAD_DEFAULTS,
    SEG_HEAD_LOSSES,
    SEG_HEAD_TRAINED_MODES,
    SegHeadCalibrationWarning,
    SegHeadLoss,
    SegHeadTrainer,
    seg_head_options,
)
from monai_skipts.engines.trainer import (
    PAPER_HPARAMS,
    NonFiniteLossError,
    SkipTSTrainer,
    build_optimizer,
    distribute_student,
)

__all__ = [
    "SkipTSTrainer",
    "SkipTSEvaluator",
    "NonFiniteLossError",
    "LevelStatsFitter",
    "TeacherFeatureCache",
    "PlainTensorBatch",
    "DenoisingBatch",
    "SegHeadTrainer",
    "SegHeadLoss",
    "SegHeadCalibrationWarning",
    "SEG_HEAD_DEFAULTS",
    "SEG_HEAD_LOSSES",
    "SEG_HEAD_TRAINED_MODES",
    "seg_head_options",
    "build_optimizer",
    "distribute_student",
    "PAPER_HPARAMS",
]
