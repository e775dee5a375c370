"""The trained anomaly detector: one module that holds everything a trained model needs to serve.

:class:`AnomalyDetector` owns the frozen teacher and the student (a
:class:`~monai_skipts.networks.SkipTS` or :class:`~monai_skipts.networks.RD4AD`, as ``model``) and
the map head (:class:`~monai_skipts.inferers.AnomalyMapHead`). Its serving state is persistent state
in ``state_dict()`` plus one JSON-able :attr:`AnomalyDetector.config`:

==========================  ======================================================================
``level_stats`` (buffer)    per-level map statistics ``(L, 2)`` (mean, std); ``(0, 2)``: none
``threshold`` (buffer)      image decision threshold, float64 scalar, NaN: not calibrated
``scale`` (buffer)          scale of the normalised score, float64 scalar, NaN: none
``volume_threshold``        volume decision threshold, float64 scalar, NaN: not calibrated
``pixel_threshold``         map threshold for outlines, float64 scalar, NaN: not calibrated
``config["model"]``         the architecture (``model.config``), from which the model is rebuilt
``config["sigma"]``         Gaussian sigma of the map
``config["similarity"]``    per-pixel discrepancy of the maps (``"cosine"``: eq 1)
``config["preprocessing"]`` ``{"modality", "spatial_size": [H, W], "window", "mri_norm"}``
``config["calibration"]``   the calibration record (``method``, ``target_fpr``, ``n_normals``, ...)
``config["anatomy_mask"]``  anatomy mask settings (:func:`~monai_skipts.networks.anatomy_mask_config`;
                            ``None``: off): the maps are zeroed outside the anatomy before the
                            Gaussian filter and are zero there after it, the score is the maximum
                            inside it (:class:`~monai_skipts.networks.AnatomyMaskLayer`)
``config["seg_head"]``      the segmentation head's config (``None``: none; :class:`~monai_skipts.networks.SegHead`)
``seg_head.*`` (weights)    the head's weights and its ``map_norm`` buffer (only with a head)
==========================  ======================================================================

A checkpoint is this state (:func:`~monai_skipts.checkpoint.save_checkpoint`,
:func:`~monai_skipts.checkpoint.load_detector`); fitting statistics and calibrating only set it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from monai_skipts.inferers import AnomalyMapHead, mask_map_and_score
from monai_skipts.metrics import normalize_score
from monai_skipts.networks.anatomy import AnatomyMaskLayer, anatomy_mask_config
from monai_skipts.networks.seg_head import SegHead
from monai_skipts.transforms.presets import SPEC_KEYS, spatial_size_2d

__all__ = ["AnomalyDetector", "SCALAR_STATE", "decide"]

#: the float64 scalar buffers of the detector (NaN: not set)
SCALAR_STATE = ("threshold", "scale", "volume_threshold", "pixel_threshold")


def _nan() -> torch.Tensor:
    return torch.tensor(math.nan, dtype=torch.float64)


def _value(t: torch.Tensor) -> float | None:
    v = float(t)
    return None if math.isnan(v) else v


class AnomalyDetector(nn.Module):
    """Image ``(B, 3, H, W)`` -> anomaly map ``(B, 1, H, W)`` and score ``(B,)``, and the decision.

    Args:
        model: the teacher-student model (:class:`~monai_skipts.networks.SkipTS` or
            :class:`~monai_skipts.networks.RD4AD`); its ``config`` is the architecture.
        sigma: Gaussian sigma of the map (paper: 4).
        preprocessing: the preset options the model is trained with (``modality``, ``spatial_size``,
            ``window``, ``mri_norm``); ``spatial_size`` is stored as ``[H, W]``.
        anatomy_mask: bound the maps and scores by the anatomy (:meth:`set_anatomy_mask`): ``None``
            or ``False``: off (the plain maps, bit for bit); ``True``: the mask of
            ``preprocessing["modality"]``; a mapping: its settings
            (:func:`~monai_skipts.networks.anatomy_mask_config`).
        similarity: the maps' per-pixel discrepancy (``"cosine"``: eq 1; see
            :class:`~monai_skipts.inferers.AnomalyMapHead`).
        seg_head: an optional segmentation head's config (:meth:`set_seg_head`; ``None``: none, the
            map is the discrepancy map).

    Raises:
        ValueError: a ``spatial_size`` that is not ``S``, ``(S,)`` or ``(H, W)`` of positive ints;
            anatomy mask settings :func:`~monai_skipts.networks.anatomy_mask_config` refuses.

    >>> from monai_skipts.networks import SkipTS
    >>> det = AnomalyDetector(SkipTS(teacher="resnet18", pretrained=False), preprocessing={"spatial_size": 64})
    >>> amap, score = det(torch.zeros(1, 3, 64, 64))
    >>> tuple(amap.shape), tuple(score.shape), det.decide(score[0])["anomalous"]
    ((1, 1, 64, 64), (1,), None)
    """

    def __init__(
        self,
        model: nn.Module,
        sigma: float = 4.0,
        preprocessing: Mapping[str, Any] | None = None,
        anatomy_mask: Mapping[str, Any] | bool | None = None,
        similarity: str = "cosine",
        seg_head: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.model = model
        self.head = AnomalyMapHead(float(sigma), similarity=similarity)
        self.register_buffer("level_stats", torch.zeros(0, 2, dtype=torch.float32))
        for name in SCALAR_STATE:
            self.register_buffer(name, _nan())
        prep = {k: (preprocessing or {}).get(k) for k in SPEC_KEYS}
        if prep["spatial_size"] is not None:
            prep["spatial_size"] = list(spatial_size_2d(prep["spatial_size"]))
        if isinstance(prep["window"], tuple):
            prep["window"] = list(prep["window"])
        self.config: dict[str, Any] = {
            "model": dict(getattr(model, "module", model).config),
            "sigma": float(sigma),
            "similarity": str(similarity),
            "preprocessing": prep,
            "calibration": None,
            "anatomy_mask": None,
            "seg_head": None,
        }
        self.anatomy: AnatomyMaskLayer | None = None
        self.set_anatomy_mask(anatomy_mask)
        self.seg_head: SegHead | None = None
        self.set_seg_head(seg_head)

    # ---- state -----------------------------------------------------------------------------------

    @property
    def sigma(self) -> float:
        return float(self.config["sigma"])

    @property
    def trained_size(self) -> tuple[int, int] | None:
        """``(H, W)`` the model was trained at, or ``None`` when unknown."""
        size = self.config["preprocessing"].get("spatial_size")
        return None if size is None else (int(size[0]), int(size[1]))

    def get_level_stats(self) -> torch.Tensor | None:
        """The per-level statistics ``(L, 2)``, or ``None`` when the maps are not standardised."""
        return self.level_stats if self.level_stats.shape[0] else None

    def set_level_stats(self, stats: torch.Tensor | Sequence[Sequence[float]] | None) -> None:
        """Set the per-level map statistics (``(L, 2)`` rows ``(mean_l, std_l)``, finite, std > 0);
        ``None`` removes them (maps then follow the plain eq 7, bit for bit)."""
        if stats is None:
            self.level_stats = torch.zeros(0, 2, dtype=torch.float32, device=self.level_stats.device)
            return
        stats = torch.as_tensor(stats).detach()
        if stats.dim() != 2 or stats.shape[1] != 2 or stats.shape[0] < 1:
            raise ValueError(f"level stats must have shape (L, 2) (mean, std per level), got {tuple(stats.shape)}")
        if not bool(torch.isfinite(stats).all()) or not bool((stats[:, 1] > 0).all()):
            raise ValueError(f"level stats must be finite with std > 0, got {stats.tolist()}")
        self.level_stats = stats.to(device=self.level_stats.device, dtype=torch.float32).clone()

    def set_calibration(self, record: Mapping[str, Any] | None) -> None:
        """Set the thresholds from a calibration record (:func:`~monai_skipts.calibration.threshold_record`:
        ``{"value", "scale", "target_fpr", "n_normals", "method", ..., "volume": {"value", ...},
        "pixel": {"value", ...}}``): ``threshold`` and ``scale`` from the top level, ``volume_threshold``
        and ``pixel_threshold`` from the sub-records (NaN where absent); ``None`` clears them all."""
        rec = dict(record) if record else None
        self.config["calibration"] = rec
        rec = rec or {}

        def value(r: Any, key: str = "value") -> float:
            return float(r[key]) if isinstance(r, Mapping) and r.get(key) is not None else math.nan

        self.threshold.fill_(value(rec))
        self.scale.fill_(value(rec, "scale"))
        self.volume_threshold.fill_(value(rec.get("volume")))
        self.pixel_threshold.fill_(value(rec.get("pixel")))

    def set_anatomy_mask(self, spec: Mapping[str, Any] | bool | None) -> None:
        """Bound the maps and scores by the anatomy (``True``: the mask of the model's modality; a
        mapping: settings, see :func:`~monai_skipts.networks.anatomy_mask_config`), or not
        (``None``/``False``). The resolved settings go to ``config["anatomy_mask"]``."""
        cfg = anatomy_mask_config(spec, self.config["preprocessing"].get("modality"))
        self.config["anatomy_mask"] = cfg
        self.anatomy = AnatomyMaskLayer(**cfg) if cfg is not None else None

    def anatomy_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """The ``(B, 1, H, W)`` anatomy mask of the input ``x`` (``None`` when the mask is off)."""
        return None if self.anatomy is None else self.anatomy(x)

    def set_sigma(self, sigma: float) -> None:
        """Use another Gaussian sigma for the map (stored in the config)."""
        self.config["sigma"] = float(sigma)
        self.head = AnomalyMapHead(float(sigma), similarity=self.config["similarity"]).to(self.level_stats.device)

    def set_seg_head(self, options: Mapping[str, Any] | None) -> SegHead | None:
        """Add a new (untrained) segmentation head, or remove it (``None``); its config becomes
        ``config["seg_head"]``.

        Args:
            options: :class:`~monai_skipts.networks.SegHead`'s ``mode``, ``hidden``, ``reduce`` and
                ``in_channels`` (default: the teacher's ``E1..E3`` channels).
        """
        if not options:
            self.seg_head, self.config["seg_head"] = None, None
            return None
        opts = dict(options)
        if opts.get("in_channels") is None:
            opts["in_channels"] = list(getattr(self.model, "module", self.model).teacher.out_channels[:3])
        head = SegHead.from_config(opts).to(self.level_stats.device)
        self.seg_head, self.config["seg_head"] = head, head.config
        return head

    def set_seg_head_mode(self, mode: str) -> None:
        """Select the map (:data:`~monai_skipts.networks.seg_head.SEG_HEAD_MODES`) of the detector's head.
        The thresholds were calibrated on another map: they are cleared (calibrate again).

        Raises:
            ValueError: no head, or an unknown mode.
        """
        if self.seg_head is None:
            raise ValueError("the detector has no segmentation head: train one first (SegHeadTrainer)")
        if mode != self.seg_head.mode:
            self.seg_head.mode = mode
            self.set_calibration(None)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """The module's own state dict, or a whole monai-skipts checkpoint (what ``python -m
        monai.bundle ckpt_export`` hands it): then the teacher is checked, the config (sigma,
        preprocessing, calibration, anatomy mask) and the state set
        (:func:`~monai_skipts.checkpoint.restore_detector`)."""
        if state_dict.get("kind") == "monai-skipts/checkpoint":
            from monai_skipts.checkpoint import restore_detector  # checkpoint.py builds detectors: no top import

            return restore_detector(self, state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        stats = state_dict.get(prefix + "level_stats")
        if stats is not None:  # (0, 2) or (L, 2): take the stored shape
            self.level_stats = torch.zeros_like(stats, dtype=torch.float32, device=self.level_stats.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---- the one image -> map path ------------------------------------------------------------------

    def features(
        self, x: torch.Tensor, teacher_feats: Sequence[torch.Tensor] | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``(teacher_feats[:3], student_feats)`` of the teacher-student model (training's forward)."""
        return self.model(x, teacher_feats)

    def forward(
        self, x: torch.Tensor, teacher_feats: Sequence[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly map ``(B, 1, H, W)`` (float32) and score ``(B,)`` (its maximum). With the anatomy
        mask on, the summed discrepancy map is zeroed outside the anatomy before the Gaussian filter
        (so nothing outside reaches the map inside through the filter), the map is zero outside the
        anatomy, and the score is the maximum inside it (:class:`~monai_skipts.inferers.AnomalyMapHead`).
        A segmentation head's map (``"map"``, ``"fused"``) is computed from the masked discrepancy map
        and is zero outside the anatomy too.

        Raises:
            ValueError: the input is not of the trained size (the threshold holds at that size only).
        """
        size = self.trained_size
        if size is not None and (int(x.shape[-2]), int(x.shape[-1])) != size:
            raise ValueError(
                f"input of {int(x.shape[-2])}x{int(x.shape[-1])} pixels, but the model was trained at "
                f"{size[0]}x{size[1]} (its spatial_size); serve and export it at that size, "
                f'e.g. ckpt_export --input_shape "[1, 3, {size[0]}, {size[1]}]"'
            )
        t, s = self.model(x, teacher_feats)
        mask = self.anatomy_mask(x)
        amap, score = self.head(t, s, x.shape[-2:], self.get_level_stats(), mask)
        if self.seg_head is not None and self.seg_head.mode != "discrepancy":
            amap, score = mask_map_and_score(self.seg_head(t, s, amap), mask)
        return amap, score

    # ---- the one decision ---------------------------------------------------------------------------

    def decide(self, score: Any) -> dict[str, Any]:
        """``{"score", "threshold", "anomalous", "normalized_score"}`` for one image score.

        ``anomalous`` is ``score >= threshold``; ``normalized_score`` is
        :func:`~monai_skipts.metrics.normalize_score` (0.5 at the threshold) when the scale is
        positive. Without a threshold both are ``None``.
        """
        return decide(score, _value(self.threshold), _value(self.scale))

    def decide_volume(self, score: Any) -> dict[str, Any]:
        """The decision for a volume score (slice scores aggregated as served): :meth:`decide`'s keys
        plus ``"threshold_kind"``. It uses ``volume_threshold`` when calibrated (``"volume"``), else
        the image threshold (``"image"``); ``None`` without any threshold."""
        volume = _value(self.volume_threshold)
        if volume is not None:
            return {**decide(score, volume, _value(self.scale)), "threshold_kind": "volume"}
        out = self.decide(score)
        return {**out, "threshold_kind": None if out["threshold"] is None else "image"}

    def outline_threshold(self) -> tuple[float | None, str | None]:
        """``(value, kind)``: the map threshold outlines are drawn at (``map >= value``): the pixel
        threshold when calibrated (``"pixel"``), else the image threshold (``"image"``); ``(None,
        None)`` without any threshold."""
        pixel = _value(self.pixel_threshold)
        if pixel is not None:
            return pixel, "pixel"
        image = _value(self.threshold)
        return (image, "image") if image is not None else (None, None)


def decide(score: Any, threshold: float | None, scale: float | None = None) -> dict[str, Any]:
    """The decision rule of :meth:`AnomalyDetector.decide` for a given threshold and scale."""
    score = float(score)
    out: dict[str, Any] = {"score": score, "threshold": None, "anomalous": None, "normalized_score": None}
    if threshold is None:
        return out
    out["threshold"] = float(threshold)
    out["anomalous"] = bool(score >= float(threshold))
    if scale is not None and scale > 0:
        out["normalized_score"] = float(normalize_score(score, float(threshold), float(scale)))
    return out
