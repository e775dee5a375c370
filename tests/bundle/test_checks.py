"""What a user meets on the command line. Every test runs the real thing (``python -m monai.bundle run`` /
``ckpt_export`` subprocesses, the export CLI, the MONAI bundle parser) with tiny settings."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_TRAINING, override_args, run_doctests

from monai_skipts import bundle
from monai_skipts.bundle import checks
from monai_skipts.engines import SegHeadCalibrationWarning

ENV = {**os.environ, "MONAI_SKIPTS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
# the tiny training, MLflow as each test sets it
TINY = override_args({k: v for k, v in TINY_TRAINING.items() if k != "mlflow"})


def _bundle(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=ENV)


def _last_lines(text: str, n: int = 3) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def _brainmri_layout(root: Path) -> Path:
    """The tiny BrainMRI layout of tests/test_bundles.py (10 normals in ``no/``, 3 tumours in ``yes/``)."""
    from test_bundles import make_layout

    make_layout("brainmri", root)
    return root


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny BrainMRI training run through the user's command (MLflow on, no registration)."""
    tmp = tmp_path_factory.mktemp("tiny_run")
    data, out = _brainmri_layout(tmp / "data"), tmp / "run"
    r = _bundle(
        "run",
        "--config_file",
        "bundles/brainmri/train.json",
        "--dataset_dir",
        str(data),
        "--output_dir",
        str(out),
        "--register",
        "False",
        *TINY,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return data, out


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """An (untrained) efficientnet_lite0 Skip-TS checkpoint recorded as trained at 32²."""
    from conftest import save_test_checkpoint

    from monai_skipts.networks import SkipTS

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_test_checkpoint(
        path,
        SkipTS("efficientnet_lite0"),
        threshold={"value": 1.0, "scale": 0.1, "target_fpr": 0.05},
        extra={"spatial_size": 32, "modality": "xray"},
    )
    return path


def test_missing_dataset_folder_is_named_in_the_last_lines(tmp_path):
    """The error raised inside a ``$`` expression is wrapped by MONAI's parser in a long
    ``RuntimeError: Failed to evaluate ...``; the last lines a user sees must still name the folder
    and the problem. MONAI's own arguments (meta, logging, run ids) pass the option check."""
    missing = tmp_path / "no_such_folder"
    r = _bundle(
        "run",
        "--config_file",
        "bundles/brainmri/train.json",
        "--meta_file",
        "bundles/brainmri/metadata.json",
        "--logging_file",
        "bundles/brainmri/logging.conf",
        "--run_id",
        "run",
        "--init_id",
        "initialize",
        "--dataset_dir",
        str(missing),
        "--output_dir",
        str(tmp_path / "run"),
        "--mlflow",
        "False",
    )
    assert r.returncode != 0
    tail = _last_lines(r.stderr, 2)
    assert str(missing) in tail and "dataset folder does not exist" in tail, tail
    assert "Failed to evaluate" not in tail


@pytest.mark.parametrize(
    "config, typo, meant",
    [
        ("train", "--epoch", "--epochs"),
        ("evaluate", "--batch_sise", "--batch_size"),
        ("inference", "--inputs", "--input"),
    ],
)
def test_unknown_override_refused(config, typo, meant, tmp_path):
    """``--epoch 1`` used to train the full 25 epochs: an id that is not a top-level id of the
    bundle is refused before anything runs, with the closest known one."""
    out = tmp_path / "run"
    r = _bundle(
        "run",
        "--config_file",
        "bundles/brainmri/train.json"
        if config == "train"
        else f"['bundles/brainmri/train.json','bundles/brainmri/{config}.json']",
        "--output_dir",
        str(out),
        "--dataset_dir",
        str(tmp_path / "data"),
        typo,
        "1",
    )
    assert r.returncode != 0
    tail = _last_lines(r.stderr, 2)
    assert f"unknown option {typo}" in tail and f"did you mean {meant}?" in tail, tail
    assert not out.exists()  # refused before the output folder is even made
    if config != "train":
        return
    # the same through --args_file and with the --key=value form
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"config_file": f"bundles/brainmri/{config}.json", typo[2:]: 1}))
    r = _bundle("run", "--args_file", str(args), f"--output_dir={out}")
    assert r.returncode != 0 and f"did you mean {meant}?" in _last_lines(r.stderr, 2), r.stderr[-2000:]


