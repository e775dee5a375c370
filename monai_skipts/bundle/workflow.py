"""The steps the bundle configs call: named, documented and tested here, so the JSON keeps wiring.

``bundles/common/{train,evaluate,inference,multi_gpu_train}.json`` wire MONAI components
(``_target_``) with ``@`` references; whatever is more than a plain call lives in this module:

=================================  ====================================================================
datalist and split                 :func:`build_split`, :func:`check_split_images`
data loading                       :func:`seeded_generator`, :func:`training_prepare_batch`,
                                   :func:`denoising_prepare_batch`
trained model (evaluate)           :func:`load_trained_model` (:class:`TrainedModel`)
run folder and processes           :func:`prepare_output_dir`, :func:`release_output_dir`,
                                   :func:`init_distributed`,
                                   :func:`end_distributed`, :func:`is_secondary_rank`
MLflow names, switches, registry   :func:`tracking_uri`, :func:`experiment_name`,
                                   :func:`registered_model_name`, :func:`training_run_name`,
                                   :func:`evaluation_run_name`, :func:`mlflow_disabled`,
                                   :func:`register_model`
values known only after a step     :func:`deferred_attribute`, :func:`metrics_extras`
=================================  ====================================================================

Every function takes plain values (the bundle's top-level ids) and returns a plain value or a
component, so that a config calls it with ``{"_target_": "monai_skipts.bundle.<name>", ...}`` or a
one-call ``"$monai_skipts.bundle.<name>(@a, @b)"``. The bundles' rule for ``initialize`` / ``run`` /
``finalize`` steps: a step that calls a function is a ``_target_`` component (instantiating it calls
the function with the named arguments, e.g. ``{"_target_": "monai_skipts.bundle.prepare_output_dir",
"output_dir": "@output_dir", "seed": "@seed"}``); a step that runs a component is a ``$`` expression
(``"$@train#trainer.run()"``), or a component whose ``_target_`` is the bound method
(``{"_target_": "$@predictor.run", "inputs": "@input", ...}``, MONAI resolves a non-string target as
the callable itself). Nothing here depends on the working directory
except the relative paths a user gives (``output_dir``, ``dataset_dir``), which mean what they mean
on the command line.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "TrainedModel",
    "build_split",
    "check_split_images",
    "deferred_attribute",
    "end_distributed",
    "evaluation_run_name",
    "experiment_name",
    "init_distributed",
    "is_secondary_rank",
    "load_trained_model",
    "metrics_extras",
    "mlflow_disabled",
    "prepare_output_dir",
    "register_model",
    "registered_model_name",
    "release_output_dir",
    "seeded_generator",
    "tracking_uri",
    "training_prepare_batch",
    "denoising_prepare_batch",
    "training_run_name",
]

logger = logging.getLogger(__name__)

#: files a training run writes into its ``output_dir``
SPLIT_FILE, CHECKPOINT_FILE, MODEL_FILE, METRICS_FILE, MLFLOW_DB = (
    "split.json",
    "checkpoint.pt",
    "model.pt",
    "metrics.json",
    "mlruns.db",
)


# ---------------------------------------------------------------------------------------------- data


def build_split(
    dataset: str,
    dataset_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    seed: int = 0,
    val_fraction: float = 0.1,
    target_fpr: float | None = None,
    calibration: str = "empirical",
    dataset_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The bundle's datalist: the dataset found under ``dataset_dir``, deduplicated and split into
    ``train`` / ``val`` / ``test`` with ``seed``, written to ``<output_dir>/split.json`` (reused when it
    exists: :func:`~monai_skipts.data.prepare_split`).

    Args:
        dataset: a dataset preset or layout name (``"brainmri"``, ``"mvtec"``, ``"class_folders"``, ...).
        dataset_dir: the dataset folder (or datalist file).
        output_dir: the run folder; the split goes to ``split.json`` in it.
        seed: split seed.
        val_fraction: share of the training normals held out to calibrate the threshold.
        target_fpr, calibration: when ``target_fpr`` is given, the split keeps at least the
            validation normals that ``calibration`` needs for it
            (:func:`~monai_skipts.calibration.min_calibration_normals`); ``None`` (evaluation): no minimum.
        dataset_kwargs: more options of the layout (``prepare_split``'s keyword arguments).

    Returns:
        ``{"train": [...], "val": [...], "test": [...], "report": {...}, ...}``, lists of datalist
        items (``{"image": path, "label": 0/1, "id": ..., ...}``).

    Example:
        >>> import tempfile
        >>> from monai_skipts.apps import make_phantom_dataset
        >>> tmp = tempfile.mkdtemp()
        >>> root = make_phantom_dataset(tmp + "/data", n_train=8, n_test_normal=2, n_test_abnormal=2, size=32)
        >>> split = build_split("mvtec", root, tmp + "/run", seed=0, val_fraction=0.25)
        >>> sorted(k for k in ("train", "val", "test") if split[k]), os.path.isfile(tmp + "/run/split.json")
        (['test', 'train', 'val'], True)
    """
    from monai_skipts.calibration import min_calibration_normals
    from monai_skipts.data import prepare_split

    min_val = 0 if target_fpr is None else min_calibration_normals(target_fpr, calibration)
    return prepare_split(
        dataset,
        dataset_dir,
        split_file=os.path.join(output_dir, SPLIT_FILE),
        seed=seed,
        val_fraction=val_fraction,
        min_val_normals=min_val,
        **dict(dataset_kwargs or {}),
    )


