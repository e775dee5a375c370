"""LoadMedicalImage on real files: pictures of every mode, DICOM (pydicom's test files and files written
here), DICOM series, NRRD, and every kind of bad input."""

from __future__ import annotations

import os
import warnings

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from monai_skipts.transforms import (
    EXTRA_META,
    LoadMedicalImage,
    LoadMedicalImaged,
    WindowIntensity,
    detect_format,
    take_slice,
    validate_datalist,
)
from monai_skipts.utils import InputDataError

H, W = 12, 10  # non-square, so that a transposed image would show
GRID = (np.arange(H)[:, None] * W + np.arange(W)[None, :]).astype(np.uint8)  # GRID[r, c] = r*W + c


def write_dicom(path, pixels, slope=None, intercept=None, z=0.0, series_uid=None, window=None):
    """Write a little-endian single-frame 16-bit signed CT DICOM file with pydicom."""
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID, fm.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = fm
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, fm.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = ds.FrameOfReferenceUID = "1.2.3.4"
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality, ds.PatientID, ds.InstanceNumber = "CT", "anon", int(z) + 1
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, float(z)], [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [0.5, 0.5], 1.0
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def loader():
    return LoadMedicalImage()


# ---- pictures -------------------------------------------------------------------------------------


def _palette_image():
    im = Image.new("P", (W, H))
    palette = [(i * 7 % 256, 255 - i, i * 3 % 256) for i in range(256)]
    im.putpalette([v for rgb in palette for v in rgb])
    im.putdata(GRID.reshape(-1).tolist())
    return im, np.array(palette, np.float32)[GRID].transpose(2, 0, 1)


def _picture_cases():
    rgb = np.stack([GRID, 255 - GRID, np.full_like(GRID, 7)], -1)
    rgba = np.concatenate([rgb, np.full_like(GRID, 200)[..., None]], -1)
    pal, pal_rgb = _palette_image()
    return {
        "L.png": (Image.fromarray(GRID), GRID[None], 255),
        "I16.png": (Image.fromarray(GRID.astype(np.uint16) * 257), GRID[None].astype(np.float32) * 257, 65535),
        "I16.tif": (Image.fromarray(GRID.astype(np.uint16) * 257), GRID[None].astype(np.float32) * 257, 65535),
        "RGB.png": (Image.fromarray(rgb), rgb.transpose(2, 0, 1), 255),
        "RGB.bmp": (Image.fromarray(rgb), rgb.transpose(2, 0, 1), 255),
        "RGBA.png": (Image.fromarray(rgba), rgba.transpose(2, 0, 1), 255),
        "RGBA.tiff": (Image.fromarray(rgba), rgba.transpose(2, 0, 1), 255),
        "P.png": (pal, pal_rgb, 255),
        "1.png": (Image.fromarray(GRID > 60), (GRID[None] > 60) * 255.0, 255),
        "L.jpg": (Image.fromarray(GRID), None, 255),
    }


@pytest.mark.parametrize("name", sorted(_picture_cases()))
def test_picture_modes(tmp_path, loader, name):
    im, expected, vmax = _picture_cases()[name]
    path = tmp_path / name
    im.save(path)
    img = loader(path)
    assert img.dtype == torch.float32 and img.shape[1:] == (H, W)
    assert img.meta["value_max"] == vmax and img.meta["source_format"] == "picture"
    assert set(EXTRA_META) <= set(img.meta)
    if expected is None:  # lossy JPEG: close, same orientation
        np.testing.assert_allclose(img[0].numpy(), GRID, atol=4)
    else:
        np.testing.assert_array_equal(img.numpy(), expected)


def test_picture_without_suffix_is_sniffed(tmp_path, loader):
    Image.fromarray(GRID).save(tmp_path / "x.png")
    os.rename(tmp_path / "x.png", tmp_path / "noext")
    assert detect_format(tmp_path / "noext") == "picture"
    np.testing.assert_array_equal(loader(tmp_path / "noext")[0].numpy(), GRID)


# ---- DICOM ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_dicom_values_are_rescaled_once(loader, name):
    path = get_testdata_file(name)
    ds = pydicom.dcmread(path)
    slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    expected = ds.pixel_array.astype(np.float64) * slope + intercept
    img = loader(path)
    assert img.shape == (1, ds.Rows, ds.Columns)
    np.testing.assert_array_equal(img[0].numpy(), expected)
    assert img.meta["modality"] == ds.Modality


def test_dicom_slope_and_intercept_applied_exactly_once(tmp_path, loader):
    raw = (np.arange(H * W).reshape(H, W) * 3).astype(np.int16)
    img = loader(write_dicom(str(tmp_path / "s.dcm"), raw, slope=2.5, intercept=-1000))
    np.testing.assert_allclose(img[0].numpy(), raw * 2.5 - 1000)
    assert (img.meta["rescale_slope"], img.meta["rescale_intercept"]) == (2.5, -1000.0)


def test_dicom_hu_window_numbers(tmp_path, loader):
    hu = np.array([[-1000, 0, 20, 40, 60, 80, 1000, 30]], np.int16).repeat(2, 0)  # intercept -1024: raw = hu + 1024
    img = loader(write_dicom(str(tmp_path / "w.dcm"), hu + 1024, slope=1, intercept=-1024, window=(50, 100)))
    np.testing.assert_array_equal(img[0, 0].numpy(), hu[0])
    brain = WindowIntensity("brain")(img)[0, 0].numpy()  # centre 40, width 80: [0, 80] -> [0, 1]
    np.testing.assert_allclose(brain, [0, 0, 0.25, 0.5, 0.75, 1, 1, 0.375], atol=1e-6)
    own = WindowIntensity("dicom")(img)[0, 0].numpy()  # file's window 50/100: [0, 100] -> [0, 1]
    np.testing.assert_allclose(own, [0, 0, 0.2, 0.4, 0.6, 0.8, 1, 0.3], atol=1e-6)


def test_monochrome1_is_inverted(loader):
    path = get_testdata_file("RG3_UNCR.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.BitsStored == 10 and "RescaleSlope" not in ds
    img = loader(path)
    np.testing.assert_array_equal(img[0].numpy(), 1023.0 - ds.pixel_array)
    assert img.meta["inverted_monochrome1"] and img.meta["window_center"] == 1023 - float(ds.WindowCenter)
    raw = LoadMedicalImage(invert_monochrome1=False)(path)
    np.testing.assert_array_equal(raw[0].numpy(), ds.pixel_array)


def test_multiframe_dicom_is_a_frame_stack(loader):
    path = get_testdata_file("emri_small.dcm")
    frames = pydicom.dcmread(path).pixel_array  # (10, 64, 64)
    vol = loader(path)
    assert vol.shape == (1, 64, 64, 10)
    for k in (0, 3, 9):
        np.testing.assert_array_equal(loader(path, slice_index=k)[0].numpy(), frames[k])


def test_colour_dicom(loader):
    rgb = loader(get_testdata_file("SC_rgb_2frame.dcm"), slice_index=1)
    frames = pydicom.dcmread(get_testdata_file("SC_rgb_2frame.dcm")).pixel_array  # (2, 100, 100, 3)
    np.testing.assert_array_equal(rgb.numpy(), frames[1].transpose(2, 0, 1))
    pal = loader(get_testdata_file("OBXXXX1A_2frame.dcm"), slice_index=0)
    assert pal.shape == (3, 600, 800) and pal.meta["value_max"] == 65535


def test_dicom_series_folder_matches_single_files(tmp_path, loader):
    uid, files, raws = generate_uid(), [], []
    for k in range(4):
        raw = (100 * k + np.arange(H * W).reshape(H, W)).astype(np.int16)
        name = f"im{(7 * k) % 5}.dcm"  # file names not in slice order
        files.append(write_dicom(str(tmp_path / "series" / name), raw, 2, -1024, z=2.5 * k, series_uid=uid))
        raws.append(raw)
    vol = loader(tmp_path / "series")
    assert vol.shape == (1, W, H, 4) and vol.meta["source_format"] == "dicom_series"
    for k in range(4):  # RAS slice k is the file at z = 2.5 k, HU applied once, same display layout
        np.testing.assert_array_equal(take_slice(vol, 2, k)[0].numpy(), raws[k] * 2.0 - 1024)
        np.testing.assert_array_equal(take_slice(vol, 2, k).numpy(), loader(files[k]).numpy())


def test_nrrd_volume(tmp_path, loader):
    itk = pytest.importorskip("itk")
    arr = np.zeros((3, H, W), np.float32)  # ITK array order (z, y, x)
    for k in range(3):
        arr[k] = k
    itk.imwrite(itk.image_from_array(arr), str(tmp_path / "v.nrrd"))
    vol = loader(tmp_path / "v.nrrd")
    assert vol.shape == (1, W, H, 3)
    assert [float(loader(tmp_path / "v.nrrd", slice_index=k).mean()) for k in range(3)] == [0.0, 1.0, 2.0]


def test_dict_loader_reads_slices_and_skips_none(tmp_path):
    vol = np.stack([np.full((4, 5), k, np.float32) for k in range(3)], -1)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "v.nii")
    d = LoadMedicalImaged(["image", "mask"], allow_missing_keys=True)(
        {"image": str(tmp_path / "v.nii"), "mask": None, "slice_index": 2, "volume_id": "case7"}
    )
    assert d["image"].shape == (1, 5, 4) and float(d["image"].mean()) == 2.0
    assert d["image"].meta["volume_id"] == "case7" and d["image"].meta["slice_index"] == 2 and d["mask"] is None


# ---- bad input ------------------------------------------------------------------------------------


def _raises_naming(path, match, fn=None):
    with pytest.raises(InputDataError, match=match) as e:
        (fn or LoadMedicalImage())(path)
    assert str(path) in str(e.value) and e.value.path == str(path)


def test_missing_file(tmp_path):
    _raises_naming(tmp_path / "nope.png", "file not found")


def test_unsupported_format(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    _raises_naming(tmp_path / "notes.txt", "unsupported file format")


@pytest.mark.parametrize("cut", [0, 40, 0.5])
def test_corrupt_or_truncated_png(tmp_path, cut):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "bad.png").write_bytes(data[: int(cut * len(data)) if isinstance(cut, float) else cut])
    _raises_naming(tmp_path / "bad.png", "corrupt or truncated")


def test_garbage_with_png_suffix(tmp_path):
    (tmp_path / "x.png").write_bytes(b"this is not a picture" * 10)
    _raises_naming(tmp_path / "x.png", "corrupt or truncated")


def test_truncated_dicom(tmp_path):
    data = open(get_testdata_file("CT_small.dcm"), "rb").read()
    (tmp_path / "half.dcm").write_bytes(data[: len(data) // 2])
    _raises_naming(tmp_path / "half.dcm", "corrupt or truncated")
    (tmp_path / "head.dcm").write_bytes(data[:300])
    _raises_naming(tmp_path / "head.dcm", "corrupt or truncated|no pixel data|not a readable")


def test_folder_without_dicom_files(tmp_path):
    (tmp_path / "series").mkdir()
    (tmp_path / "series" / "readme.txt").write_text("no images here")
    _raises_naming(tmp_path / "series", "no DICOM files")


def test_dicom_without_pixel_data(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm")
    _raises_naming(tmp_path / "nopix.dcm", "no pixel data")


def test_dicom_with_invalid_frame_count():
    _raises_naming(get_testdata_file("badVR.dcm"), "invalid NumberOfFrames '1A'")


def test_not_dicom_with_dcm_suffix(tmp_path):
    (tmp_path / "x.dcm").write_bytes(b"\x00" * 50)
    _raises_naming(tmp_path / "x.dcm", "DICOM")


def test_nonfinite_values_error_or_replace(tmp_path):
    arr = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    arr[0, 0, 0], arr[1, 1, 1], arr[2, 2, 2] = np.nan, np.inf, -np.inf
    nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp_path / "nan.nii.gz")
    _raises_naming(tmp_path / "nan.nii.gz", "3 NaN/inf values")
    with pytest.warns(UserWarning, match="replaced 3 NaN/inf"):
        img = LoadMedicalImage(nonfinite="replace")(tmp_path / "nan.nii.gz")
    assert torch.isfinite(img).all() and img.meta["nonfinite_replaced"] == 3
    assert float(img.min()) == 1.0 and float(img.max()) == 59.0  # min/max finite values


def test_one_pixel_image_is_rejected(tmp_path):
    Image.fromarray(np.array([[7]], np.uint8)).save(tmp_path / "dot.png")
    _raises_naming(tmp_path / "dot.png", r"1x1 pixels, too small")
    assert LoadMedicalImage(min_size=1)(tmp_path / "dot.png").shape == (1, 1, 1)


def test_slice_errors_name_the_file(tmp_path):
    Image.fromarray(GRID).save(tmp_path / "a.png")
    _raises_naming(tmp_path / "a.png", "2-D image", lambda p: LoadMedicalImage()(p, slice_index=0))
    path = get_testdata_file("emri_small.dcm")
    with pytest.raises(InputDataError, match="out of range") as e:
        LoadMedicalImage()(path, slice_index=10)
    assert path in str(e.value)


def test_validate_datalist_skips_and_reports(tmp_path):
    Image.fromarray(GRID).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    items = [{"image": str(tmp_path / name)} for name in ("good.png", "bad.png", "gone.png")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        valid, errors = validate_datalist(items)
    assert valid == items[:1]
    assert [e.path for e in errors] == [items[1]["image"], items[2]["image"]]
