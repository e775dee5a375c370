"""Training under hostile conditions: each case is reproduced with the real
parts (the bundle command in a subprocess, MLflow's sqlite store, real files, real write failures)
and must stay fixed.

- two trainings in one output folder: the second stops at once, naming the folder and the PID
  that holds it.
- a NaN pixel: the training stops at the first non-finite loss naming the images, and writes
  no NaN weights; under AMP a batch whose fp16 loss overflows is trained again in fp32 first.
- a full disk (a real short write, as ``RLIMIT_FSIZE`` gives) names the file being written
  instead of ``[enforce fail at inline_container.cc] unexpected pos``; nothing half-written is left.
- too few (or all identical) validation normals stop the run before training, saying how many
  duplicates were removed; no checkpoint, no MLflow run left RUNNING.
- a run killed by SIGKILL and never resumed is marked KILLED in MLflow by the next start in
  that folder.
- offline, the missing wide_resnet50_2 weights are reported once, in one line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BUNDLE_ENV, REPO, tiny_training_command

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from monai_skipts.apps import make_phantom_dataset

    return make_phantom_dataset(
        tmp_path_factory.mktemp("phantom"), n_train=12, n_test_normal=4, n_test_abnormal=4, size=64, seed=0
    )


def _run(cmd: list[str], env: dict | None = None, timeout: int = 600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=REPO, env=env or BUNDLE_ENV, capture_output=True, text=True, timeout=timeout, **kwargs
    )


def _tmp_files(root: Path) -> list[Path]:
    return [p for p in Path(root).rglob("*") if p.name.endswith(".tmp")]


def _client(out: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{out / 'mlruns.db'}")


# ---------------------------------------------------------------------------------------------


_HOLD_LOCK = """
import fcntl, os, sys, time
folder = sys.argv[1]
os.makedirs(folder, exist_ok=True)
fd = os.open(os.path.join(folder, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.ftruncate(fd, 0)
os.write(fd, f"{os.getpid()}\\n".encode())
print("locked", flush=True)
time.sleep(600)
"""


def test_output_dir_locked(data_dir, tmp_path):
    """A training already holds the folder (here: a real second process holding the OS lock on
    ``<output_dir>/.lock``, as a training does): a second training in the same folder stops before
    writing anything (no split, no checkpoint, no MLflow store), naming the folder and the holder's
    PID. Once the holder is gone (killed: its PID is still written in ``.lock``), the folder is free."""
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(out)], cwd=REPO, env=BUNDLE_ENV, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = _run(tiny_training_command(data_dir, out, mlflow=True))
        log = r.stdout + r.stderr
        assert r.returncode != 0, log[-3000:]
        assert f"{out} is in use by another training (PID {holder.pid}" in log, log[-3000:]
        assert sorted(p.name for p in out.iterdir()) == [".lock"], "the second run wrote into the locked folder"
    finally:
        holder.kill()
        holder.wait()
    from monai_skipts.utils import lock_output_dir, unlock_output_dir

    assert (out / ".lock").read_text().strip() == str(holder.pid)  # a stale lock file of a dead process
    assert lock_output_dir(out) == out / ".lock"  # taken over: flock died with its process
    assert (out / ".lock").read_text().strip() == str(os.getpid())
    unlock_output_dir(out)


# ---------------------------------------------------------------------------------------------


def test_nan_pixel_stops_training_naming_the_image(data_dir, tmp_path):
    """Three training images get one NaN pixel after loading (as a loader that let one through
    would give): the run stops at the first non-finite loss, naming the poisoned image(s) of that
    batch, and writes neither model.pt nor a checkpoint with NaN weights."""
    poisoned = ["train/good/001.png", "train/good/003.png", "train/good/005.png"]
    override = tmp_path / "nan_pixel.json"
    inject = (
        "monai.transforms.Lambda(lambda d: (d['image'].__setitem__((0, 5, 5), float('nan')), d)[1] "
        f"if d['id'] in {poisoned!r} else d)"
    )
    override.write_text(
        json.dumps(
            {
                "preprocessing_clean": "%transforms/xray.json#preprocessing",
                "preprocessing": f"$list(@preprocessing_clean) + [{inject}]",
            }
        )
    )
    out = tmp_path / "run"
    config = f"['bundles/demo/train.json', '{override}']"
    r = _run(tiny_training_command(data_dir, out, config=config, epochs=2))
    log = r.stdout + r.stderr
    assert r.returncode != 0, log[-3000:]
    train_ids = {it["id"] for it in json.loads((out / "split.json").read_text())["train"]}
    bad = [p for p in poisoned if p in train_ids]
    assert bad, "no poisoned image in the training split"
    assert "non-finite training loss" in log, log[-3000:]
    line = next(ln for ln in log.splitlines() if "non-finite training loss" in ln)
    assert any(p in line for p in bad) and "non-finite pixel values" in line, line
    assert not (out / "model.pt").exists()
    if (out / "checkpoint.pt").exists():
        ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
        student = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("model.student.")}
        assert student and all(torch.isfinite(v).all() for v in student.values() if v.is_floating_point())


def _amp_trainer(fault_calls: set[int]):
    """A real SkipTSTrainer on this CPU with AMP switched on as on a CUDA device (autocast("cuda") is
    a no-op here, a CPU GradScaler scales the loss) and a student whose output is NaN at the
    forward calls numbered in ``fault_calls`` (on a GPU a fp16 overflow does this)."""
    from monai.data import DataLoader

    from monai_skipts.engines import SkipTSTrainer
    from monai_skipts.networks import SkipTS

    torch.manual_seed(0)
    model = SkipTS("efficientnet_lite0")
    data = [{"image": torch.randn(3, 64, 64), "label": 0, "id": f"img{i}.png"} for i in range(4)]
    trainer = SkipTSTrainer("cpu", 1, DataLoader(data, batch_size=2), model, amp=False)
    trainer.amp, trainer.scaler = True, torch.amp.GradScaler("cpu")
    calls = []

    def fault(m, i, o):
        calls.append(1)
        return [t * float("nan") for t in o] if len(calls) in fault_calls else o

    model.student.register_forward_hook(fault)
    return trainer, model, calls


def test_amp_nonfinite_loss_is_retrained_in_fp32(caplog):
    """Under AMP a loss that is non-finite in fp16 does not stop the run: the batch is trained again
    in fp32 (AMP back on for the next batch); only a loss that stays non-finite in fp32 stops it."""
    trainer, model, calls = _amp_trainer({1})
    with caplog.at_level(logging.WARNING):
        trainer.run()
    assert len(calls) == 3 and trainer.amp  # batch 1 twice (fp16, then fp32), batch 2 once
    assert trainer.state.iteration == 2 and np.isfinite(trainer.state.output["loss"].item())
    assert all(torch.isfinite(p).all() for p in model.student.parameters())
    assert any("non-finite loss under AMP" in r.getMessage() and "img0.png" in r.getMessage() for r in caplog.records)

    from monai_skipts.engines import NonFiniteLossError

    trainer, model, calls = _amp_trainer({1, 2})
    before = [p.detach().clone() for p in model.student.parameters()]
    with pytest.raises(NonFiniteLossError, match=r"img0\.png.*img1\.png"):
        trainer.run()
    assert len(calls) == 2  # fp16 and fp32 both non-finite: stopped, no step taken
    assert all(torch.equal(a, b) for a, b in zip(before, model.student.parameters()))


# ---------------------------------------------------------------------------------------------


def _limit_file_size(nbytes: int):
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return limit


def test_disk_full_names_the_file(data_dir, tmp_path):
    """A disk that fills up mid-write: the kernel writes part of the data, and torch.save then fails
    with ``[enforce fail at inline_container.cc:672] unexpected pos``. A file size limit
    (RLIMIT_FSIZE) gives the same real short write. The error names the file and says the disk may be
    full; no temp file is left, and a previous checkpoint survives."""
    out = tmp_path / "run"
    r = _run(tiny_training_command(data_dir, out), preexec_fn=_limit_file_size(4 << 20))  # checkpoint.pt is ~20 MB
    log = r.stdout + r.stderr
    assert r.returncode != 0, log[-3000:]
    ckpt = out / "checkpoint.pt"
    assert f"could not write {ckpt}" in log and "the disk may be full" in log, log[-3000:]
    assert (out / "split.json").is_file() and not ckpt.exists() and not _tmp_files(out)

    # the same in this process, over a previous version of the file
    from monai_skipts.checkpoint import load_checkpoint, save_checkpoint
    from monai_skipts.networks import SkipTS

    model = SkipTS("efficientnet_lite0")
    path = save_checkpoint(tmp_path / "model.pt", model, epoch=1)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
    try:
        with pytest.raises(OSError, match="the disk may be full") as err:
            save_checkpoint(path, model, epoch=2)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert str(path) in str(err.value) and "unexpected pos" in str(err.value.__cause__)
    assert load_checkpoint(path)["epoch"] == 1 and not _tmp_files(tmp_path)


# ---------------------------------------------------------------------------------------------


def _brainmri(root: Path, n_normal: int, identical: bool) -> None:
    from PIL import Image

    for i in range(n_normal):
        rng = np.random.default_rng(0 if identical else i)
        a = (rng.random((40, 40)) * 60 + 60).astype(np.uint8)
        (root / "no").mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(root / "no" / f"img{i:03d}.jpg")
    for i in range(3):
        a = (np.random.default_rng(100 + i).random((40, 40)) * 60 + 60).astype(np.uint8)
        a[14:20, 20:26] = 250
        (root / "yes").mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(root / "yes" / f"img{i:03d}.jpg")


@pytest.mark.parametrize("case", ["two_normals", "identical_normals"])
def test_too_few_calibration_normals_fail_before_training(case, tmp_path):
    """2 normals, or 12 normals that are one image 12 times (deduplicated to 1): the run stops before
    training, saying how many duplicates were removed; no checkpoint.pt, no MLflow run RUNNING."""
    data, out = tmp_path / "data", tmp_path / "run"
    _brainmri(data, 2 if case == "two_normals" else 12, identical=case == "identical_normals")
    r = _run(tiny_training_command(data, out, config="bundles/brainmri/train.json", mlflow=True))
    log = r.stdout + r.stderr
    assert r.returncode != 0, log[-3000:]
    assert "validation normals cannot calibrate target_fpr=0.5" in log, log[-3000:]
    if case == "identical_normals":
        assert "11 exact duplicates removed" in log, log[-3000:]
        msg = next(ln for ln in log.splitlines() if "cannot calibrate" in ln)
        assert "11 exact duplicates were removed" in msg, msg
    else:
        assert "0 exact duplicates removed" in log, log[-3000:]
    assert not (out / "checkpoint.pt").exists() and not (out / "model.pt").exists()
    if (out / "mlruns.db").exists():
        client = _client(out)
        runs = [run for e in client.search_experiments() for run in client.search_runs([e.experiment_id])]
        assert not [run for run in runs if run.info.status == "RUNNING"]


# ---------------------------------------------------------------------------------------------


def test_killed_run_marked_killed_on_next_start(data_dir, tmp_path):
    """A training killed by SIGKILL once its MLflow run exists, then a new training (not a resume) in
    the same folder: the killed run is marked KILLED (not left RUNNING forever), the new one FINISHED."""
    out = tmp_path / "run"
    cmd = tiny_training_command(data_dir, out, mlflow=True, register=False, epochs=20)
    log = tmp_path / "killed.log"
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=REPO, env=BUNDLE_ENV, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    killed_run = None
    try:
        deadline = time.time() + 300
        while p.poll() is None and time.time() < deadline and killed_run is None:
            time.sleep(0.5)
            if not (out / "mlruns.db").exists():
                continue
            # read-only and without MLflow: a client here would create/migrate the store while the
            # training does (a race of its own)
            try:
                with contextlib.closing(sqlite3.connect(f"file:{out / 'mlruns.db'}?mode=ro", uri=True)) as db:
                    rows = db.execute("SELECT run_uuid FROM runs WHERE status = 'RUNNING'").fetchall()
            except sqlite3.Error:  # the store is being created
                continue
            if rows:
                os.killpg(p.pid, signal.SIGKILL)
                killed_run = rows[0][0]
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    assert killed_run is not None and p.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    assert _client(out).get_run(killed_run).info.status == "RUNNING"

    r = _run(tiny_training_command(data_dir, out, mlflow=True, register=False, resume=False))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"was left RUNNING by process {p.pid}" in r.stdout + r.stderr
    client = _client(out)
    assert client.get_run(killed_run).info.status == "KILLED"
    exp = client.get_experiment_by_name("monai-skipts-mvtec")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(run.info.status for run in runs) == ["FINISHED", "KILLED"]


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["offline_env", "no_network"])
def test_missing_wrn50_weights_said_once_in_one_line(how, tmp_path):
    """teacher 'auto' without the wide_resnet50_2 weights, offline (MONAI_SKIPTS_OFFLINE=1) or with the
    network unreachable (a proxy that refuses connections): one line names the missing weights file,
    where to put it and the fallback teacher; no download error, no second line about it."""
    from monai_skipts.apps import make_phantom_dataset

    data = make_phantom_dataset(tmp_path / "data", n_train=8, n_test_normal=2, n_test_abnormal=2, size=64, seed=0)
    env = {**BUNDLE_ENV, "TORCH_HOME": str(tmp_path / "torch_home")}
    if how == "no_network":
        env.pop("MONAI_SKIPTS_OFFLINE")
        for k in ("no_proxy", "NO_PROXY"):
            env.pop(k, None)
        env.update(https_proxy="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")
    out = tmp_path / "run"
    r = _run(tiny_training_command(data, out, teacher="auto"), env=env)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    lines = [ln for ln in log.splitlines() if "wide_resnet50_2" in ln]
    assert len(lines) == 1, lines
    (line,) = lines
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    assert "wide_resnet50_2-95faca4d.pth" in line and str(cache) in line and "teacher_weights" in line, line
    assert "using the offline teacher 'efficientnet_lite0'" in line, line
    assert "could not download" not in log and "Traceback" not in log
    assert torch.load(out / "model.pt", weights_only=True)["config"]["model"]["teacher"] == "efficientnet_lite0"
