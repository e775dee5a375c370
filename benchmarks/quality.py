"""Paper Table II side by side: Skip-TS, its Table IV ablations, an RD4AD-style reverse
distillation and PatchCore, on every paper dataset found under a data root, in one run.

The protocol is :mod:`protocol`'s (the paper's): exact duplicates removed, Table I split
(``prepare_split``), images resized to ``--size`` (256²), ImageNet normalisation, Adam lr 0.005
betas (0.5, 0.999), batch 16, ``--epochs`` epochs (200), the LAST epoch's model evaluated on the
test split, several seeds. All methods of a (dataset, seed) share one decoded-image cache, one
frozen teacher instance and one teacher-feature cache (train and test), so they differ only in what
they are meant to differ in.

    python benchmarks/quality.py                 # full protocol: 256², 200 epochs, seeds 0-4
    python benchmarks/quality.py --quick         # 128², 100 optimizer steps per method, seed 0
    python benchmarks/quality.py --datasets brainmri --methods skipts patchcore --epochs 50 --seeds 0 1

Methods (``--methods``):

========== ======================================================================================
skipts     Skip-TS: decoder student with skip connections, DRKD loss (cosine + 0.05·MAC)
kd_encoder Table IV "traditional KD": the student is a random copy of the teacher fed the image
no_skip    Table IV "DRKD w/o SC": the decoder without skip connections
mse        Table IV "L_sim with MSE": per-pixel squared error instead of 1 − cosine (loss and map)
no_mac     Table IV "w/o MAC": L_sim only
rd4ad      RD4AD-style: one-class bottleneck (fused E1..E3 → E4-sized code), skip-less decoder,
           RD4AD's flattened-cosine loss
patchcore  PatchCore on E2+E3 of the same teacher, greedy coreset 10 % (at most 4096 patches)
========== ======================================================================================

Every method's anomaly map is scored the same way (per-pixel maps up-sampled, summed, Gaussian
σ = 4; image score = max); the MSE ablation's per-pixel maps are squared errors. Output, in ``--work-dir`` (written atomically after every run, so an
interrupted run keeps what it finished and ``--resume`` continues it): ``quality.json`` (every
run's metrics and timings, the summary) and ``quality.md`` (AUROC mean ± std over seeds per
dataset, the average over datasets, the paper's Skip-TS figure for reference).
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Events
from monai.data import CacheDataset, DataLoader
from monai.engines.utils import default_prepare_batch
from monai.utils import set_determinism
from torch.utils.data import Subset


from monai_skipts.baselines import PatchCore
from monai_skipts.data import get_dataset, prepare_split
from monai_skipts.engines import PAPER_HPARAMS, SkipTSEvaluator, SkipTSTrainer, TeacherFeatureCache, resolve_device
from monai_skipts.inferers import SkipTSInferer
from monai_skipts.losses import DRKDLoss
from monai_skipts.metrics import image_metrics
from monai_skipts.networks import RD4AD, RD4ADLoss, SkipTS, build_teacher, feature_shapes, teacher_weights_available
from monai_skipts.transforms import build_preprocessing
from monai_skipts.utils import atomic_write_json, atomic_write_text

#: the paper's datasets in Table II order: (canonical name, modality preset, paper Skip-TS AUROC,
#: folder names tried under the data root). Modalities as in the bundles (bundles/make_bundles.py).
PAPER_DATASETS: list[tuple[str, str, float, tuple[str, ...]]] = [
    ("headct", "ct_brain", 85.7, ("headct", "head_ct", "HeadCT")),
    ("brainmri", "mri", 88.2, ("brainmri", "brain_mri", "BrainMRI")),
    ("lungct", "ct_lung", 90.4, ("lungct", "lung_ct", "LungCT")),
    ("busi", "ultrasound", 92.5, ("busi", "BUSI", "Dataset_BUSI_with_GT")),
    ("breastmri", "mri", 93.5, ("breastmri", "breast_mri", "BreastMRI")),
    ("retinal_oct", "xray", 91.3, ("retinal_oct", "retinaloct", "OCT2017")),
    ("cp_child_a", "rgb", 96.5, ("cp_child", "cpchild", "CP-CHILD", "cp_child_a", "cpchild_a")),
    ("cp_child_b", "rgb", 95.3, ("cp_child", "cpchild", "CP-CHILD", "cp_child_b", "cpchild_b")),
    ("nafld", "ultrasound", 90.3, ("nafld", "NAFLD")),
    ("iq_oth_nccd", "ct_lung", 97.3, ("iq_oth_nccd", "iqothnccd", "IQ-OTH_NCCD")),
    ("covid_xray", "xray", 94.1, ("covid_xray", "covid19", "Covid19-dataset")),
    ("malaria", "rgb", 95.2, ("malaria", "cell_images")),
]  # fmt: skip
PAPER_AVERAGE = 92.5

#: method name -> (label, kind, model kwargs, loss factory). kind: "skipts", "rd4ad" or "patchcore".
METHODS: dict[str, dict[str, Any]] = {
    "skipts": {"label": "Skip-TS", "kind": "skipts", "model": {}, "loss": dict},
    "kd_encoder": {"label": "Trad. KD", "kind": "skipts", "model": {"student": "encoder"}, "loss": dict},
    "no_skip": {"label": "DRKD w/o SC", "kind": "skipts", "model": {"skip": "none"}, "loss": dict},
    "mse": {"label": "L_sim MSE", "kind": "skipts", "model": {}, "loss": lambda: {"similarity": "mse"}},
    "no_mac": {"label": "w/o MAC", "kind": "skipts", "model": {}, "loss": lambda: {"mac": False}},
    "rd4ad": {"label": "RD4AD-style", "kind": "rd4ad", "model": {}, "loss": None},
    "patchcore": {"label": "PatchCore", "kind": "patchcore", "model": {}, "loss": None},
}
QUICK = {"size": 128, "steps": 100, "seeds": [0]}


def find_datasets(data_root: Path, only: list[str] | None = None) -> list[tuple[str, str, float, Path]]:
    """``(name, modality, paper AUROC, folder)`` for every paper dataset present under ``data_root``."""
    wanted = None if only is None else {get_dataset(n).name for n in only}
    found = []
    for name, modality, paper, folders in PAPER_DATASETS:
        if wanted is not None and name not in wanted:
            continue
        for folder in folders:
            root = data_root / folder
            if root.is_dir():
                found.append((name, modality, paper, root))
                break
        else:
            if wanted is not None:
                raise FileNotFoundError(f"dataset {name}: none of {list(folders)} under {data_root}")
    return found


def default_teacher() -> str:
    """The paper's wide_resnet50_2 when its weights are on this machine, else efficientnet_lite0."""
    return "wide_resnet50_2" if teacher_weights_available("wide_resnet50_2", download=False) else "efficientnet_lite0"


