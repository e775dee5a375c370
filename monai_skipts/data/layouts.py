"""Datalist builders for the dataset layouts this package knows, found by name in a registry.

Every builder takes the dataset ``root`` (a folder, or for ``datalist`` a CSV/JSON file) and returns
a list of items, sorted by ``id``::

    {"image": "/abs/path.png", "label": 0 | 1, "id": "yes/Y1.jpg",      # required
     "mask": "/abs/mask.png", "extra_masks": [...],                     # when the layout has masks
     "class_name": "yes", "subset": "train"}                            # source folder names

``label`` is 0 for normal, 1 for anomalous. ``id`` is the image path relative to the dataset root
(POSIX form): short, stable across machines, and free of header data. Builders raise
:class:`~monai_skipts.utils.InputDataError` naming the folder or file at fault.

Class-folder names are matched case-insensitively. When none of the expected folders is at ``root``
but ``root`` holds a single visible sub-folder (the usual archive wrapper, e.g. ``Covid19-dataset/``),
the builder looks inside it.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from monai_skipts.data.files import IMAGE_EXTENSIONS, _ignored, list_images, relative_id
from monai_skipts.utils import InputDataError

__all__ = [
    "LAYOUTS",
    "register_layout",
    "get_layout",
    "build_datalist",
    "layout_base",
    "class_folders_datalist",
    "head_ct_datalist",
    "busi_datalist",
    "mvtec_datalist",
    "lgg_datalist",
    "file_datalist",
]

logger = logging.getLogger(__name__)

LAYOUTS: dict[str, Callable[..., list[dict]]] = {}
"""Registered layout builders by canonical name (see :func:`register_layout`)."""

_EXPECTED_EXT = ", ".join(e[1:] for e in IMAGE_EXTENSIONS) + " or DICOM"
_MAX_LISTED = 5


def _key(name: str) -> str:
    """Lookup key: lower case, letters and digits only ('IQ-OTH/NCCD' == 'iq_oth_nccd')."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def register_layout(name: str, builder: Callable[..., list[dict]] | None = None):
    """Register ``builder`` under ``name``; usable as a decorator (``@register_layout("x")``)."""

    def _register(fn):
        LAYOUTS[name] = fn
        return fn

    return _register if builder is None else _register(builder)


def get_layout(name: str) -> Callable[..., list[dict]]:
    """The builder registered as ``name`` (case, ``-``, ``_``, ``/`` and spaces ignored)."""
    by_key = {_key(k): fn for k, fn in LAYOUTS.items()}
    if _key(name) not in by_key:
        raise ValueError(f"unknown dataset layout {name!r}; known: {', '.join(sorted(LAYOUTS))}")
    return by_key[_key(name)]


def build_datalist(layout: str, root: str | os.PathLike, **kwargs) -> list[dict]:
    """Build the datalist of ``root`` with the layout registered as ``layout``."""
    return get_layout(layout)(root, **kwargs)


def layout_base(root: str | os.PathLike) -> Path:
    """The folder item paths are relative to: ``root`` itself, or its folder when it is a file."""
    root = Path(os.path.abspath(os.path.expanduser(root)))
    return root.parent if root.is_file() else root


# ---------------------------------------------------------------------------------------------
# helpers


def _root_dir(root) -> Path:
    root = Path(os.path.abspath(os.path.expanduser(root)))
    if not root.exists():
        raise InputDataError(root, "dataset folder does not exist")
    if not root.is_dir():
        raise InputDataError(root, "expected a dataset folder, found a file")
    return root


def _subdirs(folder: Path) -> dict[str, Path]:
    """Visible sub-folders by case-folded name."""
    return {p.name.casefold(): p for p in sorted(folder.iterdir()) if p.is_dir() and not _ignored(p.name)}


def _find_base(root: Path, expected: Iterable[str], subdir: str | None = None, depth: int = 2) -> Path:
    """``root`` (or ``root/subdir``), descending through single wrapper folders until one of the
    ``expected`` sub-folder names shows up (at most ``depth`` levels)."""
    expected = {e.casefold() for e in expected}
    base = root
    if subdir is not None and subdir.casefold() in _subdirs(root):
        base = _subdirs(root)[subdir.casefold()]
    for _ in range(depth):
        subs = _subdirs(base)
        if expected & subs.keys() or len(subs) != 1:
            break
        base = next(iter(subs.values()))
    return base


