"""Exact-duplicate removal by content hash, run before splitting.

Public medical sets contain byte-identical copies (BrainMRI: 25 of 253 files); left in, a copy can
land in training and its twin in test, inflating the test score. Items are grouped by the SHA-256
of the image file's bytes (together with any frame/slice keys, so several slices of one file are not
duplicates of each other). In each group the item with the first image path in sorted order is
kept, the others are removed and reported.

A group whose copies carry different labels (normal and anomalous) is a *label conflict*: the
truth is unknown, so by default every copy is dropped (``on_conflict="drop"``); ``"keep_abnormal"``
keeps the first anomalous copy (it never reaches the normal training set), ``"error"`` raises.
Copies in different class folders with the same label (e.g. benign and malignant) are kept once
like any duplicate and also listed under ``cross_class``.
"""

from __future__ import annotations

import json
from collections import defaultdict

from monai_skipts.data.files import file_sha256
from monai_skipts.utils import InputDataError

__all__ = ["CONFLICT_POLICIES", "remove_duplicates"]

CONFLICT_POLICIES = ("drop", "keep_abnormal", "error")

# Keys that describe an item rather than pick which part of the file it is.
_DESCRIPTIVE = {"image", "mask", "extra_masks", "id", "label", "class_name", "subset"}


def _content_key(item: dict, hashes: dict[str, str]) -> tuple:
    image = item["image"]
    if image not in hashes:
        hashes[image] = file_sha256(image)
    where = tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in item.items() if k not in _DESCRIPTIVE))
    return hashes[image], where


def remove_duplicates(items: list[dict], on_conflict: str = "drop") -> tuple[list[dict], dict]:
    """Drop exact duplicates from ``items``; returns ``(kept_items, report)``.

    Args:
        items: datalist items (``image``, ``label``, ``id``, ...). Not modified.
        on_conflict: what to do with copies labelled both normal and anomalous: ``"drop"`` all of
            them (default), ``"keep_abnormal"`` (keep the first anomalous copy) or ``"error"``
            (raise :class:`~monai_skipts.utils.InputDataError` naming the files).

    Returns:
        the kept items in input order, and a report::

            {"n_input", "n_kept", "n_removed",            # n_removed: duplicate copies removed
             "removed": [{"id", "duplicate_of"}, ...],
             "cross_class": [{"ids", "classes", "kept"}, ...],
             "label_conflicts": [{"ids", "labels", "action"}, ...],
             "n_conflict_dropped", "on_conflict", "hash": "sha256"}
    """
    if on_conflict not in CONFLICT_POLICIES:
        raise ValueError(f"on_conflict must be one of {CONFLICT_POLICIES}, got {on_conflict!r}")
    groups: dict[tuple, list[int]] = defaultdict(list)
    hashes: dict[str, str] = {}
    for i, item in enumerate(items):
        groups[_content_key(item, hashes)].append(i)
    keep = set()
    removed, cross_class, conflicts = [], [], []
    for members in groups.values():
        members = sorted(members, key=lambda i: (str(items[i]["image"]), items[i]["id"]))
        first = members[0]
        labels = {items[i]["label"] for i in members}
        if len(labels) > 1:
            ids = [items[i]["id"] for i in members]
            if on_conflict == "error":
                problem = f"identical files labelled both normal and anomalous: {ids}"
                raise InputDataError(items[first]["image"], problem)
            action = "dropped"
            if on_conflict == "keep_abnormal":
                first = next(i for i in members if items[i]["label"] == 1)
                keep.add(first)
                action = f"kept {items[first]['id']} as anomalous"
            conflicts.append({"ids": ids, "labels": [items[i]["label"] for i in members], "action": action})
            continue
        keep.add(first)
        for i in members[1:]:
            removed.append({"id": items[i]["id"], "duplicate_of": items[first]["id"]})
        classes = [items[i].get("class_name") for i in members]
        if len(set(classes)) > 1:
            cross_class.append(
                {"ids": [items[i]["id"] for i in members], "classes": classes, "kept": items[first]["id"]}
            )
    kept = [item for i, item in enumerate(items) if i in keep]
    report = {
        "n_input": len(items),
        "n_kept": len(kept),
        "n_removed": len(removed),
        "removed": sorted(removed, key=lambda r: r["id"]),
        "cross_class": sorted(cross_class, key=lambda r: r["kept"]),
        "label_conflicts": sorted(conflicts, key=lambda r: r["ids"]),
        "n_conflict_dropped": len(items) - len(kept) - len(removed),
        "on_conflict": on_conflict,
        "hash": "sha256",
    }
    return kept, report
