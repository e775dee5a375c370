"""``configs/metadata.json`` of an exported bundle: MONAI's metadata fields (version, changelog,
monai/pytorch/numpy versions, required packages, network_data_format, ...) built from a detector's
checkpoint (:func:`bundle_metadata`) and checked against the MONAI bundle specification
(:func:`check_metadata`)."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from monai_skipts import __version__
from monai_skipts.transforms.presets import spatial_size_2d

__all__ = ["BUNDLE_SCHEMA_URL", "METADATA_REQUIRED", "TENSOR_SPEC_REQUIRED", "bundle_metadata", "check_metadata"]

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

_IMAGENET_RANGE = [-2.12, 2.64]  # (0 - mean) / std .. (1 - mean) / std over the three channels


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
