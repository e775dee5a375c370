"""How burned-in marks (captions, calipers, rulers, arrows) move the decision of a trained detector.

A model of the bundles' default (one-class bottleneck, no skip connections, RD4AD loss, level
statistics and the anatomy mask on) is trained on a real dataset's normals (``quality.py``'s data
loading: its split, preprocessing and teacher-feature cache), optionally with captions pasted into a
share of the training images as normal content (``--annotations``: the bundles'
``synthetic_lesions["annotations"]``, ``monai_skipts.bundle.denoising_prepare_batch``). Its threshold is
calibrated on the validation normals (``--target-fpr``, lognormal as the bundles; gaussian where a
score is not positive). Then held-out test
normals below the threshold get marks from ``RandBurnedInAnnotation`` (drawn in the image's brightest
value), placed by rejection sampling:

============ =======================================================================================
``outside``  captions and markers with no pixel in the anatomy of the clean image
``inside``   one caption with every pixel in the anatomy of the clean image
============ =======================================================================================

For each placement and for the detector with and without its anatomy mask (each calibrated on the
same validation normals): the score shift as a share of the clean score's distance to the threshold
(``(s_marked - s_clean) / (threshold - s_clean)``, 1 = moved onto the threshold), and how many
decisions flip (normal -> anomalous).

    python benchmarks/burned_in_text.py --datasets lgg --epochs 20 --size 128 --teacher efficientnet_lite0
    python benchmarks/burned_in_text.py ... --annotations 0.5

Output: ``<work-dir>/burned_in_text.json`` (settings, threshold, per-image scores and shares, summary).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from monai.utils import set_determinism

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import DatasetRun, _channels_last, find_datasets, tune_glibc_malloc  # noqa: E402

from monai_skipts.bundle import denoising_prepare_batch  # noqa: E402
from monai_skipts.calibration import threshold_record  # noqa: E402
from monai_skipts.engines import PAPER_HPARAMS, SkipTSTrainer  # noqa: E402
from monai_skipts.inferers import fit_level_stats  # noqa: E402
from monai_skipts.losses import build_loss  # noqa: E402
from monai_skipts.networks import AnomalyDetector, SkipTS, build_teacher  # noqa: E402
from monai_skipts.transforms import RandBurnedInAnnotation  # noqa: E402
from monai_skipts.utils import atomic_write_json, resolve_device  # noqa: E402

#: the placements and the marks drawn for them
PLACEMENTS = {
    "outside": {"max_texts": 1, "max_markers": 2},
    "inside": {"max_texts": 1, "max_markers": 0},
}


def _images(loader) -> torch.Tensor:
    out = []
    for batch in loader:
        img = batch["image"]
        out.append(img.as_tensor() if hasattr(img, "as_tensor") else img)
    return torch.cat(out).float()


def _scores(det: AnomalyDetector, x: torch.Tensor, device, batch: int = 16) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([det(x[i : i + batch].to(device))[1].double().cpu() for i in range(0, len(x), batch)])


def place_marks(
    images: torch.Tensor, anatomy: torch.Tensor, placement: str, seed: int, tries: int = 3000
) -> tuple[torch.Tensor, list[bool]]:
    """``images`` with marks entirely outside (or, ``"inside"``, inside) their ``anatomy`` masks, and
    whether a placement was found for each image (``False``: the image is left unmarked)."""
    marks = RandBurnedInAnnotation(prob=1.0, dark_fraction=0.0, **PLACEMENTS[placement])
    marks.set_random_state(seed)
    out, found = images.clone(), []
    for i, (img, body) in enumerate(zip(images, anatomy)):
        ok = False
        for _ in range(tries):
            marked = marks(img)
            drawn = marks.last_mask[0] > 0
            if not bool(drawn.any()):
                continue
            ok = not bool((drawn & body).any()) if placement == "outside" else bool(body[drawn].all())
            if ok:
                out[i] = torch.as_tensor(marked)
                break
        found.append(ok)
    return out, found


def calibrate(scores: torch.Tensor, target_fpr: float) -> dict:
    """The bundles' threshold record (lognormal); gaussian where a score is not positive."""
    method = "lognormal" if bool((scores > 0).all()) else "gaussian"
    return threshold_record(scores.numpy(), target_fpr, method)