def _listing(paths: Sequence) -> str:
    shown = ", ".join(str(p) for p in list(paths)[:_MAX_LISTED])
    return shown + (f" and {len(paths) - _MAX_LISTED} more" if len(paths) > _MAX_LISTED else "")


def _item(image: Path, label: int, root: Path, **extra) -> dict:
    item = {"image": str(image), "label": int(label), "id": relative_id(image, root)}
    item.update({k: v for k, v in extra.items() if v is not None})
    return item


# ---------------------------------------------------------------------------------------------
# class folders


@register_layout("class_folders")
def class_folders_datalist(
    root: str | os.PathLike,
    normal: Sequence[str] = ("normal",),
    abnormal: Sequence[str] = ("abnormal",),
    subsets: Sequence[str] | None = None,
    recursive: bool = False,
    subdir: str | None = None,
) -> list[dict]:
    """Images sorted into one folder per class: ``root/[<subset>/]<class>/<image>``.

    Args:
        root: dataset folder.
        normal: names of the folders holding normal images (label 0).
        abnormal: names of the folders holding anomalous images (label 1); may be empty for a
            normal-only dataset. Names missing on disk are skipped (so alternative spellings can be
            listed) as long as at least one normal and one abnormal folder is found.
        subsets: names of intermediate split folders (e.g. ``("train", "test")``), recorded as the
            item's ``"subset"``; missing ones are skipped. ``None``: class folders sit in ``root``.
        recursive: also take images from sub-folders of the class folders.
        subdir: a folder inside ``root`` to descend into when present (e.g. ``"CP-CHILD-A"``).
    """
    root = _root_dir(root)
    normal, abnormal = tuple(normal), tuple(abnormal)
    labels = {n.casefold(): 0 for n in normal} | {n.casefold(): 1 for n in abnormal}
    base = _find_base(root, subsets or labels, subdir)
    containers = [(None, base)]
    if subsets:
        subs = _subdirs(base)
        containers = [(subs[s.casefold()].name, subs[s.casefold()]) for s in subsets if s.casefold() in subs]
        if not containers:
            raise InputDataError(base, f"no subset folder {list(subsets)} found (folders there: {sorted(subs)})")
    items, found = [], {0: [], 1: []}
    for subset, folder in containers:
        for name, class_dir in _subdirs(folder).items():
            if name not in labels:
                continue
            found[labels[name]].append(class_dir)
            for image in list_images(class_dir, recursive):
                items.append(_item(image, labels[name], root, class_name=class_dir.name, subset=subset))
    expected = f"normal folders {list(normal)} and abnormal folders {list(abnormal)}"
    for label, names in ((0, normal), (1, abnormal)):
        if names and not found[label]:
            where = [c for _, c in containers]
            seen = sorted({d.name for c in where for d in _subdirs(c).values()})
            raise InputDataError(
                base,
                f"no {'ab' if label else ''}normal class folder {list(names)} found; "
                f"expected {expected} (folders there: {seen})",
            )
        if names and not any(it["label"] == label for it in items):
            raise InputDataError(found[label][0], f"no images found ({_EXPECTED_EXT} files expected)")
    return sorted(items, key=lambda it: it["id"])


def _preset(name: str, doc: str, **defaults) -> None:
    def builder(root: str | os.PathLike, **kwargs) -> list[dict]:
        return class_folders_datalist(root, **{**defaults, **kwargs})

    builder.__name__ = builder.__qualname__ = f"{name}_datalist"
    builder.__doc__ = f"{doc}: :func:`class_folders_datalist` with defaults {defaults}."
    register_layout(name, builder)


