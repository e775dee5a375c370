"""Transforms for medical images, MONAI style (array transform ``Foo`` + dictionary version ``Food``).

- :mod:`.io`: :class:`LoadMedicalImage` for pictures, DICOM (files, series, multi-frame), NIfTI, NRRD.
- :mod:`.volume`: volumes to 2-D slices (:class:`VolumeToSlicesd`, :func:`expand_volume_datalist`) and
  slice scores back to volume scores (:func:`aggregate_volume_scores`).
- :mod:`.intensity`: CT windows, MRI percentile/z-score, bit-range scaling, 3 channels, ImageNet.
- :mod:`.presets`: :func:`build_preprocessing` per modality (``ct_brain``, ``ct_lung``, ``mri``,
  ``xray``, ``ultrasound``, ``rgb``).
"""

from monai_skipts.transforms.intensity import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    WINDOW_PRESETS,
    BinarizeMask,
    BinarizeMaskd,
    BitRangeScaleIntensity,
    BitRangeScaleIntensityd,
    ForegroundZScore,
    ForegroundZScored,
    ImageNetNormalize,
    ImageNetNormalized,
    PercentileScaleIntensity,
    PercentileScaleIntensityd,
    ToThreeChannels,
    ToThreeChannelsd,
    WindowIntensity,
    WindowIntensityd,
)
from monai_skipts.transforms.io import (
    EXTRA_META,
    PICTURE_SUFFIXES,
    LoadMedicalImage,
    LoadMedicalImaged,
    detect_format,
    dicom_frame_count,
    dicom_value_range,
    read_dicom_header,
    take_slice,
    validate_datalist,
)
from monai_skipts.transforms.presets import PRESETS, build_preprocessing, preset_transforms
from monai_skipts.transforms.volume import (
    VolumeToSlices,
    VolumeToSlicesd,
    aggregate_volume_scores,
    expand_volume_datalist,
    select_slices,
    slice_foreground_fractions,
)

__all__ = [
    "EXTRA_META",
    "PICTURE_SUFFIXES",
    "detect_format",
    "read_dicom_header",
    "dicom_value_range",
    "dicom_frame_count",
    "take_slice",
    "LoadMedicalImage",
    "LoadMedicalImaged",
    "validate_datalist",
    "slice_foreground_fractions",
    "select_slices",
    "VolumeToSlices",
    "VolumeToSlicesd",
    "expand_volume_datalist",
    "aggregate_volume_scores",
    "WINDOW_PRESETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "WindowIntensity",
    "WindowIntensityd",
    "PercentileScaleIntensity",
    "PercentileScaleIntensityd",
    "ForegroundZScore",
    "ForegroundZScored",
    "BitRangeScaleIntensity",
    "BitRangeScaleIntensityd",
    "ToThreeChannels",
    "ToThreeChannelsd",
    "ImageNetNormalize",
    "ImageNetNormalized",
    "BinarizeMask",
    "BinarizeMaskd",
    "PRESETS",
    "preset_transforms",
    "build_preprocessing",
]
