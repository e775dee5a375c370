"""Every bundle runs end to end through MONAI's real bundle runner, on small data the test writes
in that dataset's own layout, with tiny overrides (1-2 epochs, 64²)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TINY_TRAINING
from monai.bundle import run as bundle_run
from PIL import Image

from monai_skipts import bundle

# the tiny training with 2 heat-maps drawn
TINY = {**TINY_TRAINING, "n_heatmaps": 2}

COMMON = sorted((REPO / "bundles" / "common").glob("*.json"))
GENERATED = sorted(
    p
    for p in (REPO / "bundles").glob("*/*.json")
    if p.parent.name not in ("common", "presets") and p.name != "metadata.json"
)
MAX_SHARE = 0.10


def _img(path: Path, seed: int, rgb: bool = False, lesion: bool = False, fmt: str | None = None) -> None:
    rng = np.random.default_rng(seed)
    a = (rng.random((40, 40)) * 60 + 60).astype(np.uint8)
    a[10:30, 10:30] += 60
    if lesion:
        a[14:20, 20:26] = 250
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(np.stack([a, a // 2, 255 - a], -1) if rgb else a)
    im.save(path, format=fmt)


def _class_folders(
    root: Path, folders: dict[str, int], n: int = 10, ext: str = "png", rgb: bool = False, seed0: int = 0
) -> None:
    k = seed0  # distinct seeds per call: identical images would be removed as duplicates
    for folder, label in folders.items():
        for i in range(n if label == 0 else 3):
            k += 1
            _img(root / folder / f"img{i:03d}.{ext}", k, rgb=rgb, lesion=bool(label))


def make_layout(name: str, root: Path) -> dict:
    """Write a tiny dataset in ``name``'s source layout; returns extra overrides it needs."""
    if name == "headct":
        rows = []
        for i in range(10):
            _img(root / "head_ct" / f"{i:03d}.png", i, lesion=i >= 7)
            rows.append((i, int(i >= 7)))
        with open(root / "labels.csv", "w", newline="") as f:
            f.write("id, hemorrhage\n" + "".join(f"{i}, {y}\n" for i, y in rows))
    elif name == "brainmri":
        _class_folders(root, {"no": 0, "yes": 1}, ext="jpg")
    elif name in ("lungct", "breastmri", "nafld"):
        _class_folders(root, {"normal": 0, "abnormal": 1}, n=16)  # Table I sends most normals to test
    elif name == "busi":
        base = root / "Dataset_BUSI_with_GT"
        for i in range(6):
            _img(base / "normal" / f"normal ({i + 1}).png", i)
        for cls in ("benign", "malignant"):
            for i in range(2):
                _img(base / cls / f"{cls} ({i + 1}).png", 50 + i, lesion=True)
                m = np.zeros((40, 40), np.uint8)
                m[14:20, 20:26] = 255
                Image.fromarray(m).save(base / cls / f"{cls} ({i + 1})_mask.png")
        # a second lesion of one image in its own file, as 17 published BUSI images have: batches
        # then mix items with and without extra masks (a KeyError in collation before)
        m = np.zeros((40, 40), np.uint8)
        m[2:6, 2:6] = 255
        Image.fromarray(m).save(base / "benign" / "benign (1)_mask_1.png")
    elif name == "lgg":
        for p in range(5):
            patient = f"TCGA_XX_{p:04d}_20000101"
            for n in range(1, 7):
                lesion = n in (3, 4)  # every LGG patient has a tumour
                _img(root / "kaggle_3m" / patient / f"{patient}_{n}.png", 10 * p + n, rgb=True, lesion=lesion)
                m = np.zeros((40, 40), np.uint8)
                if lesion:
                    m[14:20, 20:26] = 255
                Image.fromarray(m).save(root / "kaggle_3m" / patient / f"{patient}_{n}_mask.png")
    elif name == "retinal_oct":
        _class_folders(root / "train", {"NORMAL": 0}, n=6)
        _class_folders(root / "test", {"NORMAL": 0, "DME": 1, "CNV": 1}, n=3, seed0=100)
    elif name in ("cpchild_a", "cpchild_b"):
        sub = root / ("CP-CHILD-A" if name == "cpchild_a" else "CP-CHILD-B")
        _class_folders(sub / "Train", {"Non-Polyp": 0, "Polyp": 1}, rgb=True)
        _class_folders(sub / "Test", {"Non-Polyp": 0, "Polyp": 1}, n=3, rgb=True, seed0=100)
    elif name == "iqothnccd":
        _class_folders(root, {"Normal cases": 0, "Bengin cases": 1, "Malignant cases": 1}, ext="jpg")
    elif name == "covid_xray":
        _class_folders(root / "train", {"Normal": 0, "Covid": 1}, n=6)
        _class_folders(root / "test", {"Normal": 0, "Viral Pneumonia": 1}, n=3, seed0=100)
    elif name == "malaria":
        _class_folders(root, {"Uninfected": 0, "Parasitized": 1}, rgb=True)
    else:  # pragma: no cover
        raise KeyError(name)
    return {}