def log_epochs(trainer, every: int, t0: float, label: str = "") -> None:
    """Print ``  <label>epoch N loss L Ts`` to stderr every ``every`` epochs (0: never), T counted from ``t0``."""
    if every:
        @trainer.on(Events.EPOCH_COMPLETED(every=every))
        def _log(engine):
            print(f"  {label}epoch {engine.state.epoch} loss {float(engine.state.output['loss']):.4f} "
                  f"{time.time() - t0:.0f}s", file=sys.stderr, flush=True)  # fmt: skip


def _channels_last(model: torch.nn.Module) -> torch.nn.Module:
    """NHWC weights: oneDNN (CPU) and cuDNN run convolutions faster on them (measured on CPU at 128²:
    0.72 s → 0.40 s per Skip-TS step); every conv output then follows in NHWC."""
    return model.to(memory_format=torch.channels_last)


def tune_glibc_malloc(mmap_threshold: int = 1 << 30) -> bool:
    """Keep large buffers in the heap and never trim it (glibc ``mallopt``), for CPU runs.

    Why: by default glibc serves every allocation above a (dynamic, at most 32 MiB) threshold with a
    fresh ``mmap`` and returns it on ``free``; PyTorch's CPU activations are such buffers, so every
    forward pass page-faults its activations in again (millions of minor faults, a quarter of the
    time in the kernel). Measured on this 2-core Zen 4, one thread, 256², efficientnet_lite0
    Skip-TS: inference batch 16 9.2 → 23.6 images/s, a training step 1.30 → 0.90 s. Same effect as
    ``MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483647`` in the environment or
    jemalloc/tcmalloc via ``LD_PRELOAD``. Returns whether it was applied (glibc Linux only).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, ctypes.c_int(mmap_threshold))
        ok &= libc.mallopt(m_trim_threshold, ctypes.c_int(2**31 - 1))
        return bool(ok)
    except (OSError, AttributeError):
        return False


class PlainTensorBatch:
    """``prepare_batch`` wrapper: hands ``inner`` the batch with ``"image"`` as a plain channels-last
    ``torch.Tensor`` instead of MONAI's ``MetaTensor``.

    Why: ``CacheDataset`` yields ``MetaTensor`` images; ``TeacherFeatureCache`` runs the teacher on
    them and stores ``MetaTensor`` features, so every student op goes through ``MetaTensor``'s Python
    ``__torch_function__``: measured on this CPU at 128², batch 16, one thread: 1.10 s per Skip-TS
    training step with ``MetaTensor`` features vs 0.59 s with plain tensors (see speed.py). The
    numbers computed are identical. (Proposed for engines.TeacherFeatureCache itself.)
    """

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, batchdata: dict, device, non_blocking: bool = False, **kwargs):
        b = dict(batchdata)
        img = b["image"]
        if hasattr(img, "as_tensor"):
            img = img.as_tensor()
        b["image"] = img.contiguous(memory_format=torch.channels_last)
        return self.inner(b, device, non_blocking, **kwargs)

    @property
    def store(self) -> dict:
        return self.inner.store


def _feature_bytes(teacher, size: int, dtype: torch.dtype) -> int:
    return sum(math.prod(s) for s in feature_shapes(teacher, size)) * torch.tensor([], dtype=dtype).element_size()


class DatasetRun:
    """Everything the methods of one (dataset, seed) share: split, decoded images, teacher, features."""

    def __init__(self, name: str, root: Path, modality: str, seed: int, size: int, teacher, work_dir: Path,
                 batch_size: int, device: torch.device, image_cache: dict):  # fmt: skip
        self.name, self.seed, self.size, self.batch_size, self.device = name, seed, size, batch_size, device
        split = prepare_split(name, root, split_file=work_dir / "splits" / f"{name}_seed{seed}.json", seed=seed)
        self.report = split["report"]
        keep = ("image", "label", "id")
        self.train_items = [{k: it[k] for k in keep} for it in split["train"]]
        self.test_items = [{k: it[k] for k in keep} for it in split["test"]]
        self.pre = build_preprocessing(modality, spatial_size=size)
        # one CacheDataset per dataset and size, over every seed's items: decode + resize once
        key = (name, size)
        if key not in image_cache:
            image_cache[key] = {"items": [], "index": {}, "ds": None}
        cache = image_cache[key]
        new = [it for it in self.train_items + self.test_items if it["id"] not in cache["index"]]
        if new:
            t0 = time.time()
            ds = CacheDataset(new, self.pre, progress=False, num_workers=0)
            cache["ds"] = ds if cache["ds"] is None else torch.utils.data.ConcatDataset([cache["ds"], ds])
            for it in new:
                cache["index"][it["id"]] = len(cache["index"])
            print(f"[{name}] decoded {len(new)} images at {size}² in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
        self.train_ds = Subset(cache["ds"], [cache["index"][it["id"]] for it in self.train_items])
        self.test_ds = Subset(cache["ds"], [cache["index"][it["id"]] for it in self.test_items])
        self.teacher = teacher
        # cached teacher features: fp32 while train + test stay under 2 GiB, else fp16; the test
        # features only while they stay under 4 GiB in fp16 (WRN50 at 256²: 7.9 MB fp32 per image)
        per_image = _feature_bytes(teacher, size, torch.float32)
        n_all = len(self.train_items) + len(self.test_items)
        self.feature_dtype = torch.float32 if per_image * n_all < 2 * 2**30 else torch.float16
        self.cache_test = per_image / 2 * len(self.test_items) < 4 * 2**30
        self.train_store: dict = {}
        self.test_store: dict = {}

    def train_loader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_ds, batch_size=self.batch_size, shuffle=True, generator=g, num_workers=0)

    def test_loader(self) -> DataLoader:
        return DataLoader(self.test_ds, batch_size=self.batch_size, shuffle=False, num_workers=0)

    def feature_cache(self, model, store: dict | None) -> PlainTensorBatch:
        """``prepare_batch`` feeding cached teacher features from ``store`` (``None``: no cache, the
        model runs its teacher on the image)."""
        if store is None:
            return PlainTensorBatch(default_prepare_batch)
        cache = TeacherFeatureCache(model, self.pre, dtype=self.feature_dtype)
        cache.store = store  # shared by every method of this (dataset, seed): one teacher pass per image
        return PlainTensorBatch(cache)


def _evaluate_kd(run: DatasetRun, model, similarity: str) -> tuple[list[float], list[int], float]:
    scores, labels = [], []
    evaluator = SkipTSEvaluator(
        run.device, run.test_loader(), model, inferer=SkipTSInferer(similarity=similarity),
        prepare_batch=run.feature_cache(model, run.test_store if run.cache_test else None),
    )  # fmt: skip

    @evaluator.on(Events.ITERATION_COMPLETED)
    def _collect(engine):
        scores.extend(engine.state.output["score"].tolist())
        labels.extend(int(v) for v in engine.state.output["label"].view(-1).tolist())

    t0 = time.time()
    evaluator.run()
    return scores, labels, time.time() - t0


def run_kd_method(run: DatasetRun, method: str, epochs: int, log_every: int = 0) -> dict:
    """Train one teacher-student method on ``run`` for ``epochs`` epochs; evaluate the last epoch."""
    spec = METHODS[method]
    set_determinism(seed=run.seed)
    if spec["kind"] == "rd4ad":
        model, loss = RD4AD(run.teacher, **spec["model"]), RD4ADLoss()
    else:
        model, loss = SkipTS(run.teacher, **spec["model"]), DRKDLoss(**spec["loss"]())
    model = _channels_last(model)
    trainer = SkipTSTrainer(
        run.device, epochs, run.train_loader(), model, lr=PAPER_HPARAMS["lr"], betas=PAPER_HPARAMS["betas"],
        loss_function=loss, prepare_batch=run.feature_cache(model, run.train_store),
    )  # fmt: skip
    t0 = time.time()
    log_epochs(trainer, log_every, t0, f"[{run.name} s{run.seed} {method}] ")
    trainer.run()
    train_s = time.time() - t0
    # the maps of the similarity the model was trained with: the MSE ablation replaces M_l itself
    # (eq 1), so its L_sim and its test-time map are both per-pixel squared errors
    scores, labels, eval_s = _evaluate_kd(run, model, getattr(loss, "similarity", "cosine"))
    m = image_metrics(np.asarray(scores), np.asarray(labels))
    n_params = sum(p.numel() for p in model.student.parameters())
    m.update(train_seconds=round(train_s, 1), eval_seconds=round(eval_s, 1), final_loss=float(trainer.state.output["loss"].detach()),
             student_params=n_params)  # fmt: skip
    return m


def run_patchcore(run: DatasetRun, seed: int) -> dict:
    set_determinism(seed=seed)
    model = PatchCore(run.teacher, seed=seed)
    train_cache = run.feature_cache(model, run.train_store)
    t0 = time.time()

    def _features(batch):
        return train_cache(batch, run.device)[3]["teacher_feats"]

    model.fit(run.train_loader(), device=run.device, feature_fn=_features)
    train_s = time.time() - t0
    test_cache = run.feature_cache(model, run.test_store if run.cache_test else None)
    scores, labels = [], []
    t0 = time.time()
    with torch.inference_mode():
        for batch in run.test_loader():
            image, label, *rest = test_cache(batch, run.device)
            _, s = model(image, teacher_feats=rest[1]["teacher_feats"] if rest else None)
            scores.extend(s.tolist())
            labels.extend(int(v) for v in label.view(-1).tolist())
    m = image_metrics(np.asarray(scores), np.asarray(labels))
    m.update(train_seconds=round(train_s, 1), eval_seconds=round(time.time() - t0, 1), memory_size=model.config["memory_size"])
    return m


# --------------------------------------------------------------------------- tables


def _fmt(values: list[float]) -> str:
    if not values:
        return "–"
    mean = 100 * statistics.mean(values)
    sd = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {sd:.1f}"


def summarise(records: list[dict], methods: list[str], datasets: list[tuple[str, float]]) -> dict:
    """AUROC per (dataset, method) over seeds, and the average over datasets (its ± is the std over
    seeds of the per-seed average, counted only over seeds every dataset finished)."""
    table: dict[str, dict[str, dict]] = {}
    for name, _ in datasets:
        table[name] = {}
        for m in methods:
            vals = [r["auroc"] for r in records if r["dataset"] == name and r["method"] == m]
            if vals:
                table[name][m] = {"mean": statistics.mean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                                  "n": len(vals), "values": vals,
                                  "train_seconds": statistics.mean(r["train_seconds"] for r in records
                                                                   if r["dataset"] == name and r["method"] == m)}  # fmt: skip
    average = {}
    for m in methods:
        seeds = sorted({r["seed"] for r in records if r["method"] == m})
        per_seed = []
        for s in seeds:
            vals = [r["auroc"] for r in records if r["method"] == m and r["seed"] == s]
            if len(vals) == len(datasets):
                per_seed.append(statistics.mean(vals))
        means = [table[d][m]["mean"] for d, _ in datasets if m in table[d]]
        if means and len(means) == len(datasets):
            average[m] = {"mean": statistics.mean(means),
                          "std": statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0, "n_seeds": len(per_seed)}  # fmt: skip
    ranking = sorted(average, key=lambda m: -average[m]["mean"])
    return {"table": table, "average": average, "ranking": ranking}


def markdown(summary: dict, methods: list[str], datasets: list[tuple[str, float]], meta: dict) -> str:
    labels = [METHODS[m]["label"] for m in methods]
    lines = [
        f"# Image AUROC (%), mean ± std over seeds {meta['seeds']}",
        "",
        f"Teacher `{meta['teacher']}`, {meta['size']}², {meta['schedule']}, last epoch, batch {meta['batch_size']}, "
        f"device {meta['device']}; duplicates removed, Table I split. Wall time {meta.get('wall_seconds', 0):.0f} s.",
        "",
        "| dataset | " + " | ".join(labels) + " | paper Skip-TS (WRN50, 256², 200 ep.) |",
        "|---|" + "---|" * len(labels) + "---|",
    ]
    for name, paper in datasets:
        row = summary["table"].get(name, {})
        cells = []
        best = max((row[m]["mean"] for m in methods if m in row), default=None)
        for m in methods:
            if m not in row:
                cells.append("–")
                continue
            c = _fmt(row[m]["values"])
            cells.append(f"**{c}**" if best is not None and row[m]["mean"] == best else c)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {paper:.1f} |")
    avg = summary["average"]
    best = max((avg[m]["mean"] for m in avg), default=None)
    cells = []
    for m in methods:
        if m not in avg:
            cells.append("–")
            continue
        c = f"{100 * avg[m]['mean']:.1f} ± {100 * avg[m]['std']:.1f}"
        cells.append(f"**{c}**" if avg[m]["mean"] == best else c)
    paper_avg = statistics.mean(p for _, p in datasets) if datasets else PAPER_AVERAGE
    lines.append("| **average** | " + " | ".join(cells) + f" | {paper_avg:.1f} |")
    lines += ["", "Training seconds per run (mean over seeds; PatchCore: feature extraction + coreset):", "",
              "| dataset | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]  # fmt: skip
    for name, _ in datasets:
        row = summary["table"].get(name, {})
        lines.append(f"| {name} | " + " | ".join(f"{row[m]['train_seconds']:.0f}" if m in row else "–" for m in methods) + " |")
    if summary["ranking"]:
        lines += ["", "Ranking by average AUROC: " + " > ".join(METHODS[m]["label"] for m in summary["ranking"])]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=None, help="default: $SKIPTS_DATA_ROOT or ../shared/data")
    p.add_argument("--datasets", nargs="+", default=None, help="default: every paper dataset present")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 3 4 (quick: 0)")
    p.add_argument("--epochs", type=int, default=None, help="default 200 (the paper)")
    p.add_argument("--steps", type=int, default=None,
                   help="train every method for this many optimizer steps instead (epochs = ceil(steps / "
                        "batches per epoch) per dataset); quick mode: 100")  # fmt: skip
    p.add_argument("--size", type=int, default=None, help="default 256 (quick: 128)")
    p.add_argument("--teacher", default=None, help="default: wide_resnet50_2 when its weights are present, else efficientnet_lite0")
    p.add_argument("--batch-size", type=int, default=PAPER_HPARAMS["batch_size"])
    p.add_argument("--quick", action="store_true", help=f"{QUICK['size']}², {QUICK['steps']} steps per method, seed 0")
    p.add_argument("--device", default="auto")
    p.add_argument("--work-dir", default="runs/benchmarks/quality")
    p.add_argument("--resume", action="store_true", help="keep the runs already in <work-dir>/quality.json")
    p.add_argument("--log-every", type=int, default=0)
    p.add_argument("--no-tune-malloc", action="store_true", help="keep glibc's default malloc (see tune_glibc_malloc)")
    a = p.parse_args(argv)

    size = a.size or (QUICK["size"] if a.quick else PAPER_HPARAMS["spatial_size"])
    seeds = a.seeds or (QUICK["seeds"] if a.quick else [0, 1, 2, 3, 4])
    steps = a.steps if a.steps is not None else (QUICK["steps"] if a.quick and a.epochs is None else None)
    epochs = a.epochs or PAPER_HPARAMS["max_epochs"]
    teacher_name = a.teacher or default_teacher()
    data_root = Path(a.data_root or os.environ.get("SKIPTS_DATA_ROOT") or Path(__file__).resolve().parents[2] / "shared" / "data")
    work_dir = Path(a.work_dir)
    datasets = find_datasets(data_root, a.datasets)
    if not datasets:
        print(f"no paper dataset found under {data_root}", file=sys.stderr)
        return 1
    device = resolve_device(a.device)
    malloc_tuned = device.type == "cpu" and not a.no_tune_malloc and tune_glibc_malloc()
    out_json, out_md = work_dir / "quality.json", work_dir / "quality.md"
    meta = {
        "teacher": teacher_name, "size": size, "seeds": seeds, "batch_size": a.batch_size, "device": str(device),
        "schedule": f"{steps} optimizer steps per method" if steps else f"{epochs} epochs",
        "epochs": None if steps else epochs, "steps": steps, "methods": a.methods,
        "datasets": [d[0] for d in datasets], "data_root": str(data_root), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "malloc_tuned": malloc_tuned,
    }  # fmt: skip
    records: list[dict] = []
    if a.resume and out_json.is_file():
        import json

        records = [r for r in json.loads(out_json.read_text())["runs"]
                   if r["teacher"] == teacher_name and r["size"] == size and r.get("steps") == steps
                   and (steps or r["epochs"] == epochs)]  # fmt: skip
    print(f"quality: {[d[0] for d in datasets]} x {a.methods} x seeds {seeds}; teacher {teacher_name}, {size}², "
          f"{meta['schedule']}, device {device}, {torch.get_num_threads()} threads", flush=True)  # fmt: skip
    teacher = _channels_last(build_teacher(teacher_name)).to(device)
    t_start = time.time()
    image_cache: dict = {}
    ds_pairs = [(d[0], d[2]) for d in datasets]

    def _write():
        meta["wall_seconds"] = round(time.time() - t_start, 1)
        summary = summarise(records, a.methods, ds_pairs)
        atomic_write_json(out_json, {"meta": meta, "summary": summary, "runs": records})
        md = markdown(summary, a.methods, ds_pairs, meta)
        atomic_write_text(out_md, md)
        return md

    for name, modality, _, root in datasets:
        for seed in seeds:
            todo = [m for m in a.methods if not any(r["dataset"] == name and r["method"] == m and r["seed"] == seed for r in records)]
            if not todo:
                continue
            run = DatasetRun(name, root, modality, seed, size, teacher, work_dir, a.batch_size, device, image_cache)
            n_batches = math.ceil(len(run.train_items) / a.batch_size)
            ep = math.ceil(steps / n_batches) if steps else epochs
            for method in todo:
                t0 = time.time()
                if METHODS[method]["kind"] == "patchcore":
                    m = run_patchcore(run, seed)
                else:
                    m = run_kd_method(run, method, ep, a.log_every)
                rec = {"dataset": name, "method": method, "seed": seed, "teacher": teacher_name, "size": size,
                       "epochs": ep, "steps": steps, "n_train": len(run.train_items), "n_test": len(run.test_items),
                       "wall_seconds": round(time.time() - t0, 1), **m}  # fmt: skip
                records.append(rec)
                print(f"[{name} seed {seed}] {METHODS[method]['label']:<12} AUROC {100 * m['auroc']:.1f}  "
                      f"train {m['train_seconds']:.0f}s ({ep} epochs)  eval {m['eval_seconds']:.0f}s  "
                      f"[{time.time() - t_start:.0f}s]", flush=True)  # fmt: skip
                _write()
    md = _write()
    print()
    print(md)
    print(f"written: {out_md}, {out_json}; wall {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
