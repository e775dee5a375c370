"""DICOM results (monai_skipts.dicom, python -m monai_skipts.dicom_app): SC heat-map series, TID 1500 SR and
SEG written in the source study, validated with dciodvfy (Debian dicom3tools) and read back with
pydicom/highdicom; scores equal the predictor's on the same pixels; patient data reaches the DICOM
objects only, never the logs, the JSON summary or a file name."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("highdicom", reason="the dicom extra: pip install -e '.[dicom]'")

from conftest import DICOM_PHI, REPO, apt_tool  # noqa: E402


def _sources(study: Path):
    import pydicom

    return {p.relative_to(study).as_posix(): pydicom.dcmread(p) for p in sorted(study.rglob("*.dcm"))}


@pytest.fixture(scope="module")
def predictor(dicom_checkpoint):
    from monai_skipts.inference import AnomalyPredictor

    return AnomalyPredictor(dicom_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def results(predictor, dicom_study, dicom_checkpoint, tmp_path_factory, one_thread):
    from monai_skipts.dicom import score_study

    out = tmp_path_factory.mktemp("dicom_out")
    summary = score_study(predictor, dicom_study, out, seg=True, checkpoint=dicom_checkpoint)
    return out, summary


def test_read_study_finds_stack_multiframe_and_image(dicom_study, tmp_path):
    import shutil

    from monai_skipts.dicom import read_study

    series = read_study(dicom_study).series
    assert [(s.name, [u.kind for u in s.units]) for s in series] == [
        ("series-001-CT", ["volume"]),
        ("series-002-MR", ["volume"]),
        ("series-003-CR", ["image"]),
    ]
    ct = series[0]
    z = [float(h.ImagePositionPatient[2]) for h in ct.headers]
    assert z == sorted(z) and len(ct.units[0].slices) == 3  # slice order, whatever the file names
    assert len(series[1].units[0].slices) == 10  # the MR's frames
    # an SR in the folder (e.g. an earlier result, or any report) is skipped with the reason
    from pydicom.data import get_testdata_file

    shutil.copytree(dicom_study, tmp_path / "s")
    shutil.copy(get_testdata_file("test-SR.dcm"), tmp_path / "s" / "report.dcm")
    study2 = read_study(tmp_path / "s")
    series2, skipped2 = study2.series, study2.skipped
    assert len(series2) == 3 and any("SR" in k["reason"] for k in skipped2), skipped2


def test_objects_validate_with_dciodvfy(results, capsys):
    exe = apt_tool("dciodvfy", "dicom3tools")
    out, summary = results
    files = sorted(out.rglob("*.dcm"))
    kinds = {"SC": 0, "SR": 0, "SEG": 0}
    report = {}
    for f in files:
        r = subprocess.run([exe, "-new", str(f)], capture_output=True, text=True, timeout=120)
        lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith(("Error", "Warning"))]
        kind = "SC" if "/SC/" in f.as_posix() else ("SR" if f.name == "SR.dcm" else "SEG")
        kinds[kind] += 1
        errors = [ln for ln in lines if ln.startswith("Error")]
        assert not errors, f"{f.relative_to(out)}: {errors}"
        for ln in lines:  # one entry per message, whatever the content item it is about
            ln = re.sub(r"</[^>]*>", "<item>", ln)
            report.setdefault(kind, {}).setdefault(ln, 0)
            report[kind][ln] += 1
    assert kinds["SC"] == 3 + 10 + 1 and kinds["SR"] == 3 and kinds["SEG"] >= 2, kinds
    with capsys.disabled():  # the warnings dciodvfy gave, per object type (for the record)
        print("\ndciodvfy warnings:", json.dumps(report, indent=1))


def test_sc_series_at_source_geometry_in_source_study(results, dicom_study):
    import pydicom

    out, _ = results
    src = _sources(dicom_study)
    source_uids = {d.SOPInstanceUID for d in src.values()} | {d.SeriesInstanceUID for d in src.values()}
    cr = src["cr/1.dcm"]
    sc = pydicom.dcmread(out / "series-003-CR" / "SC" / "0001.dcm")
    assert (sc.Rows, sc.Columns) == (cr.Rows, cr.Columns) and sc.PhotometricInterpretation == "RGB"
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and sc.BurnedInAnnotation == "YES"
    assert sc.StudyInstanceUID == cr.StudyInstanceUID and sc.PatientID == DICOM_PHI["PatientID"]
    assert str(sc.PatientName) == DICOM_PHI["PatientName"] and sc.AccessionNumber == DICOM_PHI["AccessionNumber"]
    assert sc.SOPInstanceUID not in source_uids and sc.SeriesInstanceUID not in source_uids
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == cr.SOPInstanceUID
    assert "NOT FOR DIAGNOSTIC USE" in sc.SeriesDescription
    rgb = sc.pixel_array
    assert rgb.shape == (cr.Rows, cr.Columns, 3) and np.ptp(rgb[..., 0].astype(int) - rgb[..., 2].astype(int)) > 0
    # CT: one SC per slice, each referencing its slice; the MR's frames by frame number
    ct_scs = [pydicom.dcmread(p) for p in sorted((out / "series-001-CT" / "SC").glob("*.dcm"))]
    assert len({d.SeriesInstanceUID for d in ct_scs}) == 1 and len({d.SOPInstanceUID for d in ct_scs}) == 3
    ct_by_uid = {d.SOPInstanceUID: d for k, d in src.items() if k.startswith("ct/")}
    zs = [float(ct_by_uid[d.SourceImageSequence[0].ReferencedSOPInstanceUID].ImagePositionPatient[2]) for d in ct_scs]
    assert zs == sorted(zs)
    assert [float(v) for v in ct_scs[0].PixelSpacing] == [float(v) for v in src["ct/0.dcm"].PixelSpacing]
    mr = pydicom.dcmread(out / "series-002-MR" / "SC" / "0004.dcm")
    assert mr.SourceImageSequence[0].ReferencedFrameNumber == 4


def _groups(sr_path):
    import highdicom as hd

    sr = hd.sr.srread(sr_path)
    out = []
    for g in sr.content.get_image_measurement_groups():
        values = {m.name.meaning: float(m.value) for m in g.get_measurements()}
        evals = {q.name.meaning: q.value.meaning for q in g.get_qualitative_evaluations()}
        refs = [(ref.referenced_sop_instance_uid, ref.referenced_frame_numbers) for ref in g.source_images]
        out.append({"id": g.tracking_identifier, "values": values, "evals": evals, "refs": refs})
    return sr, out


def test_sr_holds_the_predictors_scores_and_references_the_source(results, dicom_study, predictor):
    from monai_skipts.dicom.writers import CODES
    from monai_skipts.transforms import aggregate_volume_scores

    out, summary = results
    src = _sources(dicom_study)
    thr = predictor.threshold
    # CR: the image score, as the predictor gives it on the same file
    want = predictor.predict_items([{"image": str(dicom_study / "cr" / "1.dcm"), "id": "cr"}])[0]
    sr, groups = _groups(out / "series-003-CR" / "SR.dcm")
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert sr.StudyInstanceUID == src["cr/1.dcm"].StudyInstanceUID and sr.PatientID == DICOM_PHI["PatientID"]
    (g,) = groups
    assert g["values"][CODES["score"][1]] == pytest.approx(want["score"], rel=1e-6)
    assert g["values"][CODES["threshold"][1]] == pytest.approx(thr)
    assert g["values"][CODES["normalized_score"][1]] == pytest.approx(want["normalized_score"], rel=1e-6)
    assert g["evals"][CODES["anomalous"][1]] == ("Yes" if want["anomalous"] else "No")
    assert g["refs"] == [(src["cr/1.dcm"].SOPInstanceUID, None)]
    evidence = {
        i.ReferencedSOPInstanceUID
        for s in sr.CurrentRequestedProcedureEvidenceSequence
        for se in s.ReferencedSeriesSequence
        for i in se.ReferencedSOPSequence
    }
    assert evidence == {src["cr/1.dcm"].SOPInstanceUID}
    # algorithm identification: model name, version, teacher
    blob = (out / "series-003-CR" / "SR.dcm").read_bytes()
    assert b"Skip-TS" in blob and b"monai-skipts 0" in blob and b"teacher=efficientnet_lite0" in blob
    # CT stack: volume score = aggregation of the slice scores; one group per slice referencing it
    ct_items = [{"image": str(p), "id": p.name} for p in sorted((dicom_study / "ct").glob("*.dcm"))]
    slice_scores = {r["id"]: r["score"] for r in predictor.predict_items(ct_items)}
    vol = aggregate_volume_scores([0] * 3, list(slice_scores.values()), predictor.volume_aggregation, predictor.topk)[0]
    _, groups = _groups(out / "series-001-CT" / "SR.dcm")
    assert groups[0]["values"][CODES["score"][1]] == pytest.approx(vol, rel=1e-6)
    assert {r[0] for r in groups[0]["refs"]} == {src[f"ct/{k}.dcm"].SOPInstanceUID for k in range(3)}
    by_uid = {src[f"ct/{k}.dcm"].SOPInstanceUID: slice_scores[f"{k}.dcm"] for k in range(3)}
    for g in groups[1:]:
        ((uid, _),) = g["refs"]
        assert g["values"][CODES["slice_score"][1]] == pytest.approx(by_uid[uid], rel=1e-6)
    # MR multi-frame: frames referenced by number
    _, groups = _groups(out / "series-002-MR" / "SR.dcm")
    assert len(groups) == 11 and groups[3]["refs"][0][1] == [3]
    assert summary["series"][2]["units"][0]["score"] == pytest.approx(want["score"], rel=1e-6)


def test_seg_is_the_region_above_threshold(results, dicom_study, predictor):
    import highdicom as hd

    out, summary = results
    seg = hd.seg.segread(out / "series-003-CR" / "SEG-01.dcm")
    assert seg.number_of_segments == 1 and seg.SegmentationType == "BINARY"
    src = _sources(dicom_study)["cr/1.dcm"]
    assert seg.StudyInstanceUID == src.StudyInstanceUID and seg.PatientID == DICOM_PHI["PatientID"]
    mask = seg.get_pixels_by_source_instance([src.SOPInstanceUID], segment_numbers=[1])[0, ..., 0]
    want = predictor.predict_items([{"image": str(dicom_study / "cr" / "1.dcm"), "id": "cr"}])[0]["map"]
    assert mask.shape == want.shape
    assert np.array_equal(mask.astype(bool), want >= predictor.threshold)
    assert (out / "series-001-CT" / "SEG-01.dcm").is_file()
    # the MR's frames have no plane positions: highdicom cannot place a SEG on them; said, not hidden
    assert any("no SEG" in n for n in summary["series"][1]["notes"])


def _needles(sources) -> list[bytes]:
    out = set()
    for v in DICOM_PHI.values():
        for form in (v, v.replace("^", " "), v.split("^")[0]):
            out |= {form.encode(), form.lower().encode()}
    for d in sources.values():  # the source UIDs are identifiers too
        out |= {str(d.StudyInstanceUID).encode(), str(d.SeriesInstanceUID).encode(), str(d.SOPInstanceUID).encode()}
    return sorted(out)


_CLI = """
import logging, sys
logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
from monai_skipts.dicom_app import main
sys.exit(main(sys.argv[1:]))
"""


def test_cli_keeps_patient_data_in_the_dicom_objects_only(dicom_study, dicom_checkpoint, tmp_path):
    out = tmp_path / "results"
    env = dict(os.environ, OMP_NUM_THREADS="1", MONAI_SKIPTS_OFFLINE="1")
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            _CLI,
            "--input",
            str(dicom_study),
            "--output",
            str(out),
            "--checkpoint",
            str(dicom_checkpoint),
            "--seg",
            "--device",
            "cpu",
            "--progress",
            "on",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-3000:]
    assert b"DEBUG" in r.stderr, "the run did not log at DEBUG"
    assert b"scoring series: 100%" in r.stderr and b"3/3" in r.stderr, "no progress bar with --progress on"
    printed = json.loads(r.stdout.decode().strip().splitlines()[-1])
    assert [s["series"] for s in printed["series"]] == ["series-001-CT", "series-002-MR", "series-003-CR"]
    needles = _needles(_sources(dicom_study))
    leaks = [
        f"{name}: {n!r}" for name, blob in (("stdout", r.stdout), ("stderr", r.stderr)) for n in needles if n in blob
    ]
    blob = (out / "dicom_results.json").read_bytes()
    leaks += [f"dicom_results.json: {n!r}" for n in needles if n in blob]
    for p in out.rglob("*"):
        leaks += [
            f"file name {p.relative_to(out)}: {n!r}" for n in needles if n in p.relative_to(out).as_posix().encode()
        ]
    assert not leaks, "patient data leaked:\n" + "\n".join(leaks)
    # control: the same values are in the DICOM objects (the PACS needs them there)
    sr = (out / "series-003-CR" / "SR.dcm").read_bytes()
    assert DICOM_PHI["PatientID"].encode() in sr and DICOM_PHI["PatientName"].encode() in sr


def test_bundle_config_writes_the_same_results(dicom_study, dicom_checkpoint, results, tmp_path, one_thread):
    from monai.bundle import run

    out = tmp_path / "bundle"
    run(
        config_file=[str(REPO / f"bundles/{f}.json") for f in ("demo/train", "demo/inference", "common/dicom_app")],
        checkpoint=str(dicom_checkpoint),
        study_dir=str(dicom_study),
        dicom_output=str(out),
        write_seg=False,
        device_name="cpu",
    )
    got = json.loads((out / "dicom_results.json").read_text())
    want = results[1]
    assert [u["score"] for s in got["series"] for u in s["units"]] == pytest.approx(
        [u["score"] for s in want["series"] for u in s["units"]], rel=1e-6
    )
    assert not list(out.rglob("SEG-*.dcm")) and len(list(out.rglob("SR.dcm"))) == 3


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
