"""Export a trained model as a standard MONAI bundle: a zip in MONAI's layout that runs anywhere
``monai-skipts`` is installed, with nothing from this repository.

Command line (see :mod:`monai_skipts.bundle.__main__`)::

    python -m monai_skipts.bundle export --config_file bundles/brainmri/train.json \\
        --checkpoint runs/brainmri/model.pt --out skipts_brainmri.zip

The zip holds one folder named after it (``skipts_brainmri/``, as MONAI's model-zoo zips do)::

    skipts_brainmri/
      configs/metadata.json    MONAI's metadata fields (version, changelog, monai/pytorch/numpy versions,
                               required_packages_version, task, description, authors, copyright,
                               network_data_format {inputs, outputs}, ...) and the decision threshold
      configs/inference.json   self-contained: MONAI components and the installed monai_skipts package only;
                               files are found through ``@bundle_root``
      configs/logging.conf     MONAI's usual console logging
      models/model.pt          state dict of ``network_def`` (teacher and student weights: no download)
      models/model.ts          TorchScript of ``network_def`` (image -> anomaly map), metadata embedded
      docs/README.md           what the model does, how to run it, inputs and outputs
      LICENSE                  Apache-2.0

Run it from any working directory::

    python -m monai.bundle run --config_file skipts_brainmri/configs/inference.json --input /path/to/images

``inference.json`` follows MONAI's inference layout (``network_def``, ``preprocessing``, ``inferer``,
``postprocessing``, ``handlers``, ``evaluator``), so MONAI Label's ``BundleInferTask`` serves the unzipped
folder as it is. The network is the trained :class:`~monai_skipts.networks.AnomalyDetector`
(:func:`~monai_skipts.checkpoint.detector_from_config`; ``models/model.pt`` holds its whole state);
through :class:`~monai_skipts.inferers.SkipTSInferer` it maps a preprocessed image ``(B, 3, S, S)`` to
the anomaly map ``(B, 1, S, S)``; the postprocessing adds the image score (the map's maximum) and the
decision against the calibrated threshold. ``bundle_root`` defaults to the folder of the config being
run (:func:`running_bundle_root`; MONAI's runner does not set it, MONAI Label does), so no
``--bundle_root`` is needed.

Functions: :func:`export_bundle` (the whole export), :func:`bundle_metadata`, :func:`inference_config`,
:func:`check_metadata`; at inference, the bundle calls the detector,
:func:`running_bundle_root`, :func:`map_score`, :func:`~monai_skipts.networks.decide`, :class:`ToMonaiLayoutd`,
:func:`item_names`.
"""

from __future__ import annotations

import inspect
import io
import json
import logging
import math
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from monai_skipts import __version__
from monai_skipts.transforms.presets import spatial_size_2d

__all__ = [
    "BUNDLE_SCHEMA_URL",
    "LOGGING_CONF",
    "METADATA_REQUIRED",
    "TENSOR_SPEC_REQUIRED",
    "running_bundle_root",
    "ToMonaiLayoutd",
    "map_score",
    "item_names",
    "bundle_metadata",
    "inference_config",
    "check_metadata",
    "export_bundle",
]

logger = logging.getLogger(__name__)

#: the schema MONAI's ``verify_metadata`` downloads (the repository's bundles name the same one)
BUNDLE_SCHEMA_URL = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
)
#: top-level keys the MONAI bundle specification requires in ``configs/metadata.json``
METADATA_REQUIRED = (
    "version",
    "changelog",
    "monai_version",
    "pytorch_version",
    "numpy_version",
    "required_packages_version",
    "task",
    "description",
    "authors",
    "copyright",
    "network_data_format",
)
#: keys every input/output format specifier of ``network_data_format`` must have
TENSOR_SPEC_REQUIRED = ("type", "format", "num_channels", "spatial_shape", "dtype", "value_range")

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

_IMAGENET_RANGE = [-2.12, 2.64]  # (0 - mean) / std .. (1 - mean) / std over the three channels


# --------------------------------------------------------------------------------------------------
# what an exported bundle calls at inference
# --------------------------------------------------------------------------------------------------