DATASETS = [
    "headct",
    "brainmri",
    "lungct",
    "busi",
    "breastmri",
    "retinal_oct",
    "cpchild_a",
    "cpchild_b",
    "nafld",
    "iqothnccd",
    "covid_xray",
    "malaria",
    "lgg",
]


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # bundles resolve "%bundles/common/..." against the working directory


def test_bundle_files_are_generated_from_the_table():
    r = subprocess.run([sys.executable, "bundles/make_bundles.py", "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in DATASETS + ["demo"]:
        for f in ("train.json", "evaluate.json", "inference.json", "metadata.json", "logging.conf"):
            assert (REPO / "bundles" / name / f).is_file(), (name, f)
        meta = json.loads((REPO / "bundles" / name / "metadata.json").read_text())
        for key in (
            "version",
            "monai_version",
            "pytorch_version",
            "numpy_version",
            "required_packages_version",
            "task",
            "description",
            "authors",
            "copyright",
            "network_data_format",
            "intended_use",
            "data_source",
            "references",
        ):
            assert key in meta, (name, key)


@pytest.mark.parametrize("path", COMMON, ids=lambda p: p.name)
def test_dollar_share_of_each_common_file_is_at_most_10_percent(path):
    """Characters inside ``$...`` string values over the file's characters, plain calls included."""
    expr, total = bundle.expression_share(path)
    print(f"{path.relative_to(REPO)}: {expr} of {total} characters in $ expressions ({100 * expr / total:.1f} %)")
    assert expr / total <= MAX_SHARE, f"{path.name}: {100 * expr / total:.1f} % of the file is Python in $ expressions"


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
    data, out = tmp_path / "data", tmp_path / "run"
    make_layout("brainmri", data)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    bundle_run(
        config_file=str(REPO / "bundles/brainmri/train.json"),
        dataset_dir=str(data),
        output_dir=str(out),
        **TINY_TRAINING,
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


@pytest.mark.parametrize("name", DATASETS)
def test_dataset_bundle_train_evaluate_infer(name, tmp_path):
    data, out = tmp_path / "data", tmp_path / "run"
    make_layout(name, data)
    bundle_run(config_file=f"bundles/{name}/train.json", dataset_dir=str(data), output_dir=str(out), **TINY)
    for f in (
        "model.pt",
        "checkpoint.pt",
        "metrics.json",
        "split.json",
        "scores.csv",
        "threshold.json",
        "roc.png",
        "score_distribution.png",
    ):
        assert (out / f).is_file(), f
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["auroc"] <= 1.0 and metrics["teacher"] == "efficientnet_lite0"
    assert metrics["n_normal"] >= 1 and metrics["n_abnormal"] >= 1
    assert list((out / "heatmaps").glob("anomalous_*.png")) and list((out / "heatmaps").glob("normal_*.png"))
    panel = Image.open(next((out / "heatmaps").glob("anomalous_*.png")))
    # image | overlay at full resolution, plus a colour bar beside and the score header above
    assert panel.size[0] > 2 * TINY["spatial_size"] and panel.size[1] > TINY["spatial_size"]
    with open(out / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == metrics["n_images"] and {"score", "anomalous", "threshold"} <= set(rows[0])
    if name in ("busi", "lgg"):  # masks beside the images: pixel metrics
        for key in ("pixel_auroc", "aupro", "dice", "dice_best", "hit_rate"):
            assert 0.0 <= metrics[key] <= 1.0, key
    if name == "lgg":  # split by patient: no patient in two subsets
        split = json.loads((out / "split.json").read_text())
        patients = {s: {it["volume_id"] for it in split[s]} for s in ("train", "val", "test")}
        assert patients["train"] and patients["val"] and patients["test"]
        assert not (
            patients["train"] & patients["val"]
            or patients["train"] & patients["test"]
            or patients["val"] & patients["test"]
        )
        assert all(it["label"] == 0 for s in ("train", "val") for it in split[s])
    bundle_run(
        config_file=[f"bundles/{name}/train.json", f"bundles/{name}/evaluate.json"],
        dataset_dir=str(data),
        output_dir=str(out),
        mlflow=False,
        batch_size=4,
    )
    ev = json.loads((out / "eval" / "metrics.json").read_text())
    assert ev["auroc"] == pytest.approx(metrics["auroc"], abs=1e-6)  # the checkpoint rebuilds the same model
    bundle_run(
        config_file=[f"bundles/{name}/train.json", f"bundles/{name}/inference.json"],
        output_dir=str(out),
        input=str(data),
        batch_size=4,
    )
    with open(out / "inference" / "predictions.csv") as f:
        preds = list(csv.DictReader(f))
    assert len(preds) >= metrics["n_images"] and preds[0]["anomalous"] in ("True", "False")


def test_demo_bundle_with_mlflow_read_back_from_sqlite(tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    out = tmp_path / "demo"
    bundle_run(
        config_file="bundles/demo/train.json",
        output_dir=str(out),
        epochs=2,
        n_train_images=8,
        spatial_size=64,
        val_interval=1,
        progress_bar=False,
        target_fpr=0.5,
        calibration="empirical",
    )
    assert (out / "mlruns.db").is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlruns.db'}")
    exp = client.get_experiment_by_name("monai-skipts-mvtec")
    runs = client.search_runs([exp.experiment_id])
    (run,) = [r for r in runs if not r.info.run_name.startswith("register-")]  # the registration has its own run
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["teacher"] == "efficientnet_lite0" and p["epochs"] == "2" and p["seed"] == "0" and p["lr"] == "0.005"
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in loss] == [1, 2]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_mean_score")] == [1, 2]
    assert "test_auroc" in run.data.metrics and "val_mean_score" in run.data.metrics
    # the phantom has lesion masks: the localisation metrics reach MLflow next to the image AUROC
    assert {"test_pixel_auroc", "test_aupro", "test_dice", "test_dice_best", "test_hit_rate"} <= set(run.data.metrics)
    # the threshold's uncertainty: the FPR it promises with 90 % confidence, and the expected FPR
    threshold = json.loads((out / "threshold.json").read_text())
    assert run.data.metrics["test_calibration_fpr_bound"] == pytest.approx(threshold["fpr_bound"])
    assert run.data.metrics["test_calibration_fpr_expected"] == pytest.approx(threshold["fpr_expected"])
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "scores.csv", "split.json", "roc.png", "score_distribution.png", "heatmaps"} <= arts
    assert any(a.path.startswith("heatmaps/") for a in client.list_artifacts(run.info.run_id, "heatmaps"))
    local = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id,
        artifact_path="metrics.json",
        tracking_uri=f"sqlite:///{out / 'mlruns.db'}",
        dst_path=str(tmp_path / "dl"),
    )
    assert json.loads(Path(local).read_text())["auroc"] == pytest.approx(run.data.metrics["test_auroc"])
    # the trained model is registered with an alias, and the bundle exports through MONAI's ckpt_export
    mv = client.get_model_version_by_alias("skipts-demo", "champion")
    assert mv.run_id is not None
    from monai.bundle import ckpt_export

    ckpt_export(
        net_id="predictor_def",
        config_file="bundles/demo/train.json",
        ckpt_file=str(out / "model.pt"),
        filepath=str(out / "model.ts"),
        use_trace=True,
        input_shape=[1, 3, 64, 64],
        converter_kwargs={"check_trace": False},
        spatial_size=64,
        n_train_images=8,
        output_dir=str(out),
    )
    import torch

    ts = torch.jit.load(str(out / "model.ts"))
    amap, score = ts(torch.zeros(2, 3, 64, 64))
    assert amap.shape == (2, 1, 64, 64) and score.shape == (2,)


def test_user_command_from_repo_root(tmp_path):
    """`python -m monai.bundle run --config_file bundles/brainmri/train.json` with overrides, as a user runs it."""
    data, out = tmp_path / "data", tmp_path / "run"
    make_layout("brainmri", data)
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "bundles/brainmri/train.json",
        "--dataset_dir",
        str(data),
        "--output_dir",
        str(out),
        "--epochs",
        "1",
        "--spatial_size",
        "64",
        "--teacher",
        "efficientnet_lite0",
        "--seed",
        "3",
        "--mlflow",
        "False",
        "--target_fpr",
        "0.5",
        "--calibration",
        "empirical",
    ]
    r = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "MONAI_SKIPTS_OFFLINE": "1"}
    )
    assert r.returncode == 0, r.stderr[-3000:]
    split = json.loads((out / "split.json").read_text())
    assert split["seed"] == 3
    assert json.loads((out / "metrics.json").read_text())["seed"] == 3
    assert (out / "val_scores.csv").is_file()  # the calibration's normals, for benchmarks/calibration.py


