"""Duplicate removal, seeded splits and split files on small fake datasets (real PNG files)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from conftest import png

from monai_skipts.data import DATASETS, get_dataset, prepare_split, remove_duplicates, split_datalist
from monai_skipts.utils import InputDataError


def brainmri(root: Path, n_no: int = 20, n_yes: int = 12) -> Path:
    """BrainMRI-like folder with 2 duplicates among normals and 1 among tumours."""
    for i in range(n_no):
        png(root / "no" / f"{i} no.jpg", i)
    for i in range(n_yes):
        png(root / "yes" / f"Y{i}.jpg", 1000 + i)
    png(root / "no" / "no 90.jpg", 0)
    png(root / "no" / "no 91.jpg", 1)
    png(root / "yes" / "Y99.jpg", 1000)
    return root


def fake_items(n_normal: int, n_abnormal: int) -> list[dict]:
    items = [{"image": f"/d/n{i}.png", "id": f"n{i}", "label": 0} for i in range(n_normal)]
    return items + [{"image": f"/d/a{i}.png", "id": f"a{i}", "label": 1} for i in range(n_abnormal)]


def ids(items):
    return [it["id"] for it in items]


# -- duplicates --------------------------------------------------------------------------------


def test_remove_duplicates_keeps_first_sorted_path(tmp_path):
    from monai_skipts.data import build_datalist

    items = build_datalist("brainmri", brainmri(tmp_path))
    kept, report = remove_duplicates(items)
    assert (report["n_input"], report["n_removed"], report["n_kept"]) == (35, 3, 32)
    assert report["removed"] == [
        {"id": "no/no 90.jpg", "duplicate_of": "no/0 no.jpg"},
        {"id": "no/no 91.jpg", "duplicate_of": "no/1 no.jpg"},
        {"id": "yes/Y99.jpg", "duplicate_of": "yes/Y0.jpg"},
    ]
    assert report["cross_class"] == [] and report["label_conflicts"] == []
    assert remove_duplicates(list(reversed(items)))[1] == report  # independent of input order


def test_cross_class_and_label_conflicts(tmp_path):
    def item(name, value, label, cls):
        image = str(png(tmp_path / cls / name, value))
        return {"image": image, "id": f"{cls}/{name}", "label": label, "class_name": cls}

    items = [
        item("a.png", 1, 0, "normal"),
        item("b.png", 1, 1, "benign"),  # conflict
        item("c.png", 2, 1, "benign"),
        item("d.png", 2, 1, "malignant"),  # cross-class, same label
        item("e.png", 3, 0, "normal"),
    ]
    kept, report = remove_duplicates(items)
    assert ids(kept) == ["benign/c.png", "normal/e.png"]
    assert report["cross_class"] == [
        {"ids": ["benign/c.png", "malignant/d.png"], "classes": ["benign", "malignant"], "kept": "benign/c.png"}
    ]
    assert report["label_conflicts"] == [
        {"ids": ["benign/b.png", "normal/a.png"], "labels": [1, 0], "action": "dropped"}
    ]
    assert (report["n_removed"], report["n_conflict_dropped"]) == (1, 2)
    kept, report = remove_duplicates(items, on_conflict="keep_abnormal")
    assert ids(kept) == ["benign/b.png", "benign/c.png", "normal/e.png"]
    with pytest.raises(InputDataError, match=r"b.png: identical files labelled both normal and anomalous"):
        remove_duplicates(items, on_conflict="error")


def test_slices_of_one_file_are_not_duplicates(tmp_path):
    vol = png(tmp_path / "v.png", 1)
    copy = png(tmp_path / "w.png", 1)
    items = [
        {"image": str(p), "id": f"{p.name}#{s}", "label": 0, "slice_index": s} for p in (vol, copy) for s in (0, 1)
    ]
    kept, report = remove_duplicates(items)
    assert ids(kept) == ["v.png#0", "v.png#1"] and report["n_removed"] == 2


# -- splitting ---------------------------------------------------------------------------------


def test_table_counts_scaled_or_subsampled():
    splits, info = split_datalist(fake_items(87, 141), n_train=58, n_test_normal=40, n_test_abnormal=154)
    assert info["counts"] == {
        "train": 46,
        "val": 5,
        "test_normal": 36,
        "test_abnormal": 141,
        "unused_normal": 0,
        "unused_abnormal": 0,
    }
    assert info["scaled"] and "scaled to 51 + 36" in info["notes"][0]
    splits, info = split_datalist(fake_items(120, 200), n_train=58, n_test_normal=40, n_test_abnormal=154)
    c = info["counts"]
    assert (c["train"] + c["val"], c["test_normal"], c["test_abnormal"], c["unused_normal"], c["unused_abnormal"]) == (
        58,
        40,
        154,
        22,
        46,
    )
    assert len(splits["unused"]) == 68 and sum(it["label"] for it in splits["test"]) == 154
    assert not any(it["label"] for it in splits["train"] + splits["val"])


def test_val_is_carved_from_train_and_test_is_stable():
    items = fake_items(30, 5)
    a, _ = split_datalist(items, seed=3, val_fraction=0.1)
    b, info = split_datalist(items, seed=3, val_fraction=0.0)
    assert info["counts"]["val"] == 0 and a["test"] == b["test"]  # 40 % of normals to test without counts
    assert len(a["test"]) == 12 + 5 and sorted(ids(a["train"] + a["val"])) == sorted(ids(b["train"]))
    assert split_datalist(fake_items(3, 1), n_train=2, n_test_normal=1, val_fraction=0.01)[1]["counts"]["val"] == 1
    assert split_datalist(fake_items(2, 1), n_train=1, n_test_normal=1)[1]["counts"]["val"] == 0


def test_seed_determinism_and_order_independence():
    items = fake_items(40, 10)
    first, _ = split_datalist(items, seed=7)
    shuffled = items[:]
    random.Random(1).shuffle(shuffled)
    again, _ = split_datalist(shuffled, seed=7)
    other, _ = split_datalist(items, seed=8)
    assert first == again
    assert ids(first["test"]) != ids(other["test"]) and ids(first["train"]) != ids(other["train"])


def test_source_split_and_errors():
    items = fake_items(6, 2)
    for i, it in enumerate(items):
        it["subset"] = "train" if i < 4 else "test"
    splits, info = split_datalist(items, source_split=True, n_train=3)
    assert ids(splits["test"]) == ["a0", "a1", "n4", "n5"] and info["counts"]["unused_normal"] == 1
    assert set(ids(splits["train"] + splits["val"])) < {"n0", "n1", "n2", "n3"}
    with pytest.raises(InputDataError, match="root: no normal images"):
        split_datalist(fake_items(0, 3), source="root")
    with pytest.raises(InputDataError, match="source_split needs"):
        split_datalist(fake_items(3, 3), source_split=True)


def test_presets_cover_table_one():
    assert len([p for p in DATASETS.values() if p.n_train]) == 12
    p = get_dataset("IQ-OTH/NCCD")
    assert (p.n_train, p.n_test_normal, p.n_test_abnormal) == (277, 139, 681)
    assert get_dataset("HeadCT") is get_dataset("head_ct") is DATASETS["headct"]
    assert get_dataset("class_folders").n_train is None
    with pytest.raises(ValueError, match="unknown dataset"):
        get_dataset("mnist")


# -- split files -------------------------------------------------------------------------------


def test_prepare_split_writes_portable_file_and_reuses_it(tmp_path):
    root = brainmri(tmp_path / "data")
    split_file = tmp_path / "out" / "split.json"
    out = prepare_split("brainmri", root, split_file, seed=1)
    report = out["report"]
    assert report["dedup"]["n_removed"] == 3 and not report["reused"]
    # 20 normals for 58 + 40 -> 12 + 8; val 1 of 12; all 12 tumours to test
    assert report["counts"] == {
        "train": 11,
        "val": 1,
        "test_normal": 8,
        "test_abnormal": 12,
        "unused_normal": 0,
        "unused_abnormal": 0,
    }
    doc = json.loads(split_file.read_text())
    assert doc["seed"] == 1 and doc["train"][0]["image"].startswith("no/") and doc["unused"] == []
    assert doc["counts"] == report["counts"] and doc["dedup"]["n_removed"] == 3
    again = prepare_split("brainmri", root, split_file, seed=1)
    assert again["report"]["reused"] and all(again[k] == out[k] for k in ("train", "val", "test"))
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    relocated = prepare_split("brainmri", moved, split_file, seed=1)
    assert relocated["train"][0]["image"] == str(moved / out["train"][0]["id"])


def test_split_file_validation(tmp_path):
    root = brainmri(tmp_path / "data")
    split_file = tmp_path / "split.json"
    out = prepare_split("brainmri", root, split_file)
    with pytest.raises(InputDataError, match=r"split.json: split was made with seed=0 \(asked 5\).*overwrite=True"):
        prepare_split("brainmri", root, split_file, seed=5)
    png(root / "yes" / "Y50.jpg", 1050)
    with pytest.raises(InputDataError, match=r"split.json: the dataset changed .*1 images not in the split: yes/Y50"):
        prepare_split("brainmri", root, split_file)
    remade = prepare_split("brainmri", root, split_file, overwrite=True)
    assert remade["report"]["counts"]["test_abnormal"] == 13
    gone = Path(out["test"][0]["image"])
    gone.unlink()
    with pytest.raises(InputDataError) as e:
        prepare_split("brainmri", root, split_file)
    assert str(e.value).startswith(f"{split_file}: 1 file it lists does not exist") and str(gone) in str(e.value)
    split_file.write_text('{"format": "other"}')
    with pytest.raises(InputDataError, match="split.json: not a monai-skipts-split/1 split file"):
        prepare_split("brainmri", root, split_file)


def test_prepare_split_mvtec_follows_source_folders(tmp_path):
    for i in range(5):
        png(tmp_path / "train" / "good" / f"{i:03d}.png", i)
    png(tmp_path / "test" / "good" / "000.png", 10)
    png(tmp_path / "test" / "good" / "001.png", 0)  # a copy of train/good/000.png: the test copy sorts first
    png(tmp_path / "test" / "scratch" / "000.png", 20)
    png(tmp_path / "ground_truth" / "scratch" / "000_mask.png", 255)
    out = prepare_split("mvtec", tmp_path, tmp_path / "split.json")
    assert out["report"]["counts"] == {
        "train": 3,
        "val": 1,
        "test_normal": 2,
        "test_abnormal": 1,
        "unused_normal": 0,
        "unused_abnormal": 0,
    }
    assert out["report"]["dedup"]["removed"] == [{"id": "train/good/000.png", "duplicate_of": "test/good/001.png"}]
    assert out["test"][-1]["mask"] == str(tmp_path / "ground_truth" / "scratch" / "000_mask.png")
    doc = json.loads((tmp_path / "split.json").read_text())
    assert doc["test"][-1]["mask"] == "ground_truth/scratch/000_mask.png"
