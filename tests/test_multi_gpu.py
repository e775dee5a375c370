"""torchrun with 2 processes on the CPU (gloo): DDP on the student only, identical weights on both ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from conftest import REPO


def test_torchrun_two_ranks_cpu_gloo_identical_students(tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "tests" / "ddp_worker.py"),
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MONAI_SKIPTS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    w0 = torch.load(out / "student_rank0.pt", weights_only=True)
    w1 = torch.load(out / "student_rank1.pt", weights_only=True)
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    ckpt = torch.load(out / "model.pt", weights_only=True)  # written once, by rank 0, without DDP prefixes
    assert all(torch.equal(ckpt["state_dict"][f"model.student.{k}"], w0[k]) for k in w0)
    assert json.loads((out / "metrics.json").read_text())["n_images"] == 40  # full test set, each id once


def test_multi_gpu_config_extends_the_training_initialize_and_finalize():
    """multi_gpu_train.json adds to train.json's ``initialize``/``finalize`` (MONAI's ``+`` merge): the
    flag check (level_stats and bottleneck included) and the calibration-split check stay, the process
    group is joined after them and left at the end."""
    from monai.bundle import ConfigParser

    files = [str(REPO / "bundles/brainmri/train.json"), str(REPO / "bundles/common/multi_gpu_train.json")]
    merged = ConfigParser.load_config_files(files)
    train = ConfigParser.load_config_files(files[:1])
    targets = [step["_target_"] for step in merged["initialize"]]
    assert merged["initialize"][: len(train["initialize"])] == train["initialize"]
    assert targets[-1] == "monai_skipts.bundle.init_distributed"
    assert "monai_skipts.handlers.training.check_calibration_split" in targets
    flags = next(s for s in merged["initialize"] if s["_target_"] == "monai_skipts.utils.check_flags")
    assert {"level_stats", "bottleneck"} <= set(flags)
    assert [s["_target_"] for s in merged["finalize"]] == [
        "monai_skipts.bundle.release_output_dir",
        "monai_skipts.bundle.end_distributed",
    ]
