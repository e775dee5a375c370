"""Running unattended: resume after kill -9, atomic writes under a full disk, safe checkpoint
loading, deterministic runs. The crash test runs the real bundle command in a subprocess."""

from __future__ import annotations

import ast
import errno
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import REPO
from ignite.engine import Engine
from monai.bundle import run as bundle_run

from monai_skipts.checkpoint import (
    CHECKPOINT_KIND,
    CheckpointError,
    UnsafeCheckpointError,
    check_teacher,
    load_checkpoint,
    load_detector,
    save_checkpoint,
)
from monai_skipts.data import EpochSeededSampler, epoch_permutation, save_split
from monai_skipts.handlers import AnomalyScoreHandler, SkipTSCheckpointHandler, ThresholdCalibrator
from monai_skipts.handlers.plots import _save_fig
from monai_skipts.handlers.training import resumed_run_name
from monai_skipts.networks import AnomalyDetector
from monai_skipts.utils import save_map_png

PKG = REPO / "monai_skipts"
EPOCHS = 4
ENV = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
ENV.update(MONAI_SKIPTS_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _tmp_files(root: Path) -> list[Path]:
    return [p for p in Path(root).rglob("*") if p.name.endswith(".tmp")]


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# crash and resume


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from monai_skipts.apps import make_phantom_dataset

    return make_phantom_dataset(
        tmp_path_factory.mktemp("phantom"), n_train=16, n_test_normal=4, n_test_abnormal=4, size=64, seed=0
    )


def _train_cmd(data: Path, out: Path, epochs: int = EPOCHS, seed: int = 0) -> list[str]:
    return [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "bundles/demo/train.json",
        "--dataset_dir",
        str(data),
        "--output_dir",
        str(out),
        "--epochs",
        str(epochs),
        "--seed",
        str(seed),
        "--spatial_size",
        "64",
        "--batch_size",
        "4",
        "--teacher",
        "efficientnet_lite0",
        "--val_interval",
        "1",
        "--progress_bar",
        "False",
        "--n_heatmaps",
        "0",
        "--save_maps",
        "False",
        "--target_fpr",
        "0.5",
        "--calibration",
        "empirical",
    ]


@pytest.fixture(scope="module")
def reference_run(data_dir, tmp_path_factory):
    """The uninterrupted run: the same bundle and overrides, in this process, one thread, no MLflow
    (tracking does not touch training)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    args = _train_cmd(data_dir, out)[6:]
    over = {k[2:]: v for k, v in zip(args[::2], args[1::2])}
    over.update(
        epochs=EPOCHS,
        seed=0,
        spatial_size=64,
        batch_size=4,
        val_interval=1,
        n_heatmaps=0,
        progress_bar=False,
        save_maps=False,
        mlflow=False,
        target_fpr=0.5,
        calibration="empirical",
    )
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        bundle_run(config_file="bundles/demo/train.json", **over)
    finally:
        os.chdir(cwd)
    return out


def _student(ckpt: dict) -> dict:
    return {k: v for k, v in ckpt["state_dict"].items() if k.startswith("model.student.")}


def _assert_same_training_state(a: dict, b: dict) -> None:
    assert a["epoch"] == b["epoch"] and a["iteration"] == b["iteration"]
    assert _student(a).keys() == _student(b).keys()
    for k in _student(a):
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), f"student tensor {k} differs"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in sa:
            assert torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])), f"optimizer state {k} differs"


def test_kill_9_mid_training_then_same_command_resumes_to_identical_weights(data_dir, reference_run, tmp_path):
    out = tmp_path / "run"
    ckpt = out / "checkpoint.pt"
    log = tmp_path / "killed.log"
    cmd = _train_cmd(data_dir, out)
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    deadline, seen = time.time() + 600, None
    try:
        while p.poll() is None and time.time() < deadline:
            try:
                st = os.stat(ckpt)
            except FileNotFoundError:
                st = None
            if st is not None and (st.st_ino, st.st_mtime_ns) != seen:  # a new checkpoint: read its epoch
                seen = (st.st_ino, st.st_mtime_ns)
                try:
                    epoch = load_checkpoint(ckpt)["epoch"]
                except (CheckpointError, OSError):
                    epoch = 0
                if epoch >= 2:
                    os.killpg(p.pid, signal.SIGKILL)
                    break
            time.sleep(0.01)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    assert p.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{log.read_text()[-3000:]}"
    killed_at = load_checkpoint(ckpt)["epoch"]  # the last complete checkpoint is readable
    assert 2 <= killed_at < EPOCHS and not (out / "model.pt").exists()

    r = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"resumed from {ckpt} at epoch {killed_at} of {EPOCHS}" in r.stdout + r.stderr

    # same student (and optimizer) as the uninterrupted run, bit for bit; same test scores
    _assert_same_training_state(load_checkpoint(reference_run / "checkpoint.pt"), load_checkpoint(ckpt))
    ref_model, model = load_checkpoint(reference_run / "model.pt"), load_checkpoint(out / "model.pt")
    assert all(torch.equal(ref_model["state_dict"][k], model["state_dict"][k]) for k in _student(ref_model))
    assert (out / "scores.csv").read_text() == (reference_run / "scores.csv").read_text()
    assert not _tmp_files(out), "a temp file was left behind"

    # MLflow: the resumed run continued the killed run (one run, finished, epochs after the kill logged once)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlruns.db'}")
    exp = client.get_experiment_by_name("monai-skipts-mvtec")
    all_runs = client.search_runs([exp.experiment_id])
    runs = [r for r in all_runs if not r.info.run_name.startswith("register-")]  # the model registration's own run
    assert len(runs) == 1 and len(all_runs) == 2, [r.info.run_name for r in all_runs]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == load_checkpoint(ckpt)["extra"]["run_name"]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert len(steps) == len(set(steps)) and set(range(killed_at + 1, EPOCHS + 1)) <= set(steps) <= set(
        range(1, EPOCHS + 1)
    )
    assert "test_auroc" in run.data.metrics


def test_rerun_of_a_finished_training_does_not_train_again(reference_run, data_dir, tmp_path, monkeypatch):
    out = shutil.copytree(reference_run, tmp_path / "run")
    ckpt = out / "checkpoint.pt"
    before = os.stat(ckpt)
    monkeypatch.chdir(REPO)
    bundle_run(
        config_file="bundles/demo/train.json",
        dataset_dir=str(data_dir),
        output_dir=str(out),
        epochs=EPOCHS,
        spatial_size=64,
        batch_size=4,
        teacher="efficientnet_lite0",
        progress_bar=False,
        n_heatmaps=0,
        save_maps=False,
        mlflow=False,
        target_fpr=0.5,
        calibration="empirical",
    )
    after = os.stat(ckpt)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), "checkpoint.pt was rewritten"
    model, done = load_checkpoint(out / "model.pt"), load_checkpoint(ckpt)
    assert done["epoch"] == EPOCHS
    assert all(torch.equal(model["state_dict"][k], done["state_dict"][k]) for k in _student(done))


# ---------------------------------------------------------------------------------------------
# the pieces of resuming, unit by unit


def test_epoch_seeded_sampler_depends_only_on_seed_and_epoch():
    data = list(range(50))
    a, b = EpochSeededSampler(data, seed=3), EpochSeededSampler(data, seed=3)
    a.set_epoch(7)
    for _ in range(3):
        list(b)  # iterating does not advance anything
    b.set_epoch(7)
    assert list(a) == list(b) == epoch_permutation(50, 3, 7) and sorted(a) == data
    orders = {tuple(epoch_permutation(50, s, e)) for s in range(3) for e in range(1, 4)}
    assert len(orders) == 9  # (seed 0, epoch 2) and (seed 1, epoch 1) differ too
    assert list(EpochSeededSampler(data, shuffle=False)) == data


class _Loader:
    """A stand-in DataLoader: a sampler, a generator and a dataset with ids."""

    def __init__(self, ids, seed=0):
        self.dataset = SimpleNamespace(data=[{"id": i} for i in ids])
        self.sampler = EpochSeededSampler(self.dataset.data, seed)
        self.generator = torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def lite0():
    from monai_skipts.networks import SkipTS

    torch.manual_seed(0)
    return SkipTS(teacher="efficientnet_lite0")


@pytest.fixture(scope="module")
def lite2():
    from monai_skipts.networks import SkipTS

    return SkipTS(teacher="efficientnet_lite2")


def _trainer(handler, loader, max_epochs, seen):
    def step(engine, batch):
        seen.append(
            (
                engine.state.epoch,
                list(loader.sampler),
                torch.randint(0, 10**9, (1,)).item(),
                torch.randint(0, 10**9, (1,), generator=loader.generator).item(),
            )
        )

    engine = Engine(step)
    handler.attach(engine)
    engine.run([0], max_epochs=max_epochs)
    return engine


def test_checkpoint_handler_restores_epoch_rng_sampler_and_generator(lite0, tmp_path):
    ids = [f"img{i}" for i in range(6)]
    opt = torch.optim.Adam(lite0.student.parameters())
    full: list = []
    torch.manual_seed(1)
    loader = _Loader(ids)
    _trainer(
        SkipTSCheckpointHandler(tmp_path / "full", AnomalyDetector(lite0), opt, data_loader=loader), loader, 4, full
    )

    part: list = []
    torch.manual_seed(1)
    loader = _Loader(ids)
    _trainer(
        SkipTSCheckpointHandler(tmp_path / "part", AnomalyDetector(lite0), opt, data_loader=loader), loader, 2, part
    )
    torch.manual_seed(999)  # a new process: other RNG states, a fresh generator
    loader = _Loader(ids)
    handler = SkipTSCheckpointHandler(tmp_path / "part", AnomalyDetector(lite0), opt, data_loader=loader)
    engine = _trainer(handler, loader, 4, part)
    assert handler.resumed_from == 2 and engine.state.epoch == 4
    assert [p[0] for p in part] == [1, 2, 3, 4]
    assert len({tuple(p[1]) for p in full}) > 1  # the order changes from epoch to epoch
    # the epochs after the resume drew the same sampler order, global RNG and generator values
    full_by_epoch = {p[0]: p[1:] for p in full}
    assert all(full_by_epoch[p[0]] == p[1:] for p in part)


def test_finished_checkpoint_ends_the_run_without_an_iteration(lite0, tmp_path):
    opt = torch.optim.Adam(lite0.student.parameters())
    save_checkpoint(tmp_path / "checkpoint.pt", AnomalyDetector(lite0), opt, epoch=3, iteration=30)
    before = os.stat(tmp_path / "checkpoint.pt")
    seen: list = []
    engine = _trainer(SkipTSCheckpointHandler(tmp_path, AnomalyDetector(lite0), opt), _Loader(["a"]), 3, seen)
    assert seen == [] and engine.state.epoch == 3 and engine.state.iteration == 30
    assert os.stat(tmp_path / "checkpoint.pt").st_mtime_ns == before.st_mtime_ns


def test_a_run_stopped_mid_epoch_keeps_the_last_complete_epoch(lite0, tmp_path):
    opt = torch.optim.Adam(lite0.student.parameters())
    handler = SkipTSCheckpointHandler(tmp_path, AnomalyDetector(lite0), opt)
    engine = Engine(lambda e, b: e.terminate() if e.state.epoch == 2 and e.state.iteration == 3 else None)
    handler.attach(engine)
    engine.run([0, 1], max_epochs=3)  # 2 iterations per epoch; stopped in the middle of epoch 2
    assert engine.state.epoch == 2 and load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1


def test_resume_refuses_another_training_split(lite0, tmp_path):
    opt = torch.optim.Adam(lite0.student.parameters())
    _trainer(
        SkipTSCheckpointHandler(tmp_path, AnomalyDetector(lite0), opt, data_loader=_Loader(["a", "b"])),
        _Loader(["a", "b"]),
        1,
        [],
    )
    loader = _Loader(["a", "c"])
    with pytest.raises(CheckpointError, match="another training split"):
        _trainer(SkipTSCheckpointHandler(tmp_path, AnomalyDetector(lite0), opt, data_loader=loader), loader, 2, [])


def test_resume_removes_temp_files_a_killed_write_left(lite0, tmp_path):
    stale = [tmp_path / ".checkpoint.pt.abc123_x.tmp", tmp_path / "maps" / ".a.png.k2j4h5g6.tmp"]
    kept = [tmp_path / "notes.tmp", tmp_path / "mlruns" / ".x.png.abcdefgh.tmp", tmp_path / ".hidden"]
    for p in stale + kept:
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"half a file")
    opt = torch.optim.Adam(lite0.student.parameters())
    _trainer(SkipTSCheckpointHandler(tmp_path, AnomalyDetector(lite0), opt), _Loader(["a"]), 1, [])
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    assert (tmp_path / "checkpoint.pt").is_file()


def test_resumed_run_name_comes_from_the_checkpoint(lite0, tmp_path):
    opt = torch.optim.Adam(lite0.student.parameters())
    handler = SkipTSCheckpointHandler(tmp_path, AnomalyDetector(lite0), opt, run_name="demo-seed0-20260101-000000")
    assert resumed_run_name(tmp_path / "checkpoint.pt") is None
    _trainer(handler, _Loader(["a"]), 1, [])
    assert resumed_run_name(tmp_path / "checkpoint.pt") == "demo-seed0-20260101-000000"
    assert resumed_run_name(tmp_path / "checkpoint.pt", resume=False) is None


# ---------------------------------------------------------------------------------------------
# atomic writes


class _TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.student = torch.nn.Linear(3, 2)
        self.config = {"teacher": "efficientnet_lite0", "teacher_weights_sha256": None}


def _write_checkpoint(d: Path) -> Path:
    net = AnomalyDetector(_TinyNet())
    return save_checkpoint(d / "checkpoint.pt", net, torch.optim.Adam(net.parameters()), epoch=1)


def _write_model(d: Path) -> Path:
    net = AnomalyDetector(_TinyNet())
    state = SimpleNamespace(state=SimpleNamespace(epoch=2))
    scores = SimpleNamespace(records=[{"score": float(s)} for s in range(5)])
    ThresholdCalibrator(state, scores, net, d, trainer=state)()
    return d / "model.pt"


def _write_scores(d: Path) -> Path:
    h = AnomalyScoreHandler(output_dir=d)
    h.records, h.metrics = [{"id": "a.png", "label": 0, "score": 1.0}], {"n_images": 1}
    h.write()
    return d / "scores.csv"


def _write_metrics(d: Path) -> Path:
    (d / "scores.csv").write_text("id,score\n")  # written first by the handler; let it succeed
    h = AnomalyScoreHandler(output_dir=d)
    h.records, h.metrics = [{"id": "a.png", "label": 0, "score": 1.0}], {"n_images": 1}
    h.write()
    return d / "metrics.json"


def _write_split(d: Path) -> Path:
    item = {"image": str(d / "a.png"), "label": 0, "id": "a.png"}
    return save_split(d / "split.json", {"train": [item], "val": [], "test": []}, d, seed=0)


def _write_map(d: Path) -> Path:
    save_map_png(d / "maps" / "a.png", np.random.default_rng(0).random((8, 8)), 1.0)
    return d / "maps" / "a.png"


def _write_plot(d: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    _save_fig(fig, d / "roc.png")
    plt.close(fig)
    return d / "roc.png"


def _write_predictions(d: Path) -> Path:
    from monai_skipts.inference_writers import write_csv

    write_csv(d / "predictions.csv", [{"id": "a.dcm", "score": 1.0}])
    return d / "predictions.csv"


WRITERS = {
    "checkpoint.pt": (_write_checkpoint, "checkpoint.pt"),
    "model.pt": (_write_model, "model.pt"),
    "threshold.json": (_write_model, "threshold.json"),
    "scores.csv": (_write_scores, "scores.csv"),
    "metrics.json": (_write_metrics, "metrics.json"),
    "split.json": (_write_split, "split.json"),
    "map png": (_write_map, "maps/a.png"),
    "roc.png": (_write_plot, "roc.png"),
    "predictions.csv": (_write_predictions, "predictions.csv"),
}


class _FullDiskFile:
    """A file object whose writes fail with ENOSPC once ``budget`` bytes are written."""

    def __init__(self, f, budget: int):
        self._f, self._budget = f, budget

    def write(self, data):
        if len(data) > self._budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._budget -= len(data)
        return self._f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self._f, name)


def _full_disk(monkeypatch, how: str, target: Path) -> None:
    """ENOSPC while writing ``target``'s temp file (other files write normally)."""
    import monai_skipts.utils as utils

    real_fdopen, real_fsync = os.fdopen, os.fsync
    names: dict[int, str] = {}

    def fdopen(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        names[fd] = os.readlink(f"/proc/self/fd/{fd}")
        mine = Path(names[fd]).name.startswith(f".{target.name}.")
        return _FullDiskFile(f, 16) if (how == "write" and mine) else f

    def fsync(fd):
        path = names.get(fd) or os.readlink(f"/proc/self/fd/{fd}")
        if how == "fsync" and Path(path).name.startswith(f".{target.name}."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(utils.os, "fdopen", fdopen)
    monkeypatch.setattr(utils.os, "fsync", fsync)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name the temp files")
@pytest.mark.parametrize("how", ["write", "fsync"])
@pytest.mark.parametrize("writer", list(WRITERS))
def test_full_disk_keeps_the_previous_file_and_names_it(writer, how, tmp_path, monkeypatch):
    write, rel = WRITERS[writer]
    target = tmp_path / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"previous version")
    _full_disk(monkeypatch, how, target)
    with pytest.raises(OSError) as err:
        write(tmp_path)
    assert err.value.errno == errno.ENOSPC
    assert str(target) in str(err.value) and "No space left" in str(err.value)
    assert target.read_bytes() == b"previous version"
    assert not _tmp_files(tmp_path), "a temp file was left behind"
    monkeypatch.undo()
    write(tmp_path)  # and with space the write goes through
    assert target.read_bytes() != b"previous version" and not _tmp_files(tmp_path)


_WRITE_CALLS = {
    "open": "builtin open() for writing",
    "write_text": "Path.write_text",
    "write_bytes": "Path.write_bytes",
    "dump": "json.dump/pickle.dump to a file",
    "save": "torch.save/np.save/nib.save/PIL save",
    "savefig": "savefig",
    "to_filename": "nibabel to_filename",
    "to_csv": "DataFrame.to_csv",
    "copy": "shutil.copy",
    "copy2": "shutil.copy2",
    "copyfile": "shutil.copyfile",
    "move": "shutil.move",
}
#: non-atomic-looking calls that are fine: (file, call, why)
_ALLOWED = {
    ("utils.py", "open"): "the atomic helpers themselves",
    ("registry.py", "copy2"): "copies configs into a temporary staging folder that MLflow then logs",
}


def _is_atomic_callback(node: ast.Call, parents: dict) -> bool:
    """``atomic_save(path, lambda f: torch.save(obj, f))``: the call sits in a lambda passed to atomic_save."""
    p = parents.get(node)
    while p is not None and not isinstance(p, ast.Lambda):
        p = parents.get(p)
    call = parents.get(p) if p is not None else None
    return isinstance(call, ast.Call) and getattr(call.func, "id", getattr(call.func, "attr", "")) == "atomic_save"


def _writes_to_memory(node: ast.Call) -> bool:
    """``fig.savefig(buf)`` / ``img.save(buf)`` with a BytesIO named buf, ``open(p, "rb")``..."""
    targets = node.args[:2] if getattr(node.func, "attr", "") == "save" else node.args[:1]  # torch.save(obj, buf)
    return any(isinstance(a, ast.Name) and a.id in ("buf", "buffer", "bio") for a in targets)


def _non_atomic_writes(paths) -> list[str]:
    offenders = []
    for path in paths:
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            if name not in _WRITE_CALLS or (path.name, name) in _ALLOWED:
                continue
            if name == "open":
                mode = (
                    node.args[1]
                    if len(node.args) > 1
                    else next((k.value for k in node.keywords if k.arg == "mode"), None)
                )
                if not (isinstance(mode, ast.Constant) and re.search(r"[wax+]", str(mode.value))):
                    continue
            if name in ("save", "savefig", "dump") and (_is_atomic_callback(node, parents) or _writes_to_memory(node)):
                continue
            if (
                name == "copy"
                and isinstance(node.func, ast.Attribute)
                and getattr(node.func.value, "id", "") != "shutil"
            ):
                continue  # dict.copy(), tensor.copy_ ...
            offenders.append(f"{path.name}:{node.lineno}: {_WRITE_CALLS[name]}")
    return offenders


def test_the_write_scan_finds_non_atomic_writes(tmp_path):
    src = tmp_path / "mod.py"
    src.write_text(
        "import torch, json, shutil\n"
        "def f(p, x, fig, buf):\n"
        "    open(p, 'w').write('x')\n"  # 3: flagged
        "    torch.save(x, p)\n"  # 4: flagged
        "    p.write_text('x')\n"  # 5: flagged
        "    json.dump(x, open(p, 'wb'))\n"  # 6: flagged twice
        "    fig.savefig(buf)\n"  # in memory: fine
        "    atomic_save(p, lambda f: torch.save(x, f))\n"  # fine
        "    open(p).read(); x.copy()\n"  # reading, dict copy: fine
        "    shutil.copy(p, p)\n"  # 10: flagged
    )
    assert sorted(int(o.split(":")[1]) for o in _non_atomic_writes([src])) == [3, 4, 5, 6, 6, 10]


def test_every_file_the_package_writes_goes_through_the_atomic_helpers():
    offenders = _non_atomic_writes(sorted(PKG.rglob("*.py")))
    assert not offenders, "files written without monai_skipts.utils.atomic_*:\n" + "\n".join(offenders)


# ---------------------------------------------------------------------------------------------
# safe loading


class _Exploit:
    """Unpickling this runs code: it writes ``sentinel``."""

    def __init__(self, sentinel: Path):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (exec, (f"open({self.sentinel!r}, 'w').write('code ran')",))


def _crafted_checkpoint(path: Path, sentinel: Path, like: dict | None = None) -> Path:
    payload = dict(like or {"kind": CHECKPOINT_KIND, "version": 1})
    payload["extra"] = {"note": _Exploit(sentinel)}
    torch.save(payload, path)
    # control: an unsafe load of this file does run the code
    torch.load(path, weights_only=False)
    assert sentinel.read_text() == "code ran"
    sentinel.unlink()
    return path


def _entry_points(lite0):
    from monai_skipts.inference import AnomalyPredictor
    from monai_skipts.networks.teacher import build_teacher

    def resume(path):
        handler = SkipTSCheckpointHandler(
            path.parent, AnomalyDetector(lite0), torch.optim.Adam(lite0.student.parameters()), filename=path.name
        )
        _trainer(handler, _Loader(["a"]), 1, [])

    return {
        "load_checkpoint": load_checkpoint,
        "load_detector": load_detector,
        "inference": lambda p: AnomalyPredictor(p, device="cpu"),
        "resume": resume,
        "teacher weights": lambda p: build_teacher("efficientnet_lite0", weights=p),
    }


@pytest.mark.parametrize("entry", ["load_checkpoint", "load_detector", "inference", "resume", "teacher weights"])
def test_pickled_code_in_a_checkpoint_is_refused_and_never_runs(entry, lite0, tmp_path):
    sentinel = tmp_path / "pwned.txt"
    like = {
        "kind": CHECKPOINT_KIND,
        "version": 1,
        "model_config": dict(lite0.config),
        "student": lite0.student.state_dict(),
        "epoch": 1,
        "iteration": 1,
        "threshold": None,
    }
    path = _crafted_checkpoint(tmp_path / "checkpoint.pt", sentinel, like)
    with pytest.raises((UnsafeCheckpointError, RuntimeError)) as err:
        _entry_points(lite0)[entry](path)
    assert not sentinel.exists(), "the pickled code ran"
    assert str(path) in str(err.value)
    if entry != "teacher weights":
        assert isinstance(err.value, UnsafeCheckpointError)
        assert "refused" in str(err.value) and "(exec)" in str(err.value)
    assert resumed_run_name(path) is None and not sentinel.exists()


def test_every_torch_load_in_the_package_is_weights_only():
    found = []
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = getattr(node.func.value, "id", getattr(node.func.value, "attr", ""))
                if node.func.attr == "load" and owner in ("torch", "pickle", "cloudpickle", "dill", "joblib"):
                    wo = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
                    ok = owner == "torch" and isinstance(wo, ast.Constant) and wo.value is True
                    found.append((f"{path.relative_to(REPO)}:{node.lineno}", ok))
                if node.func.attr in ("load", "loads") and owner in ("pickle", "cloudpickle", "dill"):
                    found.append((f"{path.relative_to(REPO)}:{node.lineno}", False))
    assert found, "no torch.load found at all: the scan is broken"
    assert all(ok for _, ok in found), [w for w, ok in found if not ok]


def test_checkpoint_of_another_teacher_is_refused_naming_both(lite0, lite2, tmp_path):
    from monai_skipts.networks.teacher import TEACHERS

    path = save_checkpoint(tmp_path / "model.pt", AnomalyDetector(lite0))
    ckpt = load_checkpoint(path)
    both = r"efficientnet_lite0.*efficientnet_lite2"
    with pytest.raises(CheckpointError, match=both):
        check_teacher(ckpt["config"]["model"], lite2, str(path))
    # resuming a lite0 training with a lite2 model
    opt = torch.optim.Adam(lite2.student.parameters())
    save_checkpoint(
        tmp_path / "checkpoint.pt", AnomalyDetector(lite0), torch.optim.Adam(lite0.student.parameters()), epoch=1
    )
    with pytest.raises(CheckpointError, match=both):
        _trainer(SkipTSCheckpointHandler(tmp_path, AnomalyDetector(lite2), opt), _Loader(["a"]), 2, [])
    # rebuilding the lite0 model with the lite2 weights file
    lite2_file = TEACHERS["efficientnet_lite2"].weights_file(None, False)
    with pytest.raises(CheckpointError, match=both) as err:
        load_detector(path, teacher_weights=lite2_file)
    assert str(lite2_file) in str(err.value)
    # same teacher name, other weights
    ckpt["config"]["model"]["teacher_weights_sha256"] = "0" * 64
    with pytest.raises(CheckpointError, match="another weights file"):
        check_teacher(ckpt["config"]["model"], lite0)


def test_truncated_and_foreign_files_are_clear_errors(lite0, tmp_path):
    path = save_checkpoint(tmp_path / "model.pt", AnomalyDetector(lite0))
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"cut\.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"other\.pt: not a monai-skipts checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


# ---------------------------------------------------------------------------------------------
# determinism


def test_same_seed_same_scores_other_seed_other_scores(data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    over = dict(
        dataset_dir=str(data_dir),
        epochs=2,
        spatial_size=64,
        batch_size=4,
        teacher="efficientnet_lite0",
        progress_bar=False,
        n_heatmaps=0,
        save_maps=False,
        mlflow=False,
        val_interval=2,
        target_fpr=0.5,
        calibration="empirical",
    )
    scores = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        bundle_run(config_file="bundles/demo/train.json", output_dir=str(tmp_path / name), seed=seed, **over)
        scores[name] = (tmp_path / name / "scores.csv").read_text()
    assert scores["a"] == scores["b"], "same seed, same data: the scores differ"
    assert scores["a"] != scores["c"], "another seed gave the very same scores"
    by_id = lambda text: {line.split(",")[0]: line.split(",")[2] for line in text.splitlines()[1:]}  # noqa: E731
    a, c = by_id(scores["a"]), by_id(scores["c"])
    assert sum(a[k] != c[k] for k in a.keys() & c.keys()) >= 1
