"""Outputs a clinician can look at: heatmap overlays, anomaly maps, ROC curve and the score
distribution of normal vs anomalous images (the paper's Fig. 8)."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from ignite.engine import Engine, Events
from PIL import Image

from ..transforms import IMAGENET_MEAN, IMAGENET_STD
from ..utils import atomic_save, atomic_write_json

__all__ = ["AnomalyPlotsHandler", "heatmap_panel", "overlay_heatmap", "save_map_png", "safe_name"]


def safe_name(item_id: str) -> str:
    """A file-system-safe file stem from an item id: image suffix dropped, path separators and odd
    characters → ``_`` (``test/good/000.png`` → ``test_good_000``)."""
    stem = re.sub(r"\.(png|jpe?g|bmp|tiff?|dcm|nii(\.gz)?|nrrd)$", "", str(item_id), flags=re.IGNORECASE)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._")[:150] or "item"


def _denormalize(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) ImageNet-normalised → (H, W, 3) float in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype).view(3, 1, 1)
    return (image.cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def overlay_heatmap(image_rgb: np.ndarray, amap: np.ndarray, vmax: float, alpha: float = 0.45) -> np.ndarray:
    """Blend a jet-coloured ``amap`` (H, W) scaled to [0, vmax] over ``image_rgb`` (H, W, 3) in [0, 1];
    returns uint8 (H, W, 3)."""
    from matplotlib import colormaps

    heat = colormaps["jet"](np.clip(amap / max(vmax, 1e-8), 0, 1))[..., :3]
    return (255 * ((1 - alpha) * image_rgb + alpha * heat)).round().astype(np.uint8)


def heatmap_panel(image_rgb: np.ndarray, amap: np.ndarray, vmax: float) -> np.ndarray:
    """Image | overlay | anomaly map alone (jet on [0, vmax]), side by side, uint8 (H, 3W, 3). The
    map's maximum (the image score's location) is marked with a white cross on the last two panels:
    on bright tissue the blended overlay alone hides where the map peaks."""
    from matplotlib import colormaps

    img = (image_rgb * 255).round().astype(np.uint8)
    over = overlay_heatmap(image_rgb, amap, vmax)
    alone = (255 * colormaps["jet"](np.clip(amap / max(vmax, 1e-8), 0, 1))[..., :3]).round().astype(np.uint8)
    h, w = amap.shape
    y, x = np.unravel_index(int(np.argmax(amap)), amap.shape)
    r = max(2, min(h, w) // 40)
    for panel in (over, alone):
        panel[max(0, y - r):y + r + 1, x] = 255
        panel[y, max(0, x - r):x + r + 1] = 255
    return np.concatenate([img, over, alone], axis=1)


def save_map_png(path: str | Path, amap: np.ndarray, vmax: float) -> None:
    """An anomaly map as a 16-bit PNG: pixel = round(65535 · map / vmax), clipped (vmax in metrics)."""
    arr = (np.clip(amap / max(vmax, 1e-8), 0, 1) * 65535).round().astype(np.uint16)
    atomic_save(path, lambda f: Image.fromarray(arr).save(f, format="PNG"))


def _save_fig(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_save(path, lambda f: f.write(buf.getvalue()))


class AnomalyPlotsHandler:
    """Writes, at the end of an evaluation epoch, under ``output_dir``:

    - ``heatmaps/<label>_<id>.png``: overlays for the first ``n_samples`` normal and anomalous
      images (colour scale: 0 to 2 × the decision threshold when known, else the largest score);
    - ``maps/<id>.png``: every anomaly map as a 16-bit PNG (``save_maps``; scale in ``maps/scale.json``);
    - ``roc.png`` and ``score_distribution.png`` (needs both labels), from ``score_handler.records``.

    Args:
        score_handler: the evaluator's :class:`~monai_skipts.handlers.AnomalyScoreHandler` (attach
            it before this one).
        threshold: decision threshold or a callable returning it.
    """

    def __init__(self, output_dir: str | Path, score_handler: Any, threshold: float | Callable | None = None,
                 n_samples: int = 8, save_maps: bool = True):  # fmt: skip
        self.output_dir = Path(output_dir)
        self.score_handler = score_handler
        self._threshold = threshold
        self.n_samples, self.save_maps = int(n_samples), bool(save_maps)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._complete)

    def _reset(self, engine: Engine) -> None:
        self._samples: dict[int, list[tuple[str, np.ndarray, np.ndarray]]] = {0: [], 1: []}
        self._maps: list[tuple[str, np.ndarray]] = []

    def _collect(self, engine: Engine) -> None:
        out = engine.state.output
        maps = out["pred"].detach().float().cpu().numpy()[:, 0]
        ids = [str(i) for i in out.get("id", range(len(maps)))]
        label = out.get("label")
        labels = label.view(-1).tolist() if isinstance(label, torch.Tensor) else [0] * len(maps)
        for k, (i, y) in enumerate(zip(ids, labels)):
            y = int(y)
            if self.save_maps:
                self._maps.append((i, maps[k]))
            if len(self._samples.setdefault(y, [])) < self.n_samples:
                self._samples[y].append((i, _denormalize(out["image"][k]), maps[k]))

    def _vmax(self) -> float:
        t = self._threshold() if callable(self._threshold) else self._threshold
        if t is not None:
            return 2.0 * float(t)
        scores = [r["score"] for r in self.score_handler.records]
        return float(max(scores)) if scores else 1.0

    def _complete(self, engine: Engine) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() > 0:
            return
        vmax = self._vmax()
        names = {0: "normal", 1: "anomalous"}
        for y, samples in self._samples.items():
            for i, img, amap in samples:
                arr = heatmap_panel(img, amap, vmax)
                path = self.output_dir / "heatmaps" / f"{names.get(y, y)}_{safe_name(i)}.png"
                atomic_save(path, lambda f, a=arr: Image.fromarray(a).save(f, format="PNG"))
        if self.save_maps and self._maps:
            for i, amap in self._maps:
                save_map_png(self.output_dir / "maps" / f"{safe_name(i)}.png", amap, vmax)
            atomic_write_json(self.output_dir / "maps" / "scale.json", {"vmax": vmax, "encoding": "uint16 = round(65535 * min(map / vmax, 1))"})
        self._plot_curves()

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
        t = self._threshold() if callable(self._threshold) else self._threshold
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
