"""Compact copies of the dev data sets for a machine that only takes a small upload (the GPU machine
of the benchmarks takes 64 MiB with everything else).

    python benchmarks/device_data.py ../shared/data .device/data --datasets brainmri iq_oth_nccd lgg_mri

Each image is down-sampled (Lanczos) so that its longer side is at most ``--max-side`` (256: the
bundles' input size, so the bundles' own resize is then a no-op or a small one) and re-encoded as
JPEG (``--quality``), under the same relative path and file name, so ids, labels and the seeded
splits stay those of the originals (the split ranks ids; LGG's by patient). Lesion masks
(``*_mask*.png``) are copied unchanged. Numbers measured on these copies are close to, not the same
as, runs on the originals: say so wherever they are reported.
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
from pathlib import Path

from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def compact(src: Path, dst: Path, max_side: int = 256, quality: int = 90) -> int:
    """Write the compact copy of image ``src`` to ``dst``; returns its size in bytes."""
    with Image.open(src) as im:
        im = im.convert("RGB") if im.mode not in ("L", "RGB") else im.copy()
    scale = max_side / max(im.size)
    if scale < 1:
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(dst)
    return len(buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--datasets", nargs="+", required=True)
    p.add_argument("--max-side", type=int, default=256)
    p.add_argument("--quality", type=int, default=90)
    a = p.parse_args(argv)
    for name in a.datasets:
        total = 0
        for f in sorted((a.src / name).rglob("*")):
            if not f.is_file() or f.name.startswith("."):
                continue
            out = a.dst / name / f.relative_to(a.src / name)
            if f.suffix.lower() in IMAGE_SUFFIXES and "_mask" not in f.stem:
                total += compact(f, out, a.max_side, a.quality)
            elif f.suffix.lower() in IMAGE_SUFFIXES:
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, out)
                total += out.stat().st_size
        print(f"{name}: {total / 2**20:.1f} MiB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
