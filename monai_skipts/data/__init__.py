"""Dataset layouts, duplicate removal and seeded splits.

``prepare_split(dataset, root, split_file)`` is the entry point the bundles call: it builds the
datalist of a known layout, removes exact duplicates by content hash, splits normals into
train/val/test (anomalous images to test) with the paper's Table I counts, and saves or reuses the
split file.
"""

from monai_skipts.data.dedup import CONFLICT_POLICIES, remove_duplicates
from monai_skipts.data.files import IMAGE_EXTENSIONS, file_sha256, is_image_file, list_images, relative_id
from monai_skipts.data.layouts import (
    LAYOUTS,
    build_datalist,
    busi_datalist,
    class_folders_datalist,
    file_datalist,
    get_layout,
    head_ct_datalist,
    layout_base,
    mvtec_datalist,
    register_layout,
)
from monai_skipts.data.presets import DATASETS, DatasetPreset, get_dataset
from monai_skipts.data.sampler import EpochSeededSampler, epoch_permutation
from monai_skipts.data.split import SPLIT_FORMAT, load_split, prepare_split, save_split, split_datalist

__all__ = [
    "CONFLICT_POLICIES",
    "DATASETS",
    "DatasetPreset",
    "EpochSeededSampler",
    "IMAGE_EXTENSIONS",
    "LAYOUTS",
    "SPLIT_FORMAT",
    "build_datalist",
    "busi_datalist",
    "class_folders_datalist",
    "epoch_permutation",
    "file_datalist",
    "file_sha256",
    "get_dataset",
    "get_layout",
    "head_ct_datalist",
    "is_image_file",
    "layout_base",
    "list_images",
    "load_split",
    "mvtec_datalist",
    "prepare_split",
    "register_layout",
    "relative_id",
    "remove_duplicates",
    "save_split",
    "split_datalist",
]