def running_bundle_root(default: str = ".") -> str:
    """The root folder of the bundle whose config MONAI is running: the parent of the ``configs``
    folder of the config file given to ``python -m monai.bundle run`` (or ``monai.bundle.run``,
    ``create_workflow``), found on the call stack's :class:`monai.bundle.ConfigWorkflow`.

    ``inference.json`` sets ``"bundle_root": "$monai_skipts.bundle.export.running_bundle_root()"``
    so that the bundle finds ``models/`` from any working directory without ``--bundle_root`` (MONAI's
    runner does not set it; MONAI Label and ``--bundle_root`` replace the expression). ``default``
    when no running workflow is found.
    """
    from monai.bundle import ConfigWorkflow

    frame = inspect.currentframe()
    try:
        while frame is not None:
            obj = frame.f_locals.get("self")
            root = getattr(obj, "config_root_path", None) if isinstance(obj, ConfigWorkflow) else None
            if root is not None:
                root = Path(root).absolute()
                return str(root.parent if root.name == "configs" else root)
            frame = frame.f_back
    finally:
        del frame
    return default


def map_score(amap: torch.Tensor) -> torch.Tensor:
    """Image score of one anomaly map ``(1, H, W)``: its maximum, as a float32 tensor of shape ``(1,)``
    (paper eq 8, as :class:`~monai_skipts.networks.AnomalyDetector` scores)."""
    t = amap.as_tensor() if hasattr(amap, "as_tensor") else torch.as_tensor(amap)
    return t.detach().float().amax().reshape(1)


class ToMonaiLayoutd:
    """Dictionary transform: 2-D images from this package's rows-first layout (``(C, rows, columns)``,
    as :class:`~monai_skipts.transforms.LoadMedicalImage` gives them) to MONAI's layout (``(C, x, y)``,
    as ``monai.transforms.LoadImage`` reads a PNG): swaps the last two axes of each key, with the
    ``spatial_shape`` and ``affine`` of its metadata, so MONAI's writers (``SaveImaged``, MONAI Label's
    ``Restored`` and writer) put the anomaly map over the input image, not transposed.

    Args:
        keys: the keys to swap (the bundle: ``["pred", "image"]``); missing keys are skipped.
    """

    def __init__(self, keys: str | Sequence[str]):
        self.keys = [keys] if isinstance(keys, str) else list(keys)

    @staticmethod
    def _swap(x: Any) -> Any:
        from monai.data import MetaTensor

        t = torch.as_tensor(x.as_tensor() if hasattr(x, "as_tensor") else x)
        if t.dim() < 3:
            return x
        y = t.transpose(-1, -2).contiguous()
        if not isinstance(x, MetaTensor):
            return y
        meta = dict(x.meta)
        shape = meta.get("spatial_shape")
        if shape is not None and len(shape) >= 2:
            shape = [int(v) for v in torch.as_tensor(shape).reshape(-1).tolist()]
            meta["spatial_shape"] = shape[:-2] + shape[-2:][::-1]
        aff = torch.as_tensor(x.affine).clone()
        k = t.dim() - 1  # spatial dimensions (channel first); MONAI keeps a 4x4 affine for 2-D images too
        if aff.dim() == 2 and aff.shape[-1] > k >= 2:  # swap the columns of the last two spatial axes
            aff[:, [k - 2, k - 1]] = aff[:, [k - 1, k - 2]]
        meta["affine"] = aff
        return MetaTensor(y, meta=meta)

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        for key in self.keys:
            if key in d:
                d[key] = self._swap(d[key])
        return d


def item_names(batch: Sequence[Mapping[str, Any]], key: str = "image") -> list[dict[str, str]]:
    """``[{"filename_or_obj": name}]`` per item of a decollated batch, for MONAI's
    ``ClassificationSaver``: the input file, with ``#slice=<i>`` for a slice of a volume (so that every
    slice keeps its own row)."""
    out = []
    for item in batch:
        img = item[key]
        meta = dict(getattr(img, "meta", None) or item.get(f"{key}_meta_dict", {}))
        name = str(meta.get("filename_or_obj", item.get("id", "")))
        idx = meta.get("slice_index", item.get("slice_index", -1))
        idx = int(idx.reshape(-1)[0]) if isinstance(idx, torch.Tensor) else int(idx if idx is not None else -1)
        out.append({"filename_or_obj": name if idx < 0 else f"{name}#slice={idx}"})
    return out


# --------------------------------------------------------------------------------------------------
# the export
# --------------------------------------------------------------------------------------------------


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _required_packages(teacher: str) -> dict[str, str]:
    """Packages the exported inference needs beyond MONAI: monai-skipts (its own dependencies follow),
    pytorch-ignite (MONAI's evaluator) and the teacher's architecture package."""
    req = {"monai-skipts": __version__}
    for name in ["pytorch-ignite"] + (["efficientnet-lite-pytorch"] if teacher.startswith("efficientnet_lite") else []):
        v = _dist_version(name)
        if v is not None:
            req[name] = v
    return req


