"""Volumes to slices (NIfTI written here, pydicom's multi-frame file) and slice scores to volume scores."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.transforms import Compose
from pydicom.data import get_testdata_file

from monai_skipts.transforms import (
    LoadMedicalImage,
    LoadMedicalImaged,
    VolumeToSlices,
    VolumeToSlicesd,
    aggregate_volume_scores,
    build_preprocessing,
    expand_volume_datalist,
    preset_transforms,
    select_slices,
    take_slice,
)
from monai_skipts.utils import InputDataError

X, Y, Z = 6, 5, 7


def _write(path, data, affine):
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), path)
    return str(path)


@pytest.fixture()
def slab(tmp_path):
    """RAS volume whose axial slice k holds value k everywhere, plus a textured in-plane pattern check."""
    vol = np.broadcast_to(np.arange(Z, dtype=np.float32), (X, Y, Z)).copy()
    return _write(tmp_path / "slab.nii.gz", vol, np.diag([1.0, 1.0, 2.0, 1.0])), vol


def test_slice_count_and_order(slab):
    path, _ = slab
    items = expand_volume_datalist([{"image": path, "label": 1}])
    assert [it["slice_index"] for it in items] == list(range(Z))
    assert all(it["volume_id"] == path and it["label"] == 1 and it["slice_axis"] == 2 for it in items)
    load = LoadMedicalImaged("image")
    for it in items:
        img = load(it)["image"]
        assert img.shape == (1, Y, X) and torch.all(img == it["slice_index"])
        assert img.meta["volume_id"] == path and img.meta["slice_index"] == it["slice_index"]


def test_ras_fix_on_flipped_affine(tmp_path):
    vol = np.broadcast_to(np.arange(Z, dtype=np.float32), (X, Y, Z)).copy()
    path = _write(tmp_path / "flipped.nii.gz", vol, np.diag([1.0, 1.0, -2.0, 1.0]))  # z runs superior -> inferior
    loaded = LoadMedicalImage()(path)
    assert loaded.shape == (1, X, Y, Z) and loaded.affine[2, 2] > 0  # RAS now
    assert [float(loaded[0, 0, 0, k]) for k in range(Z)] == list(range(Z - 1, -1, -1))
    items = expand_volume_datalist([{"image": path}])
    assert [float(LoadMedicalImaged("image")(it)["image"].mean()) for it in items] == list(range(Z - 1, -1, -1))


def test_in_plane_display_layout(tmp_path):
    """Axial slice in display order: rows anterior -> posterior, columns patient right -> left."""
    vol = np.zeros((X, Y, 1), np.float32)
    vol[X - 1, Y - 1, 0] = 1  # most right (RAS x max), most anterior (y max)
    path = _write(tmp_path / "corner.nii", vol, np.eye(4))
    img = LoadMedicalImage()(path)  # single slice volume -> 2-D image
    assert img.shape == (1, Y, X) and img[0, 0, 0] == 1  # top-left: anterior, patient right


@pytest.mark.parametrize("axis,n", [(0, X), (1, Y), (2, Z)])
def test_axis_choice(slab, axis, n):
    path, vol = slab
    items = expand_volume_datalist([{"image": path}], axis=axis)
    assert len(items) == n
    img = LoadMedicalImaged("image")(items[1])["image"]
    expected = take_slice(torch.from_numpy(vol)[None], axis, 1)
    np.testing.assert_array_equal(img.numpy(), expected.numpy())


def test_slice_range_and_foreground_skip(tmp_path):
    vol = np.zeros((X, Y, Z), np.float32)
    vol[:, :, 2:5] = 1  # slices 2..4 full
    vol[:2, :2, 5] = 1  # slice 5: 4/30 foreground
    path = _write(tmp_path / "fg.nii.gz", vol, np.eye(4))
    pick = lambda **kw: [it["slice_index"] for it in expand_volume_datalist([{"image": path}], **kw)]  # noqa: E731
    assert pick(slice_range=(1, -2)) == [1, 2, 3, 4]
    assert pick(min_foreground=0.1) == [2, 3, 4, 5]
    assert pick(min_foreground=0.5) == [2, 3, 4]
    assert pick(min_foreground=0.5, slice_range=(3, None)) == [3, 4]
    assert pick(min_foreground=0.5, foreground_threshold=1.0) == []  # nothing above 1


def test_multiframe_dicom_one_item_per_frame():
    path = get_testdata_file("emri_small.dcm")
    items = expand_volume_datalist([{"image": path}])
    assert len(items) == 10 and [it["slice_index"] for it in items] == list(range(10))
    slices = VolumeToSlicesd("image")(LoadMedicalImaged("image")({"image": path}))
    assert len(slices) == 10 and slices[4]["image"].shape == (1, 64, 64)


def test_two_d_items_pass_through_and_bad_items_skip(tmp_path, slab):
    from PIL import Image

    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a.png")
    good = {"image": str(tmp_path / "a.png")}
    dcm = {"image": get_testdata_file("CT_small.dcm")}
    bad = {"image": str(tmp_path / "missing.nii.gz")}
    with pytest.raises(InputDataError, match="missing.nii.gz: file not found"):
        expand_volume_datalist([good, bad])
    with pytest.warns(UserWarning, match="missing.nii.gz"):
        out = expand_volume_datalist([good, bad, dcm, {"image": slab[0]}], on_error="skip")
    assert out[:2] == [good, dcm] and len(out) == 2 + Z
    assert expand_volume_datalist(out) == out  # idempotent: slice items pass through


def test_volume_to_slices_transform_for_inference(tmp_path, slab):
    path, _ = slab
    mask = np.zeros((X, Y, Z), np.float32)
    mask[1:3, 1:3, 3] = 1
    mpath = _write(tmp_path / "mask.nii.gz", mask, np.diag([1.0, 1.0, 2.0, 1.0]))
    chain = Compose(
        [
            LoadMedicalImaged(["image", "mask"]),
            VolumeToSlicesd(["image", "mask"], slice_range=(2, 5)),
            *preset_transforms("mri", spatial_size=16, mask_key="mask", load=False),
        ]
    )
    out = chain({"image": path, "mask": mpath, "label": 0})
    assert [d["slice_index"] for d in out] == [2, 3, 4] and all(d["volume_id"] == path for d in out)
    assert out[0]["image"].shape == (3, 16, 16) and out[0]["mask"].shape == (1, 16, 16)
    assert [float(d["mask"].sum()) > 0 for d in out] == [False, True, False]
    arr = VolumeToSlices(axis=2)(LoadMedicalImage()(path))
    assert len(arr) == Z and arr[3].meta["slice_index"] == 3 and arr[3].meta["volume_id"] == path


def test_volumes_of_different_shapes_are_rejected(tmp_path, slab):
    other = _write(tmp_path / "small.nii.gz", np.zeros((X, Y, Z - 1)), np.eye(4))
    d = LoadMedicalImaged(["image", "mask"])({"image": slab[0], "mask": other})
    with pytest.raises(InputDataError, match="small.nii.gz: 'mask' has spatial shape"):
        VolumeToSlicesd(["image", "mask"])(d)


def test_dataset_and_dataloader_over_slices(slab):
    path, _ = slab
    ds = Dataset(expand_volume_datalist([{"image": path}]), transform=build_preprocessing("mri", spatial_size=16))
    batch = next(iter(DataLoader(ds, batch_size=3, num_workers=0)))
    assert batch["image"].shape == (3, 3, 16, 16)
    assert list(batch["slice_index"]) == [0, 1, 2] and batch["volume_id"] == [path] * 3


def test_select_slices_needs_a_volume():
    with pytest.raises(InputDataError, match="expected a volume"):
        select_slices(torch.zeros(1, 4, 4))


def test_aggregate_volume_scores():
    ids = ["a", "b", "a", "a", "b"]
    scores = torch.tensor([0.1, 0.5, 0.9, 0.3, 0.2], dtype=torch.float64)
    assert aggregate_volume_scores(ids, scores) == {"a": 0.9, "b": 0.5}
    assert aggregate_volume_scores(ids, scores, "mean") == pytest.approx({"a": 1.3 / 3, "b": 0.35})
    assert aggregate_volume_scores(ids, scores, "topk", k=2) == pytest.approx({"a": 0.6, "b": 0.35})
    assert aggregate_volume_scores(ids, np.asarray(scores), "topk", k=10) == pytest.approx({"a": 1.3 / 3, "b": 0.35})
    assert list(aggregate_volume_scores(["z", "y", "z"], [1, 2, 3])) == ["z", "y"]
    for bad in [dict(method="median"), dict(method="topk", k=0)]:
        with pytest.raises(ValueError):
            aggregate_volume_scores(ids, scores, **bad)
    with pytest.raises(ValueError, match="5 volume ids but 2 scores"):
        aggregate_volume_scores(ids, [1, 2])
