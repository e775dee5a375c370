"""The datasets: every fact about each one, declared once.

One :class:`DatasetPreset` per dataset holds how to read it (layout and layout keyword arguments),
how to split it by default (the paper's Table I counts, or a by-patient split), which modality
preset preprocesses it, the paper's Skip-TS AUROC, its display name, its bundle folder, the text
its bundle README shows and the folder names the benchmarks look for under a data root. The
bundles (``bundles/make_bundles.py`` writes them from this table), their READMEs, the benchmark
scripts and the tests all read :data:`DATASETS`; ``tests/data/test_presets.py`` fails when one of
them disagrees with it.

Table I of Liu et al. (IEEE TIM 2024) gives, per dataset, the number of normal training images and
of normal and anomalous test images. These are the default split sizes; see
:func:`~monai_skipts.data.split.split_datalist` for how they are scaled when a copy of the dataset
holds fewer (e.g. after duplicate removal) or more images. The paper AUROCs are its Table II
Skip-TS figures (WideResNet-50 teacher, 256², 200 epochs), in %.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any, Mapping, Optional, Tuple

from monai_skipts.data.layouts import LAYOUTS, _key, get_layout
from monai_skipts.transforms.presets import PRESETS

__all__ = ["DatasetPreset", "DATASETS", "get_dataset"]


@dataclasses.dataclass(frozen=True)
class DatasetPreset:
    """One dataset: how to read it, how to split it by default, and what the package says about it.

    Args:
        name: canonical dataset name (the ``dataset`` id of its bundle, ``prepare_split``'s argument).
        layout: name of the registered layout builder.
        n_train: normal images for training (Table I; the validation normals are carved from them).
        n_test_normal: normal test images (Table I).
        n_test_abnormal: anomalous test images (Table I; at most this many are used).
        source_split: follow the source's own train/test folders for normals (see ``split_datalist``).
        layout_kwargs: default keyword arguments for the layout builder.
        group_by: split by this item key (a patient or volume id: ``split_by_group``) instead of by
            image; the Table I counts then do not apply.
        test_fraction: with ``group_by``: the share of groups that go to test.
        modality: the modality preset that preprocesses it (one of
            ``monai_skipts.transforms.PRESETS``, the ``transforms/<modality>.json`` fragments);
            ``None`` only for a bare layout (``get_dataset("class_folders")``), which then needs one.
        paper_auroc: the paper's Table II Skip-TS image AUROC (%); ``None``: not in the paper.
        display_name: the name the READMEs and reports print (default: ``name``).
        bundle: its folder under ``bundles/`` (``None``: no bundle).
        bundle_dataset: the ``dataset`` id its bundle passes to ``prepare_split`` when not ``name``
            (the demo's phantom is written in the ``mvtec`` layout and split as ``mvtec``).
        val_fraction: the share of the training normals (of the training patients with ``group_by``)
            the bundle and the benchmarks hold out to calibrate the decision threshold.
        folders: folder names the benchmarks try, in order, under a data root (empty: never looked for).
        source: where the data comes from (bundle README and metadata).
        layout_text: the source layout under ``--dataset_dir``, for the bundle README (Markdown).
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
    modality: Optional[str] = None
    paper_auroc: Optional[float] = None
    display_name: str = ""
    bundle: Optional[str] = None
    bundle_dataset: Optional[str] = None
    val_fraction: float = 0.1
    folders: Tuple[str, ...] = ()
    source: str = ""
    layout_text: str = ""

    def __post_init__(self):
        if self.modality is not None and self.modality not in PRESETS:
            raise ValueError(
                f"dataset {self.name!r}: unknown modality preset {self.modality!r}; choose one of {', '.join(PRESETS)}"
            )
        if not self.display_name:
            object.__setattr__(self, "display_name", self.name)
        object.__setattr__(self, "folders", tuple(self.folders))
        object.__setattr__(self, "layout_kwargs", MappingProxyType(dict(self.layout_kwargs)))

    @property
    def table1(self) -> Optional[Tuple[int, int, int]]:
        """``(n_train, n_test_normal, n_test_abnormal)`` of the paper's Table I, or ``None``."""
        counts = (self.n_train, self.n_test_normal, self.n_test_abnormal)
        return None if None in counts else counts  # type: ignore[return-value]

    def require_modality(self) -> str:
        """``modality``, or a ``ValueError`` for a bare layout that has none (no silent default)."""
        if self.modality is None:
            raise ValueError(f"dataset {self.name!r} has no modality preset; pass one ({', '.join(PRESETS)})")
        return self.modality


def _p(name, layout, counts=(None, None, None), source_split=False, *, layout_kwargs=None, **facts) -> DatasetPreset:
    return DatasetPreset(name, layout, *counts, source_split, layout_kwargs or {}, **facts)


DATASETS: Mapping[str, DatasetPreset] = MappingProxyType(
    {
        p.name: p
        for p in (
            # -- the paper's twelve, in its Table II order --------------------------------------------------
            _p(
                "headct",
                "head_ct",
                (60, 40, 100),
                modality="ct_brain",
                paper_auroc=85.7,
                display_name="HeadCT",
                bundle="headct",
                folders=("headct", "head_ct", "HeadCT"),
                source="Kaggle felipekitamura/head-ct-hemorrhage",
                layout_text="`head_ct/000.png … 199.png` + `labels.csv` (header `id, hemorrhage`, 1 = hemorrhage)",
            ),
            _p(
                "brainmri",
                "brainmri",
                (58, 40, 154),
                modality="mri",
                paper_auroc=88.2,
                display_name="BrainMRI",
                bundle="brainmri",
                folders=("brainmri", "brain_mri", "BrainMRI"),
                source="Kaggle navoneel/brain-mri-images-for-brain-tumor-detection",
                layout_text="`no/*` normal, `yes/*` tumour (JPG/PNG, mixed sizes; 25 exact duplicates)",
            ),
            _p(
                "lungct",
                "lung_ct",
                (432, 145, 811),
                modality="ct_lung",
                paper_auroc=90.4,
                display_name="LungCT",
                bundle="lungct",
                folders=("lungct", "lung_ct", "LungCT"),
                source="LungCT as in the paper (source not named there)",
                layout_text="class folders `normal/`, `abnormal/` (rename or pass `--dataset_kwargs`)",
            ),
            _p(
                "busi",
                "busi",
                (99, 34, 647),
                modality="ultrasound",
                paper_auroc=92.5,
                display_name="BUSI",
                bundle="busi",
                folders=("busi", "BUSI", "Dataset_BUSI_with_GT"),
                source="Al-Dhabyani et al., Breast Ultrasound Images (BUSI)",
                layout_text="`Dataset_BUSI_with_GT/{normal,benign,malignant}/<name> (<n>).png` with `_mask.png` beside",
            ),
            _p(
                "breastmri",
                "breast_mri",
                (525, 175, 700),
                modality="mri",
                paper_auroc=93.5,
                display_name="BreastMRI",
                bundle="breastmri",
                folders=("breastmri", "breast_mri", "BreastMRI"),
                source="BreastMRI as in the paper",
                layout_text="class folders `normal/`, `abnormal/`",
            ),
            # Kermany's train/test folders are patient-disjoint: keep them apart.
            # Modality: OCT is neither X-ray nor ultrasound, and there is no OCT preset; its B-scans are the
            # optical analogue of ultrasound B-mode (depth from echo delay, coherent speckle, grey-level
            # reflectivity, 8-bit exports), so "ultrasound", the preset that may grow speckle handling. Until
            # then it runs the same chain as "xray" (bit-range scaling), which the bundle used before.
            _p(
                "retinal_oct",
                "retinal_oct",
                (542, 50, 735),
                source_split=True,
                modality="ultrasound",
                paper_auroc=91.3,
                display_name="Retinal OCT",
                bundle="retinal_oct",
                folders=("retinal_oct", "retinaloct", "OCT2017"),
                source="Kermany et al., Retinal OCT (Mendeley Data)",
                layout_text="Kermany `{train,test}/{NORMAL,DME,CNV,DRUSEN}/*`",
            ),
            _p(
                "cp_child_a",
                "cp_child",
                (800, 800, 800),
                layout_kwargs={"subdir": "CP-CHILD-A"},
                modality="rgb",
                paper_auroc=96.5,
                display_name="CP-CHILD-A",
                bundle="cpchild_a",
                folders=("cp_child", "cpchild", "CP-CHILD", "cp_child_a", "cpchild_a"),
                source="CP-CHILD colonoscopy, set A",
                layout_text="`CP-CHILD-A/{Train,Test}/{Polyp,Non-Polyp}/*`",
            ),
            _p(
                "cp_child_b",
                "cp_child",
                (800, 300, 300),
                layout_kwargs={"subdir": "CP-CHILD-B"},
                modality="rgb",
                paper_auroc=95.3,
                display_name="CP-CHILD-B",
                bundle="cpchild_b",
                folders=("cp_child", "cpchild", "CP-CHILD", "cp_child_b", "cpchild_b"),
                source="CP-CHILD colonoscopy, set B",
                layout_text="`CP-CHILD-B/{Train,Test}/{Polyp,Non-Polyp}/*`",
            ),
            _p(
                "nafld",
                "nafld",
                (525, 1645, 2150),
                modality="ultrasound",
                paper_auroc=90.3,
                display_name="NAFLD",
                bundle="nafld",
                folders=("nafld", "NAFLD"),
                source="NAFLD liver ultrasound as in the paper",
                layout_text="class folders `normal/`, `abnormal/`",
            ),
            _p(
                "iq_oth_nccd",
                "iq_oth_nccd",
                (277, 139, 681),
                modality="ct_lung",
                paper_auroc=97.3,
                display_name="IQ-OTH/NCCD",
                bundle="iqothnccd",
                folders=("iq_oth_nccd", "iqothnccd", "IQ-OTH_NCCD"),
                source="IQ-OTH/NCCD lung cancer CT (Kaggle)",
                layout_text="`{Normal cases, Bengin cases, Malignant cases}/*.jpg`",
            ),
            # Table I's 70 / 20 normals are exactly the source's train/ and test/ Normal folders.
            _p(
                "covid_xray",
                "covid_xray",
                (70, 20, 132),
                source_split=True,
                modality="xray",
                paper_auroc=94.1,
                display_name="COVID-19 X-ray",
                bundle="covid_xray",
                folders=("covid_xray", "covid19", "Covid19-dataset"),
                source="Kaggle Covid-19 Image Dataset",
                layout_text="`{train,test}/{Normal,Covid,Viral Pneumonia}/*`",
            ),
            _p(
                "malaria",
                "malaria",
                (344, 345, 330),
                modality="rgb",
                paper_auroc=95.2,
                display_name="Malaria",
                bundle="malaria",
                folders=("malaria", "cell_images"),
                source="NIH Malaria cell images",
                layout_text="`Parasitized/`, `Uninfected/`",
            ),
            # -- not in the paper ----------------------------------------------------------------------------
            _p(
                "mvtec",
                "mvtec",
                source_split=True,
                modality="rgb",
                display_name="MVTec AD",
                source="MVTec AD (industrial photographs)",
                layout_text="`train/good/`, `test/good/`, `test/<defect>/` (masks in `ground_truth/<defect>/<name>_mask.png`)",
            ),
            # brain MRI slices with lesion masks, split by patient (never by slice); 30 patients: 0.25 of the
            # 18 non-test patients -> 5 calibration patients (~70 normal slices)
            DatasetPreset(
                "lgg",
                "lgg",
                group_by="volume_id",
                test_fraction=0.4,
                modality="mri",
                display_name="LGG",
                bundle="lgg",
                val_fraction=0.25,
                folders=("lgg_mri", "lgg", "kaggle_3m"),
                source="the LGG brain MRI segmentation set (Buda et al. 2019, TCGA-LGG; Kaggle lgg-mri-segmentation)",
                layout_text="`kaggle_3m/<patient>/<patient>_<n>.png` with `<patient>_<n>_mask.png` beside (255 = lesion)",
            ),
            # the demo: deformed Shepp-Logan slices the package makes offline (monai_skipts.apps.phantom), in
            # the MVTec layout and split as "mvtec". Synthetic 8-bit pictures with no HU: plain bit-range
            # scaling, "xray".
            _p(
                "demo",
                "mvtec",
                source_split=True,
                modality="xray",
                display_name="Demo phantom",
                bundle="demo",
                bundle_dataset="mvtec",
                source="synthetic (monai_skipts.apps.phantom)",
                layout_text="made by the bundle under `<output_dir>/phantom`",
            ),
        )
    }
)
"""Every dataset by canonical name: layout, Table I split, modality preset, paper AUROC, bundle, texts."""


def get_dataset(name: str) -> DatasetPreset:
    """The preset for ``name`` (spelling-tolerant: ``"IQ-OTH/NCCD"``, ``"HeadCT"``, ``"head_ct"``).

    Its display name, its bundle folder name and its layout name (when no other entry has that
    layout) find it too. A registered layout name without a preset of its own (``"class_folders"``,
    ``"datalist"``, ``"cp_child"``, ...) gives a preset with no fixed counts and no modality.
    """
    by_key = {_key(k): p for k, p in DATASETS.items()}
    layouts = [p.layout for p in DATASETS.values()]
    for p in DATASETS.values():
        for alias in (p.display_name, p.bundle, p.layout if layouts.count(p.layout) == 1 else None):
            if alias:
                by_key.setdefault(_key(alias), p)
    if _key(name) in by_key:
        return by_key[_key(name)]
    try:
        get_layout(name)
    except ValueError:
        raise ValueError(
            f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}; layouts: {', '.join(sorted(LAYOUTS))}"
        ) from None
    canonical = next(k for k in LAYOUTS if _key(k) == _key(name))
    return DatasetPreset(canonical, canonical)
