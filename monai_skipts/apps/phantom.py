"""An offline demo dataset: deformed Shepp-Logan phantom slices, with and without lesions.

Normals are the modified Shepp-Logan head phantom (Toft's intensities, drawn analytically from its
ten ellipses, so no download is needed) under a random affine transform, a smooth elastic
deformation, intensity jitter and noise. Anomalies are normals with one inserted lesion: a blob
of random size, contrast sign and position inside the skull; its binary mask is written beside.

This is a demo, never a benchmark: it shows the pipeline end to end on 2 CPU cores in minutes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from ..utils import atomic_save, atomic_write_json

__all__ = ["shepp_logan", "make_phantom_image", "make_phantom_dataset"]

# modified Shepp-Logan (Toft): intensity, a, b, x0, y0, angle (deg)
_ELLIPSES = [
    (1.0, 0.69, 0.92, 0.0, 0.0, 0),
    (-0.8, 0.6624, 0.874, 0.0, -0.0184, 0),
    (-0.2, 0.11, 0.31, 0.22, 0.0, -18),
    (-0.2, 0.16, 0.41, -0.22, 0.0, 18),
    (0.1, 0.21, 0.25, 0.0, 0.35, 0),
    (0.1, 0.046, 0.046, 0.0, 0.1, 0),
    (0.1, 0.046, 0.046, 0.0, -0.1, 0),
    (0.1, 0.046, 0.023, -0.08, -0.605, 0),
    (0.1, 0.023, 0.023, 0.0, -0.606, 0),
    (0.1, 0.023, 0.046, 0.06, -0.605, 0),
]


def shepp_logan(size: int = 256, jitter: np.ndarray | None = None) -> np.ndarray:
    """The modified Shepp-Logan phantom, ``(size, size)`` float32 in [0, 1].

    ``jitter`` (10,) optionally scales each ellipse's intensity change (anatomical variation).
    """
    y, x = np.mgrid[1 : -1 : size * 1j, -1 : 1 : size * 1j]
    img = np.zeros((size, size), np.float64)
    for k, (val, a, b, x0, y0, ang) in enumerate(_ELLIPSES):
        t = np.deg2rad(ang)
        xr = (x - x0) * np.cos(t) + (y - y0) * np.sin(t)
        yr = -(x - x0) * np.sin(t) + (y - y0) * np.cos(t)
        scale = 1.0 if jitter is None or k < 2 else float(jitter[k])  # skull and brain stay fixed
        img[(xr / a) ** 2 + (yr / b) ** 2 <= 1] += val * scale
    return np.clip(img, 0, 1).astype(np.float32)


def _deform(img: np.ndarray, rng: np.random.Generator, extra: list[np.ndarray] = ()) -> list[np.ndarray]:
    """Random affine (rotation ±10°, scale 0.9-1.1, shift ±5 %) and smooth elastic field, applied
    identically to ``img`` and ``extra`` arrays (order 1 for images, 0 for masks)."""
    n = img.shape[0]
    ang = np.deg2rad(rng.uniform(-10, 10))
    sc = rng.uniform(0.9, 1.1)
    rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]]) / sc
    c = np.array([n / 2, n / 2])
    shift = rng.uniform(-0.05, 0.05, 2) * n
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    coords = np.stack([yy, xx]).reshape(2, -1) - c[:, None] - shift[:, None]
    coords = rot @ coords + c[:, None]
    alpha, sigma = n * 0.04, n * 0.08
    for i in range(2):
        field = ndimage.gaussian_filter(rng.standard_normal((n, n)), sigma, mode="constant")
        field *= alpha / (np.abs(field).max() + 1e-8)
        coords[i] += field.ravel()
    out = [ndimage.map_coordinates(img, coords, order=1, mode="constant").reshape(n, n)]
    out += [ndimage.map_coordinates(e, coords, order=0, mode="constant").reshape(n, n) for e in extra]
    return out


def make_phantom_image(
    size: int = 256,
    anomalous: bool = False,
    rng: np.random.Generator | None = None,
    lesion_contrast: tuple[float, float] = (0.25, 0.45),
    lesion_radius: tuple[float, float] = (0.04, 0.09),
    lesion_polarity: str = "both",
) -> tuple[np.ndarray, np.ndarray]:
    """One phantom slice ``(size, size)`` uint8 and its lesion mask ``(size, size)`` uint8 {0, 255}.

    ``lesion_contrast``: range of the lesion's peak intensity change; ``lesion_polarity``:
    ``"bright"``, ``"dark"`` or ``"both"`` (random sign); ``lesion_radius``: range of its radius as a
    fraction of ``size``.
    """
    rng = rng if rng is not None else np.random.default_rng()
    base = shepp_logan(size, jitter=rng.uniform(0.85, 1.15, len(_ELLIPSES)))
    mask = np.zeros_like(base)
    if anomalous:
        yy, xx = np.mgrid[0:size, 0:size]
        # a centre well inside the brain ellipse (the second ellipse: a=0.6624, b=0.874, y0=-0.0184)
        t, rad = rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform(0, 0.55))
        cx = (1 + rad * 0.6624 * np.cos(t)) * (size - 1) / 2
        cy = (1 - (rad * 0.874 * np.sin(t) - 0.0184)) * (size - 1) / 2
        r = rng.uniform(*lesion_radius) * size
        ry, rx = r * rng.uniform(0.7, 1.3), r * rng.uniform(0.7, 1.3)
        d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        blob = np.exp(-2.0 * d) * (d <= 1.5)
        sign = {"bright": 1.0, "dark": -1.0}.get(lesion_polarity) or rng.choice([-1.0, 1.0])
        base = np.clip(base + sign * rng.uniform(*lesion_contrast) * blob, 0, 1)
        mask = (d <= 1.0).astype(np.float32)
    img, mask = _deform(base, rng, [mask])
    img = img * rng.uniform(0.9, 1.1) + rng.normal(0, 0.02, img.shape)
    img = np.clip(img, 0, 1)
    return (img * 255).round().astype(np.uint8), (mask > 0.5).astype(np.uint8) * 255


def _write_png(path: Path, arr: np.ndarray) -> None:
    atomic_save(path, lambda f: Image.fromarray(arr).save(f, format="PNG"))


def make_phantom_dataset(
    root: str | Path,
    n_train: int = 40,
    n_test_normal: int = 20,
    n_test_abnormal: int = 20,
    size: int = 128,
    seed: int = 0,
    lesion_contrast: tuple[float, float] = (0.25, 0.45),
    lesion_radius: tuple[float, float] = (0.04, 0.09),
    lesion_polarity: str = "both",
) -> Path:
    """Write a phantom dataset in the MVTec layout under ``root`` (skipped if already complete).

    ``train/good/*.png``, ``test/good/*.png``, ``test/lesion/*.png``,
    ``ground_truth/lesion/<name>_mask.png``. Returns ``root``.
    """
    root = Path(root)
    manifest = root / "phantom.json"
    spec = {
        "n_train": n_train,
        "n_test_normal": n_test_normal,
        "n_test_abnormal": n_test_abnormal,
        "size": size,
        "seed": seed,
        "lesion_contrast": list(lesion_contrast),
        "lesion_radius": list(lesion_radius),
        "lesion_polarity": lesion_polarity,
    }
    if manifest.is_file() and json.loads(manifest.read_text()) == spec:
        return root
    rng = np.random.default_rng(seed)
    for split, n, anomalous in (
        ("train/good", n_train, False),
        ("test/good", n_test_normal, False),
        ("test/lesion", n_test_abnormal, True),
    ):
        for i in range(n):
            img, mask = make_phantom_image(size, anomalous, rng, lesion_contrast, lesion_radius, lesion_polarity)
            _write_png(root / split / f"{i:03d}.png", img)
            if anomalous:
                _write_png(root / "ground_truth" / "lesion" / f"{i:03d}_mask.png", mask)
    atomic_write_json(manifest, spec)
    return root
