"""Does the calibrated decision threshold keep its promise? The false-positive rate observed on the
test normals at the threshold each calibration method sets from the validation normals, against
``target_fpr``, per dataset and seed.

    python benchmarks/calibration.py runs/bundles                 # bundle runs (val_scores.csv + test_scores.csv)
    python benchmarks/calibration.py runs/benchmarks/quality/quality.json --target-fpr 0.05 0.1

Cross-fitted rows (``cross_fit/<method>``): runs trained with ``--calibration_folds K`` also hold
``cross_fit_scores.csv`` (the out-of-fold scores of the training normals,
:class:`monai_skipts.calibration.CrossFitScorer`); each method is then applied to those too, beside the
same run's validation normals, against the same test normals. The dev-set measurement (3 dev sets x
3 seeds, K = 5)::

    for ds in brainmri iqothnccd lgg; do for s in 0 1 2; do
      python -m monai.bundle run --config_file bundles/$ds/train.json --seed $s --calibration_folds 5 \
        --output_dir runs/calibration/$ds-s$s; done; done
    python benchmarks/calibration.py runs/calibration

Inputs: bundle output folders (found recursively: each holds ``val_scores.csv`` written by the
calibrator and ``test_scores.csv`` written by the test evaluation) and/or ``quality.json`` files of
``benchmarks/quality.py`` (their runs carry ``val_scores``, ``test_scores`` and ``test_labels``).
Every method is applied to the same scores, so the comparison is paired. The run's dataset is the
``split.json`` dataset (bundles) or the record's (quality.py).

Output: one Markdown table per target FPR: observed test FPR (mean ± std over runs, in %) for each
method and dataset, the mean over datasets and its distance from the target, and the number of
validation normals the runs had (and the out-of-fold normals of cross-fitted runs), with the 90 %
bound on the FPR that ``n`` normals allow each method (:func:`monai_skipts.calibration.fpr_uncertainty`,
mean over runs). Written to ``--out`` as JSON too.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from monai_skipts.calibration import (  # noqa: E402
    CALIBRATION_METHODS,
    calibrate_threshold,
    fpr_uncertainty,  # noqa: E402
)
from monai_skipts.utils import atomic_write_json  # noqa: E402


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def bundle_runs(folder: Path) -> list[dict]:
    """``{"dataset", "run", "val", "test_normal"}`` for every bundle output folder under ``folder``."""
    runs = []
    for val_csv in sorted(folder.rglob("val_scores.csv")):
        out = val_csv.parent
        test_csv = out / "test_scores.csv" if (out / "test_scores.csv").is_file() else out / "scores.csv"
        if not test_csv.is_file():
            continue
        test = _read_csv(test_csv)
        split = json.loads((out / "split.json").read_text()) if (out / "split.json").is_file() else {}
        run = {
            "dataset": split.get("dataset", out.name),
            "run": str(out),
            "val": [float(r["score"]) for r in _read_csv(val_csv)],
            "test_normal": [float(r["score"]) for r in test if str(r.get("label")) == "0"],
        }
        if (out / "cross_fit_scores.csv").is_file():
            run["cross_fit"] = [float(r["score"]) for r in _read_csv(out / "cross_fit_scores.csv")]
        runs.append(run)
    return runs


def quality_runs(path: Path) -> list[dict]:
    """The same from a ``quality.json`` of benchmarks/quality.py (one entry per dataset, method, seed)."""
    doc = json.loads(path.read_text())
    runs = []
    for r in doc.get("runs", []):
        if not r.get("val_scores") or "test_scores" not in r:
            continue
        normal = [s for s, y in zip(r["test_scores"], r["test_labels"]) if y == 0]
        runs.append(
            {
                "dataset": r["dataset"],
                "run": f"{path}:{r['method']}:s{r['seed']}",
                "method_of_run": r["method"],
                "val": r["val_scores"],
                "test_normal": normal,
            }
        )
    return runs


def _calibration_set(run: dict, method: str) -> tuple[list[float], str]:
    """The scores a row calibrates on and its method: ``cross_fit/<m>`` rows the out-of-fold scores."""
    if method.startswith("cross_fit/"):
        return run["cross_fit"], method.split("/", 1)[1]
    return run["val"], method


def observed_fpr(run: dict, target: float, method: str) -> float:
    scores, m = _calibration_set(run, method)
    t = calibrate_threshold(np.asarray(scores), target, method=m)
    return float(np.mean(np.asarray(run["test_normal"]) >= t))


def fpr_bound(run: dict, target: float, method: str) -> float:
    scores, m = _calibration_set(run, method)
    return fpr_uncertainty(len(scores), target, m)["fpr_bound"]


def study(runs: list[dict], targets: list[float]) -> dict:
    """Observed test FPR per target, method and dataset."""
    import warnings

    out: dict = {}
    datasets = sorted({r["dataset"] for r in runs})
    methods = list(CALIBRATION_METHODS)
    if any("cross_fit" in r for r in runs):
        methods += [f"cross_fit/{m}" for m in CALIBRATION_METHODS]
    for target in targets:
        by_method = {}
        for method in methods:
            per_ds = {}
            for d in datasets:
                these = [r for r in runs if r["dataset"] == d and ("cross_fit" in r or "/" not in method)]
                if not these:
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    vals = [observed_fpr(r, target, method) for r in these]
                per_ds[d] = {
                    "values": vals,
                    "mean": statistics.fmean(vals),
                    "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                    "bound": statistics.fmean(fpr_bound(r, target, method) for r in these),
                    "n": sorted({len(_calibration_set(r, method)[0]) for r in these}),
                }
            mean = statistics.fmean(v["mean"] for v in per_ds.values())
            by_method[method] = {"datasets": per_ds, "mean": mean, "error": mean - target}
        out[str(target)] = by_method
    out["n_val"] = {d: sorted({len(r["val"]) for r in runs if r["dataset"] == d}) for d in datasets}
    out["n_runs"] = {d: sum(r["dataset"] == d for r in runs) for d in datasets}
    return out


def markdown(result: dict, targets: list[float]) -> str:
    datasets = sorted(result["n_runs"])
    lines = []
    for target in targets:
        res = result[str(target)]
        lines += [
            f"Observed test FPR (%) at the calibrated threshold, target {100 * target:g} %, mean ± std over runs "
            "[90 % bound that n calibration normals allow; n]:",
            "",
            "| method | "
            + " | ".join(
                f"{d} (n_val {'/'.join(map(str, result['n_val'][d]))}, {result['n_runs'][d]} runs)" for d in datasets
            )
            + " | mean | mean − target |",
            "|---|" + "---|" * (len(datasets) + 2),
        ]
        for method, r in res.items():
            cells = [
                f"{100 * c['mean']:.1f} ± {100 * c['std']:.1f} [{100 * c['bound']:.0f}; {'/'.join(map(str, c['n']))}]"
                if (c := r["datasets"].get(d))
                else "–"
                for d in datasets
            ]
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {100 * r['mean']:.1f} | {100 * r['error']:+.1f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "inputs", nargs="+", type=Path, help="bundle run folders (searched recursively) or quality.json files"
    )
    p.add_argument("--target-fpr", type=float, nargs="+", default=[0.05])
    p.add_argument("--method-of-run", default=None, help="quality.json: only runs of this quality.py method")
    p.add_argument("--out", type=Path, default=Path("runs/benchmarks/calibration.json"))
    a = p.parse_args(argv)
    runs: list[dict] = []
    for path in a.inputs:
        runs += quality_runs(path) if path.is_file() else bundle_runs(path)
    if a.method_of_run:
        runs = [r for r in runs if r.get("method_of_run", a.method_of_run) == a.method_of_run]
    if not runs:
        print("no runs with validation and test scores found", file=sys.stderr)
        return 1
    result = study(runs, a.target_fpr)
    atomic_write_json(a.out, result)
    print(markdown(result, a.target_fpr))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
