"""A PACS over DICOMweb (``dicomweb-client``): pull a study by StudyInstanceUID (WADO-RS), score it
(:func:`~monai_skipts.dicom.app.score_study`), store the SR/SC(/SEG) back (STOW-RS) into the same study.

The pulled instances go to a temporary folder removed afterwards (they carry patient data); the
results stay under ``output`` when one is given. ``dicomweb_client`` logs request URLs, which hold the
study's UID: its logger is kept at ERROR while this module talks to the PACS.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from .app import quiet_loggers, score_study, scrub
from .writers import save_dataset

__all__ = ["connect", "pull_study", "store_files", "score_pacs_study", "PacsError"]

logger = logging.getLogger(__name__)


class PacsError(RuntimeError):
    """The PACS refused or failed a request (the message holds no UID)."""


def _quiet_client():
    return quiet_loggers("dicomweb_client")


def connect(url: str, timeout: float = 60.0, headers: dict[str, str] | None = None):
    """A :class:`dicomweb_client.DICOMwebClient` for the DICOMweb root ``url`` (e.g.
    ``http://localhost:8042/dicom-web``)."""
    from dicomweb_client.api import DICOMwebClient

    return DICOMwebClient(url.rstrip("/"), timeout=timeout, headers=headers)


def pull_study(client, study_uid: str, folder: str | os.PathLike) -> int:
    """Retrieve every instance of the study into ``folder`` (``NNNNN.dcm``); returns the count."""
    folder = Path(folder)
    with _quiet_client():
        try:
            instances = client.retrieve_study(study_uid)
        except Exception as e:
            raise PacsError(f"could not retrieve the study: {type(e).__name__}: {scrub(e)}") from None
    for k, ds in enumerate(instances):
        save_dataset(ds, folder / f"{k:05d}.dcm")
    return len(instances)


def store_files(client, paths: list[str | os.PathLike], study_uid: str | None = None, chunk: int = 16) -> int:
    """STOW-RS the DICOM files ``paths``; returns the number stored. Raises :class:`PacsError` when the
    PACS reports a failed instance."""
    import pydicom

    stored = 0
    with _quiet_client():
        for k in range(0, len(paths), chunk):
            datasets = [pydicom.dcmread(str(p)) for p in paths[k : k + chunk]]
            try:
                response = client.store_instances(datasets, study_instance_uid=study_uid)
            except Exception as e:
                raise PacsError(f"STOW-RS failed: {type(e).__name__}: {scrub(e)}") from None
            failed = response.get("FailedSOPSequence") if response is not None else None
            if failed:
                raise PacsError(f"the PACS refused {len(failed)} of {len(datasets)} instances")
            stored += len(datasets)
    return stored


def score_pacs_study(
    predictor,
    url: str,
    study_uid: str,
    output: str | os.PathLike | None = None,
    seg: bool = False,
    checkpoint: str | os.PathLike | None = None,
    client=None,
) -> dict[str, Any]:
    """Pull the study ``study_uid`` from the DICOMweb server ``url``, score it, store the results back.

    Returns the :func:`~monai_skipts.dicom.app.score_study` summary with ``n_pulled`` and ``n_stored``.
    """
    client = client or connect(url)
    with tempfile.TemporaryDirectory(prefix="skipts-study-") as tmp:
        n = pull_study(client, study_uid, Path(tmp) / "study")
        if not n:
            raise PacsError("the PACS returned no instance for this StudyInstanceUID")
        logger.info("pulled %d instances", n)
        out_ctx = (
            contextlib.nullcontext(output) if output is not None else tempfile.TemporaryDirectory(prefix="skipts-out-")
        )
        with out_ctx as out:
            summary = score_study(predictor, Path(tmp) / "study", out, seg=seg, checkpoint=checkpoint)
            files = [Path(out) / f for f in summary["files"]]
            summary["n_pulled"] = n
            summary["n_stored"] = store_files(client, files, study_uid) if files else 0
    logger.info("stored %d result instances in the study", summary["n_stored"])
    return summary
