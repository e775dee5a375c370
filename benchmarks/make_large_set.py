"""A synthetic BUSI-layout dataset of large images with masks, for the memory benchmark (peak RSS of
training + evaluation must not grow with the input size).

    python benchmarks/make_large_set.py --out runs/benchmarks/large --size 1024 --n-normal 80 --n-abnormal 40
    /usr/bin/time -v python -m monai.bundle run --config_file bundles/busi/train.json \\
        --dataset_dir runs/benchmarks/large --output_dir runs/benchmarks/large-run --epochs 1 --mlflow False

Layout (what :func:`~monai_skipts.data.layouts.busi_datalist` reads)::

    normal/normal (<n>).png
    benign/benign (<n>).png  + benign (<n>)_mask.png   (a bright ellipse; the mask marks it)
    malignant/malignant (<n>).png + malignant (<n>)_mask.png   (likewise, with ``--n-malignant``)

Images are ``--size``² (8-bit grey, or RGB with ``--rgb``; PNG or ``--ext jpg``), smooth seeded noise;
each abnormal image has one ellipse whose mask is written beside it. Deterministic for a seed. The
folder is rewritten when it exists.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth noise in [0, 1], ``(size, size)`` float32: coarse noise upsampled bilinearly, plus grain."""
    coarse = rng.random((size // 32 + 2, size // 32 + 2)).astype(np.float32)
    img = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BILINEAR))
    return np.clip(0.6 * img + 0.2 + 0.05 * rng.standard_normal((size, size)).astype(np.float32), 0, 1)


def _ellipse(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size].astype(np.float32) / size
    cy, cx = rng.uniform(0.3, 0.7, 2)
    ry, rx = rng.uniform(0.05, 0.12, 2)
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _save(path: Path, grey: np.ndarray, rgb: bool) -> None:
    u8 = (grey * 255).round().astype(np.uint8)
    Image.fromarray(np.stack([u8] * 3, -1) if rgb else u8).save(path, quality=95)


def make_large_set(
    out: str | Path,
    size: int = 1024,
    n_normal: int = 80,
    n_abnormal: int = 40,
    rgb: bool = False,
    ext: str = "png",
    n_malignant: int = 0,
) -> Path:
    """Write the dataset under ``out`` (see the module docstring) and return ``out``."""
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    rng = np.random.default_rng(0)
    for cls, n in (("normal", n_normal), ("benign", n_abnormal), ("malignant", n_malignant)):
        if not n:
            continue
        (out / cls).mkdir(parents=True)
        for i in range(1, n + 1):
            img = _texture(rng, size)
            name = f"{cls} ({i})"
            if cls != "normal":
                lesion = _ellipse(rng, size)
                img = np.where(lesion, np.clip(img + 0.35, 0, 1), img)
                Image.fromarray(lesion.astype(np.uint8) * 255).save(out / cls / f"{name}_mask.png")
            _save(out / cls / f"{name}.{ext}", img, rgb)
    return out


def make_covid_set(out: str | Path, n: int = 222, min_size: int = 1000, max_size: int = 1800) -> Path:
    """Write ``n`` RGB JPEGs of ``min_size``..``max_size`` px a side in the Covid-19 Image Dataset layout
    (``Covid19-dataset/{train,test}/{Normal,Covid,Viral Pneumonia}/<k>.jpeg``, no masks; the
    Kaggle set has 251 train and 66 test; here every 5th is test) under ``out`` and return ``out``."""
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    rng = np.random.default_rng(0)
    classes = ("Normal", "Covid", "Viral Pneumonia")
    for k in range(n):
        split = "test" if k % 5 == 4 else "train"
        cls = classes[k % 3]
        folder = out / "Covid19-dataset" / split / cls
        folder.mkdir(parents=True, exist_ok=True)
        h, w = (int(v) for v in rng.integers(min_size, max_size + 1, 2))
        grey = np.asarray(Image.fromarray(_texture(rng, max(h, w)), mode="F").resize((w, h)))
        if cls != "Normal":
            grey = np.clip(grey + 0.3 * _ellipse(rng, max(h, w))[:h, :w], 0, 1)
        _save(folder / f"{k:04d}.jpeg", grey, rgb=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--n-normal", type=int, default=80)
    p.add_argument("--n-abnormal", type=int, default=40)
    p.add_argument("--n-malignant", type=int, default=0, help="malignant/ images with masks (BUSI has 210)")
    p.add_argument("--rgb", action="store_true")
    p.add_argument("--ext", default="png", choices=("png", "jpg"))
    p.add_argument(
        "--covid", type=int, default=0, metavar="N", help="instead: N RGB JPEGs of 1000-1800 px, Covid-19 layout"
    )
    args = p.parse_args(argv)
    if args.covid:
        make_covid_set(args.out, args.covid)
        print(args.out)
        return 0
    make_large_set(args.out, args.size, args.n_normal, args.n_abnormal, args.rgb, args.ext, args.n_malignant)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
