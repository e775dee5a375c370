"""How far a calibrated threshold can be trusted, and the thresholds a deployment decides with.

The calibration logic around :func:`calibrate_threshold`, one concept per module:

=================  ====================================================================================================
module             what, and its names
=================  ====================================================================================================
``threshold``      the decision threshold from held-out normals: :func:`calibrate_threshold` (its methods
                   :data:`CALIBRATION_METHODS`), the fewest normals: :func:`min_calibration_normals`,
                   :func:`check_calibration_data`
``uncertainty``    how far the image threshold can be trusted: :func:`fpr_uncertainty`, :func:`normals_needed`,
                   :func:`uncertainty_warning`; the threshold record (checkpoint, JSON): :func:`threshold_record`
``crossfit``       more calibration normals, none lost: :class:`CrossFitScorer` (cross-fitted, out-of-fold scores)
``volume``         the volume threshold: :func:`sidak_slice_fpr`, :func:`volume_threshold`
``pixel``          the pixel threshold (outlines, ``dice``): :class:`PixelScoreSketch`, :func:`pixel_threshold`,
                   :class:`PixelThresholdHandler`
=================  ====================================================================================================

The names above are this package's API.
"""

from monai_skipts.calibration.crossfit import CrossFitScorer
from monai_skipts.calibration.pixel import DEFAULT_PIXEL_FPR, PixelScoreSketch, PixelThresholdHandler, pixel_threshold
from monai_skipts.calibration.threshold import (
    CALIBRATION_METHODS,
    MIN_PARAMETRIC_NORMALS,
    CalibrationWarning,
    calibrate_threshold,
    check_calibration_data,
    min_calibration_normals,
)
from monai_skipts.calibration.uncertainty import (
    CONFIDENCE,
    fpr_uncertainty,
    normals_needed,
    threshold_record,
    uncertainty_warning,
)
from monai_skipts.calibration.volume import sidak_slice_fpr, volume_threshold

__all__ = [
    "CalibrationWarning",
    "CALIBRATION_METHODS",
    "MIN_PARAMETRIC_NORMALS",
    "calibrate_threshold",
    "check_calibration_data",
    "min_calibration_normals",
    "CONFIDENCE",
    "DEFAULT_PIXEL_FPR",
    "CrossFitScorer",
    "PixelScoreSketch",
    "PixelThresholdHandler",
    "fpr_uncertainty",
    "normals_needed",
    "pixel_threshold",
    "sidak_slice_fpr",
    "threshold_record",
    "uncertainty_warning",
    "volume_threshold",
]
