"""Archive scale on Spark: the registered MLflow model (real sqlite store) scored with
``mlflow.pyfunc.spark_udf`` over a Spark DataFrame of file paths on ``local[2]`` gives the predictor's
scores and decisions (within 1e-5)."""

from __future__ import annotations

import glob
import os
import shutil
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import save_test_checkpoint
from monai.data import DataLoader, Dataset
from PIL import Image
from pydicom.data import get_testdata_file

from monai_skipts.calibration import calibrate_threshold
from monai_skipts.engines import SkipTSTrainer
from monai_skipts.inference import AnomalyPredictor
from monai_skipts.networks import SkipTS
from monai_skipts.transforms import build_preprocessing

mlflow = pytest.importorskip("mlflow")
pyspark = pytest.importorskip("pyspark")
registry = pytest.importorskip("monai_skipts.registry")
if not (shutil.which("java") or os.environ.get("JAVA_HOME")):
    pytest.skip("Spark needs Java 17+ (java on PATH or JAVA_HOME)", allow_module_level=True)

SIZE = 64
RESULT_TYPE = "score double, threshold double, anomalous boolean, normalized_score double"


@pytest.fixture(scope="module")
def registered(phantom_root, tmp_path_factory, one_thread):
    """Train one step on 4 phantom normals, calibrate on 4 others, register in a sqlite store."""
    tmp = tmp_path_factory.mktemp("spark")
    normals = sorted(glob.glob(str(phantom_root / "train/good/*.png")))
    pre = build_preprocessing("xray", SIZE)
    torch.manual_seed(0)
    model = SkipTS("efficientnet_lite0")
    loader = DataLoader(Dataset([{"image": p} for p in normals[:4]], pre), batch_size=4)
    SkipTSTrainer("cpu", 1, loader, model, amp=False).run()
    model.eval()
    ckpt = save_test_checkpoint(tmp / "model.pt", model, extra={"spatial_size": SIZE, "modality": "xray"})
    uncalibrated = AnomalyPredictor(ckpt, device="cpu")
    scores = np.array([uncalibrated.score_file(p, maps=False)["score"] for p in normals[4:8]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 4 normals cannot resolve 25 %: fine for a round trip
        value = calibrate_threshold(scores, 0.25)
    threshold = {"value": value, "target_fpr": 0.25, "n_normals": 4, "scale": float(scores.std())}
    ckpt = save_test_checkpoint(
        tmp / "model.pt", model, threshold=threshold, extra={"spatial_size": SIZE, "modality": "xray"}
    )
    uri = f"sqlite:///{tmp}/mlruns.db"
    info = registry.log_and_register(ckpt, "skipts-spark", tracking_uri=uri, experiment_name="skipts-spark")
    return {"info": info, "uri": uri, "checkpoint": ckpt, "tmp": tmp}


@pytest.fixture(scope="module")
def spark(monkeypatch_module):
    from pyspark.sql import SparkSession

    monkeypatch_module.setenv("PYSPARK_PYTHON", sys.executable)  # the workers run this venv's Python
    monkeypatch_module.setenv("PYSPARK_DRIVER_PYTHON", sys.executable)
    monkeypatch_module.setenv("OMP_NUM_THREADS", "1")  # one torch thread per Spark worker
    session = (
        SparkSession.builder.master("local[2]")
        .appName("monai-skipts-test")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .getOrCreate()
    )
    yield session
    session.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_spark_udf_on_local2_equals_predictor(registered, spark, phantom_root):
    tmp = registered["tmp"]
    rng = np.random.default_rng(0)
    pngs = []
    for i, src in enumerate(sorted(glob.glob(str(phantom_root / "test/*/*.png")))[::4]):
        pixels = np.asarray(Image.open(src))
        if i % 2:  # a different size than the model's: resized by the preprocessing
            pixels = np.pad(pixels, ((0, 16), (8, 8)), mode="reflect")
        noisy = np.clip(pixels.astype(np.int16) + rng.integers(-3, 4, pixels.shape), 0, 255).astype(np.uint8)
        path = tmp / "images" / f"img_{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(noisy).save(path)
        pngs.append(str(path))
    paths = pngs + [get_testdata_file("CT_small.dcm")]  # a 16-bit CT DICOM among the pictures
    assert len(paths) >= 5

    mlflow.set_tracking_uri(registered["uri"])
    udf = mlflow.pyfunc.spark_udf(spark, registered["info"]["model_uri"], result_type=RESULT_TYPE, env_manager="local")
    df = spark.createDataFrame([(p,) for p in paths], "image string").repartition(2)
    assert df.rdd.getNumPartitions() == 2  # both workers of local[2] score
    rows = df.withColumn("pred", udf("image")).select("image", "pred.*").collect()
    got = {r["image"]: r for r in rows}
    assert sorted(got) == sorted(paths)

    predictor = AnomalyPredictor(registered["checkpoint"], device="cpu")
    for p in paths:
        want = predictor.score_file(p, maps=False)
        assert got[p]["score"] == pytest.approx(want["score"], abs=1e-5), p
        assert got[p]["threshold"] == pytest.approx(want["threshold"], abs=1e-12)
        assert got[p]["anomalous"] == want["anomalous"] or abs(want["score"] - want["threshold"]) < 1e-5
        assert got[p]["normalized_score"] == pytest.approx(want["normalized_score"], abs=1e-5)