_preset("brainmri", "BrainMRI (Kaggle navoneel)", normal=("no",), abnormal=("yes",))
_preset(
    "iq_oth_nccd",
    "IQ-OTH/NCCD lung CT ('Bengin' is the published spelling; 'Benign' also accepted)",
    normal=("Normal cases",),
    abnormal=("Bengin cases", "Benign cases", "Malignant cases"),
)
_preset(
    "covid_xray",
    "Covid-19 Image Dataset (Kaggle)",
    normal=("Normal",),
    abnormal=("Covid", "Viral Pneumonia"),
    subsets=("train", "test"),
)
_preset("malaria", "Malaria cell images (NIH)", normal=("Uninfected",), abnormal=("Parasitized",))
_preset(
    "retinal_oct",
    "Retinal OCT (Kermany 2018)",
    normal=("NORMAL",),
    abnormal=("CNV", "DME", "DRUSEN"),
    subsets=("train", "val", "test"),
)
_preset(
    "cp_child",
    "CP-CHILD-A/B colonoscopy; pass subdir='CP-CHILD-A' or 'CP-CHILD-B' when root holds both",
    normal=("Non-Polyp",),
    abnormal=("Polyp",),
    subsets=("Train", "Test"),
)
# Layouts not pinned down by the paper: folder names are parameters (defaults normal/ and abnormal/).
_preset("lung_ct", "Lung CT, class folders named by the caller")
_preset("breast_mri", "Breast MRI, class folders named by the caller")
_preset("nafld", "NAFLD liver ultrasound, class folders named by the caller")


# ---------------------------------------------------------------------------------------------
# HeadCT


