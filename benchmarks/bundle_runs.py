"""The README's results table, produced by the bundles themselves: one
``python -m monai.bundle run --config_file bundles/<dataset>/train.json`` per seed, then the test
metrics each run wrote (``<run>/metrics.json``) gathered into mean ± standard deviation.

    python benchmarks/bundle_runs.py --dataset brainmri --dataset-dir ../shared/data/brainmri \\
        --seeds 0 1 2 3 4 --teacher efficientnet_lite0 --jobs 1

Every run is the bundle's whole pipeline (split with duplicates removed, 200 epochs, calibration on
the validation normals, last-epoch model on the test split, heat maps). Runs already finished in
``--work-dir`` (their ``metrics.json`` holds ``auroc``) are not repeated; a stopped run resumes
from its ``checkpoint.pt`` (the bundle's ``resume``). ``--jobs`` runs seeds side by side (one GPU
holds several of these small models). Anything after ``--`` goes to every bundle run unchanged
(e.g. ``-- --mlflow false --num_workers 4``).

Writes ``<work-dir>/<dataset>_summary.json`` and prints one Markdown table row.

    python benchmarks/bundle_runs.py --rank default=runs/gpu3/ocb_e25 paper=runs/gpu/paper

ranks configurations (each a work dir holding the dev datasets' summaries) with the selection rule
that picks the shipped default (``quality.SELECTION_RULE``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from monai_skipts.utils import atomic_write_json  # noqa: E402


def paper_auroc(dataset: str) -> float | None:
    """The paper's Table II AUROC (%) for this bundle, from its ``metadata.json``."""
    return json.loads((ROOT / "bundles" / dataset / "metadata.json").read_text()).get("paper_auroc")


def run_dir(work_dir: Path, dataset: str, seed: int, preset: str | None = None) -> Path:
    return work_dir / (f"{dataset}_{preset}_s{seed}" if preset else f"{dataset}_s{seed}")


def config_files(dataset: str, preset: str | None = None) -> str:
    """The ``--config_file`` value: the bundle's train.json, then the preset's overrides if any."""
    files = [f"bundles/{dataset}/train.json"] + ([f"bundles/presets/{preset}.json"] if preset else [])
    return files[0] if len(files) == 1 else "[" + ",".join(repr(f) for f in files) + "]"


def finished(out: Path) -> dict | None:
    f = out / "metrics.json"
    if not f.is_file():
        return None
    m = json.loads(f.read_text())
    return m if "auroc" in m else None


def run_one(args: argparse.Namespace, seed: int, extra: list[str]) -> dict:
    out = run_dir(args.work_dir, args.dataset, seed, args.preset)
    done = finished(out)
    if done is not None:
        print(f"[seed {seed}] already finished: AUROC {100 * done['auroc']:.2f}", flush=True)
        return done
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        config_files(args.dataset, args.preset),
        "--dataset_dir",
        str(args.dataset_dir),
        "--output_dir",
        str(out),
        "--teacher",
        args.teacher,
        "--seed",
        str(seed),
        *extra,
    ]
    t0 = time.perf_counter()
    with open(out / "bundle_run.log", "ab") as log:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"seed {seed}: bundle run failed (exit {rc}); see {out / 'bundle_run.log'}")
    m = finished(out)
    if m is None:
        raise RuntimeError(f"seed {seed}: the bundle run ended without {out / 'metrics.json'}")
    m = dict(m, wall_seconds=round(seconds, 1))
    print(f"[seed {seed}] AUROC {100 * m['auroc']:.2f}  AUPR {100 * m['aupr']:.2f}  ({seconds:.0f} s)", flush=True)
    return m


#: metrics gathered over seeds (in %) when every run has them: image, pixel (datasets with masks),
#: and the false-positive rate on test normals at the calibrated threshold against its target
SUMMARY_KEYS = ("auroc", "aupr", "pixel_auroc", "aupro", "dice", "dice_best", "hit_rate", "test_fpr_at_threshold")


def summarise(dataset: str, teacher: str, per_seed: dict[int, dict]) -> dict:
    seeds = sorted(per_seed)
    sd = statistics.stdev if len(seeds) > 1 else (lambda v: 0.0)
    out = {"dataset": dataset, "teacher": teacher, "seeds": seeds}
    for key in SUMMARY_KEYS:
        vals = [per_seed[s].get(key) for s in seeds]
        if key == "test_fpr_at_threshold":
            # metrics.json's specificity at the calibrated decision threshold ("cal_specificity" in runs
            # written before it was renamed)
            spec = [per_seed[s].get("specificity_at_decision", per_seed[s].get("cal_specificity")) for s in seeds]
            vals = [None if v is None else 1 - v for v in spec]
        if any(v is None for v in vals):
            continue
        vals = [100 * v for v in vals]
        out.update({key: vals, f"{key}_mean": statistics.fmean(vals), f"{key}_std": sd(vals)})
    cal = [per_seed[s].get("calibration") or {} for s in seeds]
    out["target_fpr"] = cal[0].get("target_fpr")
    out["n_val_normals"] = [c.get("n_normals") for c in cal]
    out.update(paper_auroc=paper_auroc(dataset), split=per_seed[seeds[0]].get("split"))
    return out


