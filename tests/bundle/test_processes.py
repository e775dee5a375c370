"""A run's folder and processes (:mod:`monai_skipts.bundle.processes`): seeded, created and locked
against a second training; the ``torchrun`` process group joined and left; the rank switch."""

from __future__ import annotations

import subprocess
import sys

import torch
from conftest import run_doctests

from monai_skipts import bundle
from monai_skipts.bundle import processes


def test_docstring_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_doctests(processes)


def test_output_dir_is_seeded_created_and_locked(tmp_path):
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
