"""PHI: no DICOM header value outside a small whitelist (modality, spacing, orientation, rescale,
window) reaches logs, MLflow (params, tags, metrics, artifacts), output file names or JSON.

DICOM files carrying sentinel patient/study values are trained on, evaluated and scored through the
bundles (``datalist`` layout, MLflow on) in a subprocess; then every byte the run wrote -- the
output folder with the MLflow database and artifact store, and the captured stdout/stderr -- is
searched for the sentinels. The DICOM file names are neutral: names are the hospital's choice."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO

from monai_skipts.transforms import LoadMedicalImage, build_preprocessing

#: header values no output may contain
SENTINELS = {
    "PatientName": "ZQPHINAME^SENTINEL",
    "PatientID": "ZQPHIID4711",
    "PatientBirthDate": "18671107",
    "AccessionNumber": "ZQPHIACC0815",
    "InstitutionName": "ZQPHI General Hospital",
    "InstitutionAddress": "ZQPHI Street 1",
    "StudyDescription": "ZQPHISTUDYDESC",
    "SeriesDescription": "ZQPHISERIESDESC",
    "ReferringPhysicianName": "ZQPHIDOC^REF",
    "OperatorsName": "ZQPHIOPER",
    "StudyID": "ZQSTUDY99",
    "PatientAddress": "ZQPHI Road 7",
}
#: malformed values (some files): pydicom's validation warnings must not print them either
MALFORMED = {"PatientBirthDate": "ZQBAD-DATE", "PatientID": "ZQPHIID4711" + "X" * 70, "PatientAge": "ZQAGE"}
UID_ROOT = "1.2.826.0.1.3680043.10.999."  # Study/Series/SOP instance UIDs: identifiers too
#: header values that may pass (the whitelist), used in these files
MODALITY = "DX"


def _needles() -> list[bytes]:
    out = set()
    for v in list(SENTINELS.values()) + list(MALFORMED.values()) + [UID_ROOT.rstrip(".")]:
        for form in (v, v.replace("^", " "), v.split("^")[0]):
            out |= {form.encode(), form.lower().encode(), form.encode("utf-16-le")}
    return sorted(out)


def _write_dicom(
    path: Path,
    arr: np.ndarray,
    k: int,
    series: str | None = None,
    z: int = 0,
    modality=MODALITY,
    malformed: bool = False,
) -> None:
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = f"{UID_ROOT}3.{k}.{z}"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    for key, value in (SENTINELS | (MALFORMED if malformed else {})).items():
        setattr(ds, key, value)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = f"{UID_ROOT}1.{k}", f"{UID_ROOT}2.{series or k}"
    ds.StudyDate, ds.Modality, ds.InstanceNumber = "20240101", modality, z + 1
    ds.Rows, ds.Columns = arr.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelSpacing, ds.ImageOrientationPatient, ds.ImagePositionPatient = [0.2, 0.2], [1, 0, 0, 0, 1, 0], [0, 0, z]
    ds.SliceThickness, ds.RescaleSlope, ds.RescaleIntercept = 1.0, 1, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = arr.astype(np.uint16).tobytes()
    mode = pydicom.config.settings.writing_validation_mode
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE  # write the malformed values
    try:
        ds.save_as(str(path), enforce_file_format=True)
    finally:
        pydicom.config.settings.writing_validation_mode = mode


def _image(k: int, lesion: bool) -> np.ndarray:
    rng = np.random.default_rng(k)
    a = rng.normal(1200, 60, (48, 48))
    yy, xx = np.mgrid[:48, :48]
    a[(yy - 24) ** 2 + (xx - 24) ** 2 < 15**2] += 800
    if lesion:
        a[18:26, 26:34] = 4000
    return np.clip(a, 0, 4095)


@pytest.fixture(scope="module")
def dicom_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dicom")
    rows = ["image,label"]
    (root / "images").mkdir()
    for k in range(16):
        lesion = k >= 12
        _write_dicom(root / "images" / f"img{k:03d}.dcm", _image(k, lesion), k, malformed=k in (3, 13))
        rows.append(f"images/img{k:03d}.dcm,{int(lesion)}")
    (root / "datalist.csv").write_text("\n".join(rows) + "\n")
    series = root / "series01"
    series.mkdir()
    for z in range(3):
        _write_dicom(series / f"slice{z}.dcm", _image(100 + z, False), 100, series="100", z=z, modality="CT")
    return root


def test_the_sentinels_are_in_the_input(dicom_data):
    """Control: the grep finds them where they are (the DICOM files)."""
    blob = (dicom_data / "images" / "img000.dcm").read_bytes()
    assert all(v.encode() in blob for v in SENTINELS.values()) and UID_ROOT.encode() in blob


@pytest.mark.parametrize("what", ["images/img000.dcm", "series01"])
def test_loaded_images_carry_only_whitelisted_header_values(dicom_data, what):
    img = LoadMedicalImage()(str(dicom_data / what))
    text = repr(dict(img.meta)).encode()
    assert not [n for n in _needles() if n in text]
    item = {"image": str(dicom_data / what), "id": what} | ({} if what.endswith(".dcm") else {"slice_index": 1})
    out = build_preprocessing("xray", 32)(item)
    assert not [n for n in _needles() if n in repr(dict(out["image"].meta)).encode()]
    if what.endswith(".dcm"):
        assert img.meta["modality"] == MODALITY and img.meta["window_center"] == 2048.0


_SCRIPT = textwrap.dedent(
    """
    import sys
    from monai.bundle import run
    data, out, log_conf = sys.argv[1], sys.argv[2], sys.argv[3]
    # batch 5: the 5 training normals in one batch (a batch of 1 cannot train BatchNorm at 32², E4 being 1x1)
    INFER = ["bundles/demo/train.json", "bundles/demo/inference.json"]
    common = dict(dataset="datalist", dataset_dir=data + "/datalist.csv", output_dir=out, spatial_size=32, batch_size=5,
                  mlflow=True, logging_file=log_conf)
    run(config_file="bundles/demo/train.json", epochs=1, teacher="efficientnet_lite0", n_heatmaps=2, val_interval=1,
        progress_bar=False, target_fpr=0.5, calibration="empirical", **common)
    run(config_file=["bundles/demo/train.json", "bundles/demo/evaluate.json"], n_heatmaps=2, **common)
    run(config_file=INFER, output_dir=out, input=data + "/images", logging_file=log_conf)
    run(config_file=INFER, output_dir=out, input=[data + "/series01"],
        inference_dir=out + "/inference_series", logging_file=log_conf)
    """
)


def test_no_header_value_reaches_any_output(dicom_data, tmp_path):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MONAI_SKIPTS_OFFLINE="1", OMP_NUM_THREADS="1")
    log_conf = tmp_path / "logging.conf"  # the bundle's logging at DEBUG: everything any logger says
    log_conf.write_text((REPO / "bundles/demo/logging.conf").read_text().replace("level=INFO", "level=DEBUG"))
    r = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(dicom_data), str(out), str(log_conf)],
        cwd=REPO,
        env=env,
        capture_output=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-4000:]
    assert b" - DEBUG - " in r.stdout, "the run did not log at DEBUG"

    # the run did write what we mean to search: MLflow store and artifacts, metrics, maps, predictions
    written = [p for p in out.rglob("*") if p.is_file()]
    names = {p.relative_to(out).as_posix() for p in written}
    for expected in (
        "mlruns.db",
        "metrics.json",
        "scores.csv",
        "split.json",
        "threshold.json",
        "eval/metrics.json",
        "inference/predictions.csv",
        "inference_series/volume_predictions.csv",
    ):
        assert expected in names, expected
    assert any(n.startswith("mlruns/") and n.endswith("metrics.json") for n in names), "no MLflow artifacts"
    assert any(n.startswith("heatmaps/") for n in names) and any(n.startswith("inference/maps/") for n in names)
    assert any(n.startswith("inference_series/maps/") and n.endswith(".nii.gz") for n in names)

    leaks = []
    needles = _needles()
    for p in written:
        blob = p.read_bytes()
        if p.name.endswith(".gz"):
            import gzip

            blob += gzip.decompress(blob)
        leaks += [f"{p.relative_to(out)}: {n!r}" for n in needles if n in blob]
        leaks += [
            f"file name {p.relative_to(out)}: {n!r}" for n in needles if n in p.relative_to(out).as_posix().encode()
        ]
    for stream, blob in (("stdout", r.stdout), ("stderr", r.stderr)):
        leaks += [f"{stream}: {n!r}" for n in needles if n in blob]
    assert not leaks, "PHI leaked:\n" + "\n".join(leaks)

    # and MLflow, read back through its API
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlruns.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted(r.info.run_name.split("-")[0] for r in runs) == [
        "datalist",
        "evaluate",
        "register",
    ]  # train, evaluation, registration
    for run in runs:
        values = [*run.data.params.values(), *run.data.tags.values(), *run.data.metrics, run.info.run_name]
        text = "\n".join(map(str, values)).encode()
        assert not [n for n in needles if n in text]
    # sanity: the run did see the DICOM modality (a whitelisted value) and trained on the files
    assert torch.load(out / "model.pt", weights_only=True)["extra"]["dataset"] == "datalist"
