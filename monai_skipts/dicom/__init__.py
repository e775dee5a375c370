"""DICOM results of Skip-TS for the PACS: a Secondary Capture heat-map series, a TID 1500 Structured
Report and (optionally) a SEG per scored series, in the source study (:mod:`.app`, :mod:`.writers`);
reading a study folder (:mod:`.study`); pulling and storing over DICOMweb (:mod:`.web`).
Command line: ``python -m monai_skipts.dicom_app``. Needs the ``dicom`` extra (highdicom,
dicomweb-client)."""

from .app import model_info, score_study, scrub
from .study import MANUFACTURER, Series, Unit, read_study
from .web import PacsError, connect, pull_study, score_pacs_study, store_files
from .writers import CODES, SCHEME, ModelInfo, make_sc, make_seg, make_sr, save_dataset

__all__ = [
    "CODES",
    "MANUFACTURER",
    "ModelInfo",
    "PacsError",
    "SCHEME",
    "Series",
    "Unit",
    "connect",
    "make_sc",
    "make_seg",
    "make_sr",
    "model_info",
    "pull_study",
    "read_study",
    "run_app",
    "save_dataset",
    "score_pacs_study",
    "score_study",
    "scrub",
    "store_files",
]


def run_app(predictor, output, input=None, dicomweb_url=None, study_uid=None, seg=False, checkpoint=None):
    """One entry for the command line and the bundle (``bundles/common/dicom_app.json``): a study folder
    (``input``) or a study on a DICOMweb server (``dicomweb_url`` + ``study_uid``, results stored back)."""
    import importlib.util

    for module, package in (("highdicom", "highdicom"), ("dicomweb_client", "dicomweb-client")):
        if (module != "dicomweb_client" or dicomweb_url) and importlib.util.find_spec(module) is None:
            raise ImportError(f"{package} is not installed: pip install -e '.[dicom]' (or pip install {package})")
    if dicomweb_url:
        if not study_uid:
            raise ValueError("study_uid is required with dicomweb_url")
        return score_pacs_study(predictor, dicomweb_url, study_uid, output, seg=seg, checkpoint=checkpoint)
    if not input:
        raise ValueError("give a study folder (input) or a DICOMweb server and a StudyInstanceUID")
    if output is None:
        raise ValueError("output (a folder) is required for a study folder")
    return score_study(predictor, input, output, seg=seg, checkpoint=checkpoint)
