"""The LGG (kaggle_3m) layout and its split by patient, on slices and masks the tests write; the
real 30-patient copy when ../shared/data/lgg_mri is present."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from monai_skipts.data import build_datalist, prepare_split
from monai_skipts.utils import InputDataError

REAL = REPO.parent / "shared" / "data" / "lgg_mri"


def _slice(path: Path, brain: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = np.zeros((32, 32, 3), np.uint8)
    if brain:
        a[4:28, 4:28] = (rng.random((24, 24, 3)) * 100 + 100).astype(np.uint8)
    else:
        a[0:2, 0:2] = 200  # a speck: 0.4 % of the slice
    Image.fromarray(a).save(path)


def make_lgg(root: Path, n_patients: int = 10, n_slices: int = 12) -> Path:
    """``kaggle_3m/<patient>/<patient>_<n>.png`` + ``_mask.png``: slices 1 and n_slices are background,
    slices 5-7 carry a lesion in every patient."""
    for p in range(n_patients):
        patient = f"TCGA_AA_{p:04d}_19990101"
        folder = root / "kaggle_3m" / patient
        folder.mkdir(parents=True)
        for n in range(1, n_slices + 1):
            _slice(folder / f"{patient}_{n}.png", brain=1 < n < n_slices, seed=100 * p + n)
            m = np.zeros((32, 32), np.uint8)
            if 5 <= n <= 7:
                m[10:16, 10:16] = 255
            Image.fromarray(m).save(folder / f"{patient}_{n}_mask.png")
    return root


def test_lgg_layout_items(tmp_path):
    items = build_datalist("lgg", make_lgg(tmp_path, n_patients=2))
    assert len(items) == 2 * 10  # the two background slices of each patient dropped
    first = [it for it in items if it["volume_id"] == "TCGA_AA_0000_19990101"]
    assert [it["slice_number"] for it in first] == list(range(2, 12))  # numeric, not 10 < 2
    assert {it["slice_number"]: it["label"] for it in first} == {n: int(5 <= n <= 7) for n in range(2, 12)}
    assert all(it["mask"].endswith(f"_{it['slice_number']}_mask.png") for it in items)
    assert all(it["id"].startswith("kaggle_3m/") and 0.1 <= it["foreground"] <= 1 for it in items)
    # the filter is a parameter: 0 keeps the volume ends
    assert len(build_datalist("lgg", tmp_path, min_foreground=0.0)) == 2 * 12


def test_lgg_layout_refuses_a_slice_without_mask(tmp_path):
    make_lgg(tmp_path, n_patients=1)
    (tmp_path / "kaggle_3m" / "TCGA_AA_0000_19990101" / "TCGA_AA_0000_19990101_3_mask.png").unlink()
    with pytest.raises(InputDataError, match=r"1 slices have no _mask file.*TCGA_AA_0000_19990101_3\.png"):
        build_datalist("lgg", tmp_path)
    with pytest.raises(InputDataError, match="no patient folders"):
        build_datalist("lgg", tmp_path / "kaggle_3m" / "TCGA_AA_0000_19990101")


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_lgg_split_is_by_patient(tmp_path, seed):
    root = make_lgg(tmp_path / "data")
    split = prepare_split("lgg", root, split_file=tmp_path / "split.json", seed=seed, val_fraction=0.25)
    patients = {s: {it["volume_id"] for it in split[s]} for s in ("train", "val", "test")}
    # 10 patients: 4 to test, round(0.25 * 6) = 2 (half up) to validation, 4 to training
    assert [len(patients[s]) for s in ("train", "val", "test")] == [4, 2, 4]
    assert not (
        patients["train"] & patients["val"]
        or patients["train"] & patients["test"]
        or patients["val"] & patients["test"]
    )
    assert all(it["label"] == 0 for s in ("train", "val") for it in split[s])  # lesion slices never train
    assert {it["label"] for it in split["test"]} == {0, 1}  # test keeps every slice of its patients
    assert len(split["test"]) == 4 * 10 and len(split["train"]) == 4 * 7
    doc = json.loads((tmp_path / "split.json").read_text())
    assert doc["params"]["group_by"] == "volume_id" and doc["params"]["test_fraction"] == 0.4
    assert sorted(doc["split"]["groups"]["test"]) == sorted(patients["test"])
    # the same seed gives the same split, and the stored one is reused
    again = prepare_split("lgg", root, split_file=tmp_path / "split.json", seed=seed, val_fraction=0.25)
    assert [it["id"] for it in again["test"]] == [it["id"] for it in split["test"]]


def test_lgg_split_takes_more_calibration_patients_for_min_val_normals(tmp_path):
    root = make_lgg(tmp_path / "data")
    split = prepare_split("lgg", root, seed=0, val_fraction=0.1, min_val_normals=20)
    # 7 normal slices a patient: 0.1 of 6 patients is 1 patient (7 normals); 3 reach 20
    assert len({it["volume_id"] for it in split["val"]}) == 3 and len(split["val"]) == 21


@pytest.mark.skipif(not REAL.is_dir(), reason="../shared/data/lgg_mri not present")
def test_lgg_real_copy(tmp_path):
    split = prepare_split("lgg", REAL, split_file=tmp_path / "split.json", seed=0, val_fraction=0.25)
    groups = split["report"]["split"]["groups"]
    assert sum(len(g) for g in groups.values()) == 30
    c = split["report"]["counts"]
    assert (c["train"], c["val"], c["test_normal"], c["test_abnormal"]) == (256, 74, 266, 141)
