"""The paper's datasets: their layout and their Table I split sizes.

Table I of Liu et al. (IEEE TIM 2024) gives, per dataset, the number of normal training images and
of normal and anomalous test images. These are the default split sizes; see
:func:`~monai_skipts.data.split.split_datalist` for how they are scaled when a copy of the dataset
holds fewer (e.g. after duplicate removal) or more images.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any, Mapping, Optional

from monai_skipts.data.layouts import LAYOUTS, _key, get_layout

__all__ = ["DatasetPreset", "DATASETS", "get_dataset"]


@dataclasses.dataclass(frozen=True)
class DatasetPreset:
    """How to read one dataset and how to split it by default.

    Args:
        name: canonical dataset name.
        layout: name of the registered layout builder.
        n_train: normal images for training (Table I; the validation normals are carved from them).
        n_test_normal: normal test images (Table I).
        n_test_abnormal: anomalous test images (Table I; at most this many are used).
        source_split: follow the source's own train/test folders for normals (see ``split_datalist``).
        layout_kwargs: default keyword arguments for the layout builder.
        group_by: split by this item key (a patient or volume id: ``split_by_group``) instead of by
            image; the Table I counts then do not apply.
        test_fraction: with ``group_by``: the share of groups that go to test.
    """

    name: str
    layout: str
    n_train: Optional[int] = None
    n_test_normal: Optional[int] = None
    n_test_abnormal: Optional[int] = None
    source_split: bool = False
    layout_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    group_by: Optional[str] = None
    test_fraction: float = 0.4


def _p(name, layout, counts=(None, None, None), source_split=False, **layout_kwargs) -> DatasetPreset:
    return DatasetPreset(name, layout, *counts, source_split, MappingProxyType(layout_kwargs))


DATASETS: Mapping[str, DatasetPreset] = MappingProxyType({p.name: p for p in (
    _p("headct", "head_ct", (60, 40, 100)),
    _p("brainmri", "brainmri", (58, 40, 154)),
    _p("lungct", "lung_ct", (432, 145, 811)),
    _p("busi", "busi", (99, 34, 647)),
    _p("breastmri", "breast_mri", (525, 175, 700)),
    # Kermany's train/test folders are patient-disjoint: keep them apart.
    _p("retinal_oct", "retinal_oct", (542, 50, 735), source_split=True),
    _p("cp_child_a", "cp_child", (800, 800, 800), subdir="CP-CHILD-A"),
    _p("cp_child_b", "cp_child", (800, 300, 300), subdir="CP-CHILD-B"),
    _p("nafld", "nafld", (525, 1645, 2150)),
    _p("iq_oth_nccd", "iq_oth_nccd", (277, 139, 681)),
    # Table I's 70 / 20 normals are exactly the source's train/ and test/ Normal folders.
    _p("covid_xray", "covid_xray", (70, 20, 132), source_split=True),
    _p("malaria", "malaria", (344, 345, 330)),
    _p("mvtec", "mvtec", source_split=True),
    # not a paper dataset: brain MRI slices with lesion masks, split by patient (never by slice)
    DatasetPreset("lgg", "lgg", group_by="volume_id", test_fraction=0.4),
)})
"""Dataset presets by canonical name (paper Table I counts)."""


def get_dataset(name: str) -> DatasetPreset:
    """The preset for ``name`` (spelling-tolerant: ``"IQ-OTH/NCCD"``, ``"HeadCT"``, ``"head_ct"``).

    A registered layout name without a preset (``"class_folders"``, ``"datalist"``, ...) gives a
    preset with no fixed counts.
    """
    by_key = {_key(k): p for k, p in DATASETS.items()}
    by_key.setdefault(_key("head_ct"), DATASETS["headct"])
    if _key(name) in by_key:
        return by_key[_key(name)]
    try:
        get_layout(name)
    except ValueError:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}; "
                         f"layouts: {', '.join(sorted(LAYOUTS))}") from None
    canonical = next(k for k in LAYOUTS if _key(k) == _key(name))
    return DatasetPreset(canonical, canonical)