def check_split_images(
    split: Mapping[str, Any], transform: Callable, subsets: Sequence[str] = ("val", "test"), max_listed: int = 5
) -> int:
    """Before training: run the preprocessing ``transform`` over every image of ``subsets`` (the
    validation images, which also calibrate the threshold, and the test images) and refuse the run
    when any cannot be read or preprocessed (missing, corrupt, NaN/inf values, ...). The training
    images need no pass here: the training ``CacheDataset`` preprocesses them all before the first
    epoch. Without this check a bad validation image stops the run after a trained epoch, a bad test
    image after the whole training.

    Args:
        split: what :func:`build_split` returns.
        transform: the bundle's preprocessing (``Compose`` of dictionary transforms, from the path).
        subsets: the split keys to check.
        max_listed: how many bad files the error names besides the first.

    Returns:
        The number of images checked.

    Raises:
        InputDataError: naming the first bad file and its problem, the subset it is in, and how many
            others are bad (up to ``max_listed`` named).
    """
    from monai_skipts.utils import InputDataError

    bad: list[tuple[str, str, str]] = []
    n = 0
    for subset in subsets:
        for item in split.get(subset) or []:
            n += 1
            try:
                transform(dict(item))
            except Exception as e:  # MONAI wraps the loader's error in RuntimeError("applying transform ...")
                err = e
                while not isinstance(err, InputDataError) and (err.__cause__ or err.__context__) is not None:
                    err = err.__cause__ or err.__context__
                problem = err.problem if isinstance(err, InputDataError) else f"{type(err).__name__}: {err}"
                bad.append((str(item.get("image")), problem, subset))
    if bad:
        path, problem, subset = bad[0]
        others = "".join(f"; {p} ({s}): {q}" for p, q, s in bad[1 : 1 + max_listed])
        more = f"; {len(bad) - 1 - max_listed} more" if len(bad) > 1 + max_listed else ""
        count = f" ({len(bad)} of {n} {'/'.join(subsets)} images are bad{others}{more})" if len(bad) > 1 else ""
        raise InputDataError(path, f"{problem} [{subset} split; checked before training]{count}")
    logger.info("%d %s images read and preprocessed before training", n, "/".join(subsets))
    return n


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU :class:`torch.Generator` seeded with ``seed``, for a ``DataLoader``'s ``generator``
    (worker seeds, and the order when no sampler is given).

    Example:
        >>> torch.randint(100, (3,), generator=seeded_generator(0)).tolist() == torch.randint(100, (3,), generator=seeded_generator(0)).tolist()
        True
    """
    return torch.Generator().manual_seed(int(seed))


def training_prepare_batch(
    network: torch.nn.Module,
    transform: Callable,
    cache_teacher: bool = True,
    synthetic_lesions: dict[str, Any] | None = None,
    modality: str = "mri",
    seed: int | None = 0,
) -> Callable:
    """The trainer's ``prepare_batch``: a :class:`~monai_skipts.engines.TeacherFeatureCache` (each
    image's teacher features computed once; ``transform`` must not be random) when ``cache_teacher``,
    else MONAI's ``default_prepare_batch``; with ``synthetic_lesions``, that clean path wrapped in a
    :class:`~monai_skipts.engines.DenoisingBatch` (denoising distillation: the student reads the
    teacher's features of images with synthetic lesions, its target is the clean images' features,
    which stay cached).

    Args:
        network: the :class:`~monai_skipts.networks.SkipTS` being trained.
        transform: the training preprocessing (checked to be deterministic for the cache).
        cache_teacher: the bundle's ``cache_teacher`` switch.
        synthetic_lesions: the bundle's ``synthetic_lesions``: ``None`` (off, the default) or keyword
            arguments of :class:`~monai_skipts.transforms.RandSyntheticLesion` (``{"prob": 0.5,
            "families": ["intensity", "fpi", "elastic"]}``; ``{}``: its defaults). The key
            ``"annotations"`` (a probability) also pastes burned-in captions and markers into that
            share of the clean images as normal content
            (:class:`~monai_skipts.transforms.RandBurnedInAnnotation`).
        modality: the bundle's modality preset (the anatomy the lesions are placed in, and the
            lesions' default ``modality``).
        seed: seeds the lesions' (and annotations') random state.

    >>> training_prepare_batch(None, None, cache_teacher=False).__name__
    'default_prepare_batch'
    """
    from monai.engines import default_prepare_batch

    from monai_skipts.engines import TeacherFeatureCache

    clean = TeacherFeatureCache(network, transform) if cache_teacher else default_prepare_batch
    return denoising_prepare_batch(network, clean, synthetic_lesions, modality, seed)


def denoising_prepare_batch(
    network: torch.nn.Module,
    features: Callable,
    synthetic_lesions: dict[str, Any] | None,
    modality: str = "mri",
    seed: int | None = 0,
) -> Callable:
    """``features`` (a clean ``prepare_batch``) as it is when ``synthetic_lesions`` is ``None``, else
    wrapped in a :class:`~monai_skipts.engines.DenoisingBatch` built from ``synthetic_lesions``
    (see :func:`training_prepare_batch`, whose second half this is; ``benchmarks/quality.py`` calls it
    with its shared feature cache)."""
    from monai_skipts.engines import DenoisingBatch
    from monai_skipts.transforms import RandBurnedInAnnotation, RandSyntheticLesion

    if synthetic_lesions is None:
        return features
    opts = dict(synthetic_lesions)
    annotations = opts.pop("annotations", None)
    opts.setdefault("modality", modality)
    lesion = RandSyntheticLesion(**opts)
    lesion.set_random_state(seed)
    annotation = None
    if annotations:
        annotation = RandBurnedInAnnotation(prob=float(annotations))
        annotation.set_random_state(None if seed is None else seed + 1)
    return DenoisingBatch(network, lesion, features=features, modality=modality, annotation=annotation)


# ------------------------------------------------------------------------------------- trained model


@dataclass
class TrainedModel:
    """A calibrated checkpoint rebuilt for evaluation (what :func:`load_trained_model` returns).

    Attributes:
        network: the :class:`~monai_skipts.networks.AnomalyDetector`, in eval mode, on the requested device.
        checkpoint: the checkpoint dictionary (version 2).
        threshold: the calibrated decision threshold (``None`` when the checkpoint has none).
        score_scale: the validation normals' score standard deviation (for the normalised score).
        spec: the preprocessing the model was trained with, ``{"modality", "spatial_size", "window",
            "mri_norm"}`` (:func:`~monai_skipts.transforms.preprocessing_spec`).
        pixel_threshold: the calibrated map threshold of the outlines (the detector's
            ``pixel_threshold``), ``None`` when the checkpoint has none.
    """

    network: torch.nn.Module
    checkpoint: dict[str, Any]
    threshold: float | None
    score_scale: float | None
    spec: dict[str, Any]
    pixel_threshold: float | None = None

    @property
    def teacher(self) -> str:
        """The teacher's registered name."""
        return str(self.network.config["model"]["teacher"])

    @property
    def modality(self) -> str:
        """The modality preset the model was trained with."""
        return self.spec["modality"]

    @property
    def spatial_size(self) -> int | Sequence[int]:
        """The side (or ``(H, W)``) the model was trained at."""
        return self.spec["spatial_size"]

    def preprocessing(self, mask_key: str | None = "mask") -> list:
        """The trained preprocessing (:func:`~monai_skipts.transforms.preset_transforms` with
        :attr:`spec`) as a list of transforms on the key ``image``, masks under ``mask_key`` included."""
        from monai_skipts.transforms import preset_transforms

        return preset_transforms(**self.spec, keys="image", mask_key=mask_key)


