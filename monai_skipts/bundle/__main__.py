"""``python -m monai_skipts.bundle export``: a trained model as a standard MONAI bundle zip.

    python -m monai_skipts.bundle export --config_file bundles/brainmri/train.json \\
        --checkpoint runs/brainmri/model.pt --out skipts_brainmri.zip

Exit status 0 on success (one JSON line: the zip, its size and its files), 1 when the export fails
(the reason on stderr), 2 for bad arguments. See :mod:`monai_skipts.bundle.export`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import zipfile
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m monai_skipts.bundle", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser(
        "export",
        help="write a trained model as a standard MONAI bundle (.zip)",
        description="Write a trained model as a standard MONAI bundle zip (configs/metadata.json, "
        "configs/inference.json, models/model.pt, models/model.ts, docs/README.md, LICENSE).",
    )
    e.add_argument("--config_file", required=True, help="the training bundle config, e.g. bundles/brainmri/train.json")
    e.add_argument("--checkpoint", required=True, help="the trained model, e.g. runs/brainmri/model.pt")
    e.add_argument("--out", required=True, help="the zip to write, e.g. skipts_brainmri.zip")
    e.add_argument("--version", default=None, help="bundle version (default: the source bundle's metadata.json)")
    e.add_argument("--teacher_weights", default=None, help="the teacher's weights file, if not in the default place")
    e.add_argument("--batch_size", type=int, default=4, help="the bundle's default inference batch size")
    e.add_argument(
        "--no_verify", action="store_true", help="skip the check of model.pt/model.ts against the checkpoint"
    )
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from ..checkpoint import CheckpointError
    from .export import export_bundle

    try:
        out = export_bundle(
            a.config_file,
            a.checkpoint,
            a.out,
            version=a.version,
            teacher_weights=a.teacher_weights,
            batch_size=a.batch_size,
            verify=not a.no_verify,
        )
    except (CheckpointError, FileNotFoundError, ValueError, RuntimeError, ImportError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    with zipfile.ZipFile(out) as z:
        names = z.namelist()
    print(json.dumps({"out": str(out), "bytes": out.stat().st_size, "files": names}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
