"""Finding image files on disk and hashing them.

An image file is one with a known medical or natural image extension (see ``IMAGE_EXTENSIONS``), or a
DICOM file without an extension (or with a numeric one, as in ``1.2.840.10008...``) recognised by
the ``DICM`` preamble at byte 128. Hidden files (``.*``), AppleDouble files, ``Thumbs.db``,
``desktop.ini`` and ``__MACOSX`` folders are never images.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from monai_skipts.utils import file_sha256

__all__ = [
    "IMAGE_EXTENSIONS",
    "is_image_file",
    "list_images",
    "file_sha256",
    "relative_id",
    "output_relpath",
    "output_relpaths",
]

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


# Characters kept as they are in output names; everything else is percent-encoded (UTF-8 bytes), which
# makes the encoding injective: two different ids never give the same name. "~" is left out on purpose:
# it only ever appears as the marker of a disambiguating hash (see output_relpaths).
_NAME_SAFE = re.compile(r"[A-Za-z0-9._\- ()+,=@]")
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul"} | {f"{d}{i}" for d in ("com", "lpt") for i in range(1, 10)}
_MAX_COMPONENT = 200  # bytes; file systems allow 255, leave room for the suffix and a temp-file prefix


def _encode_component(part: str) -> str:
    enc = "".join(
        c if _NAME_SAFE.fullmatch(c) else "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogatepass")) for c in part
    )
    # names a file system treats specially: hidden or relative (leading dot), stripped trailing dots or
    # spaces (Windows), leading spaces, reserved device names (Windows)
    if enc.startswith("."):
        enc = "%2E" + enc[1:]
    if enc.startswith(" "):
        enc = "%20" + enc[1:]
    if enc.endswith((".", " ")):
        enc = enc[:-1] + f"%{ord(enc[-1]):02X}"
    if enc.split(".")[0].casefold() in _WINDOWS_RESERVED:
        enc = f"%{ord(enc[0]):02X}" + enc[1:]
    if len(enc) > _MAX_COMPONENT:
        enc = enc[: _MAX_COMPONENT - 13] + "~" + hashlib.sha1(part.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return enc


def output_relpath(item_id: str | os.PathLike, suffix: str) -> str:
    """The relative POSIX path of an item's output file (e.g. its anomaly map): the item's relative
    folders are kept, its whole file name (extension included) is kept and ``suffix`` appended.

    Every folder or file name is percent-encoded outside ``A-Z a-z 0-9 . _ - space ( ) + , = @``
    (non-ASCII as UTF-8 bytes: ``ü.png`` -> ``%C3%BC.png``), so the name is portable, stable (it depends
    on the id alone) and unique: different ids give different paths (``a/b.png``, ``a_b.png``,
    ``img.png``, ``img.jpg`` -> ``a/b.png<suffix>``, ``a_b.png<suffix>``, ``img.png<suffix>``,
    ``img.jpg<suffix>``). Nothing leaves the output folder: ``..`` and ``.`` are encoded (``%2E%2E``,
    ``%2E``), an empty component (a leading, doubled or trailing ``/``) becomes ``%``. Names that differ only in letter
    case are distinct here but not on a case-insensitive file system: use :func:`output_relpaths` for
    a set of items written to one folder.

    Args:
        item_id: the item's id, a relative path in POSIX form (e.g. ``patient1/ct.nii.gz``).
        suffix: appended to the file name, e.g. ``".map.png"``.
    """
    parts = str(item_id).split("/")
    return "/".join(_encode_component(p) if p else "%" for p in parts) + suffix


def output_relpaths(item_ids: Iterable[str] | Mapping[str, str], suffix: str = "") -> dict[str, str]:
    """:func:`output_relpath` of every id, made unique on case-insensitive file systems too.

    Args:
        item_ids: the ids, all given ``suffix``; or a mapping ``{item_id: suffix}`` (e.g. ``.map.png``
            for pictures and ``.map.nii.gz`` for volumes written into one folder).
        suffix: the suffix of every id when ``item_ids`` is not a mapping.

    Where two ids would give paths that differ only in letter case (``X.png``, ``x.png``), or where a
    file would take the name of another item's folder, those paths get ``~`` and 8 hex digits of the
    id's SHA-1 before the suffix: still a function of the id alone, and never equal to another item's
    path (``~`` is always encoded in plain names).

    Returns:
        ``{item_id: relative path}`` in the order of ``item_ids`` (repeated ids: one entry).
    """
    suffixes = dict(item_ids) if isinstance(item_ids, Mapping) else dict.fromkeys(item_ids, suffix)
    plain = {str(i): output_relpath(i, sfx) for i, sfx in suffixes.items()}
    seen: dict[str, int] = {}
    folders: set[str] = set()
    for p in plain.values():
        seen[p.casefold()] = seen.get(p.casefold(), 0) + 1
        parts = p.casefold().split("/")
        folders.update("/".join(parts[:k]) for k in range(1, len(parts)))
    out = {}
    for (i, p), sfx in zip(plain.items(), suffixes.values()):
        if seen[p.casefold()] > 1 or p.casefold() in folders:
            digest = hashlib.sha1(i.encode("utf-8", "surrogatepass")).hexdigest()[:8]
            p = p[: len(p) - len(sfx)] + f"~{digest}" + sfx
        out[i] = p
    return out
