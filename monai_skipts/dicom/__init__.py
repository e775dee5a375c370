"""DICOM results of Skip-TS for the PACS: a Secondary Capture heat-map series, a TID 1500 Structured
Report and (optionally) a SEG per scored series, in the source study (:mod:`.app`, :mod:`.writers`);
reading a study folder (:mod:`.study`); pulling and storing over DICOMweb (:mod:`.web`).
Command line: ``python -m monai_skipts.dicom_app``. Needs the ``dicom`` extra (highdicom,
dicomweb-client)."""

import importlib

#: the public names and the submodule each comes from, imported on first use (PEP 562): importing
#: :mod:`.preflight` (the checks ``python -m monai_skipts.dicom_app`` runs before anything heavy) must
#: not import :mod:`.app` and its rendering (torch, MONAI)
_SOURCES = {
    "app": ("earlier_results", "model_info", "problems", "result_series_uid", "score_study"),
    "preflight": ("PacsError", "check_output", "check_pacs", "connect"),
    "study": ("MANUFACTURER", "Series", "Study", "Unit", "read_study", "scrub"),
    "web": ("delete_series", "pull_study", "score_pacs_study", "store_files"),
    "writers": ("CODES", "SCHEME", "ModelInfo", "make_sc", "make_seg", "make_sr", "save_dataset"),
}
_SOURCE_OF = {name: module for module, names in _SOURCES.items() for name in names}

__all__ = [
    "CODES",
    "MANUFACTURER",
    "ModelInfo",
    "PacsError",
    "SCHEME",
    "Series",
    "Study",
    "Unit",
    "check_output",
    "check_pacs",
    "connect",
    "delete_series",
    "earlier_results",
    "make_sc",
    "make_seg",
    "make_sr",
    "model_info",
    "problems",
    "pull_study",
    "read_study",
    "result_series_uid",
    "run_app",
    "save_dataset",
    "score_pacs_study",
    "score_study",
    "scrub",
    "store_files",
]


def run_app(
    predictor, output, input=None, dicomweb_url=None, study_uid=None, seg=False, checkpoint=None, replace=False
):
    """One entry for the command line and the bundle (``bundles/common/dicom_app.json``): a study folder
    (``input``) or a study on a DICOMweb server (``dicomweb_url`` + ``study_uid``, results stored back;
    ``replace``: score again the series this model already scored, replacing their results)."""
    import importlib.util

    from .app import score_study
    from .web import score_pacs_study

    for module, package in (("highdicom", "highdicom"), ("dicomweb_client", "dicomweb-client")):
        if (module != "dicomweb_client" or dicomweb_url) and importlib.util.find_spec(module) is None:
            raise ImportError(f"{package} is not installed: pip install -e '.[dicom]' (or pip install {package})")
    if dicomweb_url:
        if not study_uid:
            raise ValueError("study_uid is required with dicomweb_url")
        return score_pacs_study(
            predictor, dicomweb_url, study_uid, output, seg=seg, checkpoint=checkpoint, replace=replace
        )
    if not input:
        raise ValueError("give a study folder (input) or a DICOMweb server and a StudyInstanceUID")
    if output is None:
        raise ValueError("output (a folder) is required for a study folder")
    return score_study(predictor, input, output, seg=seg, checkpoint=checkpoint, replace=replace)


def __getattr__(name: str):
    if name in _SOURCE_OF:
        value = getattr(importlib.import_module(f"{__name__}.{_SOURCE_OF[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
