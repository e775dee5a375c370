"""MLflow for the bundles (:mod:`monai_skipts.bundle.tracking`): names (a resumed training keeps its
run name), the store, and the registration that a switch or a missing bundle folder does not break."""

from __future__ import annotations

import json

import pytest
from conftest import run_doctests, save_test_checkpoint

from monai_skipts import bundle
from monai_skipts.bundle import tracking


def test_docstring_examples_run():
    run_doctests(tracking)


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
    with caplog.at_level("WARNING", logger=tracking.__name__):
        info = bundle.register_model(**args, bundle_root="bundles/no_such_bundle")
    assert info["version"] == "2" and "bundles/no_such_bundle not found" in caplog.text
