"""The paper's protocol on one dataset, in Python (no bundle): dedup, Table I split, 256², train
``epochs`` epochs, evaluate the LAST epoch's model on the test split. Used by the benchmark
scripts; the bundles wire the same components from JSON.

    python benchmarks/protocol.py --dataset brainmri --root ../shared/data/brainmri \
        --teacher efficientnet_lite0 --epochs 200 --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Events
from monai.data import CacheDataset, DataLoader
from monai.utils import set_determinism

from monai_skipts.data import get_dataset, prepare_split
from monai_skipts.engines import SkipTSEvaluator, SkipTSTrainer, TeacherFeatureCache
from monai_skipts.losses import DRKDLoss
from monai_skipts.metrics import image_metrics
from monai_skipts.networks import SkipTS
from monai_skipts.transforms import build_preprocessing

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import log_epochs  # noqa: E402  (benchmarks/ is not a package)


def default_modality(dataset: str) -> str:
    """The modality preset of ``dataset`` from the package's dataset table (``monai_skipts.data.DATASETS``,
    spelling-tolerant); an unknown dataset, or a bare layout without a preset, is an error."""
    return get_dataset(dataset).require_modality()


def run_protocol(
    dataset: str,
    root: str | Path,
    work_dir: str | Path,
    teacher: str = "efficientnet_lite0",
    epochs: int = 200,
    seed: int = 0,
    spatial_size: int = 256,
    batch_size: int = 16,
    lr: float = 0.005,
    modality: str | None = None,
    model_kwargs: dict | None = None,
    loss_kwargs: dict | None = None,
    device: str = "auto",
    log_every: int = 0,
) -> dict:
    """Train and evaluate once; returns the test metrics plus timing."""
    set_determinism(seed=seed)
    work_dir = Path(work_dir)
    split = prepare_split(dataset, root, split_file=work_dir / f"split_seed{seed}.json", seed=seed)
    pre = build_preprocessing(modality or default_modality(dataset), spatial_size=spatial_size)
    train_ds = CacheDataset(split["train"], pre, progress=False)
    test_ds = CacheDataset(split["test"], pre, progress=False)
    model = SkipTS(teacher, **(model_kwargs or {}))
    g = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train_ds, batch_size=batch_size, shuffle=True, generator=g, num_workers=0)
    trainer = SkipTSTrainer(
        device,
        epochs,
        train_loader,
        model,
        lr=lr,
        loss_function=DRKDLoss(**(loss_kwargs or {})),
        prepare_batch=TeacherFeatureCache(model, pre),
    )
    t0 = time.time()
    log_epochs(trainer, log_every, t0)
    trainer.run()
    train_s = time.time() - t0
    scores, labels = [], []
    evaluator = SkipTSEvaluator(device, DataLoader(test_ds, batch_size=batch_size), model)

    @evaluator.on(Events.ITERATION_COMPLETED)
    def _collect(engine):
        scores.extend(engine.state.output["score"].tolist())
        labels.extend(int(v) for v in engine.state.output["label"].view(-1).tolist())

    evaluator.run()
    m = image_metrics(np.asarray(scores), np.asarray(labels))
    m.update(
        train_seconds=round(train_s, 1), n_train=len(split["train"]), final_loss=float(trainer.state.output["loss"])
    )
    return m


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="brainmri")
    p.add_argument(
        "--root", default=None, help="dataset folder (default: $SKIPTS_DATA_ROOT or ../shared/data/<dataset>)"
    )
    p.add_argument("--teacher", default="efficientnet_lite0")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--model", default="{}", help="JSON of SkipTS keyword arguments")
    p.add_argument("--loss", default="{}", help="JSON of DRKDLoss keyword arguments")
    p.add_argument("--work-dir", default="runs/benchmarks")
    p.add_argument("--out", default=None, help="append one JSON line per seed here")
    p.add_argument("--log-every", type=int, default=0)
    a = p.parse_args(argv)
    data_root = Path(os.environ.get("SKIPTS_DATA_ROOT", Path(__file__).resolve().parents[2] / "shared" / "data"))
    ds = get_dataset(a.dataset)
    # the first of the table's folder names present under the data root (quality.py tries the same)
    root = (
        Path(a.root)
        if a.root
        else next((data_root / f for f in ds.folders if (data_root / f).is_dir()), data_root / ds.name)
    )
    aurocs = []
    for seed in a.seeds:
        m = run_protocol(
            a.dataset,
            root,
            a.work_dir,
            a.teacher,
            a.epochs,
            seed,
            a.size,
            model_kwargs=json.loads(a.model),
            loss_kwargs=json.loads(a.loss),
            log_every=a.log_every,
        )
        rec = {
            "dataset": a.dataset,
            "teacher": a.teacher,
            "epochs": a.epochs,
            "seed": seed,
            "size": a.size,
            "model": json.loads(a.model),
            "loss": json.loads(a.loss),
            **m,
        }
        print(json.dumps(rec), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(rec) + "\n")
        aurocs.append(m["auroc"])
    sd = statistics.stdev(aurocs) if len(aurocs) > 1 else 0.0
    print(
        f"{a.dataset} {a.teacher} {a.epochs} epochs seeds {a.seeds}: AUROC {100 * statistics.mean(aurocs):.1f} ± {100 * sd:.1f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
