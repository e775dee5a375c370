"""The second training stage of DeSTSeg (Zhang et al. CVPR 2023): a segmentation head on the frozen
teacher-student discrepancy, trained on synthetic lesions.

:class:`SegHeadTrainer` runs after the student's training and the fit of the per-level statistics,
before the calibration (the thresholds are calibrated on the map the head selects). In a bundle config
(``seg_head``: ``None`` = off, or ``{"mode": "map"|"fused", "epochs": 5, ...}``)::

    "seg_head_stage": {"_target_": "monai_skipts.engines.SegHeadTrainer", "network": "@detector",
                       "data_loader": "@train#dataloader", "prepare_batch": "@train#prepare_batch",
                       "options": "@seg_head", ...},
    "run": ["$@train#trainer.run()", "$@fit_level_stats()", "$@seg_head_stage()", "$@calibrate()", ...]
"""

from __future__ import annotations

import difflib
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from monai.engines.utils import default_prepare_batch
from monai.losses import DiceLoss, FocalLoss

from monai_skipts.engines.prepare_batch import DenoisingBatch
from monai_skipts.transforms import RandSyntheticLesion
from monai_skipts.utils import resolve_device

__all__ = [
    "SegHeadCalibrationWarning",
    "warn_parametric_map_calibration",
    "SEG_HEAD_LOSSES",
    "SEG_HEAD_DEFAULTS",
    "SEG_HEAD_TRAINED_MODES",
    "SegHeadLoss",
    "SegHeadTrainer",
    "seg_head_options",
]

logger = logging.getLogger(__name__)

#: the losses of the head: DeSTSeg's focal + L1, or BCE + Dice
SEG_HEAD_LOSSES = ("focal_l1", "bce_dice")
#: the stage's defaults (a bundle's ``seg_head`` entries override them)
SEG_HEAD_DEFAULTS: dict[str, Any] = {
    "mode": "map",
    "epochs": 5,
    "lr": 1e-3,
    "loss": "focal_l1",
    "hidden": 64,
    "reduce": 32,
    # the lesions the head learns from: RandSyntheticLesion's keyword arguments (None: the bundle's
    # synthetic_lesions, else every family with prob 0.5, so the head also sees clean normals)
    "lesions": None,
}
#: the maps a trained head can give (``"discrepancy"`` would train a head that is not used)
SEG_HEAD_TRAINED_MODES = ("map", "fused")


class SegHeadCalibrationWarning(UserWarning):
    """A segmentation head's map calibrated with a parametric fit (:func:`warn_parametric_map_calibration`)."""


def warn_parametric_map_calibration(mode: str | None, calibration: str | None) -> bool:
    """Warn when a head in mode ``"map"`` is calibrated with a parametric method (``"lognormal"``,
    ``"gaussian"``): the head's map is a lesion probability (at most 1) whose normal scores are not so
    distributed, so the fitted threshold can lie above every score. Returns whether it warned.

    Warns:
        SegHeadCalibrationWarning: naming both options and recommending ``"empirical"``.
    """
    if mode != "map" or calibration in (None, "empirical"):
        return False
    warnings.warn(
        f"seg_head mode 'map' with calibration {calibration!r}: the head's map is a lesion probability "
        f"(at most 1) whose normal image scores are not {calibration}-distributed, so the fitted threshold "
        "can lie above every score and flag nothing; use --calibration empirical",
        SegHeadCalibrationWarning,
        stacklevel=3,
    )
    return True


