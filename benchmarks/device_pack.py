"""Pixel-exact copies of the dev data for the GPU machine's 64 MiB upload.

    python benchmarks/device_pack.py ../shared/data .device --max-mb 60

Files the bundle reads at their stored size are kept: 8-bit grey/RGB PNGs (LGG's 256² slices) are
re-encoded as lossless WebP under the original name (Pillow opens by content; pixel identity and mode
are checked, else the original bytes are kept), other formats as their original bytes.
Images larger than the bundles' 256² input (IQ-OTH/NCCD's 512² JPEGs) are decoded and resized by the
bundle's own transforms (``LoadMedicalImaged`` + ``Resized(bilinear, anti_aliasing)``) and stored as
lossless 8-bit PNG under the original name: the bundle then reads them at its input size, so its resize
is the identity and the only difference from the originals is the 8-bit rounding after the resize
(at most 0.5 grey level). Masks are copied unchanged. Files are packed into parts (``part<k>/``) of at
most ``--max-mb`` each so each fits one upload; every part keeps the dataset's relative paths.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def encode(src: Path, size: int) -> bytes:
    """The lossless bytes that stand in for image ``src`` (see the module docstring)."""
    with Image.open(src) as im:
        im.load()
        if max(im.size) <= size:
            if im.mode not in ("L", "RGB") or src.suffix.lower() != ".png":
                return src.read_bytes()  # palette/CMYK/JPEG: the original bytes
            buf = io.BytesIO()
            im.save(buf, format="WEBP", lossless=True, quality=50, method=4)
            with Image.open(io.BytesIO(buf.getvalue())) as back:
                if back.mode != im.mode or not np.array_equal(np.asarray(back), np.asarray(im)):
                    return src.read_bytes()
            return buf.getvalue()
    from monai.transforms import Resized

    from monai_skipts.transforms import LoadMedicalImaged

    d = LoadMedicalImaged("image")({"image": str(src)})
    d = Resized("image", spatial_size=(size, size), mode="bilinear", anti_aliasing=True)(d)
    a = np.asarray(d["image"])  # (C, H, W) in the file's grey levels
    a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    # the loader gives (C, H, W) with H the first image axis; back to a PIL (rows, cols) image
    img = Image.fromarray(a[0]) if a.shape[0] == 1 else Image.fromarray(np.moveaxis(a, 0, -1))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--datasets", nargs="+", default=["brainmri", "iq_oth_nccd", "lgg_mri"])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--max-mb", type=float, default=60)
    a = p.parse_args(argv)
    part, used = 0, 0
    for name in a.datasets:
        total = 0
        for f in sorted((a.src / name).rglob("*")):
            if not f.is_file() or f.name.startswith("."):
                continue
            is_image = f.suffix.lower() in IMAGE_SUFFIXES and "_mask" not in f.stem
            data = encode(f, a.size) if is_image else f.read_bytes()
            if used + len(data) > a.max_mb * 1e6:
                part, used = part + 1, 0
            out = a.dst / f"part{part}" / name / f.relative_to(a.src / name)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data)
            used += len(data)
            total += len(data)
        print(f"{name}: {total / 1e6:.1f} MB (part {part} ends at {used / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