def load_trained_model(
    checkpoint: str | os.PathLike,
    teacher_weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    modality: str | None = None,
    spatial_size: int | Sequence[int] | None = None,
) -> TrainedModel:
    """Rebuild a trained detector from its checkpoint (:func:`~monai_skipts.checkpoint.load_detector`)
    with its threshold and the preprocessing it was trained with. The checkpoint's preprocessing wins:
    ``modality`` and ``spatial_size`` fill only what it does not record.

    Args:
        checkpoint: ``model.pt`` of a training run.
        teacher_weights: the teacher's weights file, when not in torchvision's cache.
        device: where the model goes.
        modality, spatial_size: used only when the checkpoint does not record them (older checkpoints).

    Raises:
        ValueError: the checkpoint records no modality and none is given.
    """
    from monai_skipts.checkpoint import load_checkpoint, load_detector
    from monai_skipts.transforms import preprocessing_spec

    ckpt = load_checkpoint(checkpoint)
    network = load_detector(ckpt, teacher_weights, map_location=device)
    decision = network.decide(0.0)
    scale, pixel = float(network.scale), float(network.pixel_threshold)
    spec = preprocessing_spec(
        network.config["preprocessing"], defaults={"modality": modality, "spatial_size": spatial_size}
    )
    if not spec["modality"]:
        raise ValueError(f"{checkpoint}: the checkpoint records no modality; pass --modality <preset name>")
    return TrainedModel(
        network=network,
        checkpoint=ckpt,
        threshold=decision["threshold"],
        score_scale=None if math.isnan(scale) else scale,
        spec=spec,
        pixel_threshold=None if math.isnan(pixel) else pixel,
    )


