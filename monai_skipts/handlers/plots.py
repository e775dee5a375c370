"""Outputs a clinician can look at: heatmap panels (image | overlay with colour bar, score and
decision), anomaly maps, ROC curve and the score distribution of normal vs anomalous images (the
paper's Fig. 8)."""

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
from PIL import Image, ImageDraw, ImageFont

from ..data.files import output_relpaths
from ..metrics import normalize_score
from ..transforms import IMAGENET_MEAN, IMAGENET_STD
from ..utils import atomic_save, atomic_write_json, is_rank0, save_map_png  # noqa: F401 - save_map_png re-exported: it lived here

__all__ = [
    "AnomalyPlotsHandler",
    "colorize_map",
    "heatmap_panel",
    "overlay_heatmap",
    "save_map_png",
    "safe_name",
]

THRESHOLD_CONTOUR_RGB = (255, 255, 255)  # outline of the region with map >= threshold
MASK_CONTOUR_RGB = (0, 255, 0)  # outline of the ground-truth lesion mask
_BG, _FG, _RED = (255, 255, 255), (0, 0, 0), (200, 0, 0)


def safe_name(item_id: str) -> str:
    """A file-system-safe file stem from an item id: image suffix dropped, path separators and odd
    characters → ``_`` (``test/good/000.png`` → ``test_good_000``)."""
    stem = re.sub(r"\.(png|jpe?g|bmp|tiff?|dcm|nii(\.gz)?|nrrd)$", "", str(item_id), flags=re.IGNORECASE)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._")[:150] or "item"


def _denormalize(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) ImageNet-normalised (C = 3, or 1: repeated) → (H, W, 3) float in [0, 1]."""
    image = image.detach().float().cpu()
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype).view(3, 1, 1)
    return (image * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def _jet(fraction: np.ndarray) -> np.ndarray:
    """matplotlib's jet at ``fraction`` in [0, 1] (any shape) → float RGB in [0, 1], shape + (3,)."""
    from matplotlib import colormaps

    return np.asarray(colormaps["jet"](np.asarray(fraction, dtype=np.float64)))[..., :3]


def _color_fraction(amap: np.ndarray, threshold: float | None, scale: float | None, vmax: float | None) -> np.ndarray:
    """The colour-scale position in [0, 1] of each map value: ``normalize_score(map, threshold,
    scale)`` when both are given (threshold → 0.5), else ``clip(map / vmax, 0, 1)``."""
    amap = np.asarray(amap, dtype=np.float64)
    if threshold is not None and scale is not None:
        return np.asarray(normalize_score(amap, threshold, scale), dtype=np.float64)
    if vmax is None:
        raise ValueError(
            "a fixed colour scale is needed: pass threshold and scale, or vmax (never scale each image "
            "to its own maximum: the same colour must mean the same map value in every panel)"
        )
    return np.clip(amap / max(float(vmax), 1e-8), 0, 1)


def colorize_map(
    amap: np.ndarray, *, threshold: float | None = None, scale: float | None = None, vmax: float | None = None
) -> np.ndarray:
    """An anomaly map in jet colours on a fixed scale.

    Args:
        amap: anomaly map, shape (H, W).
        threshold: decision threshold; with ``scale`` the colour is
            ``jet(normalize_score(map, threshold, scale))``: the threshold is jet(0.5) (green).
        scale: scale of :func:`~monai_skipts.metrics.normalize_score`, in score units.
        vmax: used when ``threshold`` or ``scale`` is missing: colour ``jet(clip(map / vmax, 0, 1))``.

    Returns:
        uint8 array (H, W, 3).
    """
    return (255 * _jet(_color_fraction(amap, threshold, scale, vmax))).round().astype(np.uint8)