def test_deleted_training_file_rerun_says_what_to_do(tiny_run, tmp_path):
    """A training file deleted after the split: the rerun names split.json and the missing file and
    says what to do; following the advice (delete split.json and the checkpoint) trains again."""
    data0, out0 = tiny_run
    data, out = tmp_path / "data", tmp_path / "run"
    shutil.copytree(data0, data)
    out.mkdir()
    for f in ("split.json", "checkpoint.pt"):
        shutil.copy(out0 / f, out / f)
    split = json.loads((out / "split.json").read_text())
    gone = data / split["train"][0]["image"]
    gone.unlink()
    args = [
        "run",
        "--config_file",
        "bundles/brainmri/train.json",
        "--dataset_dir",
        str(data),
        "--output_dir",
        str(out),
        "--mlflow",
        "False",
        *TINY,
    ]
    r = _bundle(*args)
    assert r.returncode != 0
    tail = _last_lines(r.stderr, 2)
    assert str(out / "split.json") in tail and "1 file it lists does not exist" in tail and str(gone) in tail, tail
    assert "Restore it" in tail and f"delete {out / 'split.json'}" in tail and "checkpoint.pt" in tail, tail
    (out / "split.json").unlink()
    (out / "checkpoint.pt").unlink()
    r = _bundle(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert str(gone.relative_to(data)) not in (out / "split.json").read_text()


def test_onnx_export_without_onnx_names_the_extra(tiny_checkpoint, tmp_path):
    """Without the ``onnx`` package the export CLI says which extra to install (and writes nothing)."""
    out = tmp_path / "model.onnx"
    code = (
        "import sys; sys.modules['onnx'] = None  # as if onnx were not installed\n"
        "from monai_skipts.export import main\n"
        f"sys.exit(main(['--checkpoint', {str(tiny_checkpoint)!r}, '--format', 'onnx', '--out', {str(out)!r}]))"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 1
    tail = _last_lines(r.stderr, 1)
    assert "onnx" in tail and 'pip install "monai-skipts[export]"' in tail, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not out.exists()


def test_demo_registers_as_skipts_demo_and_metadata_matches_its_size():
    """The demo registers ``skipts-demo`` (``models:/skipts-<name>@champion``), and every
    bundle's metadata.json states the spatial size the bundle trains at."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles/demo/train.json"))
    assert parser.get_parsed_content("registered_model_name") == "skipts-demo"
    for train in sorted((REPO / "bundles").glob("*/train.json")):
        if train.parent.name == "common":
            continue
        size = json.loads(train.read_text())["spatial_size"]
        meta = json.loads((train.parent / "metadata.json").read_text())
        fmt = meta["network_data_format"]
        assert fmt["inputs"]["image"]["spatial_shape"] == [size, size], train.parent.name
        assert fmt["outputs"]["pred"]["spatial_shape"] == [size, size], train.parent.name
        assert f"3 x {size} x {size}" in meta["image_classes"], train.parent.name


def test_label_checkpoint_paths_resolve_against_the_start_folder(tmp_path, monkeypatch):
    """A relative ``--conf checkpoint runs/...`` means the folder MONAI Label was started from (the
    app test in tests/label checks the real app)."""
    from monai_skipts.label import APP_DIR, scorer_options

    monkeypatch.chdir(tmp_path)
    ckpt, _ = scorer_options({"checkpoint": "runs/x/model.pt"})
    assert ckpt == tmp_path / "runs/x/model.pt"
    ckpt, _ = scorer_options({"checkpoint": "runs/x/model.pt"}, base_dir=APP_DIR)  # an explicit base still wins
    assert ckpt == APP_DIR / "runs/x/model.pt"


def test_ckpt_export_refuses_a_shape_the_model_was_not_trained_at(tiny_checkpoint, tmp_path):
    """``ckpt_export --input_shape "[1, 3, 64, 64]"`` on a model trained at 32² used to export a model
    whose scores differ from the ONNX one; it is refused, naming both sizes. The trained size exports."""

    def export(size: int, out: Path) -> subprocess.CompletedProcess:
        return _bundle(
            "ckpt_export",
            "predictor_def",
            "--config_file",
            "bundles/demo/train.json",
            "--ckpt_file",
            str(tiny_checkpoint),
            "--filepath",
            str(out),
            "--use_trace",
            "True",
            "--input_shape",
            f"[1, 3, {size}, {size}]",
            "--converter_kwargs",
            "{'check_trace': False}",
            "--teacher",
            "efficientnet_lite0",
            "--output_dir",
            str(tmp_path),
            # the tiny checkpoint is SkipTS's own defaults (the paper's), not the bundle's default
            "--skip",
            "add",
            "--bottleneck",
            "False",
            "--level_stats",
            "False",
        )

    r = export(64, tmp_path / "wrong.ts")
    assert r.returncode != 0 and not (tmp_path / "wrong.ts").exists()
    tail = _last_lines(r.stderr, 2)
    assert "64" in tail and "32" in tail and "trained at" in tail, tail
    r = export(32, tmp_path / "right.ts")
    assert r.returncode == 0, r.stderr[-3000:]
    ts = torch.jit.load(str(tmp_path / "right.ts"))
    amap, score = ts(torch.zeros(1, 3, 32, 32))
    assert amap.shape == (1, 1, 32, 32) and score.shape == (1,)
    # the export CLI takes the checkpoint's size, and refuses another one given explicitly
    from monai_skipts.export import main

    assert (
        main(
            [
                "--checkpoint",
                str(tiny_checkpoint),
                "--format",
                "torchscript",
                "--out",
                str(tmp_path / "x.ts"),
                "--spatial-size",
                "64",
                "--no-verify",
            ]
        )
        == 1
    )
    assert not (tmp_path / "x.ts").exists()


DECISION_KEYS = {
    "decision_threshold",
    "sensitivity_at_decision",
    "specificity_at_decision",
    "tp_at_decision",
    "fp_at_decision",
    "tn_at_decision",
    "fn_at_decision",
}
YOUDEN_KEYS = {
    "youden_threshold_on_test",
    "sensitivity_at_youden",
    "specificity_at_youden",
    "tp_at_youden",
    "fp_at_youden",
    "tn_at_youden",
    "fn_at_youden",
}


def test_metrics_say_which_threshold_they_belong_to(tiny_run):
    """metrics.json (and MLflow) name the test-set Youden threshold and the calibrated decision
    threshold so that neither is mistaken for the other."""
    from mlflow.tracking import MlflowClient

    _, out = tiny_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert DECISION_KEYS | YOUDEN_KEYS <= set(metrics)
    ambiguous = {"threshold", "tp", "fp", "tn", "fn", "sensitivity", "specificity", "precision", "f1", "accuracy"}
    assert not ambiguous & set(metrics) and not [k for k in metrics if k.startswith("cal_")]
    assert metrics["fp_at_decision"] + metrics["tn_at_decision"] == metrics["n_normal"]
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlruns.db'}")
    exp = client.get_experiment_by_name("monai-skipts-brainmri")
    (run,) = client.search_runs([exp.experiment_id])
    logged = set(run.data.metrics)
    want = {"test_decision_threshold", "test_tp_at_decision", "test_youden_threshold_on_test", "test_tp_at_youden"}
    assert want <= logged
    assert "test_threshold" not in logged and "test_tp" not in logged


def test_an_override_without_its_train_json_is_refused_with_the_command_that_works(monkeypatch):
    """``evaluate.json`` and ``inference.json`` are merged over ``train.json``: given alone, the run stops
    at once naming the file and the ``--config_file`` that works (not with an unknown-option error)."""
    from monai_skipts.bundle.checks import check_command_line

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # check_command_line installs its hook
    main = "/site-packages/monai/bundle/__main__.py"  # what sys.argv[0] is under python -m monai.bundle
    for kind in ("evaluate", "inference"):
        want = f"'bundles/brainmri/train.json','bundles/brainmri/{kind}.json'"
        with pytest.raises(ValueError, match=f"bundles/brainmri/{kind}.json is an override") as e:
            check_command_line([main, "run", "--config_file", f"bundles/brainmri/{kind}.json", "--output_dir", "x"])
        assert want in str(e.value)
        check_command_line([main, "run", "--config_file", f"[{want}]", "--output_dir", "x"])  # both: accepted


def test_docstring_examples_run():
    run_doctests(checks)


def test_expression_share_counts_only_dollar_values(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"$key": 1, "a": "$@b.run()", "b": {"_target_": "X", "c": ["@d", "$1 + 2"]}, "e": "plain"}))
    assert bundle.expression_share(f) == (len("$@b.run()") + len("$1 + 2"), len(f.read_text()))


# ---- the segmentation head's options, checked before training --------------------------------------------


def _seg_head_check(**over):
    """The demo training bundle parsed by MONAI's ``ConfigParser`` with ``over``, and a function that runs
    its ``check_seg_head`` step (it comes after the flag check and before the output folder is made)."""
    from monai.bundle import ConfigParser

    cfg = ConfigParser()
    cfg.read_config(str(REPO / "bundles" / "demo" / "train.json"))
    cfg.update(over)
    targets = [step.get("_target_") for step in cfg["initialize"]]
    i = targets.index("monai_skipts.bundle.check_seg_head")
    assert targets.index("monai_skipts.utils.check_flags") < i < targets.index("monai_skipts.bundle.prepare_output_dir")
    assert cfg["run"].index("$@train#trainer.run()") < cfg["run"].index("$@seg_head_stage()")
    return lambda: cfg.get_parsed_content(f"initialize#{i}")


@pytest.mark.parametrize(
    "seg_head, message",
    [
        ({"epoch": 2}, "seg_head: unknown options ['epoch']; did you mean 'epochs'?"),
        ({"mode": "discrepancy"}, "seg_head mode must be 'map' or 'fused', got 'discrepancy'"),
        ({"mode": "fused", "epochs": 0}, "seg_head epochs must be an integer >= 1, got 0"),
        ({"loss": "mse"}, "seg_head loss must be one of ['focal_l1', 'bce_dice'], got 'mse'"),
    ],
)
def test_bad_seg_head_option_refused_by_the_bundle_config(seg_head, message):
    check = _seg_head_check(seg_head=seg_head, calibration="empirical")
    with pytest.raises(RuntimeError) as e:  # MONAI wraps the step's error; its root cause names the option
        check()
    root = checks.root_cause(e.value)
    assert isinstance(root, ValueError) and message in str(root), root


@pytest.mark.parametrize("folds", [2, 5])
def test_seg_head_with_cross_fitted_calibration_refused_by_the_bundle_config(folds):
    check = _seg_head_check(seg_head={"mode": "fused"}, calibration_folds=folds, calibration="empirical")
    with pytest.raises(RuntimeError) as e:
        check()
    root = str(checks.root_cause(e.value))
    assert f"seg_head with calibration_folds={folds} is not supported" in root
    assert "trains a student per fold" in root and "--calibration_folds 0" in root and "--seg_head None" in root


@pytest.mark.parametrize(
    "seg_head, folds, calibration, warns",
    [
        ({"mode": "map"}, 0, "lognormal", True),
        ({"mode": "map"}, 1, "gaussian", True),
        ({}, 0, "lognormal", True),  # the default mode is "map"
        ({"mode": "map"}, 0, "empirical", False),
        ({"mode": "fused"}, 0, "lognormal", False),
        (None, 5, "lognormal", False),  # no head: nothing to check
    ],
)
def test_seg_head_map_with_parametric_calibration_warns(seg_head, folds, calibration, warns):
    import warnings

    check = _seg_head_check(seg_head=seg_head, calibration_folds=folds, calibration=calibration)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        check()
    ours = [w for w in seen if issubclass(w.category, SegHeadCalibrationWarning)]
    assert len(ours) == int(warns), [str(w.message) for w in seen]
    if warns:
        text = str(ours[0].message)
        assert f"seg_head mode 'map' with calibration {calibration!r}" in text
        assert "use --calibration empirical" in text


def test_bad_seg_head_stops_the_bundle_run_before_anything_is_made(tmp_path):
    """The user's command: a bad loss and a head with cross-fitted calibration stop the run in its
    ``initialize``, the root cause last, before the output folder (the phantom, a checkpoint) exists."""
    for i, over in enumerate(
        [
            {"seg_head": "{'mode': 'map', 'loss': 'mse'}", "calibration_folds": 0},
            {"seg_head": "{'mode': 'fused'}", "calibration_folds": 3},
        ]
    ):
        out = tmp_path / f"run{i}"
        args = {**{k: v for k, v in TINY_TRAINING.items() if k != "mlflow"}, "mlflow": False, **over}
        r = _bundle("run", "--config_file", "bundles/demo/train.json", "--output_dir", str(out), *override_args(args))
        assert r.returncode != 0
        tail = _last_lines(r.stderr, 2)
        want = "seg_head loss must be one of" if i == 0 else "seg_head with calibration_folds=3 is not supported"
        assert want in tail, r.stderr[-3000:]
        assert not out.exists()


def test_seg_head_map_warning_is_printed_before_training(tmp_path):
    """The user's command with the head's map and the default lognormal calibration: the warning is on
    stderr, from ``initialize`` (here the run then stops at the next check: 8 phantom images leave too few
    validation normals for a lognormal fit, so nothing is trained)."""
    out = tmp_path / "run"
    args = {**TINY_TRAINING, "calibration": "lognormal", "target_fpr": 0.05, "seg_head": "{'mode': 'map'}"}
    r = _bundle(
        "run",
        "--config_file",
        "bundles/demo/train.json",
        "--output_dir",
        str(out),
        "--n_train_images",
        "8",
        *override_args(args),
    )
    assert r.returncode != 0
    warning = "seg_head mode 'map' with calibration 'lognormal'"
    assert warning in r.stderr and "use --calibration empirical" in r.stderr, r.stderr[-3000:]
    assert r.stderr.index(warning) < r.stderr.index("validation normals cannot calibrate")
    assert not (out / "checkpoint.pt").exists()
