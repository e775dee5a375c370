"""A PACS over DICOMweb (``dicomweb-client``): pull a study by StudyInstanceUID (WADO-RS), score it
(:func:`~monai_skipts.dicom.app.score_study`), store the SR/SC(/SEG) back (STOW-RS) into the same study.

The pulled instances go to a temporary folder removed afterwards (they carry patient data); the
results stay under ``output`` when one is given. ``dicomweb_client`` and urllib3 log request URLs, which
hold the study's UID: while this module talks to the PACS, dicomweb_client's logger is kept at ERROR and
the UIDs in the HTTP loggers' records are replaced by ``<uid>`` (hosts kept).

Safe to run twice: the study's earlier results by the same model (found by
:func:`~monai_skipts.dicom.app.earlier_results`) are skipped, or with ``replace=True`` deleted from the
PACS (DICOMweb DELETE, or Orthanc's REST API) before the new ones are stored.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from monai_skipts.progress import ScoringInterrupted

from .app import earlier_results, model_info, score_study
from .preflight import CONNECT_TIMEOUT, PacsError, check_output, check_pacs, connect, quiet_client
from .study import read_study, scrub
from .writers import save_dataset

__all__ = ["delete_series", "pull_study", "store_files", "score_pacs_study"]

logger = logging.getLogger(__name__)


def delete_series(client, study_uid: str, series_uid: str) -> None:
    """Delete a series from the PACS: DICOMweb DELETE where the server offers it, else Orthanc's REST API
    (``/tools/lookup`` then ``DELETE /series/<id>``, beside the DICOMweb root).

    Raises:
        PacsError: neither way deleted it (the PACS does not allow deleting).
    """
    import requests

    with quiet_client():
        try:
            client.delete_series(study_uid, series_uid)
            return
        except Exception as e:
            first = f"{type(e).__name__}: {scrub(e)}"
        base = client.base_url.rstrip("/").rsplit("/", 1)[0]
        session = getattr(client, "_session", None) or requests.Session()
        try:
            r = session.post(f"{base}/tools/lookup", data=series_uid, timeout=(CONNECT_TIMEOUT, 60))
            r.raise_for_status()
            paths = [m["Path"] for m in r.json() if m.get("Type") == "Series"]
            if not paths:
                raise PacsError("the series is not in the PACS")
            for path in paths:
                session.delete(f"{base}{path}", timeout=(CONNECT_TIMEOUT, 60)).raise_for_status()
        except Exception as e:
            raise PacsError(
                f"the PACS did not delete an earlier result series (DICOMweb: {first}; Orthanc REST: "
                f"{type(e).__name__}: {scrub(e)})"
            ) from None


def pull_study(client, study_uid: str, folder: str | os.PathLike) -> int:
    """Retrieve every instance of the study into ``folder`` (``NNNNN.dcm``); returns the count."""
    folder = Path(folder)
    with quiet_client():
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
    with quiet_client():
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
    replace: bool = False,
) -> dict[str, Any]:
    """Pull the study ``study_uid`` from the DICOMweb server ``url``, score it, store the results back.

    Series this model already scored (their results are in the study) are skipped; with ``replace``
    they are scored again and the earlier result series deleted from the PACS before the new ones are
    stored (nothing is stored when the PACS refuses the deletion: no duplicates).

    Returns:
        The :func:`~monai_skipts.dicom.app.score_study` summary with ``n_pulled``, ``n_stored`` and
        ``n_deleted`` (earlier result series deleted).

    Raises:
        PacsError: the PACS cannot be reached, holds no such study, refuses a request or a deletion.
        OSError: ``output`` cannot be written (checked before the study is pulled).
        ScoringInterrupted: Ctrl-C while scoring: nothing is stored in the PACS (``output``, when given,
            holds the series scored in full and ``dicom_results.json`` with status ``interrupted``).
    """
    if output is not None:
        check_output(output)
    client = client or connect(url)
    check_pacs(client, study_uid)
    with tempfile.TemporaryDirectory(prefix="skipts-study-") as tmp:
        n = pull_study(client, study_uid, Path(tmp) / "study")
        if not n:
            raise PacsError("the PACS returned no instance for this StudyInstanceUID")
        logger.info("pulled %d instances", n)
        earlier = earlier_results(read_study(Path(tmp) / "study"), model_info(predictor, checkpoint))
        out_ctx = (
            contextlib.nullcontext(output) if output is not None else tempfile.TemporaryDirectory(prefix="skipts-out-")
        )
        with out_ctx as out:
            try:
                summary = score_study(
                    predictor, Path(tmp) / "study", out, seg=seg, checkpoint=checkpoint, replace=replace
                )
            except ScoringInterrupted as e:  # Ctrl-C: nothing goes to the PACS
                kept = f"; the results are in {out}" if output is not None else ""
                e.args = (
                    f"interrupted: {e.n_done} of {e.n_total} series scored; nothing was stored in the PACS{kept}",
                )
                raise
            files = [Path(out) / f for f in summary["files"]]
            summary["n_pulled"] = n
            summary["n_deleted"] = 0
            for rec in summary["series"]:
                for kind, uid in earlier.get(rec["series"], {}).items():
                    delete_series(client, study_uid, uid)
                    summary["n_deleted"] += 1
                    logger.info("%s: deleted the earlier %s result series from the PACS", rec["series"], kind)
            summary["n_stored"] = store_files(client, files, study_uid) if files else 0
    logger.info("stored %d result instances in the study", summary["n_stored"])
    return summary
