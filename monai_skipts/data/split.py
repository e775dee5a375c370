"""Seeded train / val / test splits for one-class anomaly detection, saved to and reused from JSON.

Normals are divided into test and training normals; the validation normals (for threshold
calibration and monitoring) are carved out of the training normals, never out of test. Anomalous
images go to test only.

The order is a seeded hash ranking: each item is ranked by ``sha256(f"{seed}:{id}")``. The split is
therefore a function of the seed and the item ids alone: independent of the order the file system
lists files in, of the Python and NumPy versions, and stable for the other items when one is added.
Test normals are taken first, so the test set does not change with ``val_fraction`` or ``n_train``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from monai_skipts.data.dedup import remove_duplicates
from monai_skipts.data.files import relative_id
from monai_skipts.data.layouts import _listing, build_datalist, layout_base
from monai_skipts.data.presets import get_dataset
from monai_skipts.utils import InputDataError, atomic_write_json

__all__ = ["SPLIT_FORMAT", "split_datalist", "split_by_group", "save_split", "load_split", "prepare_split"]

logger = logging.getLogger(__name__)

SPLIT_FORMAT = "monai-skipts-split/1"
_SPLITS = ("train", "val", "test")
_PATH_KEYS = ("image", "mask")


def _ranked(items: list[dict], seed: int) -> list[dict]:
    return sorted(items, key=lambda it: (hashlib.sha256(f"{seed}:{it['id']}".encode()).hexdigest(), it["id"]))


def _half_up(x: float) -> int:
    return int(x + 0.5)


def _by_id(items: list[dict]) -> list[dict]:
    return sorted(items, key=lambda it: it["id"])


def _normal_counts(n: int, n_train, n_test, test_fraction: float, notes: list) -> tuple[int, int]:
    if n_train is None and n_test is None:
        te = _half_up(n * test_fraction)
        return n - te, te
    if n_train is None:
        te = min(n_test, n)
        return n - te, te
    if n_test is None:
        tr = min(n_train, n)
        return tr, n - tr
    if n_train + n_test <= n:
        if n > n_train + n_test:
            notes.append(f"{n - n_train - n_test} of {n} normal images unused ({n_train} train + {n_test} test asked)")
        return n_train, n_test
    te = _half_up(n * n_test / (n_train + n_test))
    notes.append(
        f"only {n} normal images for {n_train} train + {n_test} test: scaled to {n - te} + {te}, "
        f"keeping the train:test ratio"
    )
    return n - te, te


def split_datalist(
    items: list[dict],
    seed: int = 0,
    n_train: int | None = None,
    n_test_normal: int | None = None,
    n_test_abnormal: int | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.4,
    source_split: bool = False,
    source: str | os.PathLike | None = None,
    min_val_normals: int = 0,
) -> tuple[dict[str, list[dict]], dict]:
    """Split ``items`` into ``train``/``val``/``test`` (and ``unused``) deterministically in ``seed``.

    Normal counts:

    - ``n_train`` and ``n_test_normal`` both given (the Table I defaults): used as they are when
      enough normals exist (the rest is ``unused``); with fewer, both are scaled to the available
      number keeping their ratio (BrainMRI after dedup: 87 normals for 58 + 40 -> 51 + 36).
    - one given: the other gets the remaining normals. None: ``test_fraction`` of them go to test.
    - ``source_split``: normals from the source's ``train`` subset (the item's ``"subset"``) are
      the training pool, all others the test pool; the counts, when given, cap each pool.

    ``round(val_fraction * n_train)`` of the training normals (at least 1 when ``val_fraction > 0``
    and at least one training normal remains) become ``val``, and at least ``min_val_normals`` when
    that leaves at least as many for training (a calibration needs a minimum number of normals:
    ``monai_skipts.calibration.min_calibration_normals``). Anomalous images all go to test, or
    at most ``n_test_abnormal`` of them when given.

    Args:
        items: deduplicated datalist items with ``id`` and ``label``.
        seed: split seed.
        n_train: normal images for training, validation normals included.
        n_test_normal: normal test images.
        n_test_abnormal: maximum anomalous test images (``None``: all).
        val_fraction: fraction of the training normals held out for validation.
        test_fraction: fraction of normals for test when neither count is given.
        source_split: follow the source's train/test folders for normals.
        source: dataset root, named in error messages.

    Returns:
        ``({"train", "val", "test", "unused"}: lists of items sorted by id, info)`` where ``info``
        has ``counts``, ``available``, ``requested``, ``scaled`` and human-readable ``notes``.
    """
    normals = _ranked([it for it in items if it["label"] == 0], seed)
    abnormals = _ranked([it for it in items if it["label"] == 1], seed)
    if not normals:
        raise InputDataError(source, "no normal images to train on")
    notes: list[str] = []
    if source_split:
        if not any("subset" in it for it in normals):
            raise InputDataError(source, "source_split needs train/test subset folders; none were found")
        pool = [it for it in normals if str(it.get("subset", "")).casefold() == "train"]
        rest = [it for it in normals if str(it.get("subset", "")).casefold() != "train"]
        if not pool:
            raise InputDataError(source, "no normal images in the source's train folder")
        tr = len(pool) if n_train is None else min(n_train, len(pool))
        te = len(rest) if n_test_normal is None else min(n_test_normal, len(rest))
        for what, got, asked, have in (("train", tr, n_train, pool), ("test", te, n_test_normal, rest)):
            if asked is not None and got < asked:
                notes.append(f"only {got} normal images in the source's {what} folders ({asked} asked)")
            if len(have) > got:
                notes.append(f"{len(have) - got} normal images of the source's {what} folders unused")
        test_n, train_pool, unused = rest[:te], pool[:tr], pool[tr:] + rest[te:]
    else:
        tr, te = _normal_counts(len(normals), n_train, n_test_normal, test_fraction, notes)
        test_n, train_pool, unused = normals[:te], normals[te : te + tr], normals[te + tr :]
    if tr < 1:
        raise InputDataError(source, f"{len(normals)} normal images leave none for training ({te} to test)")
    n_val = 0 if val_fraction <= 0 or tr < 2 else min(tr - 1, max(1, _half_up(tr * val_fraction)))
    if val_fraction > 0 and n_val < min_val_normals:
        n_val = max(n_val, min(int(min_val_normals), tr // 2))
        notes.append(
            f"{n_val} validation normals (val_fraction {val_fraction:g} gives fewer; "
            f"{int(min_val_normals)} asked for the calibration)"
        )
    n_abn = len(abnormals) if n_test_abnormal is None else min(n_test_abnormal, len(abnormals))
    if n_test_abnormal is not None and len(abnormals) < n_test_abnormal:
        notes.append(f"only {len(abnormals)} anomalous images ({n_test_abnormal} asked): all used")
    if len(abnormals) > n_abn:
        notes.append(f"{len(abnormals) - n_abn} of {len(abnormals)} anomalous images unused ({n_test_abnormal} asked)")
    splits = {
        "train": _by_id(train_pool[n_val:]),
        "val": _by_id(train_pool[:n_val]),
        "test": _by_id(test_n + abnormals[:n_abn]),
        "unused": _by_id(unused + abnormals[n_abn:]),
    }
    counts = {
        "train": tr - n_val,
        "val": n_val,
        "test_normal": len(test_n),
        "test_abnormal": n_abn,
        "unused_normal": len(unused),
        "unused_abnormal": len(abnormals) - n_abn,
    }
    info = {
        "counts": counts,
        "available": {"normal": len(normals), "abnormal": len(abnormals)},
        "requested": {"n_train": n_train, "n_test_normal": n_test_normal, "n_test_abnormal": n_test_abnormal},
        "scaled": any(
            asked is not None and got < asked
            for got, asked in ((tr, n_train), (te, n_test_normal), (n_abn, n_test_abnormal))
        ),
        "notes": notes,
    }
    for note in notes:
        logger.info("%s: %s", source or "split", note)
    return splits, info


def split_by_group(
    items: list[dict],
    group_by: str,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.4,
    source: str | os.PathLike | None = None,
    min_val_normals: int = 0,
) -> tuple[dict[str, list[dict]], dict]:
    """Split ``items`` by ``item[group_by]`` (a patient, a volume): no group in two subsets.

    Groups are ranked by ``sha256(f"{seed}:{group}")``. ``round(test_fraction × G)`` groups go to
    test, ``round(val_fraction × (G − test))`` of the rest (at least 1 when ``val_fraction > 0``) to
    validation (more while they hold fewer than ``min_val_normals`` normals and at least as many
    groups stay for training), the others to training. Training and validation take the **normal** items of their
    groups only (training normals and calibration normals); test takes every item of its groups,
    normal and anomalous. Anomalous items of training/validation groups are ``unused``.

    Returns:
        ``(splits, info)`` as :func:`split_datalist`, ``info`` with ``groups`` (the group names of
        each subset) besides ``counts``.
    """
    missing = [it["id"] for it in items if it.get(group_by) in (None, "")]
    if missing:
        raise InputDataError(source, f"{len(missing)} items have no {group_by!r} to split by: {_listing(missing)}")
    groups = sorted(
        {str(it[group_by]) for it in items}, key=lambda g: (hashlib.sha256(f"{seed}:{g}".encode()).hexdigest(), g)
    )
    n_test = _half_up(len(groups) * test_fraction)
    rest = len(groups) - n_test
    n_val = 0 if val_fraction <= 0 or rest < 2 else min(rest - 1, max(1, _half_up(rest * val_fraction)))
    if rest - n_val < 1:
        raise InputDataError(source, f"{len(groups)} {group_by} groups leave none for training ({n_test} to test)")
    normals_in = {g: 0 for g in groups}
    for it in items:
        normals_in[str(it[group_by])] += it["label"] == 0
    while sum(normals_in[g] for g in groups[n_test : n_test + n_val]) < min_val_normals and n_val + 1 <= (
        rest - n_val - 1
    ):
        n_val += 1
    subset_of = {g: "test" for g in groups[:n_test]} | {g: "val" for g in groups[n_test : n_test + n_val]}
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": [], "unused": []}
    for it in items:
        subset = subset_of.get(str(it[group_by]), "train")
        splits["unused" if subset != "test" and it["label"] == 1 else subset].append(it)
    splits = {k: _by_id(v) for k, v in splits.items()}
    if not splits["train"]:
        raise InputDataError(source, f"the training {group_by} groups hold no normal items")
    counts = {
        "train": len(splits["train"]),
        "val": len(splits["val"]),
        "test_normal": sum(it["label"] == 0 for it in splits["test"]),
        "test_abnormal": sum(it["label"] == 1 for it in splits["test"]),
        "unused_normal": 0,
        "unused_abnormal": len(splits["unused"]),
    }
    names = {k: sorted(g for g, s in subset_of.items() if s == k) for k in ("test", "val")}
    names["train"] = sorted(set(groups) - set(subset_of))
    info = {
        "counts": counts,
        "available": {
            "normal": sum(it["label"] == 0 for it in items),
            "abnormal": sum(it["label"] == 1 for it in items),
        },
        "requested": {"group_by": group_by, "test_fraction": test_fraction, "val_fraction": val_fraction},
        "scaled": False,
        "groups": names,
        "notes": [
            f"split by {group_by}: {len(names['train'])} train, {len(names['val'])} val, "
            f"{len(names['test'])} test groups"
        ],
    }
    return splits, info


def _portable(item: dict, base: Path) -> dict:
    out = dict(item)
    for k in _PATH_KEYS:
        if k in out:
            out[k] = relative_id(out[k], base)
    if "extra_masks" in out:
        out["extra_masks"] = [relative_id(p, base) for p in out["extra_masks"]]
    return out


def _resolved(item: dict, base: Path) -> dict:
    out = dict(item)
    for k in _PATH_KEYS:
        if k in out:
            out[k] = str(Path(os.path.abspath(base / out[k])))
    if "extra_masks" in out:
        out["extra_masks"] = [str(Path(os.path.abspath(base / p))) for p in out["extra_masks"]]
    return out


def save_split(split_file: str | os.PathLike, splits: dict[str, list[dict]], root: str | os.PathLike, **meta) -> Path:
    """Write ``splits`` (``train``/``val``/``test``/``unused`` item lists) to ``split_file`` atomically.

    Paths are stored relative to the dataset ``root`` (its folder when it is a datalist file) so the
    file stays valid when the dataset moves; ``unused`` is stored as ids. ``meta`` (seed, params,
    counts, report, ...) is stored beside them.
    """
    base = layout_base(root)
    doc = {"format": SPLIT_FORMAT, **meta}
    doc.update({name: [_portable(it, base) for it in splits[name]] for name in _SPLITS})
    doc["unused"] = [it["id"] for it in splits.get("unused", [])]
    return atomic_write_json(split_file, doc)


def _read_split(split_file: Path) -> dict:
    try:
        doc = json.loads(split_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputDataError(split_file, f"cannot read the split file: {e}") from e
    ours = isinstance(doc, dict) and doc.get("format") == SPLIT_FORMAT
    if not ours or not all(isinstance(doc.get(s), list) for s in _SPLITS):
        raise InputDataError(split_file, f"not a {SPLIT_FORMAT} split file")
    return doc


def load_split(split_file: str | os.PathLike, root: str | os.PathLike) -> dict:
    """Read a split file written by :func:`save_split`, resolving its paths against ``root``.

    Returns:
        ``{"train", "val", "test": items with absolute paths, "report": the stored metadata}``.

    Raises:
        InputDataError: naming ``split_file`` when it is unreadable or lists files missing under ``root``.
    """
    split_file = Path(split_file)
    return _resolve_split(_read_split(split_file), split_file, root)


def _resolve_split(doc: dict, split_file: Path, root: str | os.PathLike) -> dict:
    base = layout_base(root)
    out = {name: [_resolved(it, base) for it in doc[name]] for name in _SPLITS}
    missing = [it[k] for s in _SPLITS for it in out[s] for k in _PATH_KEYS if k in it and not os.path.exists(it[k])]
    missing += [p for s in _SPLITS for it in out[s] for p in it.get("extra_masks", ()) if not os.path.exists(p)]
    if missing:
        one = len(missing) == 1
        problem = (
            f"{len(missing)} {'file it lists does' if one else 'files it lists do'} not exist under {base}: "
            f"{_listing(missing)}. Restore {'it' if one else 'them'}; or split the dataset anew: delete {split_file} "
            f"and train from scratch (the test set changes, so delete the checkpoint.pt beside it too, or train "
            f"into another --output_dir)"
        )
        raise InputDataError(split_file, problem)
    out["report"] = {k: v for k, v in doc.items() if k not in (*_SPLITS, "unused", "format")}
    out["report"].update(split_file=str(split_file), reused=True)
    return out


def _check_reuse(split_file: Path, doc: dict, params: dict, items: list[dict]) -> None:
    """Raise when the stored split was made with other parameters or from other data."""
    differ = {k: (doc.get("params", {}).get(k), v) for k, v in params.items() if doc.get("params", {}).get(k) != v}
    hint = "; pass overwrite=True to remake it, or use another split file"
    if differ:
        said = ", ".join(f"{k}={old!r} (asked {new!r})" for k, (old, new) in differ.items())
        raise InputDataError(split_file, f"split was made with {said}{hint}")
    dedup = doc.get("dedup", {})
    recorded = {it["id"]: it["label"] for s in _SPLITS for it in doc[s]}
    known = set(recorded) | set(doc.get("unused", [])) | {r["id"] for r in dedup.get("removed", [])}
    known |= {i for c in dedup.get("label_conflicts", []) for i in c["ids"]}
    current = {it["id"]: it["label"] for it in items}
    new, gone = sorted(current.keys() - known), sorted(known - current.keys())
    relabelled = sorted(i for i, lab in recorded.items() if i in current and current[i] != lab)
    problems = [
        f"{len(ids)} {what}: {_listing(ids)}"
        for ids, what in (
            (new, "images not in the split"),
            (gone, "split images no longer in the dataset"),
            (relabelled, "images with another label now"),
        )
        if ids
    ]
    if problems:
        raise InputDataError(split_file, "the dataset changed since the split was made: " + "; ".join(problems) + hint)


def _int_or(value, default):
    return default if value is None else int(value)


def prepare_split(
    dataset: str,
    root: str | os.PathLike,
    split_file: str | os.PathLike | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    n_train: int | None = None,
    n_test_normal: int | None = None,
    n_test_abnormal: int | None = None,
    test_fraction: float | None = None,
    source_split: bool | None = None,
    on_conflict: str = "drop",
    overwrite: bool = False,
    min_val_normals: int = 0,
    **layout_kwargs,
) -> dict:
    """Build, deduplicate and split a dataset, or reuse its split file: the entry point for bundles.

    Args:
        dataset: a preset name (``"brainmri"``, ``"IQ-OTH/NCCD"``, ... see ``DATASETS``) or a layout
            name (``"class_folders"``, ``"datalist"``, ``"mvtec"``, ...).
        root: dataset folder (or datalist file).
        split_file: JSON file to write the split to; when it exists it is loaded, its files checked
            and compared with the dataset found at ``root`` and the arguments given (mismatch:
            :class:`~monai_skipts.utils.InputDataError`) unless ``overwrite``. ``None``: not saved.
        seed: split seed.
        val_fraction: fraction of the training normals held out as ``val``.
        n_train, n_test_normal, n_test_abnormal: override the preset's Table I counts.
        test_fraction: test share of normals when no counts are known (default 0.4); for presets
            split by group (``lgg``: by patient) the test share of the groups (default: the preset's).
        source_split: override the preset's choice to follow the source's train/test folders.
        on_conflict: policy for identical files labelled differently (see ``remove_duplicates``).
        overwrite: remake ``split_file`` even if it exists.
        min_val_normals: the fewest validation normals to aim for (see :func:`split_datalist`).
        layout_kwargs: passed to the layout builder over the preset's defaults.

    Returns:
        ``{"train", "val", "test": items with absolute paths, "report": {dataset, seed, params,
        counts, dedup, split, split_file, reused}}``.
    """
    preset = get_dataset(dataset)
    params = {  # plain JSON types, so that a reloaded split file compares equal
        "dataset": preset.name,
        "seed": int(seed),
        "val_fraction": float(val_fraction),
        "n_train": _int_or(n_train, preset.n_train),
        "n_test_normal": _int_or(n_test_normal, preset.n_test_normal),
        "n_test_abnormal": _int_or(n_test_abnormal, preset.n_test_abnormal),
        "test_fraction": float(0.4 if test_fraction is None else test_fraction),
        "source_split": bool(preset.source_split if source_split is None else source_split),
        "on_conflict": on_conflict,
    }
    if min_val_normals:  # recorded only where used, so earlier split files stay valid
        params["min_val_normals"] = int(min_val_normals)
    if preset.group_by:  # recorded only where used, so the split files of other datasets stay as they were
        params["group_by"] = preset.group_by
        params["test_fraction"] = float(preset.test_fraction if test_fraction is None else test_fraction)
    kwargs = {**preset.layout_kwargs, **layout_kwargs}
    items = build_datalist(preset.layout, root, **kwargs)
    split_file = None if split_file is None else Path(split_file)
    if split_file is not None and split_file.exists() and not overwrite:
        doc = _read_split(split_file)
        loaded = _resolve_split(doc, split_file, root)
        _check_reuse(split_file, doc, params, items)
        return {k: (_uniform_mask_key(v) if k in _SPLITS else v) for k, v in loaded.items()}
    kept, dedup = remove_duplicates(items, on_conflict)
    if preset.group_by:
        splits, info = split_by_group(
            kept,
            preset.group_by,
            params["seed"],
            params["val_fraction"],
            params["test_fraction"],
            source=layout_base(root),
            min_val_normals=int(min_val_normals),
        )
    else:
        splits, info = split_datalist(
            kept,
            params["seed"],
            params["n_train"],
            params["n_test_normal"],
            params["n_test_abnormal"],
            params["val_fraction"],
            params["test_fraction"],
            params["source_split"],
            source=layout_base(root),
            min_val_normals=int(min_val_normals),
        )
    counts = info.pop("counts")
    report = {
        "dataset": preset.name,
        "layout": preset.layout,
        "seed": params["seed"],
        "params": params,
        "counts": counts,
        "layout_kwargs": json.loads(json.dumps(kwargs, default=str)),
        "dedup": dedup,
        "split": info,
    }
    if split_file is not None:
        save_split(split_file, splits, root, **report)
    report.update(split_file=None if split_file is None else str(split_file), reused=False)
    return {
        "train": _uniform_mask_key(splits["train"]),
        "val": _uniform_mask_key(splits["val"]),
        "test": _uniform_mask_key(splits["test"]),
        "report": report,
    }


def _uniform_mask_key(items: list[dict]) -> list[dict]:
    """When any item of a split has a ``"mask"``, give every item one (``None``: no lesion, read as an
    all-zero mask by the transforms) so that batches mixing normal and anomalous images collate."""
    if not any("mask" in it for it in items):
        return items
    return [it if "mask" in it else {**it, "mask": None} for it in items]