def _eval_metrics(checkpoint: Path) -> dict[str, float]:
    """The numeric test metrics of the training run (``metrics.json`` beside the checkpoint), if any."""
    f = checkpoint.parent / "metrics.json"
    if not f.is_file():
        return {}
    try:
        m = json.loads(f.read_text())
    except (OSError, ValueError):
        return {}
    keys = ("auroc", "auprc", "pixel_auroc", "aupro", "dice", "f1", "sensitivity", "specificity")
    return {k: float(m[k]) for k in keys if isinstance(m.get(k), (int, float)) and math.isfinite(m[k])}


def check_metadata(meta: Mapping[str, Any]) -> None:
    """Check ``metadata.json`` content against the MONAI bundle specification's required fields
    (:data:`METADATA_REQUIRED`; every ``network_data_format`` input/output has
    :data:`TENSOR_SPEC_REQUIRED`, ``spatial_shape``/``value_range`` lists, ``num_channels`` an int).
    MONAI's ``verify_metadata`` checks the same against the schema it downloads (not reachable
    offline).

    Raises:
        ValueError: naming every missing or malformed field.
    """
    problems = [f"missing '{k}'" for k in METADATA_REQUIRED if k not in meta]
    for k in (
        "version",
        "monai_version",
        "pytorch_version",
        "numpy_version",
        "task",
        "description",
        "authors",
        "copyright",
    ):
        if k in meta and not isinstance(meta[k], str):
            problems.append(f"'{k}' must be a string")
    for k in ("changelog", "required_packages_version"):
        if k in meta and not isinstance(meta[k], dict):
            problems.append(f"'{k}' must be an object")
    if isinstance(meta.get("changelog"), dict) and meta.get("version") not in meta["changelog"]:
        problems.append(f"the changelog has no entry for version {meta.get('version')!r}")
    ndf = meta.get("network_data_format", {})
    for part in ("inputs", "outputs"):
        specs = ndf.get(part) if isinstance(ndf, dict) else None
        if not isinstance(specs, dict) or not specs:
            problems.append(f"network_data_format.{part} must be a non-empty object")
            continue
        for name, spec in specs.items():
            where = f"network_data_format.{part}.{name}"
            problems += [f"{where}: missing '{k}'" for k in TENSOR_SPEC_REQUIRED if k not in spec]
            if not isinstance(spec.get("num_channels", 0), int):
                problems.append(f"{where}: 'num_channels' must be an integer")
            for k in ("spatial_shape", "value_range"):
                if k in spec and not isinstance(spec[k], list):
                    problems.append(f"{where}: '{k}' must be a list")
    if problems:
        raise ValueError("metadata.json does not follow the MONAI bundle specification: " + "; ".join(problems))


