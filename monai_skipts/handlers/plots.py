"""The evaluation's pictures, as an ignite handler: heat-map panels of chosen images
(:func:`~monai_skipts.visualize.heatmap_panel`), anomaly maps, ROC curve and the score distribution of
normal vs anomalous images (the paper's Fig. 8)."""

from __future__ import annotations

import heapq
import io
import itertools
import json
import math
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from ignite.engine import Engine, Events
from PIL import Image

from monai_skipts.data.files import output_relpaths
from monai_skipts.utils import atomic_save, atomic_write_json, is_rank0, save_map_png
from monai_skipts.visualize import as_rgb01, denormalize, heatmap_panel

__all__ = ["AnomalyPlotsHandler", "safe_name"]


def safe_name(item_id: str) -> str:
    """A file-system-safe file stem from an item id: image suffix dropped, path separators and odd
    characters → ``_`` (``test/good/000.png`` → ``test_good_000``)."""
    stem = re.sub(r"\.(png|jpe?g|bmp|tiff?|dcm|nii(\.gz)?|nrrd)$", "", str(item_id), flags=re.IGNORECASE)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._")[:150] or "item"


def _save_png(path: Path, arr: np.ndarray, text: dict[str, str] | None = None) -> None:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    atomic_save(path, lambda f: Image.fromarray(arr).save(f, format="PNG", pnginfo=info))


