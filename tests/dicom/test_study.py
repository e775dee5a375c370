"""Reading a study folder (monai_skipts.dicom.study.read_study) from real DICOM files that are broken the way
copies break: a 0-byte slice, a slice cut inside its header or its pixel data, a non-DICOM ``.dcm``,
slices that do not form one volume. Every problem names the file and says why."""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("highdicom", reason="the dicom extra: pip install -e '.[dicom]'")


def _copy(mixed_study, tmp_path):
    root = tmp_path / "study"
    shutil.copytree(mixed_study, root)
    return root


def _cut(path, n):
    path.write_bytes(path.read_bytes()[:n])


def test_empty_and_header_cut_slices_make_the_stack_incomplete(mixed_study, tmp_path):
    from monai_skipts.dicom import read_study

    root = _copy(mixed_study, tmp_path)
    (root / "ct" / "17136.dcm").write_bytes(b"")
    _cut(root / "ct" / "17166.dcm", 300)  # inside the header, before the series UID
    study = read_study(root)
    ct = next(s for s in study.series if s.modality == "CT")
    bad = {b["file"]: b["reason"] for b in study.incomplete(ct)}
    assert set(bad) == {"ct/17136.dcm", "ct/17166.dcm"}, bad
    assert "0 bytes" in bad["ct/17136.dcm"] and "cut short" in bad["ct/17166.dcm"]
    assert {u["file"] for u in study.unreadable} == {"ct/17136.dcm", "ct/17166.dcm"}
    # the other series are complete
    assert [study.incomplete(s) for s in study.series if s.modality != "CT"] == [[], []]


@pytest.mark.parametrize("keep", [2500, -10], ids=["header_without_pixel_data", "pixel_data_cut_short"])
def test_slice_cut_after_its_series_uid_is_named_in_its_series(mixed_study, tmp_path, keep):
    from monai_skipts.dicom import read_study

    root = _copy(mixed_study, tmp_path)
    path = root / "ct" / "17166.dcm"
    _cut(path, keep if keep > 0 else path.stat().st_size + keep)
    study = read_study(root)
    assert [s.modality for s in study.series].count("CT") == 1, "the cut slice became a series of its own"
    ct = next(s for s in study.series if s.modality == "CT")
    (bad,) = study.incomplete(ct)
    assert bad["file"] == "ct/17166.dcm"
    assert ("no pixel data" if keep > 0 else "pixel data cut short") in bad["reason"]
    assert len(ct.files) == 3


def test_non_dicom_dcm_is_listed_and_other_files_are_ignored_by_name(mixed_study, tmp_path):
    from monai_skipts.dicom import read_study

    root = _copy(mixed_study, tmp_path)
    (root / "cr" / "scan.dcm").write_text("not a DICOM file\n")
    (root / "notes.txt").write_text("a note\n")
    study = read_study(root)
    assert study.unreadable == [
        {
            "file": "cr/scan.dcm",
            "reason": "not a DICOM file (no 'DICM' marker at byte 128; 17 bytes)",
            "folder": str(root / "cr"),
        }
    ]
    assert study.ignored == ["notes.txt"]
    cr = next(s for s in study.series if s.modality == "CR")
    assert [b["file"] for b in study.incomplete(cr)] == ["cr/scan.dcm"]


def test_stack_that_is_no_volume_says_why(mixed_study, tmp_path):
    import numpy as np
    import pydicom

    from monai_skipts.dicom import read_study

    root = _copy(mixed_study, tmp_path)
    files = sorted((root / "ct").glob("*.dcm"))
    ds = pydicom.dcmread(files[0])  # one slice at twice the size
    ds.PixelData = np.kron(ds.pixel_array, np.ones((2, 2), ds.pixel_array.dtype)).tobytes()
    ds.Rows, ds.Columns = 32, 32
    ds.save_as(files[0], enforce_file_format=True)
    (ct,) = [s for s in read_study(root).series if s.modality == "CT"]
    assert [u.kind for u in ct.units] == ["image"] * 4
    assert ct.not_volume == "the image sizes differ (16x16, 32x32)"

    shutil.rmtree(root)
    root = _copy(mixed_study, tmp_path)
    a, b = sorted((root / "ct").glob("*.dcm"))[:2]
    ds = pydicom.dcmread(b)
    ds.ImagePositionPatient = pydicom.dcmread(a).ImagePositionPatient
    ds.save_as(b, enforce_file_format=True)
    (ct,) = [s for s in read_study(root).series if s.modality == "CT"]
    assert [u.kind for u in ct.units] == ["image"] * 4
    assert "share a slice position (3 positions, 4 instances)" in ct.not_volume


def test_empty_folder_is_refused_with_the_reason(tmp_path):
    from monai_skipts.dicom import read_study
    from monai_skipts.utils import InputDataError

    (tmp_path / "empty").mkdir()
    with pytest.raises(InputDataError, match="the folder holds no file"):
        read_study(tmp_path / "empty")


def test_earlier_results_take_no_series_index(mixed_study, tmp_path):
    import pydicom

    from monai_skipts.dicom import MANUFACTURER, read_study

    root = _copy(mixed_study, tmp_path)
    want = [(s.name, s.series_uid) for s in read_study(root).series]
    # an earlier result of the CT, dated like the CT: it sorts between the CT and the others
    ds = pydicom.dcmread(root / "ct" / "17106.dcm")
    ds.Manufacturer, ds.SeriesNumber, ds.Modality = MANUFACTURER, 9001, "OT"
    ds.SeriesInstanceUID = ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    (root / "results").mkdir()
    ds.save_as(root / "results" / "sc.dcm", enforce_file_format=True)
    study = read_study(root)
    assert [(s.name, s.series_uid) for s in study.series] == want
    assert study.earlier == {ds.SeriesInstanceUID: "OT"} and study.skipped == []
