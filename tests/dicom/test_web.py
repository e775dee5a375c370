"""A real PACS (the ``orthanc`` fixture: Debian Orthanc with its DICOMweb plugin): running the app twice on
a study adds no series and keeps the series numbers; ``--replace`` replaces the results (Orthanc's REST
DELETE) instead of adding; the HTTP stack's DEBUG logs hold no UID, and keep the host."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("highdicom", reason="the dicom extra: pip install -e '.[dicom]'")
pytest.importorskip("dicomweb_client", reason="the dicom extra: pip install -e '.[dicom]'")

from conftest import REPO  # noqa: E402


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
