"""The training bundle's checks before training, run as a user runs them (``python -m monai.bundle run``
in a subprocess, on a phantom MVTec-layout folder with one float TIFF holding a NaN pixel)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

ENV = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
ENV.update(MONAI_SKIPTS_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _nan_tiff(path: Path, marker: float) -> Path:
    """A 64² float32 TIFF with one NaN pixel; ``marker`` (pixel 0, 0) fixes its content hash, hence its
    place in the seeded split."""
    a = np.zeros((64, 64), np.float32)
    a[5, 5] = np.nan
    a[0, 0] = marker
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a, mode="F").save(path)
    return path


def _train(data: Path, out: Path) -> subprocess.CompletedProcess:
    args = {
        "epochs": 1,
        "spatial_size": 64,
        "batch_size": 4,
        "teacher": "efficientnet_lite0",
        "progress_bar": False,
        "n_heatmaps": 0,
        "save_maps": False,
        "target_fpr": 0.5,
        "calibration": "empirical",
        "mlflow": False,
    }
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "bundles/demo/train.json"]
    cmd += ["--output_dir", str(out), "--dataset_dir", str(data)]
    for k, v in args.items():
        cmd += [f"--{k}", str(v)]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    "relpath, marker, subset",
    [
        ("train/good/nan05.tif", 5.0, "val"),  # the seeded split holds it out for validation/calibration
        ("test/good/nan.tif", 0.0, "test"),
        ("train/good/nan00.tif", 0.0, "train"),
    ],
)
def test_nan_image_stops_before_training_with_the_file_in_the_last_line(tmp_path, relpath, marker, subset):
    """A NaN pixel in any image of the split stops the run before the first epoch; the last line of
    stderr names the file and the problem (not ``RuntimeError: applying transform <... at 0x...>``)."""
    from monai_skipts.apps import make_phantom_dataset

    data = make_phantom_dataset(tmp_path / "data", n_train=12, n_test_normal=4, n_test_abnormal=4, size=64, seed=0)
    bad = _nan_tiff(data / relpath, marker)
    out = tmp_path / "run"
    r = _train(data, out)
    log = r.stdout + r.stderr
    assert r.returncode != 0, log[-3000:]
    split = json.loads((out / "split.json").read_text())
    placed = [k for k in ("train", "val", "test") if any(it["image"].endswith(relpath) for it in split[k])]
    assert placed == [subset], placed
    last = r.stderr.strip().splitlines()[-1]
    assert str(bad) in last and "contains 1 NaN/inf values" in last, last
    if subset != "train":
        assert f"[{subset} split; checked before training]" in last, last
    assert "Epoch[1]" not in log, "an epoch was trained before the bad image was found"
    assert not (out / "checkpoint.pt").exists() and not (out / "model.pt").exists()
