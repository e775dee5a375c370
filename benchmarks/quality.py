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

and the variants of ``METHODS`` (skip variants, the one-class bottleneck, denoising distillation
``*_dn``: the student reads the teacher's features of training normals with synthetic lesions and is
trained towards the clean image's features, :class:`monai_skipts.engines.DenoisingBatch`).

Every method's anomaly map is scored the same way (per-pixel maps up-sampled, summed, Gaussian
σ = 4; image score = max); the MSE ablation's per-pixel maps are squared errors. With
``--anatomy-mask`` every method scores inside the anatomy, as the bundles do: the mask of the
dataset's modality (``monai_skipts.networks.AnatomyMaskLayer``), the summed map zeroed outside it
before the filter and after, the score the maximum inside (PatchCore: the largest patch score of the
patches at least half inside), the level statistics fitted inside it; recorded as ``anatomy_mask`` in
``quality.json`` (meta and every run), and ``--resume``/``--combine`` keep runs with and without it apart. Output, in ``--work-dir`` (written atomically after every run, so an
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
import torch.nn.functional as F
from ignite.engine import Events
from monai.data import CacheDataset, DataLoader
from monai.engines.utils import default_prepare_batch
from monai.utils import set_determinism
from torch.utils.data import Subset

from monai_skipts.baselines import PatchCore
from monai_skipts.bundle import denoising_prepare_batch
from monai_skipts.data import DATASETS, DatasetPreset, get_dataset, prepare_split
from monai_skipts.engines import PAPER_HPARAMS, SkipTSEvaluator, SkipTSTrainer, TeacherFeatureCache
from monai_skipts.inferers import fit_level_stats, fuse_anomaly_maps, mask_map_and_score
from monai_skipts.losses import RD4ADLoss, build_loss
from monai_skipts.metrics import pixel_metrics, report_metrics
from monai_skipts.networks import (
    RD4AD,
    AnatomyMaskLayer,
    AnomalyDetector,
    SkipTS,
    anatomy_mask_config,
    build_teacher,
    feature_shapes,
    teacher_weights_available,
)
from monai_skipts.transforms import build_preprocessing
from monai_skipts.utils import atomic_write_json, atomic_write_text, resolve_device

#: the datasets the benchmarks look for under a data root, in Table II order (the paper's twelve, then
#: LGG with its lesion masks for the pixel metrics): entries of the package's one dataset table,
#: ``monai_skipts.data.DATASETS``, with ``folders`` (the names tried under the root), ``modality``,
#: ``paper_auroc`` (Table II Skip-TS, %; ``None``: not in the paper) and ``val_fraction``.
BENCHMARK_DATASETS: tuple[DatasetPreset, ...] = tuple(p for p in DATASETS.values() if p.folders)
#: the paper's Skip-TS average over its twelve datasets
PAPER_AVERAGE = round(statistics.mean(p.paper_auroc for p in DATASETS.values() if p.paper_auroc is not None), 1)

#: method name -> (label, kind, model kwargs, loss factory). kind: "skipts", "rd4ad" or "patchcore".
METHODS: dict[str, dict[str, Any]] = {
    "skipts": {"label": "Skip-TS", "kind": "skipts", "model": {}, "loss": dict},
    "kd_encoder": {"label": "Trad. KD", "kind": "skipts", "model": {"student": "encoder"}, "loss": dict},
    "no_skip": {"label": "DRKD w/o SC", "kind": "skipts", "model": {"skip": "none"}, "loss": dict},
    "mse": {"label": "L_sim MSE", "kind": "skipts", "model": {}, "loss": lambda: {"similarity": "mse"}},
    "no_mac": {"label": "w/o MAC", "kind": "skipts", "model": {}, "loss": lambda: {"mac": False}},
    "rd4ad": {"label": "RD4AD-style", "kind": "rd4ad", "model": {}, "loss": None},
    "patchcore": {"label": "PatchCore", "kind": "patchcore", "model": {}, "loss": None},
    # skip connections that should not hand the student the anomaly (issue: a default that finds the lesion)
    "skip_l3": {"label": "SC level 3 only", "kind": "skipts", "model": {"skip_levels": (3,)}, "loss": dict},
    "skip_drop": {"label": "SC dropout 0.5", "kind": "skipts", "model": {"skip_dropout": 0.5}, "loss": dict},
    "skip_noise": {"label": "SC noise 1.0", "kind": "skipts", "model": {"skip_noise": 1.0}, "loss": dict},
    "gate": {"label": "SC gate", "kind": "skipts", "model": {"skip": "gate"}, "loss": dict},
    # EfficientNet-Lite's expanded (post-ReLU6, 6x wider) activations as E1..E4 instead of the projections
    "expanded": {"label": "expanded taps", "kind": "skipts", "model": {}, "loss": dict, "teacher_taps": "expanded"},
    # RD4AD's one-class bottleneck in front of the Skip-TS decoder (D3 gets the fused E1-E3 code, not E4)
    "ocb": {"label": "OCB + SC", "kind": "skipts", "model": {"bottleneck": True}, "loss": dict},
    "ocb_no_skip": {
        "label": "OCB w/o SC (DRKD loss)",
        "kind": "skipts",
        "model": {"bottleneck": True, "skip": "none"},
        "loss": dict,
    },
    "ocb_l3": {
        "label": "OCB + SC level 3",
        "kind": "skipts",
        "model": {"bottleneck": True, "skip_levels": (3,)},
        "loss": dict,
    },
    "ocb_noise": {
        "label": "OCB + SC noise 1.0",
        "kind": "skipts",
        "model": {"bottleneck": True, "skip_noise": 1.0},
        "loss": dict,
    },
    # the same with RD4AD's loss (1 - cos of the flattened maps) instead of DRKD's
    "ocb_noise_rdloss": {
        "label": "OCB + SC noise, RD4AD loss",
        "kind": "skipts",
        "loss_kind": "rd4ad",
        "model": {"bottleneck": True, "skip_noise": 1.0},
        "loss": dict,
    },
    "ocb_l3_rdloss": {
        "label": "OCB + SC level 3, RD4AD loss",
        "kind": "skipts",
        "loss_kind": "rd4ad",
        "model": {"bottleneck": True, "skip_levels": (3,)},
        "loss": dict,
    },
    # denoising distillation (issue 20): the student reads the teacher's features of training normals
    # with synthetic lesions (half of them), its target is the clean image's features (engines.DenoisingBatch)
    "default": {
        "label": "default (OCB w/o SC, RD4AD loss)",
        "kind": "skipts",
        "loss_kind": "rd4ad",
        "model": {"bottleneck": True, "skip": "none"},
        "loss": dict,
    },
    "default_dn": {
        "label": "default + denoising (mixed)",
        "kind": "skipts",
        "loss_kind": "rd4ad",
        "model": {"bottleneck": True, "skip": "none"},
        "loss": dict,
        "denoise": {"prob": 0.5, "families": ["intensity", "fpi", "elastic"]},
    },
    "default_dn_int": {
        "label": "default + denoising (intensity)",
        "kind": "skipts",
        "loss_kind": "rd4ad",
        "model": {"bottleneck": True, "skip": "none"},
        "loss": dict,
        "denoise": {"prob": 0.5, "families": ["intensity"]},
    },
    "default_dn_fpi": {
        "label": "default + denoising (FPI)",
        "kind": "skipts",
        "loss_kind": "rd4ad",
        "model": {"bottleneck": True, "skip": "none"},
        "loss": dict,
        "denoise": {"prob": 0.5, "families": ["fpi"]},
    },
    "default_sc_dn": {
        "label": "default + SC + denoising (mixed)",
        "kind": "skipts",
        "loss_kind": "rd4ad",
        "model": {"bottleneck": True},
        "loss": dict,
        "denoise": {"prob": 0.5, "families": ["intensity", "fpi", "elastic"]},
    },
    "skipts_dn": {
        "label": "Skip-TS + denoising (mixed)",
        "kind": "skipts",
        "model": {},
        "loss": dict,
        "denoise": {"prob": 0.5, "families": ["intensity", "fpi", "elastic"]},
    },
    "no_skip_dn": {
        "label": "DRKD w/o SC + denoising (mixed)",
        "kind": "skipts",
        "model": {"skip": "none"},
        "loss": dict,
        "denoise": {"prob": 0.5, "families": ["intensity", "fpi", "elastic"]},
    },
    "expanded_no_skip": {
        "label": "expanded, w/o SC",
        "kind": "skipts",
        "model": {"skip": "none"},
        "loss": dict,
        "teacher_taps": "expanded",
    },
}
#: ``<method>+std``: the same trained model, its per-level maps standardised with training-normal
#: statistics before summing (``monai_skipts.inferers.fit_level_stats``): evaluated for every
#: teacher-student method at the cost of one more pass over the training images
STD_SUFFIX = "+std"


def method_spec(name: str) -> dict:
    """``METHODS[name]``, or for ``<method>+std`` the method's spec with ``level_stats`` on."""
    if name.endswith(STD_SUFFIX):
        base = METHODS[name[: -len(STD_SUFFIX)]]
        return {**base, "label": base["label"] + " +std", "level_stats": True}
    return METHODS[name]


def method_choices() -> list[str]:
    return list(METHODS) + [m + STD_SUFFIX for m, s in METHODS.items() if s["kind"] != "patchcore"]


QUICK = {"size": 128, "steps": 100, "seeds": [0]}


def find_datasets(data_root: Path, only: list[str] | None = None) -> list[tuple[str, str, float, Path]]:
    """``(name, modality, paper AUROC, folder)`` for every paper dataset present under ``data_root``."""
    wanted = None if only is None else {get_dataset(n).name for n in only}
    if wanted is not None and wanted - {p.name for p in BENCHMARK_DATASETS}:
        raise ValueError(
            f"not a benchmark dataset: {sorted(wanted - {p.name for p in BENCHMARK_DATASETS})}; "
            f"known: {', '.join(p.name for p in BENCHMARK_DATASETS)}"
        )
    found = []
    for ds in BENCHMARK_DATASETS:
        if wanted is not None and ds.name not in wanted:
            continue
        for folder in ds.folders:
            root = data_root / folder
            if root.is_dir():
                found.append((ds.name, ds.require_modality(), ds.paper_auroc, root))
                break
        else:
            if wanted is not None:
                raise FileNotFoundError(f"dataset {ds.name}: none of {list(ds.folders)} under {data_root}")
    return found


def default_teacher() -> str:
    """The paper's wide_resnet50_2 when its weights are on this machine, else efficientnet_lite0."""
    return "wide_resnet50_2" if teacher_weights_available("wide_resnet50_2", download=False) else "efficientnet_lite0"


def log_epochs(trainer, every: int, t0: float, label: str = "") -> None:
    """Print ``  <label>epoch N loss L Ts`` to stderr every ``every`` epochs (0: never), T counted from ``t0``."""
    if every:

        @trainer.on(Events.EPOCH_COMPLETED(every=every))
        def _log(engine):
            print(
                f"  {label}epoch {engine.state.epoch} loss {float(engine.state.output['loss']):.4f} "
                f"{time.time() - t0:.0f}s",
                file=sys.stderr,
                flush=True,
            )


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

    def __init__(
        self,
        name: str,
        root: Path,
        modality: str,
        seed: int,
        size: int,
        teacher,
        work_dir: Path,
        batch_size: int,
        device: torch.device,
        image_cache: dict,
    ):
        self.name, self.seed, self.size, self.batch_size, self.device = name, seed, size, batch_size, device
        self.modality = modality
        split = prepare_split(
            name,
            root,
            split_file=work_dir / "splits" / f"{name}_seed{seed}.json",
            seed=seed,
            val_fraction=get_dataset(name).val_fraction,
        )
        self.report = split["report"]
        self.has_masks = any(it.get("mask") for it in split["test"])
        keep = ("image", "label", "id") + (("mask", "extra_masks") if self.has_masks else ())

        def _items(subset):
            out = [{k: it[k] for k in keep if k in it} for it in split[subset]]
            return [{**it, "mask": it.get("mask")} for it in out] if self.has_masks else out

        self.train_items, self.val_items, self.test_items = _items("train"), _items("val"), _items("test")
        self.pre = build_preprocessing(modality, spatial_size=size, mask_key="mask" if self.has_masks else None)
        # one CacheDataset per dataset and size, over every seed's items: decode + resize once
        key = (name, size)
        if key not in image_cache:
            image_cache[key] = {"items": [], "index": {}, "ds": None}
        cache = image_cache[key]
        new = [it for it in self.train_items + self.val_items + self.test_items if it["id"] not in cache["index"]]
        if new:
            t0 = time.time()
            ds = CacheDataset(new, self.pre, progress=False, num_workers=0)
            cache["ds"] = ds if cache["ds"] is None else torch.utils.data.ConcatDataset([cache["ds"], ds])
            for it in new:
                cache["index"][it["id"]] = len(cache["index"])
            print(
                f"[{name}] decoded {len(new)} images at {size}² in {time.time() - t0:.0f} s",
                file=sys.stderr,
                flush=True,
            )
        self.train_ds = Subset(cache["ds"], [cache["index"][it["id"]] for it in self.train_items])
        self.test_ds = Subset(cache["ds"], [cache["index"][it["id"]] for it in self.test_items])
        self.val_ds = Subset(cache["ds"], [cache["index"][it["id"]] for it in self.val_items])
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

    def test_loader(self, subset: str = "test") -> DataLoader:
        ds = self.val_ds if subset == "val" else self.test_ds
        return DataLoader(ds, batch_size=self.batch_size, shuffle=False, num_workers=0)

    def feature_cache(self, model, store: dict | None) -> PlainTensorBatch:
        """``prepare_batch`` feeding cached teacher features from ``store`` (``None``: no cache, the
        model runs its teacher on the image)."""
        if store is None:
            return PlainTensorBatch(default_prepare_batch)
        cache = TeacherFeatureCache(model, self.pre, dtype=self.feature_dtype)
        cache.store = store  # shared by every method of this (dataset, seed): one teacher pass per image
        return PlainTensorBatch(cache)


def _evaluate_kd(run: DatasetRun, detector, subset: str = "test") -> dict:
    """Scores (and, where the test items have masks, maps and masks) of ``subset``."""
    out: dict[str, list] = {"scores": [], "labels": [], "maps": [], "masks": []}
    use_cache = subset == "test" and run.cache_test
    evaluator = SkipTSEvaluator(
        run.device,
        run.test_loader(subset),
        detector,
        prepare_batch=run.feature_cache(detector.model, run.test_store if use_cache else None),
    )

    @evaluator.on(Events.ITERATION_COMPLETED)
    def _collect(engine):
        _collect_output(out, engine.state.output, engine.state.batch, run.has_masks and subset == "test")

    t0 = time.time()
    evaluator.run()
    out["seconds"] = time.time() - t0
    return out


def _collect_output(out: dict, output: dict, batch: dict, with_maps: bool) -> None:
    out["scores"].extend(output["score"].float().tolist())
    out["labels"].extend(int(v) for v in output["label"].view(-1).tolist())
    if with_maps:
        out["maps"].append(output["pred"].detach().float().cpu().numpy()[:, 0].astype(np.float32))
        out["masks"].append(batch["mask"].cpu().numpy()[:, 0] > 0.5)


def _metrics(test: dict, val: dict | None) -> dict:
    """Image metrics (named as in ``metrics.json``: ``youden_threshold_on_test``, ``tp_at_youden``, ...),
    pixel metrics where masks exist, and the per-image scores the calibration study reads
    (``val_scores``: held-out normals; ``test_scores``/``test_labels``)."""
    m = report_metrics(np.asarray(test["scores"]), np.asarray(test["labels"]))
    if test["maps"]:
        maps, masks = np.concatenate(test["maps"]), np.concatenate(test["masks"])
        m.update(pixel_metrics(maps, masks))
    m["test_scores"] = [round(float(v), 6) for v in test["scores"]]
    m["test_labels"] = list(test["labels"])
    if val is not None:
        m["val_scores"] = [round(float(v), 6) for v in val["scores"]]
    return m


def run_kd_method(
    run: DatasetRun,
    method: str,
    epochs: int,
    log_every: int = 0,
    with_std: bool = False,
    anatomy_mask: bool = False,
) -> dict:
    """Train one teacher-student method on ``run`` for ``epochs`` epochs; evaluate the last epoch.

    With ``with_std`` (or a ``+std`` method) the same trained model is evaluated a second time with
    its per-level maps standardised; with ``anatomy_mask`` the detector bounds its maps, scores and
    level statistics by the anatomy mask of ``run.modality``; returns ``{method: metrics[, method +
    "+std": metrics]}``."""
    spec = method_spec(method)
    set_determinism(seed=run.seed)
    if spec["kind"] == "rd4ad":
        model, loss = RD4AD(run.teacher, **spec["model"]), RD4ADLoss()
    else:
        model, loss = SkipTS(run.teacher, **spec["model"]), build_loss(spec.get("loss_kind", "drkd"), **spec["loss"]())
    model = _channels_last(model)
    trainer = SkipTSTrainer(
        run.device,
        epochs,
        run.train_loader(),
        model,
        lr=PAPER_HPARAMS["lr"],
        betas=PAPER_HPARAMS["betas"],
        loss_function=loss,
        prepare_batch=denoising_prepare_batch(
            model, run.feature_cache(model, run.train_store), spec.get("denoise"), run.modality, run.seed
        ),
    )
    t0 = time.time()
    log_epochs(trainer, log_every, t0, f"[{run.name} s{run.seed} {method}] ")
    trainer.run()
    train_s = time.time() - t0
    # the maps of the similarity the model was trained with: the MSE ablation replaces M_l itself
    # (eq 1), so its L_sim and its test-time map are both per-pixel squared errors
    similarity = getattr(loss, "similarity", "cosine")
    n_params = sum(p.numel() for p in model.student.parameters())
    base = method[: -len(STD_SUFFIX)] if method.endswith(STD_SUFFIX) else method
    variants = ([base] if not spec.get("level_stats") else []) + (
        [base + STD_SUFFIX] if with_std or spec.get("level_stats") else []
    )
    out = {}
    detector = AnomalyDetector(
        model, similarity=similarity, anatomy_mask=anatomy_mask_config(anatomy_mask, run.modality)
    ).to(run.device)
    for name in variants:
        t1 = time.time()
        if name.endswith(STD_SUFFIX):
            stats = fit_level_stats(
                detector,
                run.train_loader(),
                device=run.device,
                similarity=similarity,
                prepare_batch=run.feature_cache(model, run.train_store),
            )
            detector.set_level_stats(stats)
        test = _evaluate_kd(run, detector)
        val = _evaluate_kd(run, detector, "val") if run.val_items else None
        m = _metrics(test, val)
        m.update(
            train_seconds=round(train_s, 1),
            eval_seconds=round(time.time() - t1, 1),
            final_loss=float(trainer.state.output["loss"].detach()),
            student_params=n_params,
        )
        out[name] = m
    return out


def patchcore_masked(model: PatchCore, image: torch.Tensor, teacher_feats, anatomy: AnatomyMaskLayer):
    """PatchCore's ``(map, score)`` inside the anatomy: the up-sampled patch scores zeroed outside
    ``anatomy``'s mask of ``image`` before the Gaussian filter and after it; the score the largest patch
    score of the patches at least half inside (all patches when none is)."""
    ps = model.patch_scores(image, teacher_feats)
    mask = anatomy(image)
    amap, _ = mask_map_and_score(fuse_anomaly_maps([ps], image.shape[-2:], model.blur, mask), mask)
    cells = F.interpolate(mask, size=ps.shape[-2:], mode="area") >= 0.5
    cells = cells | ~cells.flatten(1).any(dim=1).view(-1, 1, 1, 1)
    return amap, ps.masked_fill(~cells, float("-inf")).flatten(1).amax(dim=1)


def run_patchcore(run: DatasetRun, seed: int, anatomy_mask: bool = False) -> dict:
    set_determinism(seed=seed)
    anatomy = AnatomyMaskLayer(**anatomy_mask_config(True, run.modality)) if anatomy_mask else None
    model = PatchCore(run.teacher, seed=seed)
    train_cache = run.feature_cache(model, run.train_store)
    t0 = time.time()

    def _features(batch):
        return train_cache(batch, run.device)[3]["teacher_feats"]

    model.fit(run.train_loader(), device=run.device, feature_fn=_features)
    train_s = time.time() - t0
    results = {}
    t0 = time.time()
    for subset in ("test", "val"):
        if subset == "val" and not run.val_items:
            results["val"] = None
            continue
        cache = run.feature_cache(model, run.test_store if run.cache_test and subset == "test" else None)
        out: dict[str, list] = {"scores": [], "labels": [], "maps": [], "masks": []}
        with torch.inference_mode():
            for batch in run.test_loader(subset):
                image, label, *rest = cache(batch, run.device)
                feats = rest[1]["teacher_feats"] if rest else None
                if anatomy is None:
                    amap, s = model(image, teacher_feats=feats)
                else:
                    amap, s = patchcore_masked(model, image, feats, anatomy)
                _collect_output(
                    out, {"score": s, "label": label, "pred": amap}, batch, run.has_masks and subset == "test"
                )
        results[subset] = out
        if subset == "test":
            eval_s = time.time() - t0
    m = _metrics(results["test"], results["val"])
    m.update(train_seconds=round(train_s, 1), eval_seconds=round(eval_s, 1), memory_size=model.config["memory_size"])
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
                table[name][m] = {
                    "mean": statistics.mean(vals),
                    "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                    "n": len(vals),
                    "values": vals,
                    "train_seconds": statistics.mean(
                        r["train_seconds"] for r in records if r["dataset"] == name and r["method"] == m
                    ),
                }
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
            average[m] = {
                "mean": statistics.mean(means),
                "std": statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0,
                "n_seeds": len(per_seed),
            }
    ranking = sorted(average, key=lambda m: -average[m]["mean"])
    pixel: dict[str, dict[str, dict]] = {}
    for name, _ in datasets:
        for m in methods:
            recs = [r for r in records if r["dataset"] == name and r["method"] == m and "pixel_auroc" in r]
            if recs:
                pixel.setdefault(name, {})[m] = {k: [r[k] for r in recs] for k in PIXEL_KEYS}
    return {
        "table": table,
        "average": average,
        "ranking": ranking,
        "pixel": pixel,
        "selection": selection_scores(table, pixel, methods),
        "refused": refused_candidates(table, methods),
    }


PIXEL_KEYS = ("pixel_auroc", "aupro", "dice_best", "hit_rate")
SELECTION_RULE = (
    "mean rank, lower is better: half from the image AUROC ranks (averaged over the dev "
    "datasets), a quarter each from the LGG pixel AUROC and AUPRO ranks; means over seeds"
)


def _ranks(values: dict[str, float]) -> dict[str, float]:
    """Rank 1 = highest value; ties share their mean rank."""
    order = sorted(values, key=lambda m: -values[m])
    out: dict[str, float] = {}
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def selection_scores(table: dict, pixel: dict, methods: list[str]) -> dict[str, float]:
    """The rule that picks the shipped default (written down before the final runs, see
    SELECTION_RULE), over the methods that have every dev dataset: image AUROC rank per dataset,
    averaged, weighs 1/2; LGG pixel AUROC rank and AUPRO rank 1/4 each. Empty without LGG."""
    datasets = [d for d in table if table[d]]
    lgg = pixel.get("lgg", {})
    cands = [m for m in methods if all(m in table[d] for d in datasets) and m in lgg]
    if len(cands) < 2:
        return {}
    image = {m: 0.0 for m in cands}
    for d in datasets:
        for m, r in _ranks({m: table[d][m]["mean"] for m in cands}).items():
            image[m] += r / len(datasets)
    pa = _ranks({m: statistics.mean(lgg[m]["pixel_auroc"]) for m in cands})
    pro = _ranks({m: statistics.mean(lgg[m]["aupro"]) for m in cands})
    return {m: 0.5 * image[m] + 0.25 * pa[m] + 0.25 * pro[m] for m in cands}


#: the no-trade rule of issue 20 (written before the screen, benchmarks/README.md): a candidate that
#: loses image AUROC to ``paper_std`` (``skipts+std``) by more than one sd on any dev set is refused.
#: With one seed per screen, the sd is ``paper_std``'s seed-to-seed sd of the second confirmation
#: (bundles, seeds 0-2): BrainMRI 4.1, IQ-OTH/NCCD 0.5, LGG 5.9 points; with several seeds, the
#: sd over this run's seeds of the reference when it is larger
REFUSAL_REFERENCE = "skipts+std"
REFUSAL_SD = {"brainmri": 0.041, "iq_oth_nccd": 0.005, "lgg": 0.059}


def refused_candidates(table: dict, methods: list[str], reference: str = REFUSAL_REFERENCE) -> dict[str, list[str]]:
    """``{method: [dev sets where it loses image AUROC to reference by more than one sd]}`` for the
    methods refused by the no-trade rule (see ``REFUSAL_SD``); empty without the reference."""
    out: dict[str, list[str]] = {}
    for d, row in table.items():
        if reference not in row:
            continue
        sd = max(REFUSAL_SD.get(d, 0.0), row[reference]["std"])
        for m in methods:
            if m in row and m != reference and row[m]["mean"] < row[reference]["mean"] - sd:
                out.setdefault(m, []).append(d)
    return out


def markdown(summary: dict, methods: list[str], datasets: list[tuple[str, float]], meta: dict) -> str:
    labels = [method_spec(m)["label"] for m in methods]
    lines = [
        f"# Image AUROC (%), mean ± std over seeds {meta['seeds']}",
        "",
        f"Teacher `{meta['teacher']}`, {meta['size']}², {meta['schedule']}, last epoch, batch {meta['batch_size']}, "
        f"device {meta['device']}; duplicates removed, Table I split"
        + ("; scored inside the anatomy mask" if meta.get("anatomy_mask") else "")
        + f". Wall time {meta.get('wall_seconds', 0):.0f} s.",
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
        lines.append(f"| {name} | " + " | ".join(cells) + (f" | {paper:.1f} |" if paper is not None else " | – |"))
    avg = summary["average"]
    best = max((avg[m]["mean"] for m in avg), default=None)
    cells = []
    for m in methods:
        if m not in avg:
            cells.append("–")
            continue
        c = f"{100 * avg[m]['mean']:.1f} ± {100 * avg[m]['std']:.1f}"
        cells.append(f"**{c}**" if avg[m]["mean"] == best else c)
    papers = [p for _, p in datasets if p is not None]
    paper_avg = statistics.mean(papers) if papers else PAPER_AVERAGE
    lines.append("| **average** | " + " | ".join(cells) + f" | {paper_avg:.1f} |")
    lines += [
        "",
        "Training seconds per run (mean over seeds; PatchCore: feature extraction + coreset):",
        "",
        "| dataset | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for name, _ in datasets:
        row = summary["table"].get(name, {})
        lines.append(
            f"| {name} | " + " | ".join(f"{row[m]['train_seconds']:.0f}" if m in row else "–" for m in methods) + " |"
        )
    if summary["ranking"]:
        lines += ["", "Ranking by average AUROC: " + " > ".join(method_spec(m)["label"] for m in summary["ranking"])]
    for name, _ in datasets:
        pix = summary.get("pixel", {}).get(name)
        if not pix:
            continue
        lines += [
            "",
            f"Localisation on {name} (pixel metrics, %, mean ± std over seeds; Dice at the best threshold "
            "of the test maps, an upper bound; hit rate = lesion images whose map maximum is inside the lesion):",
            "",
            "| metric | " + " | ".join(labels) + " |",
            "|---|" + "---|" * len(labels),
        ]
        for key in PIXEL_KEYS:
            lines.append(f"| {key} | " + " | ".join(_fmt(pix[m][key]) if m in pix else "–" for m in methods) + " |")
    if summary.get("selection"):
        sel = summary["selection"]
        lines += [
            "",
            f"Selection rule ({SELECTION_RULE}): "
            + ", ".join(f"{method_spec(m)['label']} {v:.2f}" for m, v in sorted(sel.items(), key=lambda kv: kv[1])),
        ]
    if summary.get("refused"):
        lines += [
            "",
            f"Refused (image AUROC more than one sd below {REFUSAL_REFERENCE} on a dev set): "
            + ", ".join(f"{method_spec(m)['label']} ({', '.join(ds)})" for m, ds in summary["refused"].items()),
        ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def combine(files: list[Path], work_dir: Path, methods: list[str] | None = None) -> int:
    """One table from several ``quality.json`` files with the same settings (teacher, size, schedule)."""
    import json

    docs = [json.loads(Path(f).read_text()) for f in files]
    keys = {
        (d["meta"]["teacher"], d["meta"]["size"], d["meta"]["schedule"], bool(d["meta"].get("anatomy_mask")))
        for d in docs
    }
    if len(keys) != 1:
        raise SystemExit(f"the files differ in teacher/size/schedule/anatomy mask: {sorted(keys)}")
    records = [r for d in docs for r in d["runs"]]
    methods = methods or list(dict.fromkeys(r["method"] for r in records))
    names = list(dict.fromkeys(r["dataset"] for r in records))
    ds_pairs = [(n, get_dataset(n).paper_auroc) for n in names]
    meta = {
        **docs[0]["meta"],
        "datasets": names,
        "methods": methods,
        "combined_from": [str(f) for f in files],
        "seeds": sorted({r["seed"] for r in records}),
        "wall_seconds": sum(d["meta"].get("wall_seconds", 0) for d in docs),
    }
    summary = summarise(records, methods, ds_pairs)
    atomic_write_json(work_dir / "quality.json", {"meta": meta, "summary": summary, "runs": records})
    md = markdown(summary, methods, ds_pairs, meta)
    atomic_write_text(work_dir / "quality.md", md)
    print(md)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=None, help="default: $SKIPTS_DATA_ROOT or ../shared/data")
    p.add_argument("--datasets", nargs="+", default=None, help="default: every paper dataset present")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=method_choices())
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 3 4 (quick: 0)")
    p.add_argument("--epochs", type=int, default=None, help="default 200 (the paper)")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="train every method for this many optimizer steps instead (epochs = ceil(steps / "
        "batches per epoch) per dataset); quick mode: 100",
    )
    p.add_argument("--size", type=int, default=None, help="default 256 (quick: 128)")
    p.add_argument(
        "--teacher", default=None, help="default: wide_resnet50_2 when its weights are present, else efficientnet_lite0"
    )
    p.add_argument("--batch-size", type=int, default=PAPER_HPARAMS["batch_size"])
    p.add_argument("--quick", action="store_true", help=f"{QUICK['size']}², {QUICK['steps']} steps per method, seed 0")
    p.add_argument("--device", default="auto")
    p.add_argument("--work-dir", default="runs/benchmarks/quality")
    p.add_argument("--resume", action="store_true", help="keep the runs already in <work-dir>/quality.json")
    p.add_argument("--log-every", type=int, default=0)
    p.add_argument("--no-tune-malloc", action="store_true", help="keep glibc's default malloc (see tune_glibc_malloc)")
    p.add_argument(
        "--anatomy-mask",
        action="store_true",
        help="score inside the anatomy mask of the dataset's modality, as the bundles do (recorded in quality.json)",
    )
    p.add_argument(
        "--combine",
        type=Path,
        nargs="+",
        default=None,
        help="train nothing: merge the runs of these quality.json files (e.g. datasets run side by side "
        "in separate processes) into one table in --work-dir",
    )
    a = p.parse_args(argv)
    if a.combine:
        return combine(a.combine, Path(a.work_dir), a.methods if "--methods" in (argv or sys.argv) else None)

    size = a.size or (QUICK["size"] if a.quick else PAPER_HPARAMS["spatial_size"])
    seeds = a.seeds or (QUICK["seeds"] if a.quick else [0, 1, 2, 3, 4])
    steps = a.steps if a.steps is not None else (QUICK["steps"] if a.quick and a.epochs is None else None)
    epochs = a.epochs or PAPER_HPARAMS["max_epochs"]
    teacher_name = a.teacher or default_teacher()
    data_root = Path(
        a.data_root or os.environ.get("SKIPTS_DATA_ROOT") or Path(__file__).resolve().parents[2] / "shared" / "data"
    )
    work_dir = Path(a.work_dir)
    datasets = find_datasets(data_root, a.datasets)
    if not datasets:
        print(f"no paper dataset found under {data_root}", file=sys.stderr)
        return 1
    device = resolve_device(a.device)
    malloc_tuned = device.type == "cpu" and not a.no_tune_malloc and tune_glibc_malloc()
    out_json, out_md = work_dir / "quality.json", work_dir / "quality.md"
    meta = {
        "teacher": teacher_name,
        "size": size,
        "seeds": seeds,
        "batch_size": a.batch_size,
        "device": str(device),
        "schedule": f"{steps} optimizer steps per method" if steps else f"{epochs} epochs",
        "epochs": None if steps else epochs,
        "steps": steps,
        "methods": a.methods,
        "datasets": [d[0] for d in datasets],
        "data_root": str(data_root),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "malloc_tuned": malloc_tuned,
        "anatomy_mask": a.anatomy_mask,
    }
    records: list[dict] = []
    if a.resume and out_json.is_file():
        import json

        records = [
            r
            for r in json.loads(out_json.read_text())["runs"]
            if r["teacher"] == teacher_name
            and r["size"] == size
            and r.get("steps") == steps
            and (steps or r["epochs"] == epochs)
            and bool(r.get("anatomy_mask")) == a.anatomy_mask
        ]
    print(
        f"quality: {[d[0] for d in datasets]} x {a.methods} x seeds {seeds}; teacher {teacher_name}, {size}², "
        f"{meta['schedule']}, device {device}, {torch.get_num_threads()} threads",
        flush=True,
    )
    teachers: dict = {}

    def _teacher(taps):
        if taps not in teachers:
            teachers[taps] = _channels_last(build_teacher(teacher_name, taps=taps)).to(device)
        return teachers[taps]

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
            todo = [
                m
                for m in a.methods
                if not any(r["dataset"] == name and r["method"] == m and r["seed"] == seed for r in records)
            ]
            if not todo:
                continue
            runs: dict = {}
            for method in todo:
                if any(r["dataset"] == name and r["method"] == method and r["seed"] == seed for r in records):
                    continue  # a +std variant evaluated with its base method
                spec = method_spec(method)
                taps = spec.get("teacher_taps")
                if taps not in runs:
                    runs[taps] = DatasetRun(
                        name, root, modality, seed, size, _teacher(taps), work_dir, a.batch_size, device, image_cache
                    )
                run = runs[taps]
                n_batches = math.ceil(len(run.train_items) / a.batch_size)
                ep = math.ceil(steps / n_batches) if steps else epochs
                t0 = time.time()
                if spec["kind"] == "patchcore":
                    results = {method: run_patchcore(run, seed, a.anatomy_mask)}
                else:
                    results = run_kd_method(
                        run, method, ep, a.log_every, with_std=method + STD_SUFFIX in todo, anatomy_mask=a.anatomy_mask
                    )
                for meth, m in results.items():
                    rec = {
                        "dataset": name,
                        "method": meth,
                        "seed": seed,
                        "teacher": teacher_name,
                        "size": size,
                        "epochs": ep,
                        "steps": steps,
                        "anatomy_mask": a.anatomy_mask,
                        "n_train": len(run.train_items),
                        "n_test": len(run.test_items),
                        "wall_seconds": round(time.time() - t0, 1),
                        **m,
                    }
                    records.append(rec)
                    pix = (
                        f"  pixel AUROC {100 * m['pixel_auroc']:.1f} AUPRO {100 * m['aupro']:.1f} hit {100 * m['hit_rate']:.0f}%"
                        if "pixel_auroc" in m
                        else ""
                    )
                    print(
                        f"[{name} seed {seed}] {method_spec(meth)['label']:<12} AUROC {100 * m['auroc']:.1f}{pix}  "
                        f"train {m['train_seconds']:.0f}s ({ep} epochs)  eval {m['eval_seconds']:.0f}s  "
                        f"[{time.time() - t_start:.0f}s]",
                        flush=True,
                    )
                _write()
    md = _write()
    print()
    print(md)
    print(f"written: {out_md}, {out_json}; wall {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
