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
    """``configs/inference.json`` of the exported bundle: MONAI's inference layout, self-contained.

    Overridable on the command line: ``--input`` (a folder, a file or a list; default
    ``--dataset_dir``), ``--output_dir`` (default ``<bundle_root>/eval``), ``--batch_size``,
    ``--device``, ``--save_maps``, ``--volume_axis``, ``--threshold``. Writes
    ``<output_dir>/predictions.csv`` (MONAI's ``ClassificationSaver``: ``file, score, anomalous``; no
    header; ``anomalous`` is 1/0, ``nan`` without a threshold) and, with ``save_maps``, the anomaly
    maps ``<output_dir>/maps/<name>_map.nii.gz`` (float32, the network's size).
    """
    config = ckpt["config"]
    prep = config["preprocessing"]
    thr = dict(config.get("calibration") or {})
    size = list(spatial_size_2d(prep.get("spatial_size") or 256))
    return {
        "imports": [
            "$import os",
            "$import torch",
            "$import numpy",
            "$import monai",
            "$import monai_skipts",
            "$import monai_skipts.bundle.runtime",
            "$import monai_skipts.checkpoint",
            "$import monai_skipts.inference",
            "$import monai_skipts.inferers",
            "$import monai_skipts.networks",
            "$import monai_skipts.transforms",
        ],
        "bundle_root": "$monai_skipts.bundle.runtime.running_bundle_root()",
        "ckpt_path": "$@bundle_root + '/models/model.pt'",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "/workspace/data",
        "input": "@dataset_dir",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "modality": str(prep.get("modality") or "xray"),
        "spatial_size": size,
        "window": prep.get("window"),
        "mri_norm": prep.get("mri_norm") or "percentile",
        "threshold": thr.get("value"),
        "threshold_scale": thr.get("scale"),
        "batch_size": int(batch_size),
        "num_workers": 0,
        "volume_axis": 2,
        "save_maps": True,
        "datalist": "$monai_skipts.transforms.expand_volume_datalist(monai_skipts.inference.list_inputs(@input), axis=@volume_axis)",
        "network_def": {
            "_target_": "monai_skipts.checkpoint.detector_from_config",
            "config": json.loads(json.dumps(config)),
            "pretrained": False,
            "download": False,
        },
        "network": "$@network_def.to(@device)",
        "preprocessing": "$monai_skipts.transforms.build_preprocessing(@modality, @spatial_size, window=@window, mri_norm=@mri_norm)",
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": "@batch_size",
            "shuffle": False,
            "num_workers": "@num_workers",
        },
        "inferer": {"_target_": "monai_skipts.inferers.SkipTSInferer"},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {
                    "_target_": "Lambdad",
                    "keys": "pred",
                    "func": "$monai_skipts.bundle.runtime.map_score",
                    "overwrite": "score",
                },
                {
                    "_target_": "Lambdad",
                    "keys": "score",
                    "overwrite": "result",
                    "func": "$lambda s: monai_skipts.networks.decide(s, @threshold, @threshold_scale)",
                },
                {"_target_": "monai_skipts.bundle.runtime.ToMonaiLayoutd", "keys": ["pred", "image"]},
                {
                    "_target_": "SaveImaged",
                    "_disabled_": "$not @save_maps",
                    "keys": "pred",
                    "output_dir": "$@output_dir + '/maps'",
                    "output_postfix": "map",
                    "output_ext": ".nii.gz",
                    "output_dtype": "$numpy.float32",
                    "resample": False,
                    "separate_folder": False,
                    "print_log": False,
                    "data_root_dir": "$@input if isinstance(@input, str) and os.path.isdir(@input) else ''",
                },
            ],
        },
        "handlers": [
            {
                "_target_": "CheckpointLoader",
                "load_path": "@ckpt_path",
                "load_dict": {"model": "@network"},
                "map_location": "@device",
            },
            {"_target_": "StatsHandler", "iteration_log": False},
            {
                "_target_": "ClassificationSaver",
                "output_dir": "@output_dir",
                "filename": "predictions.csv",
                "batch_transform": "$monai_skipts.bundle.runtime.item_names",
                "output_transform": "$lambda out: [torch.cat([o['score'], torch.tensor([float('nan') if o['result']['anomalous'] is None else float(o['result']['anomalous'])])]) for o in out]",
            },
        ],
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "val_handlers": "@handlers",
            "amp": False,
        },
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@evaluator.run()"],
        "finalize": [],
    }
