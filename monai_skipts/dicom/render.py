"""The picture a radiologist sees in the Secondary Capture series: the source frame in grey (its own
window, or the 0.5-99.5 % range), the anomaly map over it in colour (transparent where the map is low,
opaque towards twice the threshold), the outline of the region above the threshold, and the result
burned in: score, threshold, decision, and ``NOT FOR DIAGNOSTIC USE``."""

from __future__ import annotations

from typing import Any

import numpy as np

from monai_skipts.visualize import load_font, overlay_map

__all__ = ["frame_to_grey", "overlay_rgb", "burn_in_text", "DISCLAIMER"]

DISCLAIMER = "NOT FOR DIAGNOSTIC USE"


def _first(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _frame_attr(ds, frame: int, seq: str, attr: str):
    """An attribute of the per-frame (or shared) functional groups of an enhanced multi-frame image."""
    for groups, idx in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        try:
            item = getattr(ds, groups)[idx]
            return getattr(getattr(item, seq)[0], attr)
        except (AttributeError, IndexError, KeyError):
            continue
    return None


def frame_to_grey(ds, frame: int = 0) -> np.ndarray:
    """Frame ``frame`` of a DICOM image as display values: uint8 ``(H, W)`` for monochrome sources
    (rescaled, windowed, MONOCHROME1 inverted: bright is dense) or ``(H, W, 3)`` for colour ones."""
    arr = ds.pixel_array
    if _first(ds.get("NumberOfFrames")) and int(_first(ds.get("NumberOfFrames")) or 1) > 1:
        arr = arr[frame]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if arr.ndim == 3 or photometric == "PALETTE COLOR":
        if photometric == "PALETTE COLOR":
            from pydicom.pixels import apply_color_lut

            arr = apply_color_lut(arr, ds)
        arr = arr.astype(np.float64)
        hi = float(arr.max()) if arr.size else 1.0
        return np.clip(arr / (hi if hi > 255 else 255.0) * 255.0, 0, 255).astype(np.uint8)
    x = arr.astype(np.float64)
    slope = _first(ds.get("RescaleSlope")) or _first(
        _frame_attr(ds, frame, "PixelValueTransformationSequence", "RescaleSlope")
    )
    icpt = _first(ds.get("RescaleIntercept"))
    if icpt is None:
        icpt = _first(_frame_attr(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept"))
    x = x * (slope if slope else 1.0) + (icpt or 0.0)
    center = _first(ds.get("WindowCenter"))
    width = _first(ds.get("WindowWidth"))
    if center is None or not width:
        center = _first(_frame_attr(ds, frame, "FrameVOILUTSequence", "WindowCenter"))
        width = _first(_frame_attr(ds, frame, "FrameVOILUTSequence", "WindowWidth"))
    if center is not None and width and width > 1:
        lo, hi = center - width / 2.0, center + width / 2.0
    else:
        lo, hi = (float(v) for v in np.percentile(x, [0.5, 99.5])) if x.size else (0.0, 1.0)
    g = np.clip((x - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    if photometric == "MONOCHROME1":
        g = 1.0 - g
    return (g * 255.0 + 0.5).astype(np.uint8)


def overlay_rgb(
    grey: np.ndarray,
    amap: np.ndarray,
    threshold: float | None,
    vmax: float,
    outline_threshold: float | None = None,
) -> np.ndarray:
    """``grey`` (uint8 ``(H, W)`` or ``(H, W, 3)``) with the anomaly map ``amap`` (``(H, W)``) drawn over it
    by :func:`monai_skipts.visualize.overlay_map`, in the Secondary Capture's look: 'jet' colours on
    ``[0, vmax]``, clear below ``vmax / 4`` (half the threshold when ``vmax`` is twice it), the opacity
    growing to 0.6 at ``vmax``, and the outline of ``amap >= outline_threshold`` (default ``threshold``;
    the app passes the pixel threshold when the checkpoint has one) in yellow, 1 pixel per 256.
    Returns uint8 ``(H, W, 3)``.

    Raises:
        ValueError: the map and the image differ in size.
    """
    amap = np.asarray(amap, dtype=np.float64)
    if amap.shape != grey.shape[:2]:
        raise ValueError(f"map {amap.shape} and image {grey.shape[:2]} differ in size")
    return overlay_map(
        grey[..., :3] if grey.ndim == 3 else grey,
        amap,
        threshold=threshold,
        outline_threshold=outline_threshold,
        vmax=float(vmax),
        alpha=0.6,
        fade_below=0.25,
        outline_rgb=(255, 255, 0),
        outline_width=max(1, int(round(min(amap.shape) / 256))),
    )


def _wrap(draw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + ([line] if line else [])


def burn_in_text(
    rgb: np.ndarray, top: list[str], bottom: list[str], alarm: bool = False, compact: list[str] | None = None
) -> np.ndarray:
    """Write ``top`` lines at the top left and ``bottom`` lines at the bottom left of ``rgb`` (white on a
    black outline; the second top line in orange when ``alarm``), wrapped to the image width. When the
    wrapped lines would cover more than half the image (small images), ``compact`` replaces ``top``."""
    from PIL import Image, ImageDraw

    img = Image.fromarray(rgb, mode="RGB")
    draw = ImageDraw.Draw(img)
    h, w = rgb.shape[:2]
    size = max(6, int(round(min(h, w) / 24)))
    font = load_font(size)
    margin = max(1, size // 3)
    stroke = 1 if size >= 10 else 0
    step = size + max(1, size // 5)
    n_lines = sum(len(_wrap(draw, t, font, w - 2 * margin)) for t in top + bottom)
    if compact is not None and n_lines * step > h / 2:
        top = compact
    y = margin
    for k, text in enumerate(top):
        fill = (255, 150, 0) if (alarm and k == 1) else (255, 255, 255)
        for line in _wrap(draw, text, font, w - 2 * margin):
            draw.text((margin, y), line, font=font, fill=fill, stroke_width=stroke, stroke_fill=(0, 0, 0))
            y += step
    bottom_lines = [ln for text in bottom for ln in _wrap(draw, text, font, w - 2 * margin)]
    y = h - margin - step * len(bottom_lines)
    for line in bottom_lines:
        draw.text((margin, y), line, font=font, fill=(255, 255, 255), stroke_width=stroke, stroke_fill=(0, 0, 0))
        y += step
    return np.asarray(img, dtype=np.uint8).copy()