def measure(det: AnomalyDetector, val: torch.Tensor, clean: torch.Tensor, marked: dict, target_fpr: float, device):
    """Threshold, clean scores, and per placement the marked scores, shares of the distance and flips."""
    rec = calibrate(_scores(det, val, device), target_fpr)
    thr = rec["value"]
    s0 = _scores(det, clean, device)
    out = {"threshold": thr, "calibration": rec["method"], "clean_scores": s0.tolist(), "placements": {}}
    for name, (x, found) in marked.items():
        s1 = _scores(det, x, device)
        idx = [i for i, f in enumerate(found) if f and s0[i] < thr]
        shares = [float((s1[i] - s0[i]) / (thr - s0[i])) for i in idx]
        out["placements"][name] = {
            "n": len(idx),
            "scores": s1.tolist(),
            "shares": shares,
            "share_median": statistics.median(shares) if shares else None,
            "share_min": min(shares) if shares else None,
            "share_max": max(shares) if shares else None,
            "flips": sum(1 for i in idx if s1[i] >= thr),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=None, help="default: $SKIPTS_DATA_ROOT or ../shared/data")
    p.add_argument("--datasets", nargs="+", default=["lgg"], help="one dataset (default lgg)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--teacher", default="efficientnet_lite0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=PAPER_HPARAMS["batch_size"])
    p.add_argument("--annotations", type=float, default=0.0, help="share of training images given captions")
    p.add_argument("--n-images", type=int, default=16, help="held-out normals to mark")
    p.add_argument("--target-fpr", type=float, default=0.05)
    p.add_argument("--device", default="auto")
    p.add_argument("--work-dir", default="runs/benchmarks/burned_in_text")
    a = p.parse_args(argv)
    data_root = Path(
        a.data_root or os.environ.get("SKIPTS_DATA_ROOT") or Path(__file__).resolve().parents[2] / "shared" / "data"
    )
    found = find_datasets(data_root, a.datasets[:1])
    if not found:
        print(f"{a.datasets[0]} not found under {data_root}", file=sys.stderr)
        return 1
    name, modality, _, root = found[0]
    device = resolve_device(a.device)
    if device.type == "cpu":
        tune_glibc_malloc()
    work_dir = Path(a.work_dir)
    t0 = time.time()
    teacher = _channels_last(build_teacher(a.teacher)).to(device)
    run = DatasetRun(name, root, modality, a.seed, a.size, teacher, work_dir, a.batch_size, device, {})
    set_determinism(seed=a.seed)
    model = _channels_last(SkipTS(teacher, skip="none", bottleneck=True))
    lesions = {"prob": 0.0, "annotations": a.annotations} if a.annotations > 0 else None
    trainer = SkipTSTrainer(
        device,
        a.epochs,
        run.train_loader(),
        model,
        lr=PAPER_HPARAMS["lr"],
        betas=PAPER_HPARAMS["betas"],
        loss_function=build_loss("rd4ad"),
        prepare_batch=denoising_prepare_batch(
            model, run.feature_cache(model, run.train_store), lesions, modality, a.seed
        ),
    )
    trainer.run()
    train_s = time.time() - t0
    det = AnomalyDetector(model, preprocessing={"modality": modality, "spatial_size": a.size}, anatomy_mask=True)
    det = det.to(device).eval()
    det.set_level_stats(
        fit_level_stats(det, run.train_loader(), device=device, prepare_batch=run.feature_cache(model, run.train_store))
    )
    val = _images(run.test_loader("val"))
    test_labels = [int(it["label"]) for it in run.test_items]
    normals = _images(run.test_loader("test"))[torch.tensor(test_labels) == 0]
    # the held-out normals below the masked detector's threshold, in split order
    thr = calibrate(_scores(det, val, device), a.target_fpr)["value"]
    s = _scores(det, normals, device)
    clean = normals[s < thr][: a.n_images]
    with torch.no_grad():
        anatomy = det.anatomy_mask(clean.to(device))[:, 0].cpu() > 0
    marked = {k: place_marks(clean, anatomy, k, a.seed + i) for i, k in enumerate(PLACEMENTS)}
    results = {"masked": measure(det, val, clean, marked, a.target_fpr, device)}
    det.set_anatomy_mask(None)
    results["plain"] = measure(det, val, clean, marked, a.target_fpr, device)
    doc = {
        "settings": {
            "dataset": name,
            "modality": modality,
            "epochs": a.epochs,
            "size": a.size,
            "teacher": a.teacher,
            "seed": a.seed,
            "annotations": a.annotations,
            "target_fpr": a.target_fpr,
            "n_val_normals": len(val),
            "n_marked": len(clean),
            "model": "bottleneck, no skip connections, RD4AD loss, level statistics",
            "device": str(device),
            "torch": torch.__version__,
        },
        "placed": {k: sum(v[1]) for k, v in marked.items()},
        "train_seconds": round(train_s, 1),
        "wall_seconds": round(time.time() - t0, 1),
        "results": results,
    }
    atomic_write_json(work_dir / "burned_in_text.json", doc)
    for mode, r in results.items():
        for place, m in r["placements"].items():
            if m["n"]:
                print(
                    f"{name} annotations {a.annotations:g} {mode:6s} {place:7s}: share of the distance to the threshold "
                    f"median {m['share_median']:.3f} [{m['share_min']:.3f}, {m['share_max']:.3f}], "
                    f"flips {m['flips']}/{m['n']}"
                )
    print(f"written: {work_dir / 'burned_in_text.json'}; wall {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
