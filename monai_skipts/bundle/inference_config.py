"""``configs/inference.json`` and ``configs/logging.conf`` of an exported bundle: MONAI's inference
layout, self-contained (no macros into other files), the trained detector as ``network_def``."""

from __future__ import annotations

import json
from typing import Any, Mapping

from monai_skipts.transforms.presets import spatial_size_2d

__all__ = ["LOGGING_CONF", "inference_config"]

#: the ``configs/logging.conf`` of every bundle: exported ones and the generated ``bundles/<dataset>/``
LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


def inference_config(ckpt: Mapping[str, Any], batch_size: int = 4) -> dict[str, Any]:
    """``configs/inference.json`` of the exported bundle: self-contained, in two parts.

    - ``run`` is ``python -m monai_skipts.inference`` on the bundle's ``models/model.pt``
      (:func:`~monai_skipts.bundle.runtime.run_bundle_inference`): the same predictor, outputs
      (``predictions.csv`` with its header and ids relative to the input, ``errors.csv``, ``maps/``,
      ``status.json``), progress bar, exit status and one-line errors. Overridable on the command
      line: ``--input`` (a folder, a file or a list; default ``--dataset_dir``), ``--output_dir``
      (default ``<bundle_root>/eval``), ``--device``, ``--batch_size``, ``--volume_axis``,
      ``--volume_aggregation``, ``--max_pixels``, ``--save_maps``, ``--fail_fast``, ``--progress``,
      and the preprocessing options ``--modality``, ``--spatial_size``, ``--window``, ``--mri_norm``.
    - ``network_def``, ``preprocessing``, ``inferer`` and ``postprocessing`` (with ``device``,
      ``threshold``, ``threshold_scale``) are MONAI's inference layout for MONAI Label's
      ``BundleInferTask``, which loads ``models/model.pt``'s ``"model"`` entry into ``network_def``.
      ``run`` does not use them.
    """
    config = ckpt["config"]
    prep = config["preprocessing"]
    thr = dict(config.get("calibration") or {})
    size = list(spatial_size_2d(prep.get("spatial_size") or 256))
    return {
        "imports": ["$import monai_skipts", "$import monai_skipts.bundle.runtime"],
        "bundle_root": "$monai_skipts.bundle.runtime.running_bundle_root()",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "/workspace/data",
        "input": "@dataset_dir",
        "device": "auto",
        "modality": str(prep.get("modality") or "xray"),
        "spatial_size": size,
        "window": prep.get("window"),
        "mri_norm": prep.get("mri_norm") or "percentile",
        "threshold": thr.get("value"),
        "threshold_scale": thr.get("scale"),
        "batch_size": int(batch_size),
        "volume_axis": 2,
        "volume_aggregation": "max",
        "max_pixels": None,
        "save_maps": True,
        "fail_fast": False,
        "progress": "auto",
        "network_def": {
            "_target_": "monai_skipts.checkpoint.detector_from_config",
            "config": json.loads(json.dumps(config)),
            "pretrained": False,
            "download": False,
        },
        "preprocessing": {
            "_target_": "monai_skipts.transforms.build_preprocessing",
            "modality": "@modality",
            "spatial_size": "@spatial_size",
            "window": "@window",
            "mri_norm": "@mri_norm",
        },
        "inferer": {"_target_": "monai_skipts.inferers.SkipTSInferer"},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {
                    "_target_": "Lambdad",
                    "keys": "pred",
                    "func": {"_target_": "monai_skipts.bundle.runtime.map_score", "_mode_": "callable"},
                    "overwrite": "score",
                },
                {
                    "_target_": "Lambdad",
                    "keys": "score",
                    "overwrite": "result",
                    "func": {
                        "_target_": "monai_skipts.networks.decide",
                        "_mode_": "callable",
                        "threshold": "@threshold",
                        "scale": "@threshold_scale",
                    },
                },
                {"_target_": "monai_skipts.bundle.runtime.ToMonaiLayoutd", "keys": ["pred", "image"]},
            ],
        },
        "initialize": [{"_target_": "monai_skipts.bundle.check_command_line"}],
        "run": [
            {
                "_target_": "monai_skipts.bundle.runtime.run_bundle_inference",
                "bundle_root": "@bundle_root",
                "inputs": "@input",
                "output_dir": "@output_dir",
                "device": "@device",
                "batch_size": "@batch_size",
                "volume_axis": "@volume_axis",
                "volume_aggregation": "@volume_aggregation",
                "max_pixels": "@max_pixels",
                "modality": "@modality",
                "spatial_size": "@spatial_size",
                "window": "@window",
                "mri_norm": "@mri_norm",
                "save_maps": "@save_maps",
                "fail_fast": "@fail_fast",
                "progress": "@progress",
            }
        ],
        "finalize": [],
    }
