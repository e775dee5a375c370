"""Transforms for medical images, MONAI style (array transform ``Foo`` + dictionary version ``Food``).

- :mod:`.io`: :class:`LoadMedicalImage` for pictures, DICOM (files, series, multi-frame), NIfTI, NRRD.
- :mod:`.volume`: volumes to 2-D slices (:class:`VolumeToSlicesd`, :func:`expand_volume_datalist`) and
  slice scores back to volume scores (:func:`aggregate_volume_scores`).
- :mod:`.intensity`: CT windows, MRI percentile/z-score, bit-range scaling, 3 channels, ImageNet.
- :mod:`.spatial`: :class:`TiledResize` (MONAI's ``Resize``, same output, anti-aliasing convolutions on
  fixed-shape tiles, so images of many sizes do not each leave compiled convolutions behind).
- :mod:`.presets`: :func:`build_preprocessing` per modality (``ct_brain``, ``ct_lung``, ``mri``,
  ``xray``, ``ultrasound``, ``rgb``).
- :mod:`.anatomy`: :class:`AnatomyMask` (per-modality foreground) and :class:`RandBurnedInAnnotation`
  (captions and markers pasted into training normals as normal content).
- :mod:`.lesion`: :class:`RandSyntheticLesion` (intensity blobs, foreign patches, local deformation
  inside the anatomy, with the mask of the changed pixels) for denoising distillation.
"""

from monai_skipts.transforms.anatomy import (
    ANATOMY_MODALITIES,
    AnatomyMask,
    AnatomyMaskd,
    RandBurnedInAnnotation,
    RandBurnedInAnnotationd,
)
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
    DEFAULT_MAX_PIXELS,
    EXTRA_META,
    MAX_PIXELS_ENV,
    PICTURE_SUFFIXES,
    LoadMedicalImage,
    LoadMedicalImaged,
    array_to_image,
    default_max_pixels,
    detect_format,
    dicom_frame_count,
    dicom_value_range,
    read_dicom_header,
    take_slice,
    validate_datalist,
)
from monai_skipts.transforms.lesion import LESION_FAMILIES, RandSyntheticLesion, RandSyntheticLesiond
from monai_skipts.transforms.presets import (
    PRESETS,
    build_preprocessing,
    has_random_transforms,
    preprocessing_spec,
    preset_transforms,
    spatial_size_2d,
)
from monai_skipts.transforms.spatial import TiledResize, TiledResized, tiled_gaussian_smooth
from monai_skipts.transforms.volume import (
    VolumeToSlices,
    VolumeToSlicesd,
    aggregate_volume_scores,
    expand_volume_datalist,
    select_slices,
    slice_foreground_fractions,
    slice_to_plane,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "MAX_PIXELS_ENV",
    "default_max_pixels",
    "EXTRA_META",
    "PICTURE_SUFFIXES",
    "detect_format",
    "read_dicom_header",
    "dicom_value_range",
    "dicom_frame_count",
    "take_slice",
    "array_to_image",
    "LoadMedicalImage",
    "LoadMedicalImaged",
    "validate_datalist",
    "slice_foreground_fractions",
    "select_slices",
    "VolumeToSlices",
    "VolumeToSlicesd",
    "expand_volume_datalist",
    "aggregate_volume_scores",
    "slice_to_plane",
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
    "TiledResize",
    "TiledResized",
    "tiled_gaussian_smooth",
    "PRESETS",
    "preset_transforms",
    "build_preprocessing",
    "preprocessing_spec",
    "spatial_size_2d",
    "has_random_transforms",
    "ANATOMY_MODALITIES",
    "AnatomyMask",
    "AnatomyMaskd",
    "RandBurnedInAnnotation",
    "RandBurnedInAnnotationd",
    "LESION_FAMILIES",
    "RandSyntheticLesion",
    "RandSyntheticLesiond",
]
