"""A real PACS: a throw-away Orthanc with its DICOMweb plugin (Debian orthanc, orthanc-dicomweb; started by the
``orthanc`` fixture on a free localhost port, stopped afterwards). The study (CT stack, Enhanced MR, CR) is
uploaded with STOW-RS; ``python -m monai_skipts.dicom_app --dicomweb ... --study <uid>`` pulls it, scores it
and stores the SC/SR/SEG back; the PACS then holds the new series in the same study, the SRs reference
the source instances and their scores equal the predictor's on the same pixels."""

from __future__ import annotations

import pytest

pytest.importorskip("highdicom", reason="the dicom extra: pip install -e '.[dicom]'")
pytest.importorskip("dicomweb_client", reason="the dicom extra: pip install -e '.[dicom]'")

from conftest import DICOM_PHI  # noqa: E402


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
