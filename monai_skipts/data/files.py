"""Finding image files on disk and hashing them.

An image file is one with a known medical or natural image extension (see ``IMAGE_EXTENSIONS``), or a
DICOM file without an extension (or with a numeric one, as in ``1.2.840.10008...``) recognised by
the ``DICM`` preamble at byte 128. Hidden files (``.*``), AppleDouble files, ``Thumbs.db``,
``desktop.ini`` and ``__MACOSX`` folders are never images.
"""

from __future__ import annotations

import os
from pathlib import Path

from monai_skipts.utils import file_sha256

__all__ = ["IMAGE_EXTENSIONS", "is_image_file", "list_images", "file_sha256", "relative_id"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".nii", ".nii.gz", ".nrrd")
_IGNORED_NAMES = {"thumbs.db", "desktop.ini", "__macosx"}


def _ignored(name: str) -> bool:
    return name.startswith(".") or name.casefold() in _IGNORED_NAMES


def _has_dicom_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a regular, non-hidden file this package treats as an image.

    Args:
        path: file to test. Extension matching is case-insensitive (``.JPG`` counts).
    """
    path = Path(path)
    if _ignored(path.name) or not path.is_file():
        return False
    name = path.name.lower()
    if name.endswith(IMAGE_EXTENSIONS):
        return True
    suffix = path.suffix[1:]
    if suffix == "" or suffix.isdigit():  # extensionless or UID-named DICOM
        return _has_dicom_preamble(path)
    return False


def list_images(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (and its sub-folders when ``recursive``), sorted by path.

    Hidden or ignored sub-folders (``.git``, ``__MACOSX``) are not entered.
    """
    folder = Path(folder)
    if not recursive:
        return sorted(p for p in folder.iterdir() if is_image_file(p))
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not _ignored(d)]
        found.extend(Path(dirpath, f) for f in filenames if is_image_file(Path(dirpath, f)))
    return sorted(found)


def relative_id(path: str | os.PathLike, base: str | os.PathLike) -> str:
    """``path`` relative to ``base`` in POSIX form (the portable id); absolute if it cannot be."""
    try:
        return Path(os.path.relpath(path, base)).as_posix()
    except ValueError:  # another drive on Windows
        return Path(path).as_posix()