# ------------------------------------------------------------------------------- folder and processes


def is_secondary_rank() -> bool:
    """True in a ``torch.distributed`` process other than rank 0 (which alone logs to MLflow and
    registers the model); False without a process group."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_rank() > 0


def prepare_output_dir(output_dir: str | os.PathLike, seed: int | None = None, lock: bool = True) -> Path:
    """Start a run: seed every generator (``monai.utils.set_determinism``), create ``output_dir`` and
    take its lock (:func:`~monai_skipts.utils.lock_output_dir`: a second training into the same folder
    stops at once; the bundle's ``finalize`` releases it). Under ``torchrun`` only rank 0 takes the lock
    (the ranks share the folder), also before the process group is joined: the multi-GPU bundle
    extends ``initialize`` and joins the group after this step.

    Args:
        output_dir: the run folder.
        seed: the run's seed; ``None``: leave the generators alone.
        lock: False to skip the lock (evaluation, which writes into a sub-folder of a training's folder).

    Returns:
        ``output_dir`` as a :class:`~pathlib.Path`.

    Example:
        >>> import tempfile
        >>> out = prepare_output_dir(tempfile.mkdtemp() + "/run", seed=0)
        >>> out.is_dir(), (out / ".lock").is_file()
        (True, True)
        >>> release_output_dir(out)
    """
    from monai.utils import set_determinism

    from monai_skipts.utils import lock_output_dir

    if seed is not None:
        set_determinism(seed=int(seed))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if lock and int(os.environ.get("RANK", "0")) == 0:  # torchrun sets RANK in each process it starts
        lock_output_dir(out)
    return out


def release_output_dir(output_dir: str | os.PathLike) -> None:
    """End a run: release the lock :func:`prepare_output_dir` took (the process's exit releases it too).

    Args:
        output_dir: the run folder.
    """
    from monai_skipts.utils import unlock_output_dir

    unlock_output_dir(output_dir)


def init_distributed(device: str | torch.device | None = None) -> bool:
    """Join the ``torchrun`` process group (NCCL with CUDA, Gloo on CPUs) unless already joined, and
    make ``device`` this process's CUDA device. Returns True when this call created the group."""
    dist = torch.distributed
    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        created = True
    if torch.cuda.is_available() and device is not None and torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))
    return created


def end_distributed() -> None:
    """Leave the process group :func:`init_distributed` joined (no-op without one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------------------------- MLflow


def tracking_uri(output_dir: str | os.PathLike) -> str:
    """The run's MLflow store: ``sqlite:///<absolute output_dir>/mlruns.db``.

    Example:
        >>> tracking_uri("/data/runs/x")
        'sqlite:////data/runs/x/mlruns.db'
    """
    from monai.utils import path_to_sqlite_uri

    return path_to_sqlite_uri(os.path.join(os.path.abspath(output_dir), MLFLOW_DB))


def experiment_name(dataset: str) -> str:
    """The MLflow experiment of a dataset's runs.

    Example:
        >>> experiment_name("brainmri")
        'monai-skipts-brainmri'
    """
    return f"monai-skipts-{dataset}"


def registered_model_name(dataset: str) -> str:
    """The MLflow registry name of a dataset's trained model (``models:/<name>@champion``).

    Example:
        >>> registered_model_name("brainmri")
        'skipts-brainmri'
    """
    return f"skipts-{dataset}"


def training_run_name(
    dataset: str, seed: int, output_dir: str | os.PathLike | None = None, resume: bool = True, mlflow: bool = True
) -> str | None:
    """The MLflow run name of a training: the one stored in ``<output_dir>/checkpoint.pt`` when the run
    resumes (the resumed training continues its MLflow run), else ``<dataset>-seed<seed>-<UTC time>``.

    Args:
        dataset, seed: the bundle's ids.
        output_dir: the run folder (``None``: no resume).
        resume: the bundle's ``resume`` switch.
        mlflow: the bundle's ``mlflow`` switch; False gives ``None`` (nothing to name, nothing stored
            in the checkpoint).

    Example:
        >>> training_run_name("brainmri", 3).startswith("brainmri-seed3-"), training_run_name("brainmri", 3, mlflow=False)
        (True, None)
    """
    from monai_skipts.handlers import default_run_name
    from monai_skipts.handlers.training import resumed_run_name

    if not mlflow:
        return None
    resumed = resumed_run_name(os.path.join(output_dir, CHECKPOINT_FILE), resume) if output_dir is not None else None
    return resumed or default_run_name(dataset, seed)


def evaluation_run_name(dataset: str, seed: int) -> str:
    """The MLflow run name of an evaluation: ``evaluate-<dataset>-seed<seed>-<UTC time>``.

    Example:
        >>> evaluation_run_name("lgg", 0).startswith("evaluate-lgg-seed0-")
        True
    """
    from monai_skipts.handlers import default_run_name

    return "evaluate-" + default_run_name(dataset, seed)


def mlflow_disabled(mlflow: bool = True) -> bool:
    """For the MLflow handlers' ``_disabled_``: True when the ``mlflow`` switch is off or this process
    is not rank 0 (:func:`is_secondary_rank`).

    Example:
        >>> mlflow_disabled(True), mlflow_disabled(False)
        (False, True)
    """
    return not mlflow or is_secondary_rank()


def register_model(
    output_dir: str | os.PathLike,
    name: str,
    tracking_uri: str,
    experiment_name: str,
    modality: str,
    spatial_size: int | Sequence[int],
    bundle_root: str | os.PathLike | None = None,
    mlflow: bool = True,
    register: bool = True,
) -> dict[str, Any] | None:
    """The last step of a training: log ``<output_dir>/model.pt`` with its metrics as an MLflow model,
    register it as ``name`` and move the ``champion`` alias to it
    (:func:`~monai_skipts.registry.log_and_register`), with the bundle's config files.

    Args:
        output_dir: the run folder (``model.pt``, ``metrics.json``).
        name: the registered model name (:func:`registered_model_name`).
        tracking_uri, experiment_name: the run's MLflow store and experiment.
        modality, spatial_size: the serving preprocessing.
        bundle_root: the bundle's folder, logged with the model when it exists (a relative path means
            the working directory, as on the command line; a missing folder is skipped with a warning).
        mlflow, register: the bundle's switches; either off, or a process other than rank 0: nothing
            is done.

    Returns:
        what ``log_and_register`` returns (``model_uri``, ``version``, ...), or ``None`` when skipped.
    """
    if not (mlflow and register) or is_secondary_rank():
        return None
    from monai_skipts.registry import log_and_register

    files: list[str] = []
    if bundle_root is not None:
        if Path(bundle_root).is_dir():
            files.append(str(bundle_root))
        else:
            logger.warning(
                "bundle folder %s not found from %s: the model is registered without its config files",
                bundle_root,
                os.getcwd(),
            )
    return log_and_register(
        os.path.join(output_dir, MODEL_FILE),
        name=name,
        alias="champion",
        tracking_uri=tracking_uri,
        experiment_name=experiment_name,
        modality=modality,
        spatial_size=spatial_size,
        bundle_config_files=files,
        metrics=os.path.join(output_dir, METRICS_FILE),
    )


# ---------------------------------------------------------------------------- values known only later


def deferred_attribute(obj: Any, name: str) -> Callable[[], Any]:
    """A zero-argument function returning ``obj.<name>`` when called: for handler arguments known
    only after an earlier step (the test scores' ``threshold`` is the calibrator's, set after training).

    Example:
        >>> class Calibrator: threshold = None
        >>> c = Calibrator(); get = deferred_attribute(c, "threshold"); c.threshold = 0.7
        >>> get()
        0.7
    """

    def value() -> Any:
        return getattr(obj, name)

    value.__qualname__ = f"deferred_attribute.<{name}>"
    return value


def metrics_extras(
    split: Mapping[str, Any],
    calibrator: Any = None,
    network: torch.nn.Module | None = None,
    checkpoint: str | os.PathLike | None = None,
    **fields: Any,
) -> Callable[[], dict[str, Any]]:
    """The ``extra_metrics`` of an :class:`~monai_skipts.handlers.AnomalyScoreHandler`: entries written
    into ``metrics.json`` next to the metrics, gathered when the scores are complete.

    Args:
        split: the run's split (:func:`build_split`); its ``report["counts"]`` goes under ``"split"``.
        calibrator: a :class:`~monai_skipts.handlers.ThresholdCalibrator`; its ``record`` (value,
            target FPR, normals, method, FPR expected and bound) goes under ``"calibration"``, and its
            ``fpr_expected``, ``fpr_bound`` and ``n_normals`` also as ``calibration_<key>`` (numbers the
            MLflow handler logs as metrics).
        network: the evaluated model; its teacher goes under ``"teacher"``.
        checkpoint: the evaluated checkpoint, recorded as an absolute path under ``"checkpoint"``.
        fields: more entries as they are (``teacher=..., epochs=..., seed=...``).

    Example:
        >>> extras = metrics_extras({"report": {"counts": {"train": 8}}}, epochs=2, seed=0)
        >>> extras()
        {'split': {'train': 8}, 'epochs': 2, 'seed': 0}
    """

    def extras() -> dict[str, Any]:
        out: dict[str, Any] = {}
        if checkpoint is not None:
            out["checkpoint"] = os.path.abspath(checkpoint)
        if network is not None:
            out["teacher"] = network.config["model"]["teacher"]
        out["split"] = (split.get("report") or {}).get("counts")
        out.update(fields)
        if calibrator is not None:
            out["calibration"] = rec = calibrator.record
            for key in ("fpr_expected", "fpr_bound", "n_normals"):  # flat numbers: MLflow metrics
                if isinstance(rec, Mapping) and rec.get(key) is not None:
                    out[f"calibration_{key}"] = rec[key]
        return out

    return extras
