"""The DICOM objects (monai_skipts.dicom.writers) from a source with invalid geometry: pydicom-data's
RG1_UNCR.dcm, a CR whose Pixel Spacing is 0\\0. The SC and the SEG do not copy it, and dciodvfy (Debian
dicom3tools) finds no error in them."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

pytest.importorskip("highdicom", reason="the dicom extra: pip install -e '.[dicom]'")

from conftest import apt_tool  # noqa: E402


def _dciodvfy_errors(path) -> list[str]:
    exe = apt_tool("dciodvfy", "dicom3tools")
    r = subprocess.run([exe, "-new", str(path)], capture_output=True, text=True, timeout=120)
    return [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("Error")]


def test_zero_pixel_spacing_is_not_copied_into_sc_and_seg(mixed_study, tmp_path):
    import pydicom
    from pydicom.uid import generate_uid

    from monai_skipts.dicom import ModelInfo, make_sc, make_seg, save_dataset

    source = pydicom.dcmread(mixed_study / "cr" / "1.dcm", defer_size="1 KB")
    assert [float(v) for v in source.PixelSpacing] == [0.0, 0.0]
    model = ModelInfo(version="monai-skipts 0", teacher="efficientnet_lite0")
    rgb = np.zeros((source.Rows, source.Columns, 3), np.uint8)
    sc = make_sc(source, 0, rgb, generate_uid(), 9001, 1, model, "heat map")
    mask = np.zeros((1, source.Rows, source.Columns), bool)
    mask[0, 10:20, 10:20] = True
    seg = make_seg([source], [(0, 0)], mask, model, generate_uid(), 9601, "region")
    assert "PixelSpacing" not in sc
    measures = seg.SharedFunctionalGroupsSequence[0].get("PixelMeasuresSequence")
    assert measures is None or "PixelSpacing" not in measures[0]
    assert [float(v) for v in source.PixelSpacing] == [0.0, 0.0], "the source header was changed"
    for name, ds in (("sc.dcm", sc), ("seg.dcm", seg)):
        save_dataset(ds, tmp_path / name)
        assert _dciodvfy_errors(tmp_path / name) == [], name