@register_layout("head_ct")
def head_ct_datalist(root: str | os.PathLike, labels_csv: str = "labels.csv", image_dir: str = "head_ct") -> list[dict]:
    """HeadCT (Kaggle felipekitamura): ``head_ct/000.png ... 199.png`` and ``labels.csv``.

    The CSV header is ``id, hemorrhage`` (with a space, tolerated); ids are integers without zero
    padding, matched to image names by integer value. ``hemorrhage`` 1 is anomalous. The Kaggle
    archive's nesting (``head_ct/head_ct/``) is followed. Every CSV row needs an image and every
    image a row.
    """
    root = _root_dir(root)
    base = _find_base(root, [image_dir])
    images_dir = base / image_dir
    if (images_dir / image_dir).is_dir():
        images_dir = images_dir / image_dir
    csv_path = next((p for p in (base / labels_csv, images_dir / labels_csv) if p.is_file()), None)
    if csv_path is None:
        raise InputDataError(base, f"no {labels_csv} found (expected {labels_csv} with columns 'id, hemorrhage')")
    if not images_dir.is_dir():
        raise InputDataError(base, f"no image folder {image_dir}/ found beside {labels_csv}")
    images = {int(p.name.split(".")[0]): p for p in list_images(images_dir) if p.name.split(".")[0].isdigit()}
    if not images:
        raise InputDataError(images_dir, "no images found (expected 000.png, 001.png, ...)")
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f, skipinitialspace=True))
    if not rows or not {"id", "hemorrhage"} <= {(k or "").strip() for k in rows[0]}:
        raise InputDataError(csv_path, "expected columns 'id' and 'hemorrhage'")
    items, missing = [], []
    for line, row in enumerate(rows, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        if not row["id"].isdigit() or row["hemorrhage"] not in ("0", "1"):
            raise InputDataError(csv_path, f"line {line}: expected an integer id and hemorrhage 0 or 1, got {row}")
        image = images.pop(int(row["id"]), None)
        if image is None:
            missing.append(row["id"])
            continue
        label = int(row["hemorrhage"])
        items.append(_item(image, label, root, class_name="hemorrhage" if label else "normal"))
    if missing:
        raise InputDataError(csv_path, f"{len(missing)} listed ids have no image in {images_dir}: {_listing(missing)}")
    if images:
        names = [p.name for p in images.values()]
        raise InputDataError(csv_path, f"no row for {len(names)} images in {images_dir}: {_listing(names)}")
    return sorted(items, key=lambda it: it["id"])


# ---------------------------------------------------------------------------------------------
# BUSI

_MASK_RE = re.compile(r"^(?P<stem>.+)_mask(?:_(?P<k>\d+))?$")


def _stem(path: Path) -> str:
    name = path.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else path.stem


@register_layout("busi")
def busi_datalist(
    root: str | os.PathLike,
    normal: Sequence[str] = ("normal",),
    abnormal: Sequence[str] = ("benign", "malignant"),
    subdir: str = "Dataset_BUSI_with_GT",
) -> list[dict]:
    """BUSI breast ultrasound: ``Dataset_BUSI_with_GT/{normal,benign,malignant}/<name> (<n>).png``.

    Masks ``<name> (<n>)_mask.png`` beside the images are attached as ``"mask"``; further masks of
    the same image (``_mask_1.png``, ...: several lesions) are listed in ``"extra_masks"`` — the
    lesion mask is the union of all of them. Mask files are never items. Anomalous images without
    a mask and masks without an image are logged as warnings.
    """
    root = _root_dir(root)
    classes = {n.casefold(): 0 for n in normal} | {n.casefold(): 1 for n in abnormal}
    base = _find_base(root, classes, subdir)
    items, no_mask = [], []
    for name, class_dir in _subdirs(base).items():
        if name not in classes:
            continue
        images, masks = {}, {}
        for path in list_images(class_dir):
            m = _MASK_RE.match(_stem(path))
            if m:
                masks.setdefault(m["stem"], []).append((int(m["k"] or 0), path))
            else:
                images[_stem(path)] = path
        for stem, image in images.items():
            found = [p for _, p in sorted(masks.pop(stem, []))]
            item = _item(image, classes[name], root, class_name=class_dir.name)
            if found:
                item["mask"] = str(found[0])
                if len(found) > 1:
                    item["extra_masks"] = [str(p) for p in found[1:]]
            elif classes[name]:
                no_mask.append(item["id"])
            items.append(item)
        if masks:
            logger.warning("%s: %d masks without an image: %s", class_dir, len(masks), _listing(sorted(masks)))
    if not items:
        raise InputDataError(
            base,
            f"no images found in class folders {list(normal) + list(abnormal)} "
            f"(expected <name> (<n>).png with <name> (<n>)_mask.png beside)",
        )
    if no_mask:
        logger.warning("%s: %d anomalous images without a mask: %s", base, len(no_mask), _listing(no_mask))
    return sorted(items, key=lambda it: it["id"])


# ---------------------------------------------------------------------------------------------
# MVTec AD style


@register_layout("mvtec")
def mvtec_datalist(root: str | os.PathLike, good: str = "good") -> list[dict]:
    """MVTec-AD style category folder: ``train/good``, ``test/good``, ``test/<defect>`` and
    ``ground_truth/<defect>/<name>_mask.png``.

    Items carry ``"subset"`` (``train``/``test``) and ``"class_name"`` (``good`` or the defect);
    defect images get their mask when one exists.
    """
    root = _root_dir(root)
    base = _find_base(root, ["train", "test"])
    subs = _subdirs(base)
    if "train" not in subs or "test" not in subs:
        raise InputDataError(base, f"expected train/{good}/, test/{good}/ and test/<defect>/ folders")
    gt_masks = {}
    if "ground_truth" in subs:
        for defect_dir in _subdirs(subs["ground_truth"]).values():
            for path in list_images(defect_dir):
                gt_masks[(defect_dir.name, _MASK_RE.sub(r"\g<stem>", _stem(path)))] = path
    items = []
    for subset in ("train", "test"):
        for name, class_dir in _subdirs(subs[subset]).items():
            label = int(name != good.casefold())
            if subset == "train" and label:
                logger.warning("%s: defect folder in train/ ignored", class_dir)
                continue
            for image in list_images(class_dir):
                mask = gt_masks.get((class_dir.name, _stem(image))) if label else None
                items.append(
                    _item(
                        image,
                        label,
                        root,
                        class_name=class_dir.name,
                        subset=subset,
                        mask=None if mask is None else str(mask),
                    )
                )
    if not any(it["subset"] == "train" for it in items):
        raise InputDataError(subs["train"], f"no images found in train/{good}/ ({_EXPECTED_EXT} files expected)")
    return sorted(items, key=lambda it: it["id"])


# ---------------------------------------------------------------------------------------------
# LGG brain MRI segmentation (kaggle_3m): one folder per patient, slice PNGs with masks beside

_SLICE_RE = re.compile(r"^(?P<patient>.+)_(?P<n>\d+)$")


def _foreground_fraction(image: np.ndarray, level: float) -> float:
    """Share of pixels where any channel exceeds ``level``."""
    a = image.max(axis=-1) if image.ndim == 3 else image
    return float((a > level).mean())


def _read_plain(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im)
    except (OSError, UnidentifiedImageError) as e:
        raise InputDataError(path, f"cannot read the image: {e}") from e


@register_layout("lgg")
def lgg_datalist(
    root: str | os.PathLike,
    min_foreground: float = 0.1,
    foreground_threshold: float = 0.1,
    subdir: str = "kaggle_3m",
) -> list[dict]:
    """LGG brain MRI segmentation (Buda et al. 2019, TCGA-LGG; Kaggle ``lgg-mri-segmentation``):
    ``kaggle_3m/<patient>/<patient>_<n>.png`` (or ``.tif``) with ``<patient>_<n>_mask.png`` beside.

    Every slice is an item with its ``mask`` (255 = FLAIR abnormality), ``label`` 1 when the mask
    has a lesion pixel and 0 when it is empty, ``volume_id`` = the patient folder and
    ``slice_number`` = ``n`` (items of a patient sorted numerically by it; not ``slice_index``,
    which tells the loader to read slice ``i`` out of a volume file: here each slice is its own file). Every patient has a
    tumour: a label-0 slice is a lesion-free slice of a tumour patient. Split such data by patient
    (the ``lgg`` dataset preset does: ``group_by="volume_id"``), never by slice.

    The volume ends are mostly background: slices whose brain (any channel above
    ``foreground_threshold`` × the volume's maximum) covers less than ``min_foreground`` of the image
    are dropped, whatever their label (each kept item records its ``foreground``). The brain level
    is relative to the brightest pixel of the patient's whole volume, not of the slice: a slice of
    background noise has a low maximum of its own.

    Args:
        root: the dataset folder (``kaggle_3m/`` itself or a folder holding it).
        min_foreground: smallest brain fraction of a kept slice (0 keeps every slice).
        foreground_threshold: brain pixel threshold, relative to the volume's maximum.
        subdir: the folder inside ``root`` holding the patient folders, when present.
    """
    root = _root_dir(root)
    base = root / subdir if (root / subdir).is_dir() else root
    patients = [d for d in _subdirs(base).values() if any(_SLICE_RE.match(_stem(p)) for p in list_images(d))]
    if not patients:
        raise InputDataError(
            base, "no patient folders found (expected <patient>/<patient>_<n>.png with <patient>_<n>_mask.png beside)"
        )
    items, no_mask, dropped = [], [], 0
    for folder in patients:
        images, masks = {}, {}
        for path in list_images(folder):
            m = _MASK_RE.match(_stem(path))
            if m:
                masks[m["stem"]] = path
            elif _SLICE_RE.match(_stem(path)):
                images[_stem(path)] = path
        slices = sorted(images.items(), key=lambda kv: int(_SLICE_RE.match(kv[0])["n"]))
        pixels = {stem: _read_plain(image) for stem, image in slices}
        level = foreground_threshold * max(float(a.max()) for a in pixels.values())
        for stem, image in slices:
            mask = masks.pop(stem, None)
            if mask is None:
                no_mask.append(relative_id(image, root))
                continue
            frac = _foreground_fraction(pixels[stem], level)
            if frac < min_foreground:
                dropped += 1
                continue
            label = int(bool(_read_plain(mask).any()))
            items.append(
                _item(
                    image,
                    label,
                    root,
                    mask=str(mask),
                    volume_id=folder.name,
                    slice_number=int(_SLICE_RE.match(stem)["n"]),
                    foreground=round(frac, 4),
                    class_name="lesion" if label else "no_lesion",
                )
            )
        if masks:
            logger.warning("%s: %d masks without an image: %s", folder, len(masks), _listing(sorted(masks)))
    if no_mask:
        raise InputDataError(base, f"{len(no_mask)} slices have no _mask file beside them: {_listing(no_mask)}")
    if not items:
        raise InputDataError(base, f"no slice has a brain fraction >= {min_foreground}")
    logger.info(
        "%s: %d slices of %d patients kept, %d mostly-background slices dropped (brain fraction < %s)",
        base,
        len(items),
        len(patients),
        dropped,
        min_foreground,
    )
    return sorted(items, key=lambda it: (it["volume_id"], it["slice_number"]))


# ---------------------------------------------------------------------------------------------
# explicit CSV / JSON datalists

_LABELS = {"0": 0, "1": 1, "normal": 0, "good": 0, "abnormal": 1, "anomalous": 1, "anomaly": 1}
_INT_KEYS = ("slice_index", "frame")


def _read_rows(path: Path, key: str | None) -> list[dict]:
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as f:
            return [
                {(k or "").strip(): (v.strip() if isinstance(v, str) else v) for k, v in row.items()}
                for row in csv.DictReader(f, skipinitialspace=True)
            ]
    if path.suffix.lower() != ".json":
        raise InputDataError(path, "expected a .csv or .json datalist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputDataError(path, f"not valid JSON: {e}") from e
    if isinstance(data, dict):
        key = key or next((k for k in ("data", "items", "training") if k in data), None)
        data = data.get(key) if key else None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise InputDataError(
            path,
            'expected a JSON list of items (or an object with a \'data\' list), each like {"image": ..., "label": 0|1}',
        )
    return data


@register_layout("datalist")
def file_datalist(root: str | os.PathLike, key: str | None = None) -> list[dict]:
    """Items listed in a CSV (columns ``image``, ``label``, optional ``mask``, ``id`` and any
    others) or JSON file (a list of such objects, or an object holding it under ``key``/``"data"``).

    Image and mask paths (DICOM, NIfTI, PNG, ...; a DICOM series folder is accepted) may be
    relative to the datalist's folder. ``label`` is 0/1 (``normal``/``abnormal`` also accepted).
    Without an ``id`` the id is the image path relative to the datalist's folder, followed by
    ``#slice_index=<i>``/``#frame=<i>`` when those keys are given. All listed files must exist.
    """
    path = Path(os.path.abspath(os.path.expanduser(root)))
    if not path.is_file():
        raise InputDataError(path, "datalist file does not exist" if not path.exists() else "expected a datalist file")
    base, items, missing, ids = path.parent, [], [], {}
    for n, row in enumerate(_read_rows(path, key), start=1):
        if not row.get("image"):
            raise InputDataError(path, f"item {n} has no 'image'")
        label = row.get("label")
        label = int(label) if isinstance(label, (int, float)) and label in (0, 1) else _LABELS.get(str(label).lower())
        if label is None:
            raise InputDataError(path, f"item {n}: label must be 0 (normal) or 1 (anomalous), got {row.get('label')!r}")
        item = {k: v for k, v in row.items() if v not in (None, "")}
        for k in _INT_KEYS:
            if isinstance(item.get(k), str) and item[k].lstrip("-").isdigit():
                item[k] = int(item[k])
        item["label"] = label
        for k in ("image", "mask"):
            if k in item:
                p = Path(os.path.expanduser(str(item[k])))
                item[k] = str(p if p.is_absolute() else Path(os.path.abspath(base / p)))
                if not os.path.exists(item[k]):
                    missing.append(item[k])
        if "id" not in item:
            item["id"] = relative_id(item["image"], base) + "".join(f"#{k}={item[k]}" for k in _INT_KEYS if k in item)
        item["id"] = str(item["id"])
        if item["id"] in ids:
            problem = f"items {ids[item['id']]} and {n} share the id {item['id']!r}; add an 'id' column"
            raise InputDataError(path, problem)
        ids[item["id"]] = n
        items.append(item)
    if missing:
        raise InputDataError(path, f"{len(missing)} listed files do not exist: {_listing(missing)}")
    if not items:
        raise InputDataError(path, "the datalist lists no items")
    return sorted(items, key=lambda it: it["id"])
