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
