"""The bundle's data (:mod:`monai_skipts.bundle.data`): the split is written, reused and keeps enough
calibration normals; a bad image of the split stops the run before training, named in the last line;
the loaders' generator is seeded."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BUNDLE_ENV, REPO, run_doctests, tiny_training_command
from PIL import Image

from monai_skipts import bundle
from monai_skipts.bundle import data


def test_docstring_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_doctests(data)


def test_build_split_writes_reuses_and_keeps_enough_calibration_normals(tmp_path):
    from test_bundles import make_layout

    root, out = tmp_path / "data", tmp_path / "run"
    make_layout("brainmri", root)  # 10 normals in no/, 3 tumours in yes/
    split = bundle.build_split("brainmri", root, out, seed=1, val_fraction=0.1, target_fpr=0.2, calibration="empirical")
    assert (out / "split.json").is_file() and json.loads((out / "split.json").read_text())["seed"] == 1
    assert all(it["label"] == 0 for it in split["train"] + split["val"])
    assert {it["label"] for it in split["test"]} == {0, 1}
    ids = {s: [it["id"] for it in split[s]] for s in ("train", "val", "test")}
    again = bundle.build_split("brainmri", root, out, seed=1, val_fraction=0.1, target_fpr=0.2, calibration="empirical")
    assert {s: [it["id"] for it in again[s]] for s in ids} == ids  # split.json reused
    # without a target FPR (evaluation) no minimum: 10 % of the 6 training normals; with 0.2 the
    # empirical quantile asks for 5 (ceil(1 / 0.2)), as many as the 10 tiny normals allow
    plain = bundle.build_split("brainmri", root, tmp_path / "eval", seed=1, val_fraction=0.1)
    assert len(plain["val"]) == 1 and len(split["val"]) == 3


def test_seeded_generator_repeats_its_draws():
    a, b = bundle.seeded_generator(7), bundle.seeded_generator(7)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


def _nan_tiff(path: Path, marker: float) -> Path:
    """A 64² float32 TIFF with one NaN pixel; ``marker`` (pixel 0, 0) fixes its content hash, hence its
    place in the seeded split."""
    a = np.zeros((64, 64), np.float32)
    a[5, 5] = np.nan
    a[0, 0] = marker
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a, mode="F").save(path)
    return path


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

    root = make_phantom_dataset(tmp_path / "data", n_train=12, n_test_normal=4, n_test_abnormal=4, size=64, seed=0)
    bad = _nan_tiff(root / relpath, marker)
    out = tmp_path / "run"
    r = subprocess.run(
        tiny_training_command(root, out), cwd=REPO, env=BUNDLE_ENV, capture_output=True, text=True, timeout=600
    )
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