def overlay_heatmap(image_rgb: np.ndarray, amap: np.ndarray, vmax: float, alpha: float = 0.45) -> np.ndarray:
    """Blend a jet-coloured ``amap`` (H, W) scaled to [0, vmax] over ``image_rgb`` (H, W, 3) in [0, 1];
    returns uint8 (H, W, 3)."""
    heat = _jet(_color_fraction(amap, None, None, vmax))
    return (255 * ((1 - alpha) * image_rgb + alpha * heat)).round().astype(np.uint8)


def _as_rgb01(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(H, W), (H, W, 1) or (H, W, 3) image, uint8 or float in [0, 1] → float (h, w, 3) in [0, 1]
    at the map's ``shape`` (resized bilinearly only when the sizes differ)."""
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    img = img.astype(np.float64) / 255.0 if img.dtype == np.uint8 else np.clip(img.astype(np.float64), 0, 1)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.shape[:2] != tuple(shape):
        pil = Image.fromarray((img * 255).round().astype(np.uint8)).resize((shape[1], shape[0]), Image.BILINEAR)
        img = np.asarray(pil, dtype=np.float64) / 255.0
    return img


def _erode(region: np.ndarray) -> np.ndarray:
    """4-neighbour binary erosion; outside the image counts as background."""
    p = np.pad(region, 1, constant_values=False)
    return p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def _dilate(region: np.ndarray) -> np.ndarray:
    """4-neighbour binary dilation."""
    p = np.pad(region, 1, constant_values=False)
    return p[1:-1, 1:-1] | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]


def _inner_contour(region: np.ndarray, width: int) -> np.ndarray:
    """The ``width`` outermost pixel rings inside ``region`` (H, W) bool."""
    core = region
    for _ in range(width):
        core = _erode(core)
    return region & ~core


def _outer_contour(region: np.ndarray, width: int) -> np.ndarray:
    """``width`` pixel rings just outside ``region`` (H, W) bool: the region's pixels stay visible."""
    grown = region
    for _ in range(width):
        grown = _dilate(grown)
    return grown & ~region


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    return x1 - x0, y1 - y0


def _pack(draw, tokens: list[str], font, width: int, sep: str = "   ") -> list[str]:
    """Greedy line packing of ``tokens`` joined by ``sep`` into lines at most ``width`` px wide; a
    token wider than a line is broken between characters."""
    lines: list[str] = []
    cur = ""
    for tok in tokens:
        cand = tok if not cur else cur + sep + tok
        if _text_size(draw, cand, font)[0] <= width:
            cur = cand
            continue
        if cur:
            lines.append(cur)
        cur = ""
        for ch in tok:  # the token alone: break between characters where it must
            if cur and _text_size(draw, cur + ch, font)[0] > width:
                lines.append(cur)
                cur = ""
            cur += ch
    if cur:
        lines.append(cur)
    return lines


