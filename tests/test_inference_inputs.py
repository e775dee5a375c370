"""Inference on hostile inputs: each test reproduces one finding on
real files (PNG, NIfTI, DICOM written here or shipped with pydicom) and a real checkpoint, through the
Python API, the command line and the MONAI bundle where the item applies."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from conftest import REPO, save_test_checkpoint
from PIL import Image
from pydicom.data import get_testdata_file

import monai_skipts.data.files as files
import monai_skipts.inference as inference
from monai_skipts.inference import AnomalyPredictor
from monai_skipts.networks import SkipTS
from monai_skipts.transforms import LoadMedicalImage
from monai_skipts.utils import InputDataError


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real checkpoint (efficientnet_lite0 teacher, student at its seeded initialisation) with a
    calibrated threshold, at 64²: what training writes, minus the training time."""
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


@pytest.fixture(scope="module")
def predictor(checkpoint, one_thread):
    return AnomalyPredictor(checkpoint, device="cpu", batch_size=8)


def _png(path: Path, h: int, w: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((h, w)) * 255).astype(np.uint8)).save(path)
    return path


def _nii(path: Path, shape: tuple, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    nib.save(nib.Nifti1Image((rng.random(shape) * 1000).astype(np.float32), np.eye(4)), path)
    return path


def _chain(exc: BaseException) -> str:
    """The messages of ``exc`` and its causes (MONAI's bundle runner wraps the real error)."""
    out = []
    while exc is not None:
        out.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return "\n".join(out)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ---- map names --------------------------------------------------------------------------------


def test_map_names_unique_stable_and_listed_in_predictions(tmp_path, predictor):
    """6 pictures whose old names collided pairwise, and two patients' ``ct.nii.gz``: every input gets its
    own map (its own size proves it is its own), under its relative folders, named in the CSVs."""
    inp = tmp_path / "in"
    sizes = {
        "a/b.png": (20, 30),
        "a_b.png": (21, 31),
        "ü.png": (22, 32),
        "é.png": (23, 33),
        "img.png": (24, 34),
        "img.jpg": (25, 35),
    }
    for k, (rel, (h, w)) in enumerate(sizes.items()):
        _png(inp / rel, h, w, seed=k)
    vols = {"p1/ct.nii.gz": (20, 24, 3), "p2/ct.nii.gz": (22, 26, 4)}
    for k, (rel, shape) in enumerate(vols.items()):
        _nii(inp / rel, shape, seed=10 + k)
    out = tmp_path / "out"
    predictor.run(inp, out)

    rows = _rows(out / "predictions.csv")
    pictures = {r["id"]: r for r in rows if not r["volume_id"]}
    assert set(pictures) == set(sizes)
    assert len({r["map"] for r in pictures.values()}) == 6  # 6 inputs -> 6 map files
    for rel, (h, w) in sizes.items():
        m = out / pictures[rel]["map"]
        assert m.is_file() and Image.open(m).size == (w, h), rel  # the map of this very image
        assert Path(pictures[rel]["map"]).parts[0] == "maps"
    assert Path(pictures["a/b.png"]["map"]).parent.as_posix() == "maps/a"  # relative folders kept
    assert len(list((out / "maps").rglob("*.png"))) == 6

    vrows = {r["volume_id"]: r for r in _rows(out / "volume_predictions.csv")}
    assert set(vrows) == set(vols)
    assert vrows["p1/ct.nii.gz"]["map"] != vrows["p2/ct.nii.gz"]["map"]
    for rel, shape in vols.items():
        assert nib.load(out / vrows[rel]["map"]).shape == shape, rel  # this patient's grid, not the other's
        assert {r["map"] for r in rows if r["volume_id"] == rel} == {vrows[rel]["map"]}  # slice rows too
    assert len(list((out / "maps").rglob("*.nii.gz"))) == 2

    # stable: the name depends only on the item's own id; unique even where only the case differs
    assert files.output_relpath("a/b.png", ".map.png") == pictures["a/b.png"]["map"].removeprefix("maps/")
    names = files.output_relpaths(["X.png", "x.png", "a/b.png", "a_b.png", "ü.png", "u.png", "a"], ".map.png")
    assert len({n.casefold() for n in names.values()}) == len(names) == 7
    assert all(".." not in Path(files.output_relpath(i, ".map.png")).parts for i in ("../x.png", "a/../../b.png"))


# ---- 4-D NIfTI --------------------------------------------------------------------------------


def test_4d_nifti_is_refused_naming_file_shape_and_support(tmp_path, predictor):
    path = _nii(tmp_path / "fmri.nii.gz", (32, 32, 8, 3))
    with pytest.raises(InputDataError) as e:
        LoadMedicalImage()(path)
    msg = str(e.value)
    assert str(path) in msg and "(32, 32, 8, 3)" in msg and "3-D" in msg, msg
    with pytest.raises(InputDataError, match=r"\(32, 32, 8, 3\)"):
        predictor.run(path, tmp_path / "out", fail_fast=True)
    assert not (tmp_path / "out" / "predictions.csv").exists()  # nothing was scored


# ---- one bad file must not lose the batch -------------------------------------------------------


def _batch_with_bad_files(root: Path) -> Path:
    for k in range(5):
        _png(root / f"good{k}.png", 24, 28, seed=k)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # truncated PNG
    (root / "sub").mkdir()
    (root / "sub" / "garbage.nii.gz").write_bytes(b"not a nifti at all")
    return root


def test_bad_files_are_listed_and_the_rest_is_scored(tmp_path, predictor):
    inp = _batch_with_bad_files(tmp_path / "in")
    out = tmp_path / "out"
    with pytest.raises(inference.InferenceIncompleteError) as e:
        predictor.run(inp, out)
    assert "2 of 7" in str(e.value) and "errors.csv" in str(e.value)
    assert e.value.summary["n_images"] == 5 and e.value.summary["n_errors"] == 2
    rows = _rows(out / "predictions.csv")
    assert sorted(r["id"] for r in rows) == [f"good{k}.png" for k in range(5)]
    assert all((out / r["map"]).is_file() for r in rows)
    errs = _rows(out / "errors.csv")
    assert sorted(r["file"] for r in errs) == ["broken.png", "sub/garbage.nii.gz"]
    assert all(r["reason"] for r in errs) and str(tmp_path) not in (out / "errors.csv").read_text()

    # fail_fast: stop at the first bad file, write nothing
    with pytest.raises(InputDataError, match="broken.png"):
        predictor.run(inp, tmp_path / "out_ff", fail_fast=True)
    assert not (tmp_path / "out_ff").exists()


def test_command_line_and_bundle_exit_non_zero_and_write_errors_csv(tmp_path, checkpoint, monkeypatch):
    inp = _batch_with_bad_files(tmp_path / "in")
    env = dict(os.environ, OMP_NUM_THREADS="1", MONAI_SKIPTS_OFFLINE="1")
    cli = [
        sys.executable,
        "-m",
        "monai_skipts.inference",
        "--checkpoint",
        str(checkpoint),
        "--input",
        str(inp),
        "--device",
        "cpu",
    ]
    r = subprocess.run(
        cli + ["--output_dir", str(tmp_path / "cli")], capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == 1, r.stderr[-3000:]
    assert "2 of 7" in r.stderr and "errors.csv" in r.stderr
    assert len(_rows(tmp_path / "cli" / "predictions.csv")) == 5 and len(_rows(tmp_path / "cli" / "errors.csv")) == 2

    from monai.bundle import run as bundle_run

    monkeypatch.chdir(REPO)  # bundles resolve "%bundles/common/..." against the working directory
    run_dir = tmp_path / "bundle"
    run_dir.mkdir()
    shutil.copy(checkpoint, run_dir / "model.pt")
    with pytest.raises(Exception) as e:  # monai.bundle run exits non-zero on it
        bundle_run(
            config_file=["bundles/demo/train.json", "bundles/demo/inference.json"],
            output_dir=str(run_dir),
            input=str(inp),
            device_name="cpu",
        )
    assert "InferenceIncompleteError" in _chain(e.value) and "2 of 7" in _chain(e.value)
    assert len(_rows(run_dir / "inference" / "predictions.csv")) == 5
    assert len(_rows(run_dir / "inference" / "errors.csv")) == 2
    with pytest.raises(Exception) as e:
        bundle_run(
            config_file=["bundles/demo/train.json", "bundles/demo/inference.json"],
            output_dir=str(run_dir),
            input=str(inp),
            device_name="cpu",
            inference_dir=str(tmp_path / "bundle_ff"),
            fail_fast=True,
        )
    assert "InputDataError" in _chain(e.value) and "broken.png" in _chain(e.value)
    assert not (tmp_path / "bundle_ff" / "predictions.csv").exists()


# ---- the tensor API -----------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_predict_tensor_refuses_non_finite_input(predictor, bad):
    x = torch.zeros(2, 3, 64, 64)
    x[1, 0, 5, 7] = bad
    with pytest.raises(ValueError, match="not finite") as e:
        predictor.predict_tensor(x)
    assert "image 1" in str(e.value)
    amap, score = predictor.predict_tensor(torch.zeros(1, 3, 64, 64))  # finite input still scores
    assert torch.isfinite(score).all() and torch.isfinite(amap).all()


# ---- pixel limit ------------------------------------------------------------------------------


def test_pixel_limit_refuses_large_pictures_and_dicom_before_decoding(tmp_path, checkpoint, monkeypatch):
    big = _png(tmp_path / "in" / "big.png", 200, 300)
    with pytest.raises(InputDataError) as e:
        LoadMedicalImage(max_pixels=10_000)(big)
    msg = str(e.value)
    assert str(big) in msg and "300x200" in msg and "60,000" in msg and "10,000" in msg, msg
    assert "max_pixels" in msg and "MONAI_SKIPTS_MAX_PIXELS" in msg, msg  # how to raise it
    ct = get_testdata_file("CT_small.dcm")  # 128 x 128
    with pytest.raises(InputDataError, match="128x128"):
        LoadMedicalImage(max_pixels=10_000)(ct)
    monkeypatch.setenv("MONAI_SKIPTS_MAX_PIXELS", "10000")  # the environment sets the default (bundles)
    with pytest.raises(InputDataError, match="10,000"):
        LoadMedicalImage()(big)
    monkeypatch.delenv("MONAI_SKIPTS_MAX_PIXELS")
    # the predictor passes its limit on; a small picture beside the big one is still scored
    _png(tmp_path / "in" / "small.png", 40, 40)
    with pytest.raises(inference.InferenceIncompleteError):
        AnomalyPredictor(checkpoint, device="cpu", max_pixels=10_000).run(tmp_path / "in", tmp_path / "out")
    assert [r["id"] for r in _rows(tmp_path / "out" / "predictions.csv")] == ["small.png"]
    assert "10,000" in _rows(tmp_path / "out" / "errors.csv")[0]["reason"]
    from monai.bundle import run as bundle_run  # the bundle's --max_pixels reaches the loader too

    monkeypatch.chdir(REPO)
    shutil.copy(checkpoint, tmp_path / "model.pt")
    with pytest.raises(Exception) as e:
        bundle_run(
            config_file=["bundles/demo/train.json", "bundles/demo/inference.json"],
            output_dir=str(tmp_path),
            input=str(tmp_path / "in"),
            device_name="cpu",
            max_pixels=10_000,
        )
    assert "InferenceIncompleteError" in _chain(e.value)
    assert [r["file"] for r in _rows(tmp_path / "inference" / "errors.csv")] == ["big.png"]
    # a limit raised above Pillow's own decompression-bomb limit is honoured, without its warning
    from PIL import Image as PILImage

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", PILImage.DecompressionBombWarning)
        assert LoadMedicalImage(max_pixels=100_000)(big).shape == (1, 200, 300)
    assert PILImage.MAX_IMAGE_PIXELS == 1000  # Pillow's setting is left as it was


# ---- 12-bit JPEG DICOM --------------------------------------------------------------------------


def test_12bit_jpeg_dicom_says_which_decoder_is_missing_and_how_to_install_it():
    from pydicom.pixels.decoders.base import get_decoder

    path = get_testdata_file("JPEG-lossy.dcm")  # JPEG Extended (process 2 and 4), 12 bits stored
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.51" and ds.BitsStored == 12
    missing = " ".join(get_decoder(ds.file_meta.TransferSyntaxUID).missing_dependencies)
    if "pylibjpeg" not in missing or "gdcm" not in missing:  # a 12-bit capable decoder is installed here
        img = LoadMedicalImage()(path)
        assert img.shape[1:] == (ds.Rows, ds.Columns)
        return
    with pytest.raises(InputDataError) as e:  # only Pillow is installed, and it cannot decode 12-bit JPEG
        LoadMedicalImage()(path)
    msg = str(e.value)
    assert path in msg and "JPEG Extended" in msg and "12" in msg, msg
    assert "pillow" in msg.lower()  # what the installed decoder said
    assert "pip install" in msg and "pylibjpeg-libjpeg" in msg and "python-gdcm" in msg, msg
    assert not msg.rstrip().endswith("plugins:)"), msg


# ---- relative volume ids -----------------------------------------------------------------------


def test_volume_ids_are_relative_to_the_input_root(tmp_path, predictor):
    inp = tmp_path / "in"
    a = _nii(inp / "p1" / "ct.nii.gz", (20, 20, 2), seed=1)
    b = _nii(inp / "p2" / "ct.nii.gz", (20, 20, 2), seed=2)
    _png(inp / "p1" / "x.png", 20, 20)
    for name, inputs in (("folder", inp.resolve()), ("list", [str(a.resolve()), str(b.resolve())])):
        out = tmp_path / name
        predictor.run(inputs, out)
        for f in ("predictions.csv", "volume_predictions.csv"):
            assert str(tmp_path) not in (out / f).read_text(encoding="utf-8"), (name, f)
        rows = _rows(out / "predictions.csv")
        assert {r["volume_id"] for r in rows if r["volume_id"]} == {"p1/ct.nii.gz", "p2/ct.nii.gz"}, name
        assert {r["id"] for r in rows if r["volume_id"]} == {"p1/ct.nii.gz", "p2/ct.nii.gz"}, name
        assert {r["volume_id"] for r in _rows(out / "volume_predictions.csv")} == {"p1/ct.nii.gz", "p2/ct.nii.gz"}