def bundle_metadata(
    ckpt: Mapping[str, Any],
    base: Mapping[str, Any] | None = None,
    version: str | None = None,
    eval_metrics: Mapping[str, float] | None = None,
    changelog_note: str | None = None,
) -> dict[str, Any]:
    """``configs/metadata.json`` of the exported bundle.

    Args:
        ckpt: the monai-skipts checkpoint (version 2: the detector's config, ``extra`` with the dataset).
        base: the source bundle's ``metadata.json`` (name, task, description, authors, copyright,
            data source, references, ...), kept where the export does not set the field.
        version: the bundle version (default: ``base``'s, else ``"0.1.0"``).
        eval_metrics: test metrics of the training run (``eval_metrics``).
        changelog_note: this version's changelog entry.

    The versions are this environment's; ``network_data_format`` describes the exported network
    (``inputs.image`` ``(3, S, S)`` preprocessed, ``outputs.pred`` the anomaly map ``(1, S, S)``) and
    ``post_processed_outputs`` what the postprocessing adds (``score``, ``result``).
    """
    import monai
    import numpy

    base = dict(base or {})
    extra = dict(ckpt.get("extra") or {})
    config = ckpt["config"]
    prep = config["preprocessing"]
    size = list(spatial_size_2d(prep.get("spatial_size") or 256))
    cfg = dict(config["model"])
    thr = dict(config.get("calibration") or {}) or None
    version = str(version or base.get("version") or "0.1.0")
    modality = str(prep.get("modality") or "xray")
    changelog = {str(k): str(v) for k, v in (base.get("changelog") or {}).items()}
    changelog[version] = (
        changelog_note
        or changelog.get(version)
        or (f"exported with monai-skipts {__version__} (teacher {cfg['teacher']}, {size[0]}x{size[1]})")
    )
    changelog = dict(
        sorted(changelog.items(), key=lambda kv: [int(p) if p.isdigit() else p for p in kv[0].split(".")], reverse=True)
    )
    in_spec = dict((base.get("network_data_format") or {}).get("inputs", {}).get("image", {}))
    in_spec.update(
        {
            "type": "image",
            "format": in_spec.get("format", "magnitude"),
            "modality": modality,
            "num_channels": 3,
            "spatial_shape": size,
            "dtype": "float32",
            "value_range": in_spec.get("value_range", _IMAGENET_RANGE),
            "is_patch_data": False,
            "channel_def": {"0": "R", "1": "G", "2": "B"},
        }
    )
    base_pred = dict((base.get("network_data_format") or {}).get("outputs", {}).get("pred", {}))
    map_spec = {
        "type": "image",
        "format": "anomaly map",
        "modality": modality,
        "num_channels": 1,
        "spatial_shape": size,
        "dtype": "float32",
        "value_range": base_pred.get("value_range", [0, 6]),
        "is_patch_data": False,
        "channel_def": {"0": "anomaly"},
    }
    score_spec = {
        "type": "number",
        "format": "anomaly score (the map's maximum); anomalous when >= the threshold",
        "num_channels": 1,
        "spatial_shape": [1],
        "dtype": "float32",
        "value_range": map_spec["value_range"],
        "is_patch_data": False,
        "channel_def": {"0": "score"},
    }
    meta: dict[str, Any] = {
        "schema": BUNDLE_SCHEMA_URL,
        "version": version,
        "changelog": changelog,
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": _required_packages(cfg["teacher"]),
        "supported_apps": {"monailabel": "0.8"},
        "name": base.get("name", f"Skip-TS anomaly detection ({extra.get('dataset', 'custom')})"),
        "task": base.get("task", "Unsupervised anomaly detection and localisation (trained on normal images only)"),
        "description": base.get(
            "description",
            "Skip-TS teacher-student anomaly detector: an anomaly map and an "
            "image score with a decision threshold calibrated on held-out normals.",
        ),
        "authors": base.get("authors", "monai-skipts developers"),
        "copyright": base.get("copyright", "Copyright (c) monai-skipts developers; code Apache-2.0."),
        "data_source": base.get("data_source", str(extra.get("dataset", "unknown"))),
        "data_type": base.get("data_type", "png/jpg/dicom/nifti"),
        "image_classes": f"grey or RGB image, preprocessed to 3 x {size[0]} x {size[1]} ImageNet-normalised",
        "pred_classes": "anomaly map (higher: more anomalous); image score = its maximum",
        "eval_metrics": dict(eval_metrics or {}),
        "intended_use": base.get("intended_use", "Research and development; not a diagnostic device."),
        "references": list(base.get("references", [])),
        "network_data_format": {
            "inputs": {"image": in_spec},
            "outputs": {"pred": map_spec},
            "post_processed_outputs": {"pred": map_spec, "score": score_spec},
        },
        "anomaly_threshold": thr,
        "monai_skipts": {
            "version": __version__,
            "teacher": cfg["teacher"],
            "model_config": cfg,
            "modality": modality,
            "spatial_size": size,
            "sigma": float(config.get("sigma", 4.0)),
            "window": prep.get("window"),
            "mri_norm": prep.get("mri_norm"),
            "checkpoint": {"epoch": ckpt.get("epoch"), "iteration": ckpt.get("iteration")},
        },
    }
    for k in ("paper_auroc",):
        if k in base:
            meta[k] = base[k]
    return meta


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
            "$import monai_skipts.bundle.export",
            "$import monai_skipts.checkpoint",
            "$import monai_skipts.inference",
            "$import monai_skipts.inferers",
            "$import monai_skipts.networks",
            "$import monai_skipts.transforms",
        ],
        "bundle_root": "$monai_skipts.bundle.export.running_bundle_root()",
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
                    "func": "$monai_skipts.bundle.export.map_score",
                    "overwrite": "score",
                },
                {
                    "_target_": "Lambdad",
                    "keys": "score",
                    "overwrite": "result",
                    "func": "$lambda s: monai_skipts.networks.decide(s, @threshold, @threshold_scale)",
                },
                {"_target_": "monai_skipts.bundle.export.ToMonaiLayoutd", "keys": ["pred", "image"]},
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
                "batch_transform": "$monai_skipts.bundle.export.item_names",
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


