"""Inference on the files a hospital has: PNG at its own size, NIfTI volumes slice-wise with the
map written back as a NIfTI on the input's grid, a volume score, and a decision per image."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import save_test_checkpoint
from PIL import Image

from monai_skipts.inference import AnomalyPredictor, list_inputs
from monai_skipts.networks import SkipTS
from monai_skipts.utils import InputDataError


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_test_checkpoint(
        path,
        SkipTS("efficientnet_lite0"),
        threshold={"value": 2.0, "target_fpr": 0.05, "n_normals": 20, "scale": 0.1},
        extra={"modality": "mri", "spatial_size": 64},
        with_rng=False,
    )
    return path


def test_png_and_nifti_volume(tmp_path, checkpoint):
    inp = tmp_path / "in"
    inp.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((50, 70)) * 255).astype(np.uint8)).save(inp / "slice.png")
    vol = rng.random((40, 30, 5)).astype(np.float32) * 1000
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    affine[:3, 3] = [-10, 5, 30]
    nib.save(nib.Nifti1Image(vol, affine), inp / "brain.nii.gz")
    out = tmp_path / "out"
    summary = AnomalyPredictor(checkpoint, batch_size=4).run(inp, out)
    assert summary == {"n_images": 6, "n_volumes": 1, "n_anomalous": summary["n_anomalous"], "n_errors": 0}
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {r["threshold"] for r in rows} == {"2.0"}
    assert all(r["anomalous"] == str(float(r["score"]) >= 2.0) for r in rows)
    slices = [r for r in rows if r["volume_id"]]
    assert sorted(int(r["slice_index"]) for r in slices) == list(range(5))
    with open(out / "volume_predictions.csv") as f:
        (vrow,) = list(csv.DictReader(f))
    assert float(vrow["score"]) == pytest.approx(max(float(r["score"]) for r in slices))  # max aggregation
    png_map = np.array(Image.open(out / "maps" / "slice.png.map.png"))
    assert png_map.shape == (50, 70) and png_map.dtype == np.uint16  # the input's own size
    m = nib.load(out / "maps" / "brain.nii.gz.map.nii.gz")
    assert m.shape == (40, 30, 5)  # the volume's grid (already RAS here)
    assert np.allclose(m.affine, affine, atol=1e-4)
    assert np.isfinite(m.get_fdata()).all() and m.get_fdata().max() > 0


def test_slice_maps_go_back_to_their_slices(tmp_path, checkpoint):
    """A bright blob in one slice must light up that slice of the written map volume, not another."""
    vol = np.full((48, 48, 4), 100.0, np.float32)
    vol[30:40, 8:18, 2] = 1000.0
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "v.nii")
    pred = AnomalyPredictor(checkpoint)
    res = pred.predict_items(list_inputs(tmp_path / "v.nii"))
    pred.run(tmp_path / "v.nii", tmp_path / "o")
    m = nib.load(tmp_path / "o" / "maps" / "v.nii.map.nii.gz").get_fdata()
    k = int(np.argmax([r["score"] for r in res]))
    assert res[k]["slice_index"] == 2
    iy, ix = np.unravel_index(np.argmax(m[..., 2]), m.shape[:2])
    assert 24 <= iy <= 46 and 2 <= ix <= 24, (iy, ix)  # peak near the blob, in voxel coordinates


def test_missing_input_and_empty_folder(tmp_path, checkpoint):
    with pytest.raises(InputDataError, match="nope"):
        list_inputs(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputDataError, match="empty"):
        list_inputs(tmp_path / "empty")


def test_heatmap_panel_marks_the_maps_peak_where_the_lesion_is():
    from monai_skipts.visualize import heatmap_panel

    img = np.full((64, 64, 3), 0.9)  # bright tissue: the blended overlay alone washes out
    amap = np.zeros((64, 64))
    amap[40:46, 10:16] = np.linspace(0.5, 1.0, 36).reshape(6, 6)  # peak at (45, 15)
    p, lay = heatmap_panel(img, amap, vmax=1.0, return_layout=True)
    assert p.dtype == np.uint8 and p.shape[2] == 3
    (iy, ix, ih, iw), (oy, ox, oh, ow) = lay["image"], lay["overlay"]
    assert (ih, iw) == (oh, ow) == (64, 64)  # full resolution
    assert (p[iy : iy + 64, ix : ix + 64] == round(0.9 * 255)).all()  # first pane: the image untouched
    o = p[oy : oy + 64, ox : ox + 64]  # overlay: white cross centred on the peak
    assert (o[45, 15] == 255).all() and (o[43, 15] == 255).all() and (o[45, 13] == 255).all()
    assert o[10, 50, 2] > o[10, 50, 0] + 40  # zero map: jet's dark blue blended over the tissue


def test_ctrl_c_writes_the_scored_rows_marks_the_run_interrupted_and_exits_with_one_line(tmp_path, checkpoint):
    """``python -m monai_skipts.inference`` on 300 PNGs, SIGINT once the progress bar (forced on) has
    counted 16 files: the CSV holds the rows scored so far (each with its map), ``status.json`` says
    ``interrupted``, the exit status is 130 and stderr ends with one line and no traceback."""
    import json
    import os
    import signal
    import subprocess
    import sys

    from conftest import REPO, read_until

    inp = tmp_path / "in"
    inp.mkdir()
    rng = np.random.default_rng(0)
    for i in range(300):
        Image.fromarray((rng.random((32, 32)) * 255).astype(np.uint8)).save(inp / f"{i:04d}.png")
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MONAI_SKIPTS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "monai_skipts.inference", "--checkpoint", str(checkpoint), "--input", str(inp)]
    cmd += ["--output_dir", str(out), "--batch_size", "8", "--device", "cpu", "--progress", "on"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        before = read_until(proc.stderr, r"scoring:.*\b(1[6-9]|[2-9]\d|1\d\d)/300\b", timeout=300)
        proc.send_signal(signal.SIGINT)
        stdout, rest = proc.communicate(timeout=120)
    finally:
        proc.kill()
    stderr = before + rest
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted: ") and str(out / "predictions.csv") in last, last
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert 8 <= len(rows) < 300, len(rows)
    assert len({r["id"] for r in rows}) == len(rows) and all((inp / r["id"]).is_file() for r in rows)
    assert all((out / r["map"]).is_file() for r in rows)
    assert len(list((out / "maps").glob("*.map.png"))) == len(rows)
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "interrupted" and status["n_images"] == len(rows) and status["n_inputs"] == 300
    assert f"interrupted: {len(rows)} of 300 inputs scored" in last


def test_a_complete_run_says_complete_in_its_status_file(tmp_path, checkpoint):
    import json

    inp = tmp_path / "in"
    inp.mkdir()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(inp / "a.png")
    AnomalyPredictor(checkpoint, batch_size=4).run(inp, tmp_path / "out", progress=False)
    status = json.loads((tmp_path / "out" / "status.json").read_text())
    assert status == {
        "status": "complete",
        "n_inputs": 1,
        "n_images": 1,
        "n_volumes": 0,
        "n_errors": 0,
        "n_anomalous": status["n_anomalous"],
    }


def _noise_volumes(folder, n, seed):
    """``n`` normal volumes (32 x 32 x 8 Gaussian noise, NIfTI) under ``folder``."""
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        vol = rng.normal(500, 100, (32, 32, 8)).astype(np.float32)
        nib.save(nib.Nifti1Image(vol, np.diag([1.0, 1.0, 3.0, 1.0])), folder / f"v{i:02d}.nii.gz")
    return folder


def _volume_rows(checkpoint, inputs, out):
    import subprocess
    import sys

    from conftest import REPO

    cmd = [sys.executable, "-m", "monai_skipts.inference", "--checkpoint", str(checkpoint), "--input", str(inputs)]
    cmd += ["--output_dir", str(out), "--no_maps", "--device", "cpu", "--progress", "off"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out / "volume_predictions.csv") as f:
        return list(csv.DictReader(f))


def test_volume_threshold_decides_volumes_at_the_target_where_the_slice_threshold_flags_more(tmp_path):
    """60 normal noise volumes calibrate the image (slice) threshold and the volume threshold (volume
    scores aggregated as served) at 5 %; on 80 other normal volumes scored by ``python -m
    monai_skipts.inference`` the volume threshold flags about 5 % and says ``volume``; the same
    checkpoint without a volume threshold decides with the slice threshold (``image``) and flags
    more, as the max of 8 slices exceeds it far more often than one slice does."""
    from monai_skipts.calibration import threshold_record, volume_threshold
    from monai_skipts.checkpoint import save_checkpoint

    torch.manual_seed(0)
    base = save_test_checkpoint(
        tmp_path / "base.pt", SkipTS("efficientnet_lite0"), extra={"modality": "mri", "spatial_size": 32}
    )
    predictor = AnomalyPredictor(base, device="cpu", batch_size=32)
    calib = predictor.predict_items(list_inputs(_noise_volumes(tmp_path / "calib", 60, seed=1)))
    scores, vids = [r["score"] for r in calib], [r["volume_id"] for r in calib]
    record = threshold_record(scores, 0.05, "lognormal")
    image_only = save_checkpoint(tmp_path / "image_only.pt", _calibrated(predictor, record))
    record["volume"] = volume_threshold(scores, 0.05, "lognormal", volume_ids=vids)
    with_volume = save_checkpoint(tmp_path / "with_volume.pt", _calibrated(predictor, record))

    test = _noise_volumes(tmp_path / "test", 80, seed=2)
    by_volume = _volume_rows(with_volume, test, tmp_path / "out_volume")
    by_image = _volume_rows(image_only, test, tmp_path / "out_image")
    assert len(by_volume) == len(by_image) == 80
    assert {r["threshold_kind"] for r in by_volume} == {"volume"} and {r["threshold_kind"] for r in by_image} == {
        "image"
    }
    assert float(by_volume[0]["threshold"]) == pytest.approx(record["volume"]["value"])
    assert float(by_image[0]["threshold"]) == pytest.approx(record["value"])
    fpr_volume = np.mean([r["anomalous"] == "True" for r in by_volume])
    fpr_image = np.mean([r["anomalous"] == "True" for r in by_image])
    assert abs(fpr_volume - 0.05) <= 0.05 + 1e-9, (fpr_volume, fpr_image)
    assert fpr_image > fpr_volume + 0.1, (fpr_volume, fpr_image)


def _calibrated(predictor, record):
    predictor.detector.set_calibration(record)
    return predictor.detector


def test_score_file_decides_a_volume_with_the_volume_threshold_and_an_image_with_the_image_one(tmp_path):
    torch.manual_seed(0)
    record = {"value": 0.0, "scale": 1.0, "volume": {"value": 1e6}, "pixel": {"value": 0.5}}
    ckpt = save_test_checkpoint(
        tmp_path / "model.pt",
        SkipTS("efficientnet_lite0"),
        threshold=record,
        extra={"modality": "mri", "spatial_size": 32},
    )
    predictor = AnomalyPredictor(ckpt, device="cpu")
    vol = np.random.default_rng(0).normal(100, 20, (20, 24, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "vol.nii.gz")
    Image.fromarray(vol[..., 0].astype(np.uint8)).save(tmp_path / "slice.png")
    v = predictor.score_file(tmp_path / "vol.nii.gz", maps=False)
    assert (v["kind"], v["threshold"], v["threshold_kind"], v["anomalous"]) == ("volume", 1e6, "volume", False)
    i = predictor.score_file(tmp_path / "slice.png", maps=False)
    assert (i["kind"], i["threshold"], i["anomalous"]) == ("image", 0.0, True) and "threshold_kind" not in i
    assert predictor.detector.outline_threshold() == (0.5, "pixel")
