"""Scoring a study folder (monai_skipts.dicom.app.score_study) when the study or the output folder is not
what it should be: an incomplete stack is not scored as a volume and the summary names the file; an
output folder inside the study, holding another study, or not writable is refused before scoring;
running again into the same folder leaves no stale file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("highdicom", reason="the dicom extra: pip install -e '.[dicom]'")


@pytest.fixture(scope="module")
def predictor(dicom_checkpoint):
    from monai_skipts.inference import AnomalyPredictor

    return AnomalyPredictor(dicom_checkpoint, device="cpu")


def _copy(mixed_study, tmp_path, name="study"):
    root = tmp_path / name
    shutil.copytree(mixed_study, root)
    return root


def test_incomplete_stack_is_not_scored_and_the_summary_names_the_file(
    predictor, mixed_study, tmp_path, one_thread, caplog
):
    from monai_skipts.dicom import score_study

    root = _copy(mixed_study, tmp_path)
    (root / "ct" / "17136.dcm").write_bytes(b"")
    raw = (root / "ct" / "17166.dcm").read_bytes()
    (root / "ct" / "17166.dcm").write_bytes(raw[:2500])  # cut inside the header, after the series UID
    out = tmp_path / "out"
    with caplog.at_level("INFO", logger="monai_skipts.dicom"):
        summary = score_study(predictor, root, out)
    assert sorted(s["modality"] for s in summary["series"]) == ["CR", "MR"]  # the CT volume is not scored
    (error,) = summary["errors"]
    assert error["series"] == "series-001-CT" and error["reason"].startswith("incomplete: 2 file(s)")
    assert "ct/17136.dcm: empty file (0 bytes)" in error["reason"]
    assert "ct/17166.dcm: no pixel data" in error["reason"]
    assert summary["unreadable"] == [{"file": "ct/17136.dcm", "reason": "empty file (0 bytes)"}]
    assert summary["complete"] is False
    assert json.loads((out / "dicom_results.json").read_text())["errors"] == summary["errors"]
    assert not (out / "series-001-CT").exists()
    logged = caplog.text
    assert "series-001-CT: not scored: incomplete" in logged and "ct/17166.dcm" in logged


def test_stack_that_is_no_volume_is_noted_in_the_summary(predictor, mixed_study, tmp_path, one_thread):
    import pydicom

    from monai_skipts.dicom import score_study

    root = _copy(mixed_study, tmp_path)
    a, b = sorted((root / "ct").glob("*.dcm"))[:2]
    ds = pydicom.dcmread(b)
    ds.ImagePositionPatient = pydicom.dcmread(a).ImagePositionPatient
    ds.save_as(b, enforce_file_format=True)
    summary = score_study(predictor, root, tmp_path / "out")
    ct = next(s for s in summary["series"] if s["modality"] == "CT")
    assert [u["kind"] for u in ct["units"]] == ["image"] * 4
    assert ct["notes"][0].startswith("not scored as one volume: 2 or more instances share a slice position")


def test_output_in_the_study_folder_is_refused_and_a_second_run_skips_copied_results(
    predictor, mixed_study, tmp_path, one_thread
):
    from monai_skipts.dicom import score_study
    from monai_skipts.utils import InputDataError

    root = _copy(mixed_study, tmp_path)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    for output in (root, root / "results"):
        with pytest.raises(InputDataError, match="the output folder (is the study folder|is inside the study folder)"):
            score_study(predictor, root, output)
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before, "something was written into the study"
    # results copied into the study by hand: the second run does not score them as patient images
    first = score_study(predictor, root, tmp_path / "out1")
    shutil.copytree(tmp_path / "out1", root / "results")
    second = score_study(predictor, root, tmp_path / "out2")
    assert second["series"] == []
    assert [a["series"] for a in second["already_scored"]] == [s["series"] for s in first["series"]]
    assert second["earlier_results"] == 2 * len(first["series"])  # an SC and an SR series each


def test_output_folder_of_another_study_or_other_files_is_refused(
    predictor, mixed_study, dicom_study, tmp_path, one_thread
):
    from monai_skipts.dicom import score_study
    from monai_skipts.utils import InputDataError

    out = tmp_path / "out"
    score_study(predictor, mixed_study, out)
    with pytest.raises(InputDataError, match="holds the results of another study"):
        score_study(predictor, dicom_study, out)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine\n")
    with pytest.raises(InputDataError, match=r"holds 1 files this app did not write \(e.g. notes.txt\)"):
        score_study(predictor, mixed_study, tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine\n"


def test_second_run_into_the_same_output_leaves_no_stale_file(predictor, mixed_study, tmp_path, one_thread):
    from monai_skipts.dicom import score_study

    out = tmp_path / "out"
    first = score_study(predictor, mixed_study, out, seg=True)
    assert any("SEG" in f for f in first["files"])
    second = score_study(predictor, mixed_study, out, seg=False)
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.dcm"))
    assert on_disk == sorted(second["files"]) and not any("SEG" in f for f in on_disk)


@pytest.fixture
def unwritable_folder(tmp_path):
    """An existing folder nobody can write into: mode 0o555, and the immutable attribute where the tests
    run as root (root ignores the mode)."""
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = False
    if os.geteuid() == 0:
        chattr = shutil.which("chattr")
        immutable = chattr is not None and subprocess.run([chattr, "+i", str(folder)]).returncode == 0
    try:
        (folder / "probe").write_bytes(b"")
    except OSError:
        pass
    else:
        pytest.skip("cannot make a folder unwritable here (root without chattr +i)")
    yield folder
    if immutable:
        subprocess.run([shutil.which("chattr"), "-i", str(folder)])
    folder.chmod(0o755)


def test_unwritable_output_is_refused_before_scoring_naming_the_folder(predictor, mixed_study, unwritable_folder):
    import time

    from monai_skipts.dicom import score_study

    t = time.perf_counter()
    with pytest.raises(OSError) as e:
        score_study(predictor, mixed_study, unwritable_folder)
    message = str(e.value)
    assert f"the output folder {unwritable_folder} is not writable" in message
    assert ".tmp" not in message
    assert time.perf_counter() - t < 3.0, "the folder was found unwritable only after scoring"


def _sr_texts(path) -> dict[str, list[str]]:
    """``{code value: [text, ...]}`` of every TEXT item in an SR."""
    import pydicom

    out: dict[str, list[str]] = {}

    def walk(items):
        for it in items:
            if it.get("ValueType") == "TEXT":
                out.setdefault(it.ConceptNameCodeSequence[0].CodeValue, []).append(str(it.TextValue))
            walk(it.get("ContentSequence", []))

    walk(pydicom.dcmread(path).ContentSequence)
    return out


def test_calibrated_volume_and_pixel_thresholds_decide_volumes_and_draw_the_seg(
    dicom_study, dicom_checkpoint, tmp_path
):
    """A checkpoint with volume and pixel thresholds, through ``python -m monai_skipts.dicom_app``: the CT
    volume is decided with the volume threshold, the CR image with the image threshold, the SEG is the
    region above the pixel threshold, and the SR says which threshold was applied and its FPR bound."""
    import highdicom as hd
    import numpy as np
    import pydicom
    from conftest import REPO

    from monai_skipts.checkpoint import load_detector, save_checkpoint
    from monai_skipts.inference import AnomalyPredictor

    cr = dicom_study / "cr" / "1.dcm"
    cr_map = AnomalyPredictor(dicom_checkpoint, device="cpu").predict_items([{"image": str(cr), "id": "cr"}])[0]["map"]
    detector = load_detector(dicom_checkpoint)
    record = dict(detector.config["calibration"])
    image_thr = float(record["value"])
    pixel_thr = float(np.quantile(cr_map, 0.25))  # far below the image threshold: a larger outline
    assert int((cr_map >= pixel_thr).sum()) > int((cr_map >= image_thr).sum())
    bounds = {"fpr_expected": 0.05, "fpr_bound": 0.2, "fpr_bound_confidence": 0.9, "method": "lognormal"}
    record.update(bounds, n_normals=40)
    record["volume"] = {"value": 1e6, "target_fpr": 0.05, **bounds, "n_normals": 20, "source": "sidak", "n_slices": 3}
    record["pixel"] = {"value": pixel_thr, "target_fpr": 0.005, "method": "pixel_quantile"}
    detector.set_calibration(record)
    ckpt = save_checkpoint(tmp_path / "calibrated.pt", detector)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "monai_skipts.dicom_app", "--input", str(dicom_study), "--output", str(out)]
    cmd += ["--checkpoint", str(ckpt), "--seg", "--device", "cpu", "--progress", "off"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    units = {s["series"]: s["units"][0] for s in json.loads((out / "dicom_results.json").read_text())["series"]}
    ct, cr_unit = units["series-001-CT"], units["series-003-CR"]
    assert (ct["kind"], ct["threshold_kind"], ct["threshold"], ct["anomalous"]) == ("volume", "volume", 1e6, False)
    assert (cr_unit["kind"], cr_unit["threshold_kind"]) == ("image", "image")
    assert cr_unit["threshold"] == pytest.approx(image_thr)
    assert (cr_unit["outline_kind"], cr_unit["outline_threshold"]) == ("pixel", pytest.approx(pixel_thr))
    src = pydicom.dcmread(cr)
    seg = hd.seg.segread(out / "series-003-CR" / "SEG-01.dcm")
    mask = seg.get_pixels_by_source_instance([src.SOPInstanceUID], segment_numbers=[1])[0, ..., 0]
    assert np.array_equal(mask.astype(bool), cr_map >= pixel_thr)
    texts = _sr_texts(out / "series-001-CT" / "SR.dcm")
    assert texts["SKIPTS-007"] == ["volume threshold (calibrated on volume scores) 1e+06"]
    assert (
        "at most 20.0 % with 90 % confidence" in texts["SKIPTS-008"][0] and "20 calibration" in texts["SKIPTS-008"][0]
    )
    assert texts["SKIPTS-009"][0].startswith("pixel threshold") and "pixel FPR 0.5 %" in texts["SKIPTS-009"][0]
    cr_texts = _sr_texts(out / "series-003-CR" / "SR.dcm")
    assert cr_texts["SKIPTS-007"][0].startswith("image threshold") and "40 calibration" in cr_texts["SKIPTS-008"][0]


def test_ctrl_c_keeps_the_series_scored_marks_the_summary_interrupted_and_exits_130_with_one_line(
    dicom_checkpoint, tmp_path
):
    """``python -m monai_skipts.dicom_app`` on a study of 200 one-slice CT series (pydicom's ``CT_small.dcm``
    with new SeriesInstanceUIDs), SIGINT once the progress bar (forced on) has counted 3 series: the series
    scored keep their SC and SR (whole DICOM files, no temp file, no half-written series folder),
    ``dicom_results.json`` lists them with status ``interrupted``, the exit status is 130 and stderr ends
    with one line naming the count and the summary, no traceback."""
    import signal

    import pydicom
    from conftest import REPO, read_until
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    N_SERIES = 200  # ~5 series/s: the SIGINT lands mid-run even when the test's reader is starved a while
    study = tmp_path / "study"
    study.mkdir()
    study_uid = generate_uid()
    for k in range(N_SERIES):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study_uid, generate_uid(), generate_uid()
        ds.SeriesNumber = k + 1
        ds.save_as(study / f"{k:03d}.dcm", enforce_file_format=True)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "monai_skipts.dicom_app", "--input", str(study), "--output", str(out)]
    cmd += ["--checkpoint", str(dicom_checkpoint), "--device", "cpu", "--progress", "on"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MONAI_SKIPTS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        before = read_until(proc.stderr, rf"scoring series:.*\b([3-9]|[1-9]\d)/{N_SERIES}\b", timeout=300)
        assert proc.poll() is None, "the app finished before the test could interrupt it (a starved reader)"
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=120)
    finally:
        proc.kill()
    stderr = before + rest
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    summary = json.loads((out / "dicom_results.json").read_text())
    n = len(summary["series"])
    assert (
        last.startswith(f"interrupted: {n} of {N_SERIES} series scored") and str(out / "dicom_results.json") in last
    ), last
    assert (summary["status"], summary["complete"]) == ("interrupted", False)
    assert 3 <= n < N_SERIES, n
    names = {s["series"] for s in summary["series"]}
    assert {p.name for p in out.iterdir() if p.is_dir()} == names  # no folder of a series half written
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert on_disk == sorted(summary["files"] + ["dicom_results.json"])  # no temp file either
    for s in summary["series"]:
        assert {f.split("/", 1)[1] for f in s["files"]} == {"SC/0001.dcm", "SR.dcm"}
    for f in summary["files"]:
        pydicom.dcmread(out / f)  # whole DICOM files
