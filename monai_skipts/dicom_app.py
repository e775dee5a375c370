"""Score a DICOM study and write the results as DICOM objects into the same study: a Secondary Capture
heat-map series, a Structured Report (TID 1500) and optionally a SEG per scored series
(see :mod:`monai_skipts.dicom`).

Command line::

    # a study folder -> DICOM files under --output (series-NNN-MOD/SC/*.dcm, SR.dcm, SEG-*.dcm)
    python -m monai_skipts.dicom_app --input study/ --output results/ --checkpoint runs/x/model.pt [--seg]
    # a study in a PACS over DICOMweb: pulled, scored, results stored back (STOW-RS)
    python -m monai_skipts.dicom_app --dicomweb http://localhost:8042/dicom-web --study <StudyInstanceUID> \\
        --checkpoint runs/x/model.pt [--output results/] [--seg]

Exit status: 0 when every scorable series was scored and written (or had been, by this model:
``already_scored``), 1 when any failed, was incomplete (a file of it cannot be read), or nothing could
be scored: the reasons go to stderr, one line each, and into ``dicom_results.json``; 2 for bad
arguments; 130 on Ctrl-C: the series scored in full keep their results, ``dicom_results.json`` lists
them with ``"status": "interrupted"``, nothing is stored in the PACS, and one line on stderr says how many
series were scored and where the summary is. The output folder and the PACS are checked before the model is loaded. The summary printed
and logged holds scores and decisions, no patient data and no UID. Running twice is safe: the series
this model already scored are skipped (``--replace`` scores them again and replaces their results).
A progress bar over the series shows when stderr is a terminal (``--progress on|off`` forces it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
from typing import Sequence

from monai_skipts.progress import PROGRESS_CHOICES, PROGRESS_ENV, ScoringInterrupted

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m monai_skipts.dicom_app", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="a folder holding the study's DICOM files (any layout)")
    src.add_argument("--dicomweb", help="DICOMweb root of a PACS, e.g. http://localhost:8042/dicom-web")
    p.add_argument("--study", help="StudyInstanceUID to pull from --dicomweb")
    p.add_argument("--output", help="where the DICOM results go (required with --input)")
    p.add_argument("--checkpoint", required=True, help="the training run's model.pt")
    p.add_argument("--seg", action="store_true", help="also write a DICOM SEG of the region above the threshold")
    p.add_argument(
        "--replace",
        action="store_true",
        help="score again the series this model already scored (their results in the study are replaced)",
    )
    p.add_argument("--teacher_weights", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--volume_aggregation", default="max", choices=("max", "mean", "topk"))
    p.add_argument(
        "--progress", default="auto", choices=PROGRESS_CHOICES, help="progress bar (auto: when stderr is a terminal)"
    )
    args = p.parse_args(argv)
    if args.progress != "auto":  # read by every bar of this process (progress_enabled)
        os.environ[PROGRESS_ENV] = args.progress
    if args.input and not args.output:
        p.error("--output is required with --input")
    if args.dicomweb and not args.study:
        p.error("--study (a StudyInstanceUID) is required with --dicomweb")
    failed = _preflight(args)
    if failed:
        print(f"error: {failed}", file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from monai_skipts.dicom import PacsError, run_app
    from monai_skipts.inference import AnomalyPredictor
    from monai_skipts.utils import InputDataError

    try:
        predictor = AnomalyPredictor(
            args.checkpoint,
            args.teacher_weights,
            device=args.device,
            volume_aggregation=args.volume_aggregation,
            batch_size=args.batch_size,
        )
        summary = run_app(
            predictor,
            args.output,
            input=args.input,
            dicomweb_url=args.dicomweb,
            study_uid=args.study,
            seg=args.seg,
            checkpoint=args.checkpoint,
            replace=args.replace,
        )
    except (InputDataError, OSError, PacsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C: one line, no traceback (run_app wrote what was scored)
        print(f"\n{e}" if isinstance(e, ScoringInterrupted) else "\ninterrupted before scoring", file=sys.stderr)
        return 130
    brief = {
        "series": [
            {
                "series": s["series"],
                "units": [
                    {k: u[k] for k in ("unit", "score", "threshold", "anomalous", "normalized_score")}
                    for u in s["units"]
                ],
            }
            for s in summary["series"]
        ],
        "skipped": summary["skipped"],
        "errors": summary["errors"],
        "unreadable": summary["unreadable"],
        "already_scored": summary["already_scored"],
        "n_files": len(summary["files"]),
    }
    for key in ("n_pulled", "n_stored", "n_deleted"):
        if key in summary:
            brief[key] = summary[key]
    print(json.dumps(brief))
    from monai_skipts.dicom import problems

    reasons = problems(summary)
    for line in reasons:
        print(f"error: {line}", file=sys.stderr)
    return 1 if reasons else 0


def _preflight(args) -> str | None:
    """What makes the run fail before the model is loaded: an output folder that cannot be written or lies
    in the study folder, a PACS that cannot be reached or holds no such study (None when all is well)."""
    from monai_skipts.dicom.preflight import PacsError, check_output, check_pacs, connect  # light: no torch, MONAI
    from monai_skipts.utils import InputDataError

    try:
        if args.output:
            check_output(args.output, args.input)
        if (
            args.dicomweb and importlib.util.find_spec("dicomweb_client") is not None
        ):  # else run_app says how to install it
            check_pacs(connect(args.dicomweb, attempts=1), args.study)
    except (InputDataError, OSError, PacsError) as e:
        return str(e)
    return None


if __name__ == "__main__":
    sys.exit(main())
