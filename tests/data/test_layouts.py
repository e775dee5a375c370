"""Datalist builders on small fake datasets written to tmp_path (real PNG files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import png

from monai_skipts.data import (
    LAYOUTS,
    build_datalist,
    file_datalist,
    get_layout,
    is_image_file,
    list_images,
)
from monai_skipts.utils import InputDataError


def fill(folder: Path, n: int, start: int, pattern: str = "{}.png") -> list[Path]:
    return [png(folder / pattern.format(i), start + i) for i in range(n)]


def labels_of(items):
    return [it["label"] for it in items]


def test_image_file_detection(tmp_path):
    png(tmp_path / "a.PNG", 1)
    (tmp_path / "b.nii.gz").write_bytes(b"x")
    (tmp_path / "c.txt").write_text("no")
    (tmp_path / "Thumbs.db").write_bytes(b"x")
    png(tmp_path / ".hidden.png", 2)
    (tmp_path / "IM0001").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 8)
    (tmp_path / "1.2.840.10008").write_bytes(b"\0" * 128 + b"DICM")
    (tmp_path / "README").write_bytes(b"not a dicom file, long enough" * 10)
    png(tmp_path / "sub" / "d.jpg", 3)  # Pillow writes PNG bytes; the extension decides
    names = [p.name for p in list_images(tmp_path)]
    assert names == ["1.2.840.10008", "IM0001", "a.PNG", "b.nii.gz"]
    assert [p.name for p in list_images(tmp_path, recursive=True)][-1] == "d.jpg"
    assert not is_image_file(tmp_path / "sub")


def test_registry_lookup_is_spelling_tolerant():
    assert get_layout("IQ-OTH/NCCD") is LAYOUTS["iq_oth_nccd"]
    assert get_layout("HeadCT") is LAYOUTS["head_ct"]
    with pytest.raises(ValueError, match="unknown dataset layout"):
        get_layout("nope")


def test_brainmri_class_folders(tmp_path):
    fill(tmp_path / "no", 3, 0, "{} no.jpg")
    fill(tmp_path / "yes", 4, 100, "Y{}.JPG")
    png(tmp_path / "yes" / "Y9.png", 0)  # duplicate bytes are kept here: dedup is a later step
    items = build_datalist("brainmri", tmp_path)
    assert len(items) == 8 and labels_of(items).count(0) == 3
    assert items[0] == {"image": str(tmp_path / "no" / "0 no.jpg"), "label": 0, "id": "no/0 no.jpg", "class_name": "no"}
    assert [it["id"] for it in items] == sorted(it["id"] for it in items)


def test_iq_oth_nccd_spelling_and_wrapper_folder(tmp_path):
    data = tmp_path / "The IQ-OTHNCCD lung cancer dataset"
    fill(data / "Normal cases", 2, 0, "Normal case ({}).jpg")
    fill(data / "Bengin cases", 2, 10, "Bengin case ({}).jpg")
    fill(data / "Malignant cases", 3, 20, "Malignant case ({}).jpg")
    (data / "notes.txt").write_text("ignored")
    items = build_datalist("iq_oth_nccd", tmp_path)
    assert labels_of(items).count(0) == 2 and labels_of(items).count(1) == 5
    assert {it["class_name"] for it in items} == {"Normal cases", "Bengin cases", "Malignant cases"}
    assert items[0]["id"].startswith("The IQ-OTHNCCD lung cancer dataset/")


def test_covid_and_retinal_oct_subsets(tmp_path):
    covid = tmp_path / "covid" / "Covid19-dataset"
    for subset, n in (("train", 3), ("test", 2)):
        fill(covid / subset / "Normal", n, 0 if subset == "train" else 50)
        fill(covid / subset / "Covid", n, 100 if subset == "train" else 150)
        fill(covid / subset / "Viral Pneumonia", 1, 200 if subset == "train" else 250)
    items = build_datalist("covid_xray", tmp_path / "covid")
    assert len(items) == 12 and {it["subset"] for it in items} == {"train", "test"}
    assert sum(it["label"] == 0 and it["subset"] == "test" for it in items) == 2
    oct_root = tmp_path / "OCT2017"
    fill(oct_root / "train" / "NORMAL", 2, 0, "NORMAL-1-{}.jpeg")
    for k, cls in enumerate(("CNV", "DME", "DRUSEN")):
        fill(oct_root / "test" / cls, 1, 10 + k, cls + "-2-{}.jpeg")
    items = build_datalist("retinal_oct", oct_root)
    assert labels_of(items) == [1, 1, 1, 0, 0]


def test_malaria_cp_child_and_generic(tmp_path):
    fill(tmp_path / "cell_images" / "Uninfected", 2, 0)
    fill(tmp_path / "cell_images" / "Parasitized", 3, 10)
    (tmp_path / "cell_images" / "Uninfected" / "Thumbs.db").write_bytes(b"x")
    assert labels_of(build_datalist("malaria", tmp_path)) == [1, 1, 1, 0, 0]
    for variant, n in (("CP-CHILD-A", 2), ("CP-CHILD-B", 1)):
        fill(tmp_path / "cp" / variant / "Train" / "Non-Polyp", n, 20 + 5 * n)
        fill(tmp_path / "cp" / variant / "Test" / "Polyp", 1, 40 + n)
    items = build_datalist("cp_child", tmp_path / "cp", subdir="CP-CHILD-A")
    assert len(items) == 3 and all(it["id"].startswith("CP-CHILD-A/") for it in items)
    fill(tmp_path / "nafld" / "healthy" / "deep", 2, 60)
    fill(tmp_path / "nafld" / "fatty", 1, 70)
    items = build_datalist("nafld", tmp_path / "nafld", normal=["healthy"], abnormal=["fatty"], recursive=True)
    assert labels_of(items) == [1, 0, 0]


def test_class_folders_errors_name_the_folder(tmp_path):
    with pytest.raises(InputDataError, match="does not exist"):
        build_datalist("brainmri", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputDataError, match=r"empty: no normal class folder \['no'\]"):
        build_datalist("brainmri", tmp_path / "empty")
    (tmp_path / "b" / "no").mkdir(parents=True)
    fill(tmp_path / "b" / "yes", 1, 0)
    with pytest.raises(InputDataError) as e:
        build_datalist("brainmri", tmp_path / "b")
    assert str(e.value).startswith(str(tmp_path / "b" / "no")) and "no images found" in str(e.value)
    fill(tmp_path / "c" / "Normal", 1, 0)
    fill(tmp_path / "c" / "Other", 1, 1)
    with pytest.raises(InputDataError, match=r"no abnormal class folder.*folders there: \['Normal', 'Other'\]"):
        build_datalist("lung_ct", tmp_path / "c")


def _head_ct(root: Path, labels: list[int], header: str = "id, hemorrhage") -> Path:
    fill(root / "head_ct" / "head_ct", len(labels), 0, "{:03d}.png")
    rows = "\n".join(f"{i}, {lab}" for i, lab in enumerate(labels))
    (root / "labels.csv").write_text(f"{header}\n{rows}\n")
    return root


def test_head_ct(tmp_path):
    items = build_datalist("head_ct", _head_ct(tmp_path, [1, 1, 0, 0, 0]))
    assert labels_of(items) == [1, 1, 0, 0, 0]
    assert items[0]["id"] == "head_ct/head_ct/000.png" and items[0]["class_name"] == "hemorrhage"
    (tmp_path / "head_ct" / "head_ct" / "004.png").unlink()
    with pytest.raises(InputDataError, match=r"labels.csv: 1 listed ids have no image .*: 4$"):
        build_datalist("head_ct", tmp_path)
    (tmp_path / "labels.csv").write_text("id,label\n0,1\n")
    with pytest.raises(InputDataError, match="labels.csv: expected columns 'id' and 'hemorrhage'"):
        build_datalist("head_ct", tmp_path)


def test_busi_masks(tmp_path):
    base = tmp_path / "Dataset_BUSI_with_GT"
    for k, (cls, n) in enumerate((("normal", 2), ("benign", 2), ("malignant", 1))):
        for i in range(1, n + 1):
            png(base / cls / f"{cls} ({i}).png", 10 * k + i)
            png(base / cls / f"{cls} ({i})_mask.png", 0)  # masks are never items, even when identical
    png(base / "benign" / "benign (2)_mask_1.png", 1)
    png(base / "malignant" / "malignant (7).png", 99)  # anomalous image without mask: warned, kept
    items = build_datalist("busi", tmp_path)
    assert len(items) == 6 and labels_of(items).count(0) == 2
    by_id = {it["id"]: it for it in items}
    b2 = by_id["Dataset_BUSI_with_GT/benign/benign (2).png"]
    assert b2["mask"].endswith("benign (2)_mask.png") and b2["extra_masks"][0].endswith("benign (2)_mask_1.png")
    assert "mask" not in by_id["Dataset_BUSI_with_GT/malignant/malignant (7).png"]
    assert all("_mask" not in Path(it["image"]).name for it in items)


def test_mvtec(tmp_path):
    fill(tmp_path / "bottle" / "train" / "good", 3, 0, "{:03d}.png")
    fill(tmp_path / "bottle" / "test" / "good", 1, 10, "{:03d}.png")
    fill(tmp_path / "bottle" / "test" / "crack", 2, 20, "{:03d}.png")
    png(tmp_path / "bottle" / "ground_truth" / "crack" / "000_mask.png", 255)
    items = build_datalist("mvtec", tmp_path)  # wrapper folder 'bottle' found
    assert [(it["subset"], it["label"]) for it in items] == [("test", 1)] * 2 + [("test", 0)] + [("train", 0)] * 3
    assert items[0]["mask"].endswith("crack/000_mask.png") and "mask" not in items[1]
    with pytest.raises(InputDataError, match="expected train/good/"):
        build_datalist("mvtec", tmp_path / "bottle" / "test")


def test_csv_and_json_datalists(tmp_path):
    png(tmp_path / "img" / "a.png", 1)
    png(tmp_path / "img" / "b.png", 2)
    png(tmp_path / "img" / "b_mask.png", 3)
    (tmp_path / "vol.nii.gz").write_bytes(b"nifti")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "dl.csv").write_text(
        "image,label,mask,slice_index\n../img/a.png,0,,\n../img/b.png,1,../img/b_mask.png,\n"
        "../vol.nii.gz,abnormal,,3\n../vol.nii.gz,normal,,4\n"
    )
    items = file_datalist(tmp_path / "lists" / "dl.csv")
    assert [it["id"] for it in items] == [
        "../img/a.png",
        "../img/b.png",
        "../vol.nii.gz#slice_index=3",
        "../vol.nii.gz#slice_index=4",
    ]
    assert labels_of(items) == [0, 1, 1, 0] and items[2]["slice_index"] == 3
    assert items[1]["mask"] == str(tmp_path / "img" / "b_mask.png") and "mask" not in items[0]
    rows = [
        {"image": str(tmp_path / "img" / "a.png"), "label": 0, "id": "p1"},
        {"image": "img/b.png", "label": 1, "class_name": "tumour"},
    ]
    (tmp_path / "dl.json").write_text(json.dumps({"data": rows}))
    items = build_datalist("datalist", tmp_path / "dl.json")
    assert [it["id"] for it in items] == ["img/b.png", "p1"] and items[0]["class_name"] == "tumour"


def test_datalist_errors_name_the_datalist(tmp_path):
    png(tmp_path / "a.png", 1)
    lines = ["image,label", "a.png,0"] + [f"gone{i}.dcm,1" for i in range(7)]
    (tmp_path / "dl.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(InputDataError) as e:
        file_datalist(tmp_path / "dl.csv")
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'dl.csv'}: 7 listed files do not exist: {tmp_path / 'gone0.dcm'}")
    assert "and 2 more" in msg
    (tmp_path / "dl.csv").write_text("image,label\na.png,2\n")
    with pytest.raises(InputDataError, match="item 1: label must be 0"):
        file_datalist(tmp_path / "dl.csv")
    (tmp_path / "dl.json").write_text("[]")
    with pytest.raises(InputDataError, match="dl.json: the datalist lists no items"):
        file_datalist(tmp_path / "dl.json")
    (tmp_path / "dl.json").write_text('{"x": 1}')
    with pytest.raises(InputDataError, match="expected a JSON list"):
        file_datalist(tmp_path / "dl.json")
    with pytest.raises(InputDataError, match="datalist file does not exist"):
        file_datalist(tmp_path / "nope.csv")
