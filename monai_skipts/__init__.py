"""monai-skipts: Skip-TS teacher-student anomaly detection for medical images, as a MONAI plugin.

Subpackages mirror MONAI's taxonomy: ``networks`` (teacher, student, SkipTS), ``losses``,
``inferers`` (feature maps to anomaly map and score), ``transforms`` (DICOM, volumes, intensity),
``data`` (dataset layouts, dedup, splits), ``engines``, ``handlers``, ``metrics``.
"""

__version__ = "0.1.0"
