"""MONAI Label's own ``BundleInferTask`` serves a bundle written by ``python -m monai_skipts.bundle
export``, unzipped as it is: no app code of this package, only the bundle's configs
and models. Runs in the monailabel environment (``.ci/label_env.sh``); skipped elsewhere."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch

monailabel = pytest.importorskip("monailabel")
itk = pytest.importorskip("itk")

from conftest import REPO, save_test_checkpoint  # noqa: E402
from monailabel.tasks.infer.bundle import BundleInferTask  # noqa: E402

from monai_skipts.bundle.export import export_bundle  # noqa: E402
from monai_skipts.inference import AnomalyPredictor  # noqa: E402
from monai_skipts.networks import SkipTS  # noqa: E402

THRESHOLD = {"value": 1.0, "scale": 0.1, "target_fpr": 0.05, "n_normals": 20}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A checkpoint in the trained models' format (student, threshold, per-level statistics, 32² MRI
    preset) exported to a zip and unzipped; the model's weights are not trained (serving is tested)."""
    tmp = tmp_path_factory.mktemp("bundle")
    torch.manual_seed(0)
    model = SkipTS("efficientnet_lite0")
    ckpt = save_test_checkpoint(
        tmp / "run" / "model.pt",
        model,
        threshold=THRESHOLD,
        extra={"dataset": "brainmri", "spatial_size": 32, "modality": "mri"},
        level_stats=[[0.2, 0.1], [0.3, 0.1], [0.4, 0.2]],
    )
    out = export_bundle(REPO / "bundles" / "brainmri" / "train.json", ckpt, tmp / "skipts_brainmri.zip")
    with zipfile.ZipFile(out) as z:
        z.extractall(tmp / "unzipped")
    return tmp / "unzipped" / "skipts_brainmri", ckpt


@pytest.fixture
def picture(phantom_root, tmp_path):
    """A phantom lesion image cropped to 48 rows x 64 columns: not square, so that a transposed map shows."""
    from PIL import Image

    src = sorted(phantom_root.glob("test/lesion/*.png"))[0]
    out = tmp_path / "lesion.png"
    Image.open(src).crop((0, 8, 64, 56)).save(out)
    return out


def test_bundle_infer_task_serves_the_exported_bundle(bundle, picture):
    path, ckpt = bundle
    task = BundleInferTask(str(path), conf={})
    assert task.is_valid()
    assert task.labels == {"anomaly": 0} and task.dimension == 2
    info = task.info()
    assert info["version"] == "0.1.0" and "Skip-TS" in info["description"]

    png = picture  # 48x64, scored at 32x32
    label_file, result = task({"image": str(png), "device": "cpu", "result_extension": ".nrrd"})
    want = AnomalyPredictor(ckpt, device="cpu").predict_items([{"image": str(png), "id": png.name}])[0]
    assert result["score"] == pytest.approx(want["score"], abs=1e-4)
    assert result["threshold"] == THRESHOLD["value"] and result["anomalous"] == want["anomalous"]
    assert result["normalized_score"] == pytest.approx(want["normalized_score"], abs=1e-4)

    # the map, restored to the input's size and written over it (MONAI's x-first layout, as a PNG is read)
    written = itk.array_from_image(itk.imread(label_file)).squeeze()  # (rows, columns)
    assert written.shape == want["map"].shape == (48, 64)
    assert float(written.max()) == pytest.approx(want["score"], abs=1e-4)  # nearest up-sampling keeps the max
    assert np.corrcoef(written.ravel(), want["map"].ravel())[0, 1] > 0.9  # same map (bilinear vs nearest)


def test_bundle_infer_task_torchscript_only(bundle, picture, tmp_path):
    """Without models/model.pt, BundleInferTask runs models/model.ts: the same score."""
    import shutil

    path, ckpt = bundle
    ts_only = tmp_path / "skipts_brainmri"
    shutil.copytree(path, ts_only)
    (ts_only / "models" / "model.pt").unlink()
    task = BundleInferTask(str(ts_only), conf={})
    assert task.is_valid()
    png = picture
    _, result = task({"image": str(png), "device": "cpu", "result_extension": ".nrrd"})
    want = AnomalyPredictor(ckpt, device="cpu").predict_items([{"image": str(png), "id": png.name}])[0]
    assert result["score"] == pytest.approx(want["score"], abs=1e-4)
