"""Drawing anomaly maps: the one overlay renderer (a map in jet colours blended over an image, the
outline of the region at or above the threshold, optional lesion outline and peak marker), colour
scales, and the heat-map panel a clinician reads (image | overlay | colour bar under a header with the
score and the decision). Used by :class:`~monai_skipts.handlers.AnomalyPlotsHandler` (panels of an
evaluation) and by the DICOM Secondary Capture series (:func:`monai_skipts.dicom.render.overlay_rgb`).
numpy, PIL and matplotlib's colormap only: deterministic, no figure.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from monai_skipts.metrics import normalize_score
from monai_skipts.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "THRESHOLD_CONTOUR_RGB",
    "MASK_CONTOUR_RGB",
    "denormalize",
    "as_rgb01",
    "jet",
    "map_fraction",
    "colorize_map",
    "inner_contour",
    "outer_contour",
    "overlay_map",
    "load_font",
    "heatmap_panel",
]

THRESHOLD_CONTOUR_RGB = (255, 255, 255)  # outline of the region with map >= threshold
MASK_CONTOUR_RGB = (0, 255, 0)  # outline of the ground-truth lesion mask
_BG, _FG, _RED = (255, 255, 255), (0, 0, 0), (200, 0, 0)


def denormalize(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) ImageNet-normalised (C = 3, or 1: repeated) → (H, W, 3) float in [0, 1]."""
    image = image.detach().float().cpu()
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype).view(3, 1, 1)
    return (image * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def jet(fraction: np.ndarray) -> np.ndarray:
    """matplotlib's jet at ``fraction`` in [0, 1] (any shape) → float RGB in [0, 1], shape + (3,)."""
    from matplotlib import colormaps

    return np.asarray(colormaps["jet"](np.asarray(fraction, dtype=np.float64)))[..., :3]


def map_fraction(amap: np.ndarray, threshold: float | None, scale: float | None, vmax: float | None) -> np.ndarray:
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
    return (255 * jet(map_fraction(amap, threshold, scale, vmax))).round().astype(np.uint8)


def as_rgb01(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
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


def inner_contour(region: np.ndarray, width: int) -> np.ndarray:
    """The ``width`` outermost pixel rings inside ``region`` (H, W) bool."""
    core = region
    for _ in range(width):
        core = _erode(core)
    return region & ~core


def outer_contour(region: np.ndarray, width: int) -> np.ndarray:
    """``width`` pixel rings just outside ``region`` (H, W) bool: the region's pixels stay visible."""
    grown = region
    for _ in range(width):
        grown = _dilate(grown)
    return grown & ~region


def overlay_map(
    image: np.ndarray,
    amap: np.ndarray,
    *,
    threshold: float | None = None,
    scale: float | None = None,
    vmax: float | None = None,
    alpha: float = 0.45,
    fade_below: float | None = None,
    outline_rgb: tuple[int, int, int] = THRESHOLD_CONTOUR_RGB,
    outline_width: int | None = None,
    mask: np.ndarray | None = None,
    mask_rgb: tuple[int, int, int] = MASK_CONTOUR_RGB,
    mark_peak: bool = False,
    outline_threshold: float | None = None,
) -> np.ndarray:
    """The anomaly map drawn over the image: the one overlay of the package (heat-map panels and the
    DICOM Secondary Capture).

    - colour: ``jet(map_fraction(amap, threshold, scale, vmax))`` blended over the image with opacity
      ``alpha``; with ``fade_below``, the opacity grows from 0 at colour position ``fade_below`` to
      ``alpha`` at 1 (the image stays clear where the map is low);
    - ``outline_rgb``: the inner outline of ``amap >= outline_threshold`` (default ``threshold``; none
      when both are ``None``);
    - ``mask_rgb``: the outline just outside the lesion ``mask``, so the lesion's pixels stay visible;
    - ``mark_peak``: a white cross with a black rim at the map's maximum.

    Args:
        image: (H, W), (H, W, 1) or (H, W, 3); uint8, or float in [0, 1]. Resized to the map's size if
            it differs.
        amap: anomaly map, (H, W).
        threshold: decision threshold in score units (``None``: no outline).
        scale: :func:`~monai_skipts.metrics.normalize_score` scale (colour scale with ``threshold``).
        vmax: colour-scale maximum, used when ``threshold`` or ``scale`` is ``None``.
        alpha: opacity of the colour.
        fade_below: colour position below which the colour is transparent (``None``: constant ``alpha``).
        outline_rgb: colour of the threshold outline.
        outline_width: outline width in pixels (``None``: 1, or 2 from 192 pixels up).
        mask: lesion mask, (H, W) bool.
        mask_rgb: colour of the lesion outline.
        mark_peak: mark the map's maximum.
        outline_threshold: the map value the outline is drawn at: the calibrated pixel threshold
            (:func:`~monai_skipts.calibration.pixel_threshold`); ``None``: ``threshold``.

    Returns:
        uint8 RGB array (H, W, 3).

    Raises:
        ValueError: ``amap`` not 2-D, a mask of another shape, or no fixed colour scale (see
            :func:`map_fraction`).

    Example:
        >>> amap = np.zeros((8, 8)); amap[2:5, 2:5] = 1.0
        >>> overlay_map(np.zeros((8, 8), np.uint8), amap, threshold=0.5, vmax=1.0)[3, 2].tolist()
        [255, 255, 255]
    """
    amap = np.asarray(amap, dtype=np.float64)
    if amap.ndim != 2:
        raise ValueError(f"amap must be (H, W); got shape {amap.shape}")
    h, w = amap.shape
    frac = map_fraction(amap, threshold, scale, vmax)
    a = float(alpha)
    if fade_below is not None:
        a = (alpha * np.clip((frac - fade_below) / (1.0 - fade_below), 0.0, 1.0))[..., None]
    out = (1 - a) * as_rgb01(image, (h, w)) + a * jet(frac)
    over = (255 * np.clip(out, 0.0, 1.0)).round().astype(np.uint8)
    width = (1 if min(h, w) < 192 else 2) if outline_width is None else int(outline_width)
    outline = threshold if outline_threshold is None else outline_threshold
    if outline is not None:
        over[inner_contour(amap >= float(outline), width)] = outline_rgb
    if mask is not None:
        mask = np.asarray(mask).astype(bool)
        if mask.shape != (h, w):
            raise ValueError(f"mask shape {mask.shape} differs from the map's {(h, w)}")
        over[outer_contour(mask, width)] = mask_rgb
    if mark_peak:
        py, px = np.unravel_index(int(np.argmax(amap)), amap.shape)
        r = max(3, min(h, w) // 40)
        ys, xs = slice(max(0, py - r), py + r + 1), slice(max(0, px - r), px + r + 1)
        over[ys, max(0, px - 1) : px + 2] = 0  # black rim: the cross shows on white tissue and white outlines
        over[max(0, py - 1) : py + 2, xs] = 0
        over[ys, px] = 255
        over[py, xs] = 255
    return over


def load_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
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
    outline_threshold: float | None = None,
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
        outline_threshold: the map value the white outline is drawn at: the calibrated pixel
            threshold (:func:`~monai_skipts.calibration.pixel_threshold`); ``None``: ``threshold``.

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
    image_u8 = (255 * as_rgb01(image_rgb, (h, w))).round().astype(np.uint8)
    over = overlay_map(
        image_rgb,
        amap,
        threshold=threshold,
        scale=scale,
        vmax=vmax,
        alpha=alpha,
        mask=mask,
        mark_peak=True,
        outline_threshold=outline_threshold,
    )
    outline = threshold if outline_threshold is None else float(outline_threshold)

    # text
    fs = int(np.clip(round(min(h, w) / 18), 10, 28))
    font = load_font(fs)
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
    if outline is not None:
        legend.insert(0, "white: map >= " + ("threshold" if outline_threshold is None else "pixel threshold"))
    if mask is not None:
        legend.insert(1 if outline is not None else 0, "green: lesion")
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
    bar = (255 * jet(np.repeat(rows, bar_w, axis=1))).round().astype(np.uint8)
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
