"""Archive scale: images/s of the registered MLflow model as a Spark UDF (``mlflow.pyfunc.spark_udf``)
over a Spark DataFrame of file paths, with 1 and 2 Spark workers (``local[1]``, ``local[2]``) on this
machine, in one run.

    OMP_NUM_THREADS=1 python benchmarks/archive.py             # a phantom model, 256 phantom PNGs (256 px)
    python benchmarks/archive.py --model-uri models:/skipts-brainmri@champion \\
        --tracking-uri sqlite:///runs/brainmri/mlruns.db --images '/data/brainmri/**/*.png'
    python benchmarks/archive.py --masters 'local[1]' 'local[2]' 'local[4]' --n-images 1024

Without ``--model-uri`` a model is registered in ``<work-dir>/mlruns.db``: Skip-TS with the
EfficientNet-Lite0 teacher and an untrained student at ``--size`` (speed does not depend on the
weights), threshold at the median score of 8 phantom normals (a speed benchmark: no meaning).

Per master, in this order: a new ``SparkSession``; the UDF (``env_manager="local"``: this Python);
one warm-up pass over one partition per worker (Python workers start, import torch and MONAI, load
the model: the *cold* seconds, reported apart); then ``--rounds`` timed passes over all images in
2 partitions per worker, the result columns collected on the driver. Python workers are reused
between passes (Spark's default), so the timed passes are the steady state of a long archive job.
Each worker runs one torch thread (``OMP_NUM_THREADS=1`` for the workers), so workers = cores used.
Arrow batches hold at most ``--batch-rows`` images (``spark.sql.execution.arrow.maxRecordsPerBatch``):
the model loads one batch of images at a time.

On a terminal (or with ``--progress on``) Spark's console bar shows each stage's tasks
(``spark.ui.showConsoleProgress``) and a bar counts the timed passes.

Writes ``archive.json`` and ``archive.md`` to ``--work-dir`` (atomically) and prints the table.
"""

from __future__ import annotations

import argparse
import glob
import os
import platform
import statistics
import sys
import time
from pathlib import Path

RESULT_TYPE = "score double, threshold double, anomalous boolean, normalized_score double"


def register_phantom_model(work_dir: Path, size: int) -> tuple[str, str]:
    """Register a Skip-TS (untrained student) in ``<work_dir>/mlruns.db``; returns ``(model_uri, tracking_uri)``."""
    import numpy as np
    import torch

    from monai_skipts.apps import make_phantom_dataset
    from monai_skipts.checkpoint import save_checkpoint
    from monai_skipts.inference import AnomalyPredictor
    from monai_skipts.networks import AnomalyDetector, SkipTS
    from monai_skipts.registry import log_and_register

    root = make_phantom_dataset(work_dir / "normals", n_train=8, n_test_normal=1, n_test_abnormal=1, size=size, seed=1)
    torch.manual_seed(0)
    detector = AnomalyDetector(
        SkipTS("efficientnet_lite0"), preprocessing={"spatial_size": size, "modality": "xray"}
    ).eval()
    ckpt = save_checkpoint(work_dir / "model.pt", detector)
    pred = AnomalyPredictor(ckpt, device="cpu")
    scores = np.array(
        [pred.score_file(p, maps=False)["score"] for p in sorted(glob.glob(str(root / "train/good/*.png")))]
    )
    threshold = {
        "value": float(np.median(scores)),
        "target_fpr": 0.5,
        "n_normals": len(scores),
        "scale": float(scores.std()),
    }
    detector.set_calibration(threshold)
    ckpt = save_checkpoint(work_dir / "model.pt", detector)
    tracking_uri = f"sqlite:///{work_dir.resolve()}/mlruns.db"
    info = log_and_register(ckpt, "skipts-archive-bench", tracking_uri=tracking_uri, experiment_name="archive-bench")
    return info["model_uri"], tracking_uri


def phantom_images(work_dir: Path, n: int, size: int) -> list[str]:
    from monai_skipts.apps import make_phantom_dataset

    half = (n + 1) // 2
    root = make_phantom_dataset(
        work_dir / "images", n_train=0, n_test_normal=half, n_test_abnormal=n - half, size=size, seed=0
    )
    return sorted(glob.glob(str(root / "test/*/*.png")))


