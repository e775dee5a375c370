"""The bundle's data: the datalist split, the check of its images before training, and the loaders'
seeded generator.

``bundles/common/train.json`` and ``evaluate.json`` call :func:`build_split` (a ``_target_``
component), :func:`check_split_images` (an ``initialize`` step) and :func:`seeded_generator` (the
``DataLoader``'s ``generator``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["SPLIT_FILE", "build_split", "check_split_images", "seeded_generator"]

logger = logging.getLogger(__name__)

#: the split a run writes into its ``output_dir`` (and reuses when it exists)
SPLIT_FILE = "split.json"


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
