"""End-to-end check of the MONAI Deploy app on a real DICOM series (pydicom's test data), in the
environment that has ``monai-deploy-app-sdk`` (see the README, "MONAI Deploy")::

    python -m monai_skipts.deploy.check [--series <folder of one DICOM series>] [--checkpoint model.pt]

Runs ``python -m monai_skipts.deploy`` as a subprocess (the Holoscan graph: DICOM loader -> series
selector -> series to volume -> Skip-TS -> DICOM text SR writer) and checks: the app exits 0, the SR
is a readable DICOM Basic Text SR in the source study holding the score, and the app's volume and
slice scores equal ``AnomalyPredictor.score_file(<series folder>)`` (the package's path for a series
folder, read by ITK) within 1e-5. Without ``--checkpoint`` a Skip-TS with an untrained student is
used (scores do not need a trained model to be compared). Exit status 0 when everything holds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def default_series() -> Path:
    """A 4-slice CT series of pydicom's test files (``dicomdirtests/77654033/CT2``, 16 x 16 pixels)."""
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests" / "77654033" / "CT2"


def tiny_checkpoint(path: Path) -> Path:
    import torch

    from monai_skipts.checkpoint import save_checkpoint
    from monai_skipts.networks import AnomalyDetector, SkipTS

    torch.manual_seed(0)
    detector = AnomalyDetector(SkipTS("efficientnet_lite0"), preprocessing={"spatial_size": 64, "modality": "xray"})
    detector.set_calibration({"value": 1.0, "target_fpr": 0.05, "n_normals": 0, "scale": 0.1})  # a check only
    return save_checkpoint(path, detector.eval())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--series", default=None, help="a folder holding one DICOM series (default: pydicom's CT2)")
    p.add_argument("--checkpoint", default=None, help="a monai-skipts checkpoint (default: an untrained student)")
    p.add_argument("--work-dir", default=None, help="default: a temporary folder")
    args = p.parse_args(argv)

    import pydicom

    from monai_skipts.inference import AnomalyPredictor

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="skipts-deploy-"))
    series = Path(args.series) if args.series else default_series()
    study = work / "input"
    shutil.rmtree(study, ignore_errors=True)
    shutil.copytree(series, study)
    out = work / "output"
    shutil.rmtree(out, ignore_errors=True)
    ckpt = Path(args.checkpoint) if args.checkpoint else tiny_checkpoint(work / "model.pt")

    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "monai_skipts.deploy", "-i", str(study), "-o", str(out), "-m", str(ckpt)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n")
        print(f"FAIL: the app exited {proc.returncode}")
        return 1
    result = json.loads((out / "skipts_result.json").read_text(encoding="utf-8"))
    files = [f for f in sorted(study.iterdir()) if f.is_file()]
    one_image = (
        len(files) == 1 and int(pydicom.dcmread(files[0], stop_before_pixels=True).get("NumberOfFrames", 1) or 1) == 1
    )
    want = AnomalyPredictor(ckpt, device="cpu").score_file(files[0] if one_image else study, maps=False)
    want.setdefault("slice_scores", [want["score"]])
    problems = []
    if abs(result["score"] - want["score"]) > 1e-5:
        problems.append(f"volume score {result['score']} != predictor's {want['score']}")
    if (
        len(result["slice_scores"]) != len(want["slice_scores"])
        or max(abs(a - b) for a, b in zip(result["slice_scores"], want["slice_scores"])) > 1e-5
    ):
        problems.append(f"slice scores {result['slice_scores']} != predictor's {want['slice_scores']}")
    srs = [pydicom.dcmread(f) for f in out.glob("*.dcm")]
    src = pydicom.dcmread(next(f for f in sorted(study.iterdir()) if f.is_file()), stop_before_pixels=True)
    if len(srs) != 1:
        problems.append(f"{len(srs)} DICOM files written, expected one SR")
    else:
        sr = srs[0]
        text = " ".join(str(item.get("TextValue", "")) for item in sr.get("ContentSequence", []))
        if sr.SOPClassUID != "1.2.840.10008.5.1.4.1.1.88.11" or sr.Modality != "SR":
            problems.append(f"not a Basic Text SR: {sr.SOPClassUID} {sr.Modality}")
        if sr.StudyInstanceUID != src.StudyInstanceUID:
            problems.append("the SR is not in the source study")
        if f"score {result['score']:.6g}" not in text:
            problems.append(f"the SR text does not hold the score: {text!r}")
    print(f"app: {seconds:.1f} s (Holoscan graph, one series of {len(result['slice_scores'])} slices)")
    print(f"score {result['score']:.6f} (predictor {want['score']:.6f}), slices {result['slice_scores']}")
    for prob in problems:
        print("FAIL:", prob)
    print("OK" if not problems else f"{len(problems)} problem(s)")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
