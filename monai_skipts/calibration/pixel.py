"""The pixel threshold of the outlines and ``dice``: a bounded sample of the validation normals' map pixels
(:class:`PixelScoreSketch`), its quantile (:func:`pixel_threshold`) and the evaluator handler that fills it
(:class:`PixelThresholdHandler`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from monai_skipts.calibration.threshold import calibrate_threshold

__all__ = ["DEFAULT_PIXEL_FPR", "PixelScoreSketch", "PixelThresholdHandler", "pixel_threshold"]

#: the default share of normal pixels inside the anatomy allowed at or above the pixel threshold
DEFAULT_PIXEL_FPR = 0.005


class PixelScoreSketch:
    """A bounded sample of normal anomaly-map pixels (inside the anatomy when a mask is given), for
    the pixel threshold's quantile: every pixel is kept with the same probability ``rate``, so each
    image contributes in proportion to its (in-anatomy) pixels and the memory is ``rate`` × the
    pixels seen, never the full-resolution maps; at most ``max_samples`` are kept (a uniform
    subsample, seeded, when more arrive).

    Args:
        rate: share of pixels kept (``1.0``: all).
        max_samples: the most values held.
        seed: the sampling generator's seed.

    Example:
        >>> sk = PixelScoreSketch(rate=1.0)
        >>> sk.update(np.arange(1000.0).reshape(1, 10, 100))
        >>> sk.quantile_threshold(0.01), sk.n_images
        (990.0, 1)
    """

    def __init__(self, rate: float = 1 / 16, max_samples: int = 2_000_000, seed: int = 0):
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"rate must be in (0, 1]; got {rate}")
        self.rate, self.max_samples = float(rate), int(max_samples)
        self.rng = np.random.default_rng(seed)
        self.reset()

    def reset(self) -> None:
        self._parts: list[np.ndarray] = []
        self.n_kept = self.n_seen = self.n_images = 0

    def update(self, maps: Any, masks: Any = None) -> None:
        """Add maps ``(B, H, W)`` or ``(B, 1, H, W)`` (tensor or array) with optional anatomy masks
        (same shape; pixels where the mask is false are ignored)."""
        m = maps.detach().float().cpu().numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps, np.float32)
        m = m.reshape(m.shape[0], -1) if m.ndim > 1 else m.reshape(1, -1)
        if masks is not None:
            k = masks.detach().cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
            k = k.reshape(m.shape) > 0.5 if k.size == m.size else None
            if k is None:
                raise ValueError(f"anatomy masks of shape {np.shape(masks)} do not match maps of {np.shape(maps)}")
        for i in range(m.shape[0]):
            v = m[i] if masks is None else m[i][k[i]]
            v = v[np.isfinite(v)]
            self.n_seen += v.size
            self.n_images += 1
            if self.rate < 1.0:
                v = v[self.rng.random(v.size) < self.rate]
            self._parts.append(v.astype(np.float32))
            self.n_kept += v.size
        if self.n_kept > self.max_samples:
            allv = np.concatenate(self._parts)
            self._parts = [self.rng.choice(allv, self.max_samples, replace=False)]
            self.n_kept = self.max_samples

    def values(self) -> np.ndarray:
        return np.concatenate(self._parts) if self._parts else np.zeros(0, np.float32)

    def quantile_threshold(self, target_fpr: float) -> float:
        """The smallest sampled value with at most ``target_fpr`` of the sample at or above it (the
        order-statistic rule of :func:`calibrate_threshold`)."""
        v = self.values()
        if v.size == 0:
            raise ValueError("the pixel threshold needs normal maps; none were seen")
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(calibrate_threshold(v.astype(np.float64), target_fpr, method="empirical"))


def pixel_threshold(sketch: PixelScoreSketch, target_fpr: float = DEFAULT_PIXEL_FPR) -> dict[str, Any]:
    """The pixel threshold's record from a :class:`PixelScoreSketch` of validation normals' maps:
    ``{"value", "target_fpr", "n_images", "n_pixels", "n_pixels_sampled", "method"}``; outlines (the
    SEG, the SC outline, MONAI Label's mask, the panels) and ``dice`` use ``map >= value``.

    Example:
        >>> sk = PixelScoreSketch(rate=1.0); sk.update(np.linspace(0, 1, 2000).reshape(2, 1000))
        >>> r = pixel_threshold(sk, 0.005); round(r["value"], 4), r["n_images"]
        (0.9955, 2)
    """
    value = sketch.quantile_threshold(target_fpr)
    return {
        "value": value,
        "target_fpr": float(target_fpr),
        "n_images": int(sketch.n_images),
        "n_pixels": int(sketch.n_seen),
        "n_pixels_sampled": int(sketch.n_kept),
        "method": "pixel_quantile",
    }


class PixelThresholdHandler:
    """An evaluator handler feeding the maps of every iteration (``output["pred"]``) into a
    :class:`PixelScoreSketch`, restarted each run; the anatomy mask is the batch's ``anatomy_key``
    entry when present. Attach it to the validation evaluator next to the score handler; the
    :class:`~monai_skipts.handlers.ThresholdCalibrator` reads ``record(target_fpr)``.

    Args:
        rate, max_samples, seed: of the sketch.
        anatomy_key: the batch key of the anatomy mask (absent: every pixel counts).
    """

    def __init__(self, rate: float = 1 / 16, max_samples: int = 2_000_000, seed: int = 0, anatomy_key: str = "anatomy"):
        self.sketch = PixelScoreSketch(rate, max_samples, seed)
        self.anatomy_key = anatomy_key

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self.sketch.reset())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)

    def _collect(self, engine: Engine) -> None:
        batch = engine.state.batch
        mask = batch.get(self.anatomy_key) if isinstance(batch, dict) else None
        mask = engine.state.output.get(self.anatomy_key, mask)  # the detector's own (SkipTSEvaluator's output)
        self.sketch.update(engine.state.output["pred"], mask if isinstance(mask, torch.Tensor) else None)

    def record(self, target_fpr: float = DEFAULT_PIXEL_FPR) -> dict[str, Any] | None:
        """The pixel threshold record, ``None`` when no map was seen."""
        return pixel_threshold(self.sketch, target_fpr) if self.sketch.n_kept else None
