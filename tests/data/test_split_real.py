"""The real BrainMRI and IQ-OTH/NCCD sets, when present (``../shared/data`` or ``$SKIPTS_DATA_ROOT``).

Duplicate counts are the ones documented in the data folder's README (checked there against
``sha256sums.txt``); the split counts follow from the Table I defaults scaled to the deduplicated
normals (see ``split_datalist``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from monai_skipts.data import prepare_split

DATA_ROOT = Path(os.environ.get("SKIPTS_DATA_ROOT") or Path(__file__).resolve().parents[2].parent / "shared" / "data")

CASES = {
    # folder: (dataset, files, duplicate copies removed, split counts)
    "brainmri": ("brainmri", 253, 25, {"train": 46, "val": 5, "test_normal": 36, "test_abnormal": 141}),
    "iq_oth_nccd": ("IQ-OTH/NCCD", 1097, 42, {"train": 243, "val": 27, "test_normal": 135, "test_abnormal": 650}),
}


@pytest.mark.parametrize(
    "folder",
    [
        pytest.param(f, marks=pytest.mark.skipif(not (DATA_ROOT / f).is_dir(), reason=f"{DATA_ROOT / f} not present"))
        for f in sorted(CASES)
    ],
)
def test_real_dataset_dedup_and_split(folder, tmp_path):
    root = DATA_ROOT / folder
    dataset, n_files, n_dup, counts = CASES[folder]
    out = prepare_split(dataset, root, tmp_path / "split.json", seed=0)
    dedup, got = out["report"]["dedup"], out["report"]["counts"]
    print(f"{dataset}: {got}; notes: {out['report']['split']['notes']}")
    assert (dedup["n_input"], dedup["n_removed"], dedup["n_kept"]) == (n_files, n_dup, n_files - n_dup)
    assert dedup["cross_class"] == [] and dedup["label_conflicts"] == []
    assert {k: got[k] for k in counts} == counts and got["unused_normal"] == got["unused_abnormal"] == 0
    everything = [it["id"] for k in ("train", "val", "test") for it in out[k]]
    assert len(everything) == len(set(everything)) == n_files - n_dup
    doc = json.loads((tmp_path / "split.json").read_text())
    assert not any(Path(it["image"]).is_absolute() for it in doc["test"])
    other = prepare_split(dataset, root, tmp_path / "split1.json", seed=1)
    assert other["report"]["counts"] == got and other["test"] != out["test"]