def rank(entries: list[str]) -> int:
    """``--rank NAME=WORK_DIR ...``: the selection rule (``quality.SELECTION_RULE``, written down before
    the final runs) over configurations whose summaries (``*_summary.json``, one per dev dataset) lie
    in each WORK_DIR; prints one Markdown table, lowest score first."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quality import SELECTION_RULE, selection_scores

    table: dict[str, dict] = {}
    lgg: dict[str, dict] = {}
    for entry in entries:
        name, _, folder = entry.partition("=")
        files = sorted(Path(folder).glob("*_summary.json"))
        if not name or not files:
            raise SystemExit(f"--rank {entry!r}: want NAME=WORK_DIR with *_summary.json files in it")
        for f in files:
            sm = json.loads(f.read_text())
            table.setdefault(sm["dataset"], {})[name] = {"mean": sm["auroc_mean"], "sd": sm["auroc_std"]}
            if sm["dataset"] == "lgg":
                lgg[name] = sm
    names = [e.partition("=")[0] for e in entries]
    scores = selection_scores(table, {"lgg": lgg}, names)
    if not scores:
        raise SystemExit("--rank: every configuration needs a summary of each dataset, LGG included")
    datasets = sorted(table)
    cell = lambda m, s: f"{m:.1f} ± {s:.1f}"  # noqa: E731
    print("| configuration | " + " | ".join(datasets) + " | LGG pixel AUROC | LGG AUPRO | LGG hit rate | rule score |")
    print("|---" * (len(datasets) + 5) + "|")
    for n in sorted(scores, key=scores.get):
        row = [cell(table[d][n]["mean"], table[d][n]["sd"]) for d in datasets]
        row += [cell(lgg[n][k + "_mean"], lgg[n][k + "_std"]) for k in ("pixel_auroc", "aupro", "hit_rate")]
        print(f"| {n} | " + " | ".join(row) + f" | {scores[n]:.2f} |")
    print(f"\nRule: {SELECTION_RULE}.")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--rank"]:
        return rank(argv[1:])
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="brainmri")
    p.add_argument("--dataset-dir", type=Path, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--teacher", default="auto")
    p.add_argument("--jobs", type=int, default=1, help="seeds run side by side")
    p.add_argument("--work-dir", type=Path, default=Path("runs/bundles"))
    p.add_argument("--preset", default=None, help="a bundles/presets/<name>.json merged over the bundle (e.g. paper)")
    args = p.parse_args(argv)
    if not (ROOT / "bundles" / args.dataset / "train.json").is_file():
        p.error(f"no bundle bundles/{args.dataset}/train.json")
    args.dataset_dir = args.dataset_dir.resolve()
    args.work_dir = args.work_dir.resolve()
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {s: pool.submit(run_one, args, s, extra) for s in args.seeds}
        per_seed, failed = {}, []
        for s, f in futures.items():
            try:
                per_seed[s] = f.result()
            except RuntimeError as e:
                print(e, file=sys.stderr)
                failed.append(s)
    if not per_seed:
        return 1
    summary = summarise(args.dataset, args.teacher, per_seed)
    summary["bundle_args"] = extra
    summary["preset"] = args.preset
    name = f"{args.dataset}_{args.preset}" if args.preset else args.dataset
    atomic_write_json(args.work_dir / f"{name}_summary.json", summary)
    paper = summary["paper_auroc"]
    cells = [
        f"{summary[k + '_mean']:.1f} ± {summary[k + '_std']:.1f}" if k + "_mean" in summary else "–"
        for k in SUMMARY_KEYS
    ]
    print("| dataset | preset | " + " | ".join(SUMMARY_KEYS) + " | seeds | paper |")
    print(
        f"| {args.dataset} | {args.preset or 'default'} | "
        + " | ".join(cells)
        + f" | {len(per_seed)} | {paper if paper is not None else '–'} |"
    )
    print("per seed AUROC:", ", ".join(f"{s}: {a:.2f}" for s, a in zip(summary["seeds"], summary["auroc"])))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