def _save_fig(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_save(path, lambda f: f.write(buf.getvalue()))


def _resolve(value: Any) -> float | None:
    v = value() if callable(value) else value
    return None if v is None else float(v)


class AnomalyPlotsHandler:
    """Writes, at the end of an evaluation epoch, under ``output_dir``:

    - ``heatmaps/<group>_<NN>_<id>.png``: :func:`heatmap_panel` panels, ``NN`` the rank from 01, for
      the groups ``normal_first`` / ``anomalous_first`` (the first ``n_samples`` of each label, in
      loader order), ``normal_highest`` (the ``n_samples`` highest-scoring normals, highest first)
      and ``anomalous_lowest`` (the ``n_samples`` lowest-scoring anomalous images, lowest first): the
      errors a reader needs to see. Unlabelled images: ``unlabelled_first`` / ``unlabelled_highest``.
      An image in several groups is written once per group. The panel's layout (pane boxes) is in
      the PNG text chunk ``skipts_layout`` (JSON);
    - ``heatmaps/scale.json``: the colour scale every panel of the epoch shares;
    - ``maps/<id>.map.png``: every anomaly map as a 16-bit PNG, named as inference names them
      (:func:`~monai_skipts.data.files.output_relpaths`: relative folders and the whole file name kept) (``save_maps``; ``vmax`` = 2 × threshold
      when known, else the largest score, in ``maps/scale.json``);
    - ``roc.png`` and ``score_distribution.png`` (needs both labels), from ``score_handler.records``.

    Colour scale, one for the epoch: ``normalize_score(map, threshold, scale)`` when a threshold is
    known. The scale is ``score_scale``, else the score handler's ``scale``, else derived from the
    epoch's scores: the standard deviation of the normal-labelled scores (all scores when fewer than
    two normals), at least 1e-6, i.e. :class:`~monai_skipts.handlers.ThresholdCalibrator`'s rule
    applied to the test scores. With no threshold: ``clip(map / vmax)`` with ``vmax`` = the
    largest score of the epoch.

    Memory is bounded: candidates live in bounded heaps (at most ``4 n_samples`` images with their
    uint8 image, float32 map and bool mask), and the maps for ``maps/`` are spooled to an unlinked
    temporary file in ``output_dir``. Under torch.distributed, rank 0 writes, from its own share of
    the data; other ranks collect and write nothing.

    Args:
        output_dir: where to write.
        score_handler: the evaluator's :class:`~monai_skipts.handlers.AnomalyScoreHandler` (attach
            it before this one).
        threshold: decision threshold or a callable returning it (``None``: the score handler's
            ``threshold`` when it has one).
        n_samples: panels per group.
        save_maps: write ``maps/``.
        score_scale: :func:`~monai_skipts.metrics.normalize_score` scale or a callable returning it
            (``None``: the score handler's ``scale``, else derived, see above).
        alpha: opacity of the coloured map in the overlays.
        outline_threshold: the pixel threshold of the white outline, or a callable returning it
            (``None``: the decision threshold; see :func:`~monai_skipts.visualize.heatmap_panel`).
    """

    def __init__(
        self,
        output_dir: str | Path,
        score_handler: Any,
        threshold: float | Callable | None = None,
        n_samples: int = 8,
        save_maps: bool = True,
        score_scale: float | Callable | None = None,
        alpha: float = 0.45,
        outline_threshold: float | Callable | None = None,
    ):
        self.output_dir = Path(output_dir)
        self.score_handler = score_handler
        self._outline_threshold = outline_threshold
        self._threshold = threshold
        self._scale = score_scale
        self.n_samples, self.save_maps = int(n_samples), bool(save_maps)
        self.alpha = float(alpha)
        self._spool = None
        self._reset(None)

    @property
    def threshold(self) -> float | None:
        t = _resolve(self._threshold)
        return t if t is not None else _resolve(getattr(self.score_handler, "threshold", None))

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._complete)

    # ---------------------------------------------------------------------------------- collection
    def _reset(self, engine: Engine | None) -> None:
        self._first: dict[str, list[tuple]] = {}
        # min-heaps of (key, -seq, item): the n largest keys survive; ties keep the earlier item
        self._heaps: dict[str, list[tuple]] = {}
        self._seq = itertools.count()
        self._max_score = -math.inf
        self._close_spool()
        self._map_index: list[tuple[str, tuple[int, int], int]] = []
        if engine is not None and self.save_maps and is_rank0():
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._spool = tempfile.TemporaryFile(dir=self.output_dir, prefix=".maps_spool_")

    def _close_spool(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    @property
    def candidates(self) -> dict[str, list[tuple[str, float]]]:
        """The images kept so far, ``{group: [(id, score), ...]}`` in the order they will be written."""
        return {g: [(it["id"], it["score"]) for it in items] for g, items in self._groups().items()}

    def _groups(self) -> dict[str, list[dict]]:
        out = {f"{k}_first": v for k, v in self._first.items()}
        for g, heap in self._heaps.items():
            out[g] = [item for _, _, item in sorted(heap, reverse=True)]
        return out

    def _collect(self, engine: Engine) -> None:
        out = engine.state.output
        batch = engine.state.batch if isinstance(engine.state.batch, dict) else {}
        maps = out["pred"].detach().float().cpu().numpy()[:, 0]
        n = len(maps)
        ids = [str(i) for i in out.get("id", range(n))]
        score = out.get("score")
        if isinstance(score, torch.Tensor):
            scores = score.detach().float().cpu().view(-1).tolist()
        else:  # the Skip-TS image score is the map's maximum
            scores = maps.reshape(n, -1).max(1).tolist()
        label = out.get("label")
        if isinstance(label, torch.Tensor):
            labels = [int(y) for y in label.detach().cpu().view(-1).tolist()]
        elif isinstance(label, (list, tuple)):
            labels = [None if y is None else int(y) for y in label]
        else:
            labels = [None] * n
        images = out.get("image") if isinstance(out.get("image"), torch.Tensor) else batch.get("image")
        masks = batch.get("mask")
        masks = masks.detach().cpu().numpy()[:, 0] > 0.5 if isinstance(masks, torch.Tensor) else None
        for k, (i, y, s) in enumerate(zip(ids, labels, scores)):
            self._max_score = max(self._max_score, s)
            if self._spool is not None:
                m = np.ascontiguousarray(maps[k], dtype=np.float32)
                self._map_index.append((i, m.shape, self._spool.tell()))
                self._spool.write(m.tobytes())
            if self.n_samples <= 0 or images is None:
                continue
            name = {0: "normal", None: "unlabelled"}.get(y, "anomalous")
            seq = next(self._seq)
            # the groups this item enters (the image is de-normalised once, only if kept)
            first = self._first.setdefault(name, [])
            wants_first = len(first) < self.n_samples
            group, key = (f"{name}_lowest", -s) if name == "anomalous" else (f"{name}_highest", s)
            heap = self._heaps.setdefault(group, [])
            wants_heap = len(heap) < self.n_samples or (key, -seq) > heap[0][:2]
            if not (wants_first or wants_heap):
                continue
            item = {
                "id": i,
                "label": y,
                "score": float(s),
                "image": self._image_u8(images[k], maps[k].shape),
                "map": np.asarray(maps[k], dtype=np.float32).copy(),
                "mask": None if masks is None or masks[k].shape != maps[k].shape else masks[k].copy(),
            }
            if wants_first:
                first.append(item)
            if wants_heap:
                if len(heap) < self.n_samples:
                    heapq.heappush(heap, (key, -seq, item))
                else:
                    heapq.heapreplace(heap, (key, -seq, item))

    @staticmethod
    def _image_u8(image: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
        """(C, H', W') ImageNet-normalised → uint8 (H, W, 3) at the map's ``shape``."""
        return (255 * as_rgb01(denormalize(image), shape)).round().astype(np.uint8)

    # ---------------------------------------------------------------------------------- writing
    def _scores(self) -> tuple[np.ndarray, np.ndarray]:
        recs = getattr(self.score_handler, "records", None) or []
        s = np.array([r["score"] for r in recs], dtype=np.float64)
        y = np.array([-1 if r.get("label") is None else int(r["label"]) for r in recs])
        return s, y

    def color_scale(self) -> dict[str, Any]:
        """The epoch's colour scale: ``{"threshold", "scale", "scale_source", "vmax"}`` (see the class)."""
        t = self.threshold
        s, y = self._scores()
        max_score = float(s.max()) if s.size else (self._max_score if math.isfinite(self._max_score) else 1.0)
        if t is None:
            return {"threshold": None, "scale": None, "scale_source": None, "vmax": max_score}
        scale, source = _resolve(self._scale), "score_scale"
        if scale is None:
            scale, source = _resolve(getattr(self.score_handler, "scale", None)), "score_handler.scale"
        if scale is None or not (math.isfinite(scale) and scale > 0):
            normals = s[y == 0]
            base = normals if normals.size >= 2 else s
            if base.size >= 2:
                scale = float(max(base.std(), 1e-6))
                source = "std of the normal test scores" if normals.size >= 2 else "std of the test scores"
            else:
                scale, source = max(0.1 * abs(t), 1e-6), "0.1 x |threshold| (fewer than two scores)"
        return {"threshold": t, "scale": scale, "scale_source": source, "vmax": None}

    def _complete(self, engine: Engine) -> None:
        try:
            if not is_rank0():
                return
            cs = self.color_scale()
            width = max(2, len(str(self.n_samples)))
            wrote = False
            for group, items in self._groups().items():
                for rank, it in enumerate(items, start=1):
                    arr, layout = heatmap_panel(
                        it["image"],
                        it["map"],
                        threshold=cs["threshold"],
                        scale=cs["scale"],
                        vmax=cs["vmax"],
                        score=it["score"],
                        item_id=it["id"],
                        label=it["label"],
                        mask=it["mask"],
                        alpha=self.alpha,
                        outline_threshold=_resolve(self._outline_threshold),
                        return_layout=True,
                    )
                    path = self.output_dir / "heatmaps" / f"{group}_{rank:0{width}d}_{safe_name(it['id'])}.png"
                    _save_png(path, arr, {"skipts_layout": json.dumps(layout)})
                    wrote = True
            if wrote:
                atomic_write_json(
                    self.output_dir / "heatmaps" / "scale.json",
                    {
                        **cs,
                        "colour": "jet(normalize_score(map, threshold, scale))"
                        if cs["threshold"] is not None
                        else "jet(clip(map / vmax, 0, 1))",
                    },
                )
            if self._spool is not None and self._map_index:
                t = cs["threshold"]
                vmax = 2.0 * t if t else (cs["vmax"] if cs["vmax"] is not None else self._max_score)
                self._spool.flush()
                # the names inference gives maps: relative folders and whole file name kept, unique per id
                names = output_relpaths([str(i) for i, _, _ in self._map_index], ".map.png")
                for i, shape, offset in self._map_index:
                    self._spool.seek(offset)
                    amap = np.frombuffer(self._spool.read(4 * shape[0] * shape[1]), dtype=np.float32).reshape(shape)
                    save_map_png(self.output_dir / "maps" / names[str(i)], amap, vmax)
                atomic_write_json(
                    self.output_dir / "maps" / "scale.json",
                    {"vmax": vmax, "encoding": "uint16 = round(65535 * min(map / vmax, 1))"},
                )
            self._plot_curves()
        finally:
            self._close_spool()
            self._first, self._heaps = {}, {}  # free the kept images

    def _plot_curves(self) -> None:
        recs = self.score_handler.records
        labels = [r.get("label") for r in recs]
        if None in labels or len(set(labels)) < 2:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from sklearn.metrics import roc_auc_score, roc_curve

        y = np.array(labels)
        s = np.array([r["score"] for r in recs])
        fpr, tpr, _ = roc_curve(y, s)
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot(fpr, tpr, lw=2, label=f"AUROC {roc_auc_score(y, s):.3f}")
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        t = self.threshold
        if t is not None:
            ax.plot([(s[y == 0] >= t).mean()], [(s[y == 1] >= t).mean()], "ro", label=f"threshold {t:.3f}")
        ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title="ROC (test set)")
        ax.legend(loc="lower right")
        _save_fig(fig, self.output_dir / "roc.png")
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        bins = np.linspace(s.min(), s.max(), 31)
        ax.hist(s[y == 0], bins=bins, alpha=0.6, label=f"normal (n={int((y == 0).sum())})", color="tab:blue")
        ax.hist(s[y == 1], bins=bins, alpha=0.6, label=f"anomalous (n={int((y == 1).sum())})", color="tab:red")
        if t is not None:
            ax.axvline(t, color="k", ls="--", label="decision threshold")
        ax.set(xlabel="anomaly score", ylabel="images", title="Score distribution (test set)")
        ax.legend()
        _save_fig(fig, self.output_dir / "score_distribution.png")
        plt.close(fig)
