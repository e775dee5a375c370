"""What the DICOM app checks before the model is loaded: the output folder can be written, the PACS
answers and holds the study (:func:`check_output`, :func:`connect`, :func:`check_pacs`), and the logging
guards of the PACS traffic (:func:`quiet_loggers`, :func:`scrubbed_loggers`: request URLs hold UIDs).

This module imports no torch, MONAI or rendering code (only the standard library, ``dicomweb_client``
when connecting, and :func:`~monai_skipts.dicom.study.scrub`), so ``python -m monai_skipts.dicom_app``
reports an unreachable PACS or an unwritable folder in about a second, before the heavy imports.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

from monai_skipts.utils import InputDataError

from .study import scrub

__all__ = [
    "CONNECT_TIMEOUT",
    "HTTP_LOGGERS",
    "PacsError",
    "UidScrubber",
    "check_output",
    "check_pacs",
    "connect",
    "quiet_client",
    "quiet_loggers",
    "scrubbed_loggers",
]


@contextlib.contextmanager
def quiet_loggers(*names: str, level: int = logging.ERROR):
    """Keep the loggers ``names`` at ``level`` or above meanwhile: highdicom logs the source SOP
    instance UIDs it copies from (INFO), dicomweb-client the request URLs (which hold UIDs)."""
    saved = [(lg, lg.level) for lg in map(logging.getLogger, names)]
    for lg, old in saved:
        lg.setLevel(max(level, old))
    try:
        yield
    finally:
        for lg, old in saved:
            lg.setLevel(old)


class UidScrubber(logging.Filter):
    """A logging filter that replaces UIDs in a record's message by ``<uid>`` (hosts kept): urllib3
    logs every request line (``GET /dicom-web/studies/<StudyInstanceUID>``) at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = scrub(message)
        if clean != " ".join(message.split())[:500]:
            record.msg, record.args = clean, None
        return True


#: the loggers of the HTTP stack under dicomweb-client: they log request URLs, which hold UIDs
HTTP_LOGGERS = ("urllib3", "urllib3.connectionpool", "requests", "dicomweb_client", "dicomweb_client.web")


@contextlib.contextmanager
def scrubbed_loggers(*names: str):
    """Meanwhile, records logged to the loggers ``names`` have their UIDs replaced by ``<uid>`` (a filter
    on each logger: filters do not apply to records propagated from child loggers, so name each)."""
    scrubber = UidScrubber()
    loggers = [logging.getLogger(n) for n in names]
    for lg in loggers:
        lg.addFilter(scrubber)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(scrubber)


def check_output(output: str | os.PathLike, study: str | os.PathLike | None = None) -> Path:
    """Create the output folder and check that it can be written, before any scoring.

    Raises:
        InputDataError: ``output`` is the study folder or inside it (a second run would read the
            results as part of the study).
        OSError: ``output`` cannot be created or written (the message names the folder).
    """
    out = Path(output)
    if study is not None:
        src, dst = Path(study).resolve(), out.resolve()
        if dst == src or src in dst.parents:
            where = "is the study folder" if dst == src else f"is inside the study folder {study}"
            raise InputDataError(
                out,
                f"the output folder {where}: a second run would read the results as part of the study; "
                "give a folder outside it",
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(e.errno, f"cannot create the output folder {out}: {e.strerror}") from None
    try:
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise OSError(e.errno, f"the output folder {out} is not writable: {e.strerror}") from None
    return out


CONNECT_TIMEOUT = 5.0
"""Seconds to wait for the PACS to accept a connection (an unreachable host fails fast)."""


class PacsError(RuntimeError):
    """The PACS refused or failed a request (the message holds no UID)."""


@contextlib.contextmanager
def quiet_client():
    """Meanwhile, dicomweb-client's logger at ERROR and the UIDs in the HTTP loggers' records replaced."""
    with quiet_loggers("dicomweb_client"), scrubbed_loggers(*HTTP_LOGGERS):
        yield


def connect(url: str, timeout: float = 60.0, headers: dict[str, str] | None = None, attempts: int = 3):
    """A :class:`dicomweb_client.DICOMwebClient` for the DICOMweb root ``url`` (e.g.
    ``http://localhost:8042/dicom-web``): :data:`CONNECT_TIMEOUT` seconds to connect, ``timeout`` to
    read a response, ``attempts`` tries per request 1 s, 2 s... apart (dicomweb-client retries every
    error, a refused connection included: its default, 5 tries 2 to 16 s apart, took 30 s to fail)."""
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url.rstrip("/"), timeout=(CONNECT_TIMEOUT, timeout), headers=headers)
    client.set_http_retry_params(retry=attempts > 1, max_attempts=attempts, wait_exponential_multiplier=500)
    return client


def check_pacs(client, study_uid: str) -> int:
    """Ask the PACS for the study's series (QIDO-RS), before anything is loaded or scored; returns how many.

    Raises:
        PacsError: the PACS cannot be reached or refuses the query (the message names the host, no
            UID), or holds no series for ``study_uid``.
    """
    with quiet_client():
        try:
            series = client.search_for_series(study_uid)
        except Exception as e:
            raise PacsError(f"cannot query the PACS at {client.base_url}: {type(e).__name__}: {scrub(e)}") from None
    if not series:
        raise PacsError(f"the PACS at {client.base_url} holds no series for this StudyInstanceUID")
    return len(series)
