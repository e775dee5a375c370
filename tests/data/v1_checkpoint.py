"""A version-1 checkpoint built deterministically (seeded student initialisation), and the fixed files
it is scored on; see make_v1_scores.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

FILES = ("CT_small.dcm", "MR_small.dcm", "noise_rgb.png", "gradient_grey.png")


def v1_payload() -> dict:
    """The default bundle's architecture (one-class bottleneck, no skips, efficientnet_lite0) with a
    seeded random student, per-level statistics and a threshold, in the version-1 layout."""
    from monai_skipts.networks import SkipTS

    torch.manual_seed(20261204)
    net = SkipTS(teacher="efficientnet_lite0", bottleneck=True, skip="none")
    return {
        "kind": "monai-skipts/checkpoint",
        "version": 1,
        "model_config": dict(net.config),
        "student": net.student.state_dict(),
        "epoch": 3,
        "iteration": 12,
        "threshold": {"value": 31.5, "scale": 1.25, "target_fpr": 0.05, "n_normals": 10, "method": "lognormal"},
        "extra": {"dataset": "compat", "modality": "mri", "spatial_size": 64, "sigma": 4.0},
        "map_level_stats": torch.tensor([[0.30, 0.05], [0.40, 0.08], [0.50, 0.10]], dtype=torch.float32),
    }


def fixed_files(folder: Path) -> dict[str, Path]:
    """Two of pydicom's test files and two deterministic PNGs, written into ``folder``."""
    from pydicom.data import get_testdata_file

    out = {name: Path(get_testdata_file(name)) for name in FILES[:2]}
    rng = np.random.RandomState(7)
    p = folder / "noise_rgb.png"
    Image.fromarray(rng.randint(0, 256, (80, 96, 3), dtype=np.uint8)).save(p)
    out["noise_rgb.png"] = p
    p = folder / "gradient_grey.png"
    Image.fromarray(np.add.outer(np.arange(70), np.arange(90)).astype(np.uint8)).save(p)
    out["gradient_grey.png"] = p
    return out
