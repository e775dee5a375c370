"""A real PACS: a throw-away Orthanc with its DICOMweb plugin (Debian orthanc, orthanc-dicomweb; started by the
``orthanc`` fixture on a free localhost port, stopped afterwards). The study (CT stack, Enhanced MR, CR) is
uploaded with STOW-RS; ``python -m monai_skipts.dicom_app --dicomweb ... --study <uid>`` pulls it, scores it
and stores the SC/SR/SEG back; the PACS then holds the new series in the same study, the SRs reference
the source instances and their scores equal the predictor's on the same pixels."""

from __future__ import annotations

import pytest

pytest.importorskip("highdicom", reason="the dicom extra: pip install -e '.[dicom]'")
pytest.importorskip("dicomweb_client", reason="the dicom extra: pip install -e '.[dicom]'")

import json
import os
import subprocess
import sys

from conftest import (
    DICOM_PHI,  # noqa: E402
    REPO,  # noqa: E402
)


def test_pull_score_store_back(orthanc, dicom_study, dicom_checkpoint, tmp_path, one_thread, capsys):
    import io

    import highdicom as hd
    import pydicom

    from monai_skipts.dicom import connect, store_files
    from monai_skipts.dicom.writers import CODES
    from monai_skipts.dicom_app import main
    from monai_skipts.inference import AnomalyPredictor
    from monai_skipts.transforms import aggregate_volume_scores

    client = connect(orthanc)
    files = sorted(dicom_study.rglob("*.dcm"))
    sources = {p.relative_to(dicom_study).as_posix(): pydicom.dcmread(p) for p in files}
    study_uid = sources["cr/1.dcm"].StudyInstanceUID
    assert store_files(client, files, study_uid) == len(files)
    before = client.search_for_series(study_uid)
    assert len(before) == 3

    rc = main(
        [
            "--dicomweb",
            orthanc,
            "--study",
            study_uid,
            "--checkpoint",
            str(dicom_checkpoint),
            "--seg",
            "--device",
            "cpu",
            "--output",
            str(tmp_path / "out"),
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert study_uid not in printed and DICOM_PHI["PatientID"] not in printed

    series = client.search_for_series(study_uid)
    modalities = sorted(pydicom.Dataset.from_json(s).Modality for s in series)
    # 3 sources + 3 SC (OT) + 3 SR + SEG for the CT and the CR (the MR frames have no plane positions)
    assert modalities == sorted(["CT", "MR", "CR", "OT", "OT", "OT", "SR", "SR", "SR", "SEG", "SEG"]), modalities
    new = [pydicom.Dataset.from_json(s) for s in series]
    assert all(s.StudyInstanceUID == study_uid for s in new)

    predictor = AnomalyPredictor(dicom_checkpoint, device="cpu")
    by_uid = {d.SOPInstanceUID: (k, d) for k, d in sources.items()}
    srs = [s for s in new if s.Modality == "SR"]
    checked = set()
    for s in srs:
        (inst,) = client.retrieve_series(study_uid, s.SeriesInstanceUID)
        assert inst.PatientID == DICOM_PHI["PatientID"] and inst.StudyInstanceUID == study_uid
        sr = hd.sr.srread(io.BytesIO(_to_bytes(inst)))
        groups = sr.content.get_image_measurement_groups()
        refs = {ref.referenced_sop_instance_uid for ref in groups[0].source_images}
        assert refs and refs <= set(by_uid), "the SR references instances that are not the source's"
        keys = sorted(by_uid[u][0] for u in refs)
        score = {m.name.meaning: float(m.value) for m in groups[0].get_measurements()}[CODES["score"][1]]
        items = [{"image": str(dicom_study / k), "id": k} for k in keys]
        slice_scores = [r["score"] for r in predictor.predict_items(items)]
        want = aggregate_volume_scores(
            [0] * len(slice_scores), slice_scores, predictor.volume_aggregation, predictor.topk
        )[0]
        assert score == pytest.approx(want, rel=1e-6), keys
        checked.add(keys[0].split("/")[0])
    assert checked == {"ct", "mr", "cr"}


def _to_bytes(ds) -> bytes:
    import io

    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _store_new_study(client, mixed_study, tmp_path) -> tuple[str, list]:
    """The mixed study under a new StudyInstanceUID (series and SOP UIDs new too), stored in the PACS."""
    import pydicom
    from pydicom.uid import generate_uid

    from monai_skipts.dicom import store_files

    study_uid, series = generate_uid(), {}
    files = []
    for p in sorted(mixed_study.rglob("*.dcm")):
        ds = pydicom.dcmread(p)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series.setdefault(ds.SeriesInstanceUID, generate_uid())
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        out = tmp_path / "upload" / p.relative_to(mixed_study)
        out.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(out, enforce_file_format=True)
        files.append(out)
    assert store_files(client, files, study_uid) == len(files)
    return study_uid, [pydicom.dcmread(f, stop_before_pixels=True) for f in files]


def _series(client, study_uid) -> list[tuple[str, int, str]]:
    import pydicom

    found = [pydicom.Dataset.from_json(s) for s in client.search_for_series(study_uid)]
    return sorted((str(d.Modality), int(d.get("SeriesNumber", 0) or 0), str(d.SeriesInstanceUID)) for d in found)


def test_second_run_adds_no_series_and_replace_keeps_one_result_per_source(
    orthanc, mixed_study, dicom_checkpoint, tmp_path, one_thread, capsys
):
    from monai_skipts.dicom import connect
    from monai_skipts.dicom_app import main

    client = connect(orthanc)
    study_uid, _ = _store_new_study(client, mixed_study, tmp_path)
    args = ["--dicomweb", orthanc, "--study", study_uid, "--checkpoint", str(dicom_checkpoint), "--seg"]
    args += ["--device", "cpu"]
    assert main(args) == 0, capsys.readouterr()
    first = _series(client, study_uid)
    assert len(first) > 3
    numbers = sorted(n for m, n, _ in first if n >= 9000)
    assert numbers == sorted({n for n in numbers}), "two result series share a number"

    capsys.readouterr()
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert _series(client, study_uid) == first, "the second run changed the study's series"
    assert printed["series"] == [] and printed["n_stored"] == 0
    assert sorted(a["series"][-2:] for a in printed["already_scored"]) == ["CR", "CT", "MR"]

    assert main(args + ["--replace"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["n_deleted"] == len(first) - 3 and printed["n_stored"] > 0
    assert _series(client, study_uid) == first, "--replace must replace: same series, numbers and UIDs"
    # ... with new instances in them
    sr_series = [u for m, n, u in first if m == "SR"]
    instances = client.search_for_instances(study_uid, sr_series[0])
    assert len(instances) == 1, "the replaced SR series holds the earlier instance too"


_CLI = """
import logging, sys
logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
from monai_skipts.dicom_app import main
sys.exit(main(sys.argv[1:]))
"""


def test_debug_logs_of_the_http_requests_hold_no_uid_but_the_host(orthanc, mixed_study, dicom_checkpoint, tmp_path):
    from monai_skipts.dicom import connect

    study_uid, headers = _store_new_study(connect(orthanc), mixed_study, tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1", MONAI_SKIPTS_OFFLINE="1")
    args = ["--dicomweb", orthanc, "--study", study_uid, "--checkpoint", str(dicom_checkpoint), "--device", "cpu"]
    r = subprocess.run(
        [sys.executable, "-c", _CLI, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stderr
    assert "urllib3.connectionpool: http://127.0.0.1:" in log, "urllib3 logged no request line at DEBUG"
    assert '"GET /dicom-web/studies/<uid>' in log and '"POST /dicom-web/studies/<uid>' in log
    uids = {study_uid} | {str(h.SeriesInstanceUID) for h in headers} | {str(h.SOPInstanceUID) for h in headers}
    assert [u for u in uids if u in log or u in r.stdout] == []