def test_too_few_normals_to_calibrate_fails_before_training(tmp_path):
    """The tiny BrainMRI layout has 10 normals: 2 validation normals cannot calibrate the default 5 %
    FPR. The run stops before training, naming the split file and what to change, and leaves no
    checkpoint and no MLflow run behind."""
    data, out = tmp_path / "data", tmp_path / "run"
    make_layout("brainmri", data)
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "bundles/brainmri/train.json",
        "--dataset_dir",
        str(data),
        "--output_dir",
        str(out),
        "--epochs",
        "1",
        "--spatial_size",
        "64",
        "--teacher",
        "efficientnet_lite0",
    ]
    r = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "MONAI_SKIPTS_OFFLINE": "1"}
    )
    assert r.returncode != 0
    assert (
        "validation normals cannot calibrate target_fpr=0.05 with the 'lognormal' calibration (needs at least 10)"
        in r.stderr
    )
    assert str(out / "split.json") in r.stderr
    assert not (out / "checkpoint.pt").exists() and not (out / "mlruns.db").exists()


@pytest.mark.parametrize("config", ["train", "evaluate"])
def test_lower_case_false_on_the_command_line_is_refused(config, tmp_path):
    """`--mlflow false` reaches the bundle as the string 'false' (true in Python): refused by name
    before anything runs, instead of silently logging to MLflow."""
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "bundles/brainmri/train.json"
        if config == "train"
        else f"['bundles/brainmri/train.json','bundles/brainmri/{config}.json']",
        "--dataset_dir",
        str(tmp_path / "data"),
        "--output_dir",
        str(out),
        "--mlflow",
        "false",
    ]
    r = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "MONAI_SKIPTS_OFFLINE": "1"}
    )
    assert r.returncode != 0
    assert "--mlflow must be True or False, got 'false' (write False)" in r.stderr
    assert not (out / "mlruns.db").exists() and not (out / "checkpoint.pt").exists()