def seg_head_options(options: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A bundle's ``seg_head`` checked, over :data:`SEG_HEAD_DEFAULTS`; ``None`` when off (``None``).

    Raises:
        ValueError: naming ``seg_head`` and the option: not a mapping, an unknown option, a mode other
            than ``"map"``/``"fused"``, ``epochs`` not an integer ``>= 1``, or an unknown loss.

    >>> seg_head_options({"mode": "fused"})["epochs"]
    5
    >>> seg_head_options({"epoch": 2})
    Traceback (most recent call last):
    ...
    ValueError: seg_head: unknown options ['epoch']; did you mean 'epochs'? (known: [...])
    """
    if options is None:
        return None
    if not isinstance(options, Mapping):
        raise ValueError(f"seg_head must be null (off) or a mapping of {sorted(SEG_HEAD_DEFAULTS)}, got {options!r}")
    unknown = sorted(set(options) - set(SEG_HEAD_DEFAULTS))
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), list(SEG_HEAD_DEFAULTS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"seg_head: unknown options {unknown}{hint} (known: {sorted(SEG_HEAD_DEFAULTS)})")
    opts = {**SEG_HEAD_DEFAULTS, **dict(options)}
    if opts["mode"] not in SEG_HEAD_TRAINED_MODES:
        modes = " or ".join(repr(m) for m in SEG_HEAD_TRAINED_MODES)
        raise ValueError(f"seg_head mode must be {modes}, got {opts['mode']!r}")
    epochs = opts["epochs"]
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"seg_head epochs must be an integer >= 1, got {epochs!r}")
    if opts["loss"] not in SEG_HEAD_LOSSES:
        raise ValueError(f"seg_head loss must be one of {list(SEG_HEAD_LOSSES)}, got {opts['loss']!r}")
    return opts


class SegHeadLoss(torch.nn.Module):
    """Loss of the head's logits ``(B, 1, H, W)`` against the lesion masks ``(B, 1, H, W)``.

    Args:
        kind: ``"focal_l1"`` (DeSTSeg: focal loss, gamma 4, plus the L1 distance of the probability to
            the mask) or ``"bce_dice"`` (binary cross-entropy plus the batch Dice loss).

    Raises:
        ValueError: an unknown ``kind``.

    >>> loss = SegHeadLoss("bce_dice")
    >>> mask = torch.zeros(2, 1, 8, 8); mask[:, :, 2:5, 2:5] = 1
    >>> bool(loss(20 * (2 * mask - 1), mask) < loss(torch.zeros(2, 1, 8, 8), mask))
    True
    """

    def __init__(self, kind: str = "focal_l1"):
        super().__init__()
        if kind not in SEG_HEAD_LOSSES:
            raise ValueError(f"seg head loss must be one of {list(SEG_HEAD_LOSSES)}, got {kind!r}")
        self.kind = kind
        self.focal = FocalLoss(gamma=4.0, use_softmax=False)
        self.dice = DiceLoss(sigmoid=True, batch=True)

    def forward(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.kind == "focal_l1":
            return self.focal(logits, mask) + (torch.sigmoid(logits) - mask).abs().mean()
        return F.binary_cross_entropy_with_logits(logits, mask) + self.dice(logits, mask)


class SegHeadTrainer:
    """Train a :class:`~monai_skipts.networks.SegHead` on a trained detector (teacher and student
    frozen) with synthetic lesions and their masks, then fit the ``"fused"`` normalisation on the
    clean training normals, and select the head's ``mode``.

    Per step: the batch's clean features (``prepare_batch``: a
    :class:`~monai_skipts.engines.TeacherFeatureCache` is reused; a
    :class:`~monai_skipts.engines.DenoisingBatch` is replaced by its clean ``features``) go through a
    :class:`~monai_skipts.engines.DenoisingBatch` of the head's own lesions, whose masks
    (``last_masks``) are the targets; the teacher's and the student's features of the corrupted images
    are the head's input (as at inference: both read the image).

    Args:
        network: the trained :class:`~monai_skipts.networks.AnomalyDetector` (it gets the head).
        data_loader: the training normals (batches of dicts with ``"image"`` and ``"id"``).
        options: the bundle's ``seg_head``: ``None`` (off: the call is a no-op) or entries of
            :data:`SEG_HEAD_DEFAULTS` (``mode``, ``epochs``, ``lr``, ``loss``, ``hidden``, ``reduce``,
            ``lesions``).
        prepare_batch: the student's trainer's ``prepare_batch`` (clean features; see above).
        synthetic_lesions: the bundle's ``synthetic_lesions``, the lesions' default when ``options``
            has no ``lesions`` (their ``prob`` is kept).
        modality: the anatomy preset the lesions are placed in.
        seed: seeds the lesions and the head's initial weights.
        device: default the network's device.

    Raises:
        ValueError: bad ``options`` (:func:`seg_head_options`).

    >>> SegHeadTrainer(None, [], options=None)() is None
    True
    """

    def __init__(
        self,
        network: torch.nn.Module,
        data_loader: Iterable,
        options: Mapping[str, Any] | None = None,
        prepare_batch: Callable | None = None,
        synthetic_lesions: Mapping[str, Any] | None = None,
        modality: str = "mri",
        seed: int | None = 0,
        device: str | torch.device | None = None,
    ):
        self.network, self.data_loader = network, data_loader
        self.enabled = options is not None
        self.options = seg_head_options(options) or dict(SEG_HEAD_DEFAULTS)
        lesions = self.options["lesions"]
        if lesions is None:
            lesions = {k: v for k, v in (synthetic_lesions or {"prob": 0.5}).items() if k != "annotations"}
        self.lesions = dict(lesions)
        if isinstance(prepare_batch, DenoisingBatch):
            prepare_batch = prepare_batch.features
        self.prepare_batch = prepare_batch if prepare_batch is not None else default_prepare_batch
        self.modality, self.seed = modality, seed
        self.device = None if device is None else resolve_device(device)
        self.losses: list[float] = []

    def __call__(self, engine: Any = None):
        """Train the head and set it on the network; returns it (``None`` when off)."""
        if not self.enabled:
            return None
        det, opts = self.network, self.options
        device = self.device or det.level_stats.device
        if self.seed is not None:
            torch.manual_seed(int(self.seed))
        head = det.set_seg_head({"mode": opts["mode"], "hidden": opts["hidden"], "reduce": opts["reduce"]})
        head.to(device)
        model = getattr(det.model, "module", det.model)
        was_training = model.training
        model.eval()
        seed = None if self.seed is None else int(self.seed) + 2  # not the student's lesion sequence
        lesion = RandSyntheticLesion(**{"modality": self.modality, **self.lesions})
        lesion.set_random_state(seed)
        corrupt = DenoisingBatch(model, lesion, features=self.prepare_batch, modality=self.modality)
        loss_fn = SegHeadLoss(opts["loss"])
        optimizer = torch.optim.Adam(head.parameters(), lr=float(opts["lr"]))
        head.train()
        try:
            for epoch in range(int(opts["epochs"])):
                total, n = 0.0, 0
                for batch in self.data_loader:
                    with torch.no_grad():
                        x, _, _, kwargs = corrupt(batch, device)
                        t, s = model(x, kwargs["teacher_feats"])
                    mask = corrupt.last_masks.to(device)
                    loss = loss_fn(head.logits(t, s, x.shape[-2:]), mask)
                    if not math.isfinite(float(loss.detach())):
                        raise RuntimeError(f"seg head: non-finite loss at epoch {epoch + 1}")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total, n = total + float(loss.detach()), n + 1
                self.losses.append(total / max(n, 1))
                logger.info("seg head epoch %d/%d: loss %.4f", epoch + 1, opts["epochs"], self.losses[-1])
            head.eval()
            head.set_map_norm(*self._fit_map_norm(model, device))
        finally:
            head.eval()
            model.train(was_training)
        return head

    def _fit_map_norm(self, model: torch.nn.Module, device: torch.device) -> tuple[float, float]:
        """``(offset, scale)``: the mean discrepancy pixel of the clean training normals (inside the
        anatomy when the detector has the mask), and their mean image maximum minus it, from the map the
        detector serves."""
        det = self.network
        pix, peaks, n_pix, n_img = 0.0, 0.0, 0, 0
        with torch.no_grad():
            for batch in self.data_loader:
                prepared = self.prepare_batch(batch, device)
                x = prepared[0]
                kwargs = prepared[3] if len(prepared) > 3 else {}
                t, s = model(x, kwargs.get("teacher_feats"))
                mask = det.anatomy_mask(x)
                amap, score = det.head(t, s, x.shape[-2:], det.get_level_stats(), mask)
                pix += float(amap.double().sum())  # zero outside the anatomy
                n_pix += amap.numel() if mask is None else int(mask.expand_as(amap).count_nonzero())
                peaks += float(score.double().sum())
                n_img += int(score.numel())
        if n_img == 0:
            raise ValueError("seg head: no training batches")
        offset = pix / n_pix
        scale = max(peaks / n_img - offset, 1e-6)
        return offset, scale