def time_master(
    master: str, model_uri: str, paths: list[str], rounds: int, batch_rows: int, progress: str = "auto"
) -> dict:
    import mlflow
    from pyspark.sql import SparkSession

    from monai_skipts.progress import progress_bar, progress_enabled

    workers = int(master[master.index("[") + 1 : master.index("]")]) if "[" in master else 1
    t0 = time.perf_counter()
    spark = (
        SparkSession.builder.master(master)
        .appName(f"skipts-archive-{master}")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", str(progress_enabled(progress)).lower())  # Spark's stage bar
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", str(batch_rows))
        .config("spark.sql.shuffle.partitions", str(2 * workers))
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    session_s = time.perf_counter() - t0
    parallelism = spark.sparkContext.defaultParallelism
    assert spark.sparkContext.master == master and parallelism == workers, (spark.sparkContext.master, parallelism)
    try:
        udf = mlflow.pyfunc.spark_udf(spark, model_uri, result_type=RESULT_TYPE, env_manager="local")
        df = spark.createDataFrame([(p,) for p in paths], "image string")

        def run(frame, k: int) -> tuple[float, list]:
            t = time.perf_counter()
            rows = frame.repartition(k).withColumn("pred", udf("image")).select("image", "pred.score").collect()
            return time.perf_counter() - t, rows

        warm = spark.createDataFrame([(p,) for p in paths[: 2 * workers]], "image string")
        cold_s, _ = run(warm, workers)
        times, rows = [], []
        for _ in progress_bar(range(rounds), desc=f"{master} passes", unit="pass", enabled=progress):
            dt, rows = run(df, 2 * workers)
            times.append(dt)
    finally:
        spark.stop()
    assert len(rows) == len(paths) and all(r["score"] == r["score"] for r in rows), "missing or NaN scores"
    sec = statistics.median(times)
    return {
        "master": master,
        "workers": workers,
        "default_parallelism": parallelism,
        "images": len(paths),
        "session_s": session_s,
        "cold_s": cold_s,
        "pass_s": times,
        "median_pass_s": sec,
        "images_per_s": len(paths) / sec,
        "scores": {r["image"]: r["score"] for r in rows},
    }


def to_markdown(res: dict) -> str:
    base = res["runs"][0]["images_per_s"]
    lines = [
        f"Model `{res['model_uri']}`, {res['n_images']} images, {res['rounds']} timed passes per master (median), "
        f"{res['cpus']} CPUs, load average {res['loadavg_before'][0]:.1f} before / {res['loadavg_after'][0]:.1f} after.",
        "",
        "| master | workers | images | session start (s) | cold pass (s) | pass (s) | images/s | ratio vs first |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["runs"]:
        lines.append(
            f"| `{r['master']}` | {r['workers']} | {r['images']} | {r['session_s']:.1f} | {r['cold_s']:.1f} | "
            f"{r['median_pass_s']:.1f} | {r['images_per_s']:.2f} | {r['images_per_s'] / base:.2f}x |"
        )
    lines.append("")
    lines.append(f"Largest score difference between masters: {res['max_score_diff']:.2e}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-uri", default=None, help="e.g. models:/skipts-brainmri@champion; default: a phantom model")
    p.add_argument("--tracking-uri", default=None, help="the MLflow store of --model-uri (sqlite:///..., http://...)")
    p.add_argument("--images", default=None, help="glob of the images to score (recursive **); default: phantom PNGs")
    p.add_argument("--n-images", type=int, default=256, help="images scored per pass (the first N of --images)")
    p.add_argument("--size", type=int, default=128, help="the phantom model's spatial size")
    p.add_argument("--image-size", type=int, default=256, help="the phantom images' size")
    p.add_argument("--masters", nargs="+", default=["local[1]", "local[2]"])
    p.add_argument("--rounds", type=int, default=2, help="timed passes per master")
    p.add_argument("--batch-rows", type=int, default=64, help="images per Arrow batch (one model call)")
    p.add_argument("--work-dir", default="runs/benchmarks/archive")
    p.add_argument("--progress", default="auto", choices=("auto", "on", "off"), help="progress bars (auto: a terminal)")
    args = p.parse_args(argv)

    import mlflow

    from monai_skipts.utils import atomic_write_json, atomic_write_text

    # the Spark workers: this venv's Python, one torch thread each
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    os.environ["OMP_NUM_THREADS"] = "1"
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    if args.model_uri:
        model_uri, tracking_uri = args.model_uri, args.tracking_uri
    else:
        model_uri, tracking_uri = register_phantom_model(work_dir, args.size)
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    if args.images:
        paths = sorted(glob.glob(args.images, recursive=True))[: args.n_images]
        if not paths:
            p.error(f"no file matches {args.images!r}")
    else:
        paths = phantom_images(work_dir, args.n_images, args.image_size)
    paths = [str(Path(x).resolve()) for x in paths]

    res = {
        "model_uri": model_uri,
        "tracking_uri": tracking_uri,
        "n_images": len(paths),
        "rounds": args.rounds,
        "batch_rows": args.batch_rows,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "loadavg_before": os.getloadavg(),
        "runs": [],
    }
    for master in args.masters:
        print(f"archive: {master} ...", flush=True)
        res["runs"].append(time_master(master, model_uri, paths, args.rounds, args.batch_rows, args.progress))
    res["loadavg_after"] = os.getloadavg()
    first = res["runs"][0]["scores"]
    res["max_score_diff"] = max(abs(r["scores"][k] - first[k]) for r in res["runs"] for k in first)
    for r in res["runs"]:
        r.pop("scores")
    md = to_markdown(res)
    atomic_write_json(work_dir / "archive.json", res, default=float)
    atomic_write_text(work_dir / "archive.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