def test_auto_teacher_falls_back_loudly_offline(tmp_path):
    """No WRN50 weights and no internet: teacher 'auto' says so and trains the offline teacher, which
    the checkpoint records and evaluate rebuilds."""
    data, out = tmp_path / "data", tmp_path / "run"
    make_layout("malaria", data)
    env = {**os.environ, "MONAI_SKIPTS_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "torch_home")}
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "bundles/malaria/train.json",
        "--dataset_dir",
        str(data),
        "--output_dir",
        str(out),
        "--epochs",
        "1",
        "--spatial_size",
        "64",
        "--mlflow",
        "False",
        "--target_fpr",
        "0.5",
        "--calibration",
        "empirical",
    ]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert "wide_resnet50_2" in log and "using the offline teacher 'efficientnet_lite0'" in log
    import torch

    ckpt = torch.load(out / "model.pt", weights_only=True)
    assert ckpt["config"]["model"]["teacher"] == "efficientnet_lite0"


def test_bundle_runs_gathers_seeds_into_the_results_table(tmp_path):
    """benchmarks/bundle_runs.py (the README's results table): one real bundle run per seed, the
    metrics each wrote gathered into mean ± sd; a second call reuses finished runs."""
    data, work = tmp_path / "data", tmp_path / "work"
    make_layout("brainmri", data)
    cmd = [
        sys.executable,
        "benchmarks/bundle_runs.py",
        "--dataset",
        "brainmri",
        "--dataset-dir",
        str(data),
        "--seeds",
        "0",
        "1",
        "--teacher",
        "efficientnet_lite0",
        "--work-dir",
        str(work),
        "--",
        "--epochs",
        "1",
        "--spatial_size",
        "64",
        "--batch_size",
        "4",
        "--mlflow",
        "False",
        "--n_heatmaps",
        "0",
        "--target_fpr",
        "0.5",
        "--calibration",
        "empirical",
    ]
    env = {**os.environ, "MONAI_SKIPTS_OFFLINE": "1"}
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    summary = json.loads((work / "brainmri_summary.json").read_text())
    per_seed = [100 * json.loads((work / f"brainmri_s{s}" / "metrics.json").read_text())["auroc"] for s in (0, 1)]
    assert summary["seeds"] == [0, 1] and summary["auroc"] == pytest.approx(per_seed)
    assert summary["auroc_mean"] == pytest.approx(np.mean(per_seed))
    assert summary["auroc_std"] == pytest.approx(np.std(per_seed, ddof=1))
    assert summary["paper_auroc"] == 88.2 and "| brainmri |" in r.stdout
    spec = [
        100 * (1 - json.loads((work / f"brainmri_s{s}" / "metrics.json").read_text())["specificity_at_decision"])
        for s in (0, 1)
    ]
    assert summary["test_fpr_at_threshold"] == pytest.approx(spec) and summary["target_fpr"] == 0.5
    r2 = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert r2.returncode == 0 and r2.stdout.count("already finished") == 2