def _readme(meta: Mapping[str, Any], name: str) -> str:
    sk = meta["monai_skipts"]
    thr = meta.get("anomaly_threshold") or {}
    s = sk["spatial_size"]
    metrics = ", ".join(f"{k} {v:.3f}" for k, v in meta.get("eval_metrics", {}).items()) or "not recorded"
    pkgs = " ".join(f'"{k}=={v}"' for k, v in meta["required_packages_version"].items())
    return f"""# {meta["name"]}

{meta["description"]}

Task: {meta["task"]}. Intended use: {meta["intended_use"]}

## Model

Skip-TS teacher-student anomaly detector (Liu et al., IEEE TIM 2024) trained on normal images only;
teacher `{sk["teacher"]}`, input {s[0]}x{s[1]}, modality preset `{sk["modality"]}`. Training data:
{meta.get("data_source", "not recorded")}. Test metrics of the training run: {metrics}.

- `models/model.pt`: state dict of `network_def` (`monai_skipts.networks.AnomalyDetector`): teacher and
  student weights, per-level statistics, thresholds; `models/model.ts`: TorchScript of the same network
  (outputs: the map and the score).
- Network input `image`: `(B, 3, {s[0]}, {s[1]})` float32, preprocessed by `preprocessing` (intensity to
  [0, 1] for the `{sk["modality"]}` preset, resize, 3 channels, ImageNet normalisation).
- Network output `pred`: the anomaly map `(B, 1, {s[0]}, {s[1]})`. The image score is its maximum; an
  image is anomalous when `score >= {thr.get("value")}` (threshold calibrated on held-out normals at a
  false-positive rate of {thr.get("target_fpr")}; `configs/metadata.json` `anomaly_threshold`).

## Install and run

```bash
pip install {pkgs}
python -m monai.bundle run --config_file {name}/configs/inference.json --input /path/to/images
```

`--input` takes a folder (every PNG/JPG/DICOM/NIfTI/NRRD below it), a file, or a list; volumes are
scored slice by slice. Outputs under `--output_dir` (default `{name}/eval`): `predictions.csv`
(no header: file, score, anomalous as 1/0; a volume's slices as `file#slice=<i>`) and the anomaly
maps of 2-D images `maps/<name>_map.nii.gz` (`--save_maps False` to skip; a volume's slice maps share
one name, so score volumes with `--save_maps False`, or with monai-skipts' own inference). Other overrides: `--batch_size`, `--device`, `--threshold`.
The bundle finds its models from any working directory; `--bundle_root` overrides.

MONAI Label serves the unzipped folder with `monailabel.tasks.infer.bundle.BundleInferTask`; the
request's result holds `score`, `threshold`, `anomalous` and `normalized_score`.

## License

Code and model: Apache-2.0 (`LICENSE`). The training data keep their sources' own licences. Not a
diagnostic device.
"""


def _license_text() -> str:
    head = (
        "monai-skipts bundle: code and model weights are licensed under the Apache License, Version 2.0\n"
        "(SPDX-License-Identifier: Apache-2.0). The teacher's ImageNet weights are Apache-2.0 as published.\n"
        "Training data keep the licences of their sources.\n\n"
    )
    from importlib import metadata

    try:  # the licence's full text, as MONAI ships it (MONAI is Apache-2.0 too)
        for f in metadata.distribution("monai").files or []:
            if f.name.upper().startswith("LICENSE"):
                text = Path(f.locate()).read_text(encoding="utf-8")
                if "Apache License" in text:
                    return head + text
    except Exception:  # noqa: BLE001 - the short form below is still a valid licence statement
        pass
    return head + "Full text: https://www.apache.org/licenses/LICENSE-2.0\n"


def _trace(net: nn.Module, size: Sequence[int]) -> torch.jit.ScriptModule:
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        return torch.jit.trace(net, x, check_trace=False)


def _close(name: str, want: torch.Tensor, got: torch.Tensor, atol: float) -> None:
    if want.shape != got.shape or not torch.allclose(want, got, rtol=0.0, atol=atol):
        diff = (want - got).abs().max().item() if want.shape == got.shape else float("nan")
        raise RuntimeError(f"{name} differs from the checkpoint's model (max difference {diff:.3g}, atol {atol})")


