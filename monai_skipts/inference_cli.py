"""The command line of :mod:`monai_skipts.inference` (run as ``python -m monai_skipts.inference``):
score files, folders and volumes with a checkpoint into ``--output_dir`` (see
:meth:`~monai_skipts.inference.AnomalyPredictor.run` for the files written).

Command line::

    python -m monai_skipts.inference --checkpoint runs/brainmri/model.pt --input scans/ --output_dir out/
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Callable, Sequence

import monai_skipts.inference
from monai_skipts.checkpoint import CheckpointError
from monai_skipts.inference import AnomalyPredictor
from monai_skipts.progress import PROGRESS_CHOICES, ScoringInterrupted
from monai_skipts.utils import InputDataError

__all__ = ["main", "run_and_report"]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m monai_skipts.inference``: score files with a checkpoint. Exit status 0 when every
    input was scored, 1 when any could not be (listed in ``errors.csv``) or the run failed, 2 for
    bad arguments."""
    p = argparse.ArgumentParser(
        prog="python -m monai_skipts.inference", description=monai_skipts.inference.__doc__.split("\n\n")[0]
    )
    p.add_argument("--checkpoint", required=True, help="the training run's model.pt")
    p.add_argument("--input", required=True, nargs="+", help="a folder, a file, or several files")
    p.add_argument("--output_dir", required=True, help="where predictions.csv, errors.csv and maps/ go")
    p.add_argument("--teacher_weights", default=None, help="the teacher's weights file when not in the default place")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--volume_axis", type=int, default=2, help="slicing axis of volumes (2 = axial)")
    p.add_argument("--volume_aggregation", default="max", choices=("max", "mean", "topk"))
    p.add_argument(
        "--max_pixels",
        type=int,
        default=None,
        help="largest picture or DICOM frame accepted, in pixels (default 40 million; 0 = no limit)",
    )
    p.add_argument(
        "--backend",
        default="torch",
        choices=("torch", "onnxruntime", "openvino"),
        help="runtime of the network: eager PyTorch, or the exported graph on the CPU (cached next to the checkpoint)",
    )
    p.add_argument("--num_threads", type=int, default=None, help="CPU threads of the forward pass")
    p.add_argument("--no_maps", action="store_true", help="do not write the anomaly maps")
    p.add_argument("--fail_fast", action="store_true", help="stop at the first input that cannot be scored")
    p.add_argument(
        "--progress", default="auto", choices=PROGRESS_CHOICES, help="progress bar (auto: when stderr is a terminal)"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    inputs = args.input[0] if len(args.input) == 1 else args.input

    def predictor() -> AnomalyPredictor:
        return AnomalyPredictor(
            args.checkpoint,
            args.teacher_weights,
            device=args.device,
            volume_axis=args.volume_axis,
            volume_aggregation=args.volume_aggregation,
            batch_size=args.batch_size,
            max_pixels=args.max_pixels,
            backend=args.backend,
            num_threads=args.num_threads,
        )

    return run_and_report(
        predictor, inputs, args.output_dir, save_maps=not args.no_maps, fail_fast=args.fail_fast, progress=args.progress
    )


def run_and_report(
    make_predictor: Callable[[], AnomalyPredictor],
    inputs: str | os.PathLike | Sequence,
    output_dir: str | os.PathLike,
    save_maps: bool = True,
    fail_fast: bool = False,
    progress: bool | str | None = None,
) -> int:
    """Build a predictor, :meth:`~monai_skipts.inference.AnomalyPredictor.run` it, and report as a
    command line: the summary as one JSON line on stdout; a failure as one line on stderr, no traceback.
    The one ending of ``python -m monai_skipts.inference`` and of an exported bundle's ``run``
    (:func:`monai_skipts.bundle.runtime.run_bundle_inference`).

    Args:
        make_predictor: builds the predictor (its errors, e.g. a refused checkpoint, are reported too).
        inputs, output_dir, save_maps, fail_fast, progress: see :meth:`~monai_skipts.inference.AnomalyPredictor.run`.

    Returns:
        The exit status: 0 every input scored; 1 an input could not be scored (``errors.csv``), a
        checkpoint refused, or a file not readable or writable; 130 Ctrl-C (what was scored is written).
    """
    try:
        summary = make_predictor().run(inputs, output_dir, save_maps=save_maps, fail_fast=fail_fast, progress=progress)
    except (InputDataError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C: one line, no traceback (run() wrote what was scored)
        print(f"\n{e}" if isinstance(e, ScoringInterrupted) else "\ninterrupted before scoring", file=sys.stderr)
        return 130
    print(json.dumps(summary))
    return 0