def test_bundle_runs_rank_applies_the_selection_rule(tmp_path):
    """`bundle_runs.py --rank NAME=DIR ...` ranks configurations from their summaries with
    quality.SELECTION_RULE: ½ mean image-AUROC rank over the dev sets + ¼ LGG pixel-AUROC rank + ¼ AUPRO rank."""

    def write(folder, brain, iq, lgg, pix, pro):
        folder.mkdir()
        for d, a in (("brainmri", brain), ("iqothnccd", iq), ("lgg", lgg)):
            sm = {"dataset": d, "auroc_mean": a, "auroc_std": 1.0}
            if d == "lgg":
                sm.update(
                    pixel_auroc=[pix],
                    pixel_auroc_mean=pix,
                    pixel_auroc_std=0.0,
                    aupro=[pro],
                    aupro_mean=pro,
                    aupro_std=0.0,
                    hit_rate_mean=10.0,
                    hit_rate_std=0.0,
                )
            (folder / f"{d}_summary.json").write_text(json.dumps(sm))

    # a: best image AUROC on two of three sets, worst localisation; b: the reverse; c: worst images, mid pixel
    write(tmp_path / "a", 91.0, 95.0, 70.0, 92.0, 70.0)
    write(tmp_path / "b", 88.0, 90.0, 78.0, 94.0, 77.0)
    write(tmp_path / "c", 85.0, 89.0, 71.0, 93.0, 72.0)
    r = subprocess.run(
        [sys.executable, "benchmarks/bundle_runs.py", "--rank", *(f"{n}={tmp_path / n}" for n in "abc")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line.split(" | ") for line in r.stdout.splitlines() if line[:4] in ("| a ", "| b ", "| c ")]
    # a: images (1+1+3)/3, pixel 3, AUPRO 3 -> 0.5*5/3 + 0.75 + 0.75 = 2.33; b: (2+2+1)/3, 1, 1 -> 1.33; c: (3+3+2)/3, 2, 2 -> 2.33
    assert [(row[0][2:], row[-1].strip(" |")) for row in rows] == [("b", "1.33"), ("a", "2.33"), ("c", "2.33")]


def test_threshold_is_calibrated_on_the_maps_the_model_serves(tmp_path):
    """With per-level standardised maps (fitted after training), the validation scores from the last
    training epoch are stale: the calibrator must score the validation normals again. Seen on an
    H200 before the fix: every test normal above the threshold (FPR 100 %)."""
    import torch

    from monai_skipts.checkpoint import load_detector
    from monai_skipts.transforms import build_preprocessing

    data, out = tmp_path / "data", tmp_path / "run"
    make_layout("lgg", data)
    bundle_run(
        config_file="bundles/lgg/train.json",
        dataset_dir=str(data),
        output_dir=str(out),
        level_stats=True,
        val_interval=1,
        **{**TINY, "epochs": 2},
    )
    model = load_detector(out / "model.pt")
    assert model.get_level_stats() is not None
    split = json.loads((out / "split.json").read_text())
    pre = build_preprocessing("mri", spatial_size=TINY["spatial_size"])
    with open(out / "val_scores.csv") as f:
        written = {r["id"]: float(r["score"]) for r in csv.DictReader(f)}
    assert set(written) == {it["id"] for it in split["val"]}
    for it in split["val"]:
        image = pre({"image": str(data / it["image"])})["image"].as_tensor()[None]
        with torch.no_grad():
            _, score = model(image)
        assert float(score) == pytest.approx(written[it["id"]], rel=1e-4, abs=1e-4)
    assert model.config["calibration"]["n_normals"] == len(split["val"])


@pytest.mark.parametrize(
    "preset, expect, loss, level_stats, epochs",
    [
        (None, {"skip": "none", "bottleneck": True, "skip_levels": []}, "RD4ADLoss", True, 25),  # the default
        (
            "paper",
            {"skip": "add", "bottleneck": False, "skip_levels": [3, 2], "teacher_taps": "project"},
            "DRKDLoss",
            False,
            200,
        ),
        ("paper_std", {"skip": "add", "bottleneck": False, "skip_levels": [3, 2]}, "DRKDLoss", True, 200),
    ],
)
def test_presets_merged_over_a_bundle_build_their_model(preset, expect, loss, level_stats, epochs, tmp_path):
    """`--config_file "['bundles/<d>/train.json','bundles/presets/<p>.json']"` (bundle_runs.py --preset):
    the preset's ids win over the bundle's, and the model, loss, map standardisation, anatomy mask and
    schedule follow them; without a preset the bundle builds the default the rule picked
    (benchmarks/README.md), with the anatomy mask, which the paper's configuration has not."""
    from monai.bundle import ConfigWorkflow

    files = ["bundles/lgg/train.json"] + ([f"bundles/presets/{preset}.json"] if preset else [])
    wf = ConfigWorkflow(
        config_file=files, workflow_type="train", teacher="efficientnet_lite0", output_dir=str(tmp_path)
    )
    parser = wf.parser
    net = parser.get_parsed_content("network_def")
    assert {k: net.config[k] for k in expect} == expect
    assert type(parser.get_parsed_content("train#loss")).__name__ == loss
    assert parser.get_parsed_content("level_stats") is level_stats
    assert parser.get_parsed_content("epochs") == epochs
    assert parser.get_parsed_content("anatomy_mask") is (preset is None)


def test_demo_bundle_trains_with_synthetic_lesions_switched_on(tmp_path):
    """``synthetic_lesions`` (off by default) switches the training to denoising distillation: the
    trainer's prepare_batch is a DenoisingBatch over the cached clean features, and the run completes."""
    from monai.bundle import ConfigParser

    from monai_skipts.engines import DenoisingBatch, TeacherFeatureCache

    cfg = ConfigParser()
    cfg.read_config(str(REPO / "bundles" / "demo" / "train.json"))
    assert cfg["synthetic_lesions"] is None
    lesions = {"prob": 1.0, "families": ["intensity", "elastic"]}
    cfg.update({"synthetic_lesions": lesions, "output_dir": str(tmp_path / "parsed"), "spatial_size": 64})
    prep = cfg.get_parsed_content("train#prepare_batch")
    assert isinstance(prep, DenoisingBatch) and isinstance(prep.features, TeacherFeatureCache)
    assert prep.lesion.families == ("intensity", "elastic") and prep.lesion.prob == 1.0
    out = tmp_path / "demo"
    bundle_run(
        config_file="bundles/demo/train.json", output_dir=str(out), **TINY, n_train_images=8, synthetic_lesions=lesions
    )
    assert (out / "model.pt").is_file() and (out / "metrics.json").is_file()


def test_demo_bundle_trains_a_segmentation_head_when_asked(tmp_path):
    """``seg_head`` (off by default) adds the head's stage after the student's training and before the
    calibration: the stage is a no-op when off, and with ``{"mode": "fused", ...}`` the saved model
    holds the head (its mode in the config, its weights in the state) and is calibrated on its map."""
    from monai.bundle import ConfigParser

    from monai_skipts.checkpoint import load_checkpoint, load_detector
    from monai_skipts.engines import SegHeadTrainer

    cfg = ConfigParser()
    cfg.read_config(str(REPO / "bundles" / "demo" / "train.json"))
    assert cfg["seg_head"] is None and "$@seg_head_stage()" in cfg["run"]
    assert cfg["run"].index("$@seg_head_stage()") < cfg["run"].index("$@calibrate()")
    cfg.update({"output_dir": str(tmp_path / "parsed"), "spatial_size": 64})
    stage = cfg.get_parsed_content("seg_head_stage")
    assert isinstance(stage, SegHeadTrainer) and not stage.enabled
    out = tmp_path / "demo"
    bundle_run(
        config_file="bundles/demo/train.json",
        output_dir=str(out),
        **TINY,
        n_train_images=8,
        seg_head={"mode": "fused", "epochs": 2},
    )
    ckpt = load_checkpoint(out / "model.pt")
    assert ckpt["config"]["seg_head"]["mode"] == "fused" and "seg_head.map_norm" in ckpt["state_dict"]
    assert ckpt["config"]["calibration"] is not None
    det = load_detector(ckpt)
    assert det.seg_head is not None and det.seg_head.mode == "fused"
    assert 0.0 <= json.loads((out / "metrics.json").read_text())["auroc"] <= 1.0