def export_bundle(
    config_file: str | os.PathLike,
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    version: str | None = None,
    teacher_weights: str | os.PathLike | None = None,
    batch_size: int = 4,
    verify: bool = True,
    atol: float = 1e-4,
) -> Path:
    """Write a trained model as a standard MONAI bundle zip (layout: module docstring).

    Args:
        config_file: the training bundle config (e.g. ``bundles/brainmri/train.json``); its folder's
            ``metadata.json`` gives the name, task, description, authors, copyright, data source and
            references. Only read, never run: modality and spatial size come from the checkpoint
            (the values the model was trained with, overrides included).
        checkpoint: the run's ``model.pt``; its ``metrics.json`` neighbour, when present, gives
            ``eval_metrics``.
        out: the zip to write (``.zip``); the folder inside is named after it.
        version: the bundle version (default: the source metadata's).
        teacher_weights: the teacher's weights file, when not in the default place (needed to rebuild
            the checkpoint's model; the bundle then holds the weights itself).
        batch_size: the bundle's default inference batch size.
        verify: check ``network_def`` loaded from ``model.pt`` and ``model.ts`` against the
            checkpoint's detector (:func:`~monai_skipts.checkpoint.load_detector`) on random images:
            maps within ``atol``; a mismatch raises ``RuntimeError`` and writes nothing.

    Returns:
        ``out``.
    """
    from monai.bundle import ConfigParser
    from monai.data import save_net_with_metadata

    from ..checkpoint import detector_from_config, load_checkpoint, load_detector
    from ..utils import atomic_write_bytes

    config_file, checkpoint, out = Path(config_file), Path(checkpoint), Path(out)
    if out.suffix != ".zip":
        raise ValueError(f"{out}: the bundle is written as a .zip file")
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: config file not found")
    name = out.stem
    ckpt = load_checkpoint(checkpoint)
    train_cfg = ConfigParser.load_config_file(str(config_file))  # plain content; references stay unresolved
    base_meta_file = config_file.parent / "metadata.json"
    base = json.loads(base_meta_file.read_text()) if base_meta_file.is_file() else {}
    extra = dict(ckpt.get("extra") or {})
    extra.setdefault("dataset", train_cfg.get("dataset"))
    reference = load_detector(ckpt, teacher_weights=teacher_weights)
    prep = reference.config["preprocessing"]  # the checkpoint's; the bundle's values only fill what it lacks
    if prep.get("modality") is None and isinstance(train_cfg.get("modality"), str):
        prep["modality"] = train_cfg["modality"]
    if prep.get("spatial_size") is None and isinstance(train_cfg.get("spatial_size"), int):
        prep["spatial_size"] = list(spatial_size_2d(train_cfg["spatial_size"]))
    ckpt = {**ckpt, "config": reference.config, "extra": extra}
    size = list(spatial_size_2d(prep.get("spatial_size") or 256))

    config = inference_config(ckpt, batch_size)
    meta = bundle_metadata(ckpt, base, version, _eval_metrics(checkpoint))
    check_metadata(meta)

    net = reference
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    buf = io.BytesIO()  # in memory: the zip is written atomically below
    torch.save(state, buf)

    traced = _trace(net, size)
    ts = io.BytesIO()
    with warnings.catch_warnings():  # as MONAI's ckpt_export writes it: metadata and config embedded
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.save.*deprecated")
        save_net_with_metadata(
            traced, ts, meta_values=meta, more_extra_files={"inference.json": json.dumps(config).encode()}
        )

    if verify:
        x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            want = reference(x)[0]
            kwargs = {k: v for k, v in config["network_def"].items() if k != "_target_"}
            fresh = detector_from_config(**kwargs).eval()
            fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
            _close("models/model.pt", want, fresh(x)[0], atol)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*deprecated")
                _close("models/model.ts", want, torch.jit.load(io.BytesIO(ts.getvalue()))(x)[0], atol)

    files = {
        f"{name}/configs/metadata.json": json.dumps(meta, indent=2).encode(),
        f"{name}/configs/inference.json": json.dumps(config, indent=2).encode(),
        f"{name}/configs/logging.conf": LOGGING_CONF.encode(),
        f"{name}/models/model.pt": buf.getvalue(),
        f"{name}/models/model.ts": ts.getvalue(),
        f"{name}/docs/README.md": _readme(meta, name).encode(),
        f"{name}/LICENSE": _license_text().encode(),
    }
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for arc, data in files.items():
            z.writestr(zipfile.ZipInfo(arc, date_time=(2024, 1, 1, 0, 0, 0)), data, compress_type=zipfile.ZIP_DEFLATED)
    logger.info("bundle %s: %s", out, ", ".join(files))
    return atomic_write_bytes(out, buf.getvalue())