def heatmap_panel(
    image_rgb: np.ndarray,
    amap: np.ndarray,
    *,
    threshold: float | None = None,
    scale: float | None = None,
    vmax: float | None = None,
    score: float | None = None,
    item_id: str | None = None,
    label: int | None = None,
    mask: np.ndarray | None = None,
    alpha: float = 0.45,
    return_layout: bool = False,
) -> np.ndarray | tuple[np.ndarray, dict[str, tuple[int, int, int, int]]]:
    """A panel a clinician can read, at the map's full resolution: a text header above, then the
    image, the overlay, and a vertical colour bar, side by side.

    - colour scale, fixed per model: ``jet(normalize_score(map, threshold, scale))`` (the threshold
      is jet(0.5)); with no ``scale`` or ``threshold``, ``jet(clip(map / vmax, 0, 1))``. Never scaled
      per image: one map value has one colour in every panel of a model.
    - overlay: the coloured map alpha-blended over the image; white outline (inside the region) of
      map >= threshold; green outline (just outside it) of the lesion ``mask``; a white cross with
      a black rim at the map's maximum.
    - colour bar: the colormap from 0 (bottom row) to 1 (top row), ticks 0, 0.5 = threshold, 1
      (``vmax`` scale: 0 and vmax, plus the threshold when known).
    - header: id, image score, normalised score, threshold, decision (``ANOMALOUS`` if score >=
      threshold, else ``normal``), ground truth when ``label`` is given, and the outline legend.

    Deterministic (numpy + PIL, no matplotlib figure).

    Args:
        image_rgb: the image, (H, W, 3), (H, W, 1) or (H, W); uint8, or float in [0, 1]. Resized to
            the map's size if it differs.
        amap: anomaly map, (H, W); its resolution is the panes' (never downscaled).
        threshold: decision threshold in score units (``None``: no decision, no outline).
        scale: :func:`~monai_skipts.metrics.normalize_score` scale (with ``threshold``).
        vmax: fixed colour-scale maximum, used when ``threshold`` or ``scale`` is ``None``.
        score: the image score (default: the map's maximum, the Skip-TS image score).
        item_id: printed in the header.
        label: ground truth (0 normal, 1 anomalous), ``None`` when unknown.
        mask: lesion mask, (H, W) bool (``None``: none).
        alpha: opacity of the coloured map in the overlay.
        return_layout: also return the boxes ``{"header", "image", "overlay", "colorbar"}`` as
            ``(top, left, height, width)`` in panel pixels.

    Returns:
        uint8 RGB array (H_panel, W_panel, 3), with ``H_panel > H`` and ``W_panel > 2 W``; and the
        layout dict when ``return_layout``.

    Raises:
        ValueError: no fixed colour scale (neither ``threshold`` and ``scale`` nor ``vmax``), or a
            mask of another shape than the map.
    """
    amap = np.asarray(amap, dtype=np.float64)
    if amap.ndim != 2:
        raise ValueError(f"amap must be (H, W); got shape {amap.shape}")
    h, w = amap.shape
    threshold = None if threshold is None else float(threshold)
    scale = None if scale is None else float(scale)
    normalised_scale = threshold is not None and scale is not None
    frac = _color_fraction(amap, threshold, scale, vmax)
    img = _as_rgb01(image_rgb, (h, w))
    image_u8 = (255 * img).round().astype(np.uint8)
    over = (255 * ((1 - alpha) * img + alpha * _jet(frac))).round().astype(np.uint8)

    # outlines, then the peak marker on top
    width = 1 if min(h, w) < 192 else 2
    if threshold is not None:
        over[_inner_contour(amap >= threshold, width)] = THRESHOLD_CONTOUR_RGB
    if mask is not None:
        mask = np.asarray(mask).astype(bool)
        if mask.shape != (h, w):
            raise ValueError(f"mask shape {mask.shape} differs from the map's {(h, w)}")
        over[_outer_contour(mask, width)] = MASK_CONTOUR_RGB
    py, px = np.unravel_index(int(np.argmax(amap)), amap.shape)
    r = max(3, min(h, w) // 40)
    ys, xs = slice(max(0, py - r), py + r + 1), slice(max(0, px - r), px + r + 1)
    over[ys, max(0, px - 1) : px + 2] = 0  # black rim: the cross shows on white tissue and white outlines
    over[max(0, py - 1) : py + 2, xs] = 0
    over[ys, px] = 255
    over[py, xs] = 255

    # text
    fs = int(np.clip(round(min(h, w) / 18), 10, 28))
    font = _font(fs)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = _text_size(probe, "Ag0|", font)[1] + max(2, fs // 4)
    pad, gap = max(4, fs // 2), max(4, fs // 2)
    bar_w = max(10, w // 16)
    score = float(amap.max()) if score is None else float(score)
    if normalised_scale:
        ticks = [(1.0, "1"), (0.5, "0.5 = threshold"), (0.0, "0")]
    else:
        ticks = [(1.0, f"{float(vmax):.4g} (vmax)"), (0.0, "0")]
        if threshold is not None and 0 < threshold / max(float(vmax), 1e-8) < 1:
            ticks.insert(1, (threshold / float(vmax), "threshold"))
    ticks_w = max(_text_size(probe, t, font)[0] for _, t in ticks)
    tick_len = max(3, bar_w // 3)
    content_w = pad + w + gap + w + 2 * gap + bar_w + tick_len + 2 + ticks_w + pad
    text_w = content_w - 2 * pad

    header: list[tuple[str, tuple[int, int, int]]] = []
    if item_id is not None:
        id_lines = _pack(probe, [str(item_id)], font, text_w)
        if len(id_lines) > 3:  # very long ids: the file name holds it whole
            id_lines = id_lines[:2] + [id_lines[2][:-3] + "..."]
        header += [(ln, _FG) for ln in id_lines]
    nums = [f"score {score:.4g}"]
    if threshold is not None:
        if scale is not None:
            nums.append(f"normalised {float(normalize_score(score, threshold, scale)):.3f}")
        nums.append(f"threshold {threshold:.4g}")
    else:
        nums.append("threshold unknown")
    header += [(ln, _FG) for ln in _pack(probe, nums, font, text_w)]
    verdict = []
    anomalous = None if threshold is None else score >= threshold
    if anomalous is not None:
        verdict.append("decision: ANOMALOUS" if anomalous else "decision: normal")
    if label is not None:
        verdict.append("ground truth: " + ("anomalous" if int(label) else "normal"))
        if anomalous is not None and bool(int(label)) != anomalous:
            verdict.append("(false positive)" if anomalous else "(false negative)")
    if verdict:
        header += [(ln, _RED if anomalous else _FG) for ln in _pack(probe, verdict, font, text_w)]
    legend = ["+ map maximum"]
    if threshold is not None:
        legend.insert(0, "white: map >= threshold")
    if mask is not None:
        legend.insert(1 if threshold is not None else 0, "green: lesion")
    header += [(ln, _FG) for ln in _pack(probe, legend, font, text_w)]

    header_h = pad + line_h * len(header)
    caption_y = header_h + pad // 2
    top = caption_y + line_h
    total_h = top + h + line_h // 2 + pad
    canvas = Image.new("RGB", (content_w, total_h), _BG)
    draw = ImageDraw.Draw(canvas)
    for k, (text, color) in enumerate(header):
        draw.text((pad, pad + k * line_h), text, fill=color, font=font)
    x_img, x_over = pad, pad + w + gap
    x_bar = x_over + w + 2 * gap
    cap_over = "overlay" if _text_size(probe, "overlay (jet)", font)[0] > w else "overlay (jet)"
    draw.text((x_img, caption_y), "image", fill=_FG, font=font)
    draw.text((x_over, caption_y), cap_over, fill=_FG, font=font)
    canvas.paste(Image.fromarray(image_u8), (x_img, top))
    canvas.paste(Image.fromarray(over), (x_over, top))
    rows = (np.arange(h - 1, -1, -1) / max(h - 1, 1))[:, None]  # 1 at the top row, 0 at the bottom
    bar = (255 * _jet(np.repeat(rows, bar_w, axis=1))).round().astype(np.uint8)
    canvas.paste(Image.fromarray(bar), (x_bar, top))
    for f, text in ticks:
        y = top + int(round((1 - f) * (h - 1)))
        draw.line([(x_bar + bar_w, y), (x_bar + bar_w + tick_len - 1, y)], fill=_FG, width=1)
        _, ty0, _, ty1 = draw.textbbox((0, 0), text, font=font)
        draw.text((x_bar + bar_w + tick_len + 2, y - (ty0 + ty1) // 2), text, fill=_FG, font=font)
    panel = np.asarray(canvas, dtype=np.uint8).copy()
    if not return_layout:
        return panel
    layout = {
        "header": (0, 0, header_h, content_w),
        "image": (top, x_img, h, w),
        "overlay": (top, x_over, h, w),
        "colorbar": (top, x_bar, h, bar_w),
    }
    return panel, layout


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
    ):
        self.output_dir = Path(output_dir)
        self.score_handler = score_handler
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
        return (255 * _as_rgb01(_denormalize(image), shape)).round().astype(np.uint8)

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
