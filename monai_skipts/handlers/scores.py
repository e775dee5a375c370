"""Collect per-image anomaly scores from a :class:`~monai_skipts.engines.SkipTSEvaluator`, compute
the metrics, and write ``scores.csv`` / ``metrics.json``."""

from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from ignite.engine import Engine, Events

from ..metrics import pixel_metrics, report_metrics
from ..utils import atomic_write_json, atomic_write_text, is_rank0

__all__ = ["AnomalyScoreHandler", "gather_objects"]

logger = logging.getLogger(__name__)


def gather_objects(obj: Any) -> list[Any]:
    """All ranks' ``obj`` (one list per rank) under torch.distributed, else ``[obj]``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        out: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, obj)
        return out
    return [obj]


class AnomalyScoreHandler:
    """Collects ``score``, ``label``, ``id`` (and pixel data when ``mask`` batches exist) each
    iteration; at epoch end puts metrics in ``engine.state.metrics`` and optionally writes files.

    Metrics: always ``mean_score``, ``max_score``, ``n_images``. With both labels present: every
    :func:`~monai_skipts.metrics.report_metrics` value (``auroc``, ``aupr``, ``youden_threshold_on_test``
    and ``<k>_at_youden``; with a decision threshold ``decision_threshold`` and ``<k>_at_decision``);
    with masks: ``pixel_auroc``, ``aupro``, ``dice_best`` (at the best threshold of the data: an upper
    bound), ``dice`` (at the pixel threshold when one is given, else at the decision threshold;
    ``dice_threshold`` and ``dice_threshold_kind`` say which) and ``hit_rate`` (see :func:`~monai_skipts.metrics.pixel_metrics`).

    Args:
        output_dir: where to write ``scores.csv`` and ``metrics.json`` (``None``: write nothing).
        threshold: decision threshold, or a callable returning it (``None``: no decision), e.g. the
            calibrator's ``lambda: calibrator.threshold``.
        score_scale: scale for the normalised score (``normalize_score``), or a callable.
        pixel_threshold: the calibrated map threshold for ``dice`` (a float, a callable, or ``None``:
            ``dice`` at the decision threshold), e.g. the calibrator's ``pixel_threshold``.
        prefix: file-name prefix (``"test_"`` → ``test_scores.csv``).
        pixel_metrics_on: compute pixel metrics when batches carry masks.
        extra_metrics: more key/values (or a callable returning them) for ``metrics.json``.

    After each epoch ``handler.records`` holds ``[{"id", "label", "score", ...}]`` and
    ``handler.metrics`` the metrics dict (rank 0 gathers all ranks under torch.distributed).
    """

    def __init__(
        self,
        output_dir: str | Path | None = None,
        threshold: float | Callable[[], float | None] | None = None,
        score_scale: float | Callable[[], float | None] | None = None,
        prefix: str = "",
        pixel_metrics_on: bool = True,
        extra_metrics: dict | Callable[[], dict] | None = None,
        metric_prefix: str = "",
        pixel_threshold: float | Callable[[], float | None] | None = None,
    ):
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self._threshold = threshold
        self._pixel_threshold = pixel_threshold
        self._scale = score_scale
        self.prefix = prefix
        self.metric_prefix = metric_prefix
        self.pixel_metrics_on = pixel_metrics_on
        self.extra_metrics = extra_metrics
        self.records: list[dict[str, Any]] = []
        self.metrics: dict[str, Any] = {}
        self._maps: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []

    @property
    def threshold(self) -> float | None:
        t = self._threshold() if callable(self._threshold) else self._threshold
        return None if t is None else float(t)

    @property
    def pixel_threshold(self) -> float | None:
        t = self._pixel_threshold() if callable(self._pixel_threshold) else self._pixel_threshold
        return None if t is None else float(t)

    @property
    def scale(self) -> float | None:
        s = self._scale() if callable(self._scale) else self._scale
        return None if s is None else float(s)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._complete)

    def _reset(self, engine: Engine) -> None:
        self.records, self._maps, self._masks = [], [], []

    def _collect(self, engine: Engine) -> None:
        out = engine.state.output
        scores = out["score"].detach().float().cpu().view(-1).tolist()
        n = len(scores)
        label = out.get("label")
        labels = label.detach().cpu().view(-1).tolist() if isinstance(label, torch.Tensor) else [None] * n
        ids = [str(i) for i in out.get("id", [None] * n)]
        for s, y, i in zip(scores, labels, ids):
            if not math.isfinite(s):
                raise ValueError(
                    f"{i}: the anomaly score is not finite ({s}): the image or the model's weights hold "
                    "non-finite values (images are checked on loading: look at the checkpoint)"
                )
            self.records.append({"id": i, "label": None if y is None else int(y), "score": s})
        batch = engine.state.batch
        if self.pixel_metrics_on and isinstance(batch, dict) and isinstance(batch.get("mask"), torch.Tensor):
            self._maps.append(out["pred"].detach().float().cpu().numpy()[:, 0])
            self._masks.append(batch["mask"].cpu().numpy()[:, 0] > 0.5)

    def _complete(self, engine: Engine) -> None:
        gathered = gather_objects((self.records, self._maps, self._masks))
        records, maps, masks, seen = [], [], [], set()
        for recs, mp, mk in gathered:
            for r in recs:  # DistributedSampler pads with repeats: keep each id once
                if r["id"] in seen and r["id"] != "None":
                    continue
                seen.add(r["id"])
                records.append(r)
            maps += mp
            masks += mk
        # one copy of the pooled maps while the pixel metrics run, not the batches beside it
        self._maps, self._masks = [], []
        del gathered, recs, mp, mk
        if maps:
            maps, masks = [np.concatenate(maps)], [np.concatenate(masks)]
        self.records = records
        self.metrics = self.compute(records, maps, masks)
        engine.state.metrics.update(
            {self.metric_prefix + k: v for k, v in self.metrics.items() if isinstance(v, (int, float))}
        )
        if self.output_dir is not None and is_rank0():
            self.write()

    def compute(self, records: list[dict], maps: list[np.ndarray], masks: list[np.ndarray]) -> dict[str, Any]:
        scores = np.array([r["score"] for r in records], dtype=np.float64)
        m: dict[str, Any] = {"n_images": len(records)}
        if len(scores):
            m.update(mean_score=float(scores.mean()), max_score=float(scores.max()))
        labels = [r["label"] for r in records]
        t, scale = self.threshold, self.scale
        if t is not None:
            from ..networks.detector import decide  # the one decision rule

            m["decision_threshold"] = t
            for r in records:
                d = decide(r["score"], t, scale)
                r.update(threshold=t, anomalous=d["anomalous"])
                if d["normalized_score"] is not None:
                    r["normalized_score"] = d["normalized_score"]
        if None not in labels and len(set(labels)) == 2:
            y = np.array(labels)
            m.update(report_metrics(scores, y, t))
            if maps and self.pixel_metrics_on:
                mk = masks[0] if len(masks) == 1 else np.concatenate(masks)
                if mk.any():
                    pt = self.pixel_threshold
                    dice_t = pt if pt is not None else t
                    mp = maps[0] if len(maps) == 1 else np.concatenate(maps)
                    m.update(pixel_metrics(mp, mk, threshold=dice_t))
                    if dice_t is not None:
                        m.update(dice_threshold=dice_t, dice_threshold_kind="pixel" if pt is not None else "image")
        if self.extra_metrics is not None:
            m.update(self.extra_metrics() if callable(self.extra_metrics) else self.extra_metrics)
        return m

    def write(self) -> None:
        assert self.output_dir is not None
        cols = ["id", "label", "score", "threshold", "anomalous", "normalized_score"]
        buf = io.StringIO()
        w = csv.DictWriter(
            buf, fieldnames=[c for c in cols if any(c in r for r in self.records)], extrasaction="ignore"
        )
        w.writeheader()
        w.writerows(self.records)
        atomic_write_text(self.output_dir / f"{self.prefix}scores.csv", buf.getvalue())
        atomic_write_json(self.output_dir / f"{self.prefix}metrics.json", self.metrics)
        logger.info("wrote %s", self.output_dir / f"{self.prefix}metrics.json")
