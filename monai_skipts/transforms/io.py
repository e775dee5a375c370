"""Loading medical images with MONAI's readers: pictures, DICOM files and series, NIfTI, NRRD/MetaImage.

One loader, :class:`LoadMedicalImage`, picks the MONAI reader from the file (``PILReader``,
``PydicomReader``, ``NibabelReader``, ``ITKReader``) and returns a float32 ``MetaTensor``:

- 2-D sources (PNG/JPEG/BMP/TIFF, single-frame DICOM, or a volume's slice): ``(C, H, W)`` in display
  order -- row 0 is the top row as a viewer shows it (note: MONAI's ``LoadImage`` default is ``(C, W, H)``).
- 3-D sources (NIfTI, NRRD/MetaImage, a folder holding one DICOM series, a multi-frame DICOM):
  ``(C, X, Y, Z)`` reoriented to RAS. Multi-frame DICOM files carry no slice geometry; their frames are
  stacked as axial slices in file order (frame ``f`` is slice ``Z = f``), so that slicing them gives the
  frames back as displayed. Volumes with one singleton spatial axis are returned as 2-D images.

DICOM: RescaleSlope/RescaleIntercept are applied exactly once, by MONAI's reader (``PydicomReader`` for
files, ``ITKReader``/GDCM for series), so CT values are Hounsfield units. MONOCHROME1 images are inverted
within their representable range (see :func:`dicom_value_range`) so that bright always means dense; the
file's own window centre is mirrored with them. PALETTE COLOR is expanded to RGB with pydicom.

Every loaded tensor carries the same extra meta keys (see ``EXTRA_META``), whatever its format, so that
batches collate: ``source_format``, ``modality``, ``photometric_interpretation``, ``inverted_monochrome1``,
``rescale_slope``, ``rescale_intercept``, ``window_center``, ``window_width``, ``value_min``,
``value_max`` (the representable range: 0..255 for 8-bit pictures, 0..65535 for 16-bit, the
rescaled ``BitsStored`` range for DICOM, NaN when unknown), ``nonfinite_replaced``, ``volume_id``,
``slice_index``, ``slice_axis`` (-1 for 2-D sources).

Bad input raises :class:`~monai_skipts.utils.InputDataError` naming the file: missing, unsupported
format, corrupt or truncated, DICOM without pixel data, NaN/inf values (unless ``nonfinite="replace"``),
images smaller than ``min_size`` pixels along an axis (a 1-pixel image is an error by default), pictures
and DICOM frames above ``max_pixels`` (checked from the header, before decoding; see
:data:`DEFAULT_MAX_PIXELS`), time series and multi-channel volumes (a 4-D NIfTI, a vector NRRD), and
compressed DICOM that no installed decoder can read (the error says which package to install).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import ITKReader, MetaTensor, NibabelReader, PILReader, PydicomReader
from monai.transforms import LoadImage, MapTransform, Orientation, Transform

from monai_skipts.utils import InputDataError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "MAX_PIXELS_ENV",
    "default_max_pixels",
    "EXTRA_META",
    "PICTURE_SUFFIXES",
    "detect_format",
    "read_dicom_header",
    "dicom_value_range",
    "dicom_frame_count",
    "take_slice",
    "array_to_image",
    "LoadMedicalImage",
    "LoadMedicalImaged",
    "validate_datalist",
]

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_SUFFIXES = (".dcm", ".dicom")
_PICTURE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"BM", b"II*\x00", b"MM\x00*")
_SUPPORTED = (
    "PNG, JPEG, BMP, TIFF, DICOM (.dcm or any file with the DICM preamble), NIfTI (.nii, .nii.gz), "
    "NRRD/MetaImage (.nrrd, .nhdr, .mha, .mhd), or a folder holding one DICOM series"
)
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))

DEFAULT_MAX_PIXELS = 40_000_000
"""Largest picture or DICOM frame (width x height) loaded by default: 40 megapixels (e.g. 6300 x 6300,
above full-field mammography's 4096 x 5120). Decoding a 10000 x 10000 PNG and resizing it takes minutes
and gigabytes; such files are refused from their header, before any pixel is decoded."""
MAX_PIXELS_ENV = "MONAI_SKIPTS_MAX_PIXELS"
"""Environment variable overriding :data:`DEFAULT_MAX_PIXELS` (``0``: no limit), e.g. for the bundles."""


def default_max_pixels() -> int:
    """The pixel limit in force: ``$MONAI_SKIPTS_MAX_PIXELS`` when set, else :data:`DEFAULT_MAX_PIXELS`
    (0 means no limit)."""
    value = os.environ.get(MAX_PIXELS_ENV, "").strip().replace("_", "").replace(",", "")
    if not value:
        return DEFAULT_MAX_PIXELS
    try:
        n = int(float(value))
    except ValueError:
        raise ValueError(f"{MAX_PIXELS_ENV}={os.environ[MAX_PIXELS_ENV]!r} is not a number of pixels") from None
    if n < 0:
        raise ValueError(f"{MAX_PIXELS_ENV} must be 0 (no limit) or a positive number of pixels, got {n}")
    return n


_PIL_LOCK = threading.Lock()
_PIL_STATE = {"depth": 0, "saved": None}


@contextlib.contextmanager
def _pillow_bomb_check_off():
    """Switch off Pillow's own decompression-bomb check (a warning above ``Image.MAX_IMAGE_PIXELS``, an
    error above twice that) while a picture whose size passed ``max_pixels`` is read; restored after."""
    from PIL import Image

    with _PIL_LOCK:
        if _PIL_STATE["depth"] == 0:
            _PIL_STATE["saved"] = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        _PIL_STATE["depth"] += 1
    try:
        yield
    finally:
        with _PIL_LOCK:
            _PIL_STATE["depth"] -= 1
            if _PIL_STATE["depth"] == 0:
                Image.MAX_IMAGE_PIXELS = _PIL_STATE["saved"]


def _picture_size(path: str) -> tuple[int, int] | None:
    """``(width, height)`` from a picture's header (no pixel decoded); None when Pillow cannot open it."""
    from PIL import Image

    try:
        with _pillow_bomb_check_off(), Image.open(path) as im:
            return int(im.size[0]), int(im.size[1])
    except Exception:  # the reader reports unreadable files, with its own reason
        return None


def _pip_options(missing: Sequence[str]) -> list[str]:
    """pydicom's ``missing_dependencies`` (``"pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1"``)
    as ``pip install`` commands, one per decoder plugin."""
    out = []
    for line in missing:
        _, sep, req = line.partition(" - requires ")
        if not sep:
            continue
        pkgs = [p.strip() for p in req.replace(" and ", ", ").split(",") if p.strip()]
        pkgs = ["python-" + p if p.startswith("gdcm") else p for p in pkgs if not p.startswith("numpy")]
        if pkgs:
            out.append("pip install " + " ".join(f'"{p}"' if any(c in p for c in "<>=") else p for p in pkgs))
    return sorted(out, key=lambda o: "gdcm" in o)  # pylibjpeg first: wheels everywhere, no system library


def _dicom_decode_problem(ds, error: BaseException) -> str | None:
    """What to tell the user when the pixel data of a compressed DICOM file could not be decoded: the
    transfer syntax, the bit depth, what the installed decoders said, and how to install one that can.
    None for uncompressed files (then the file itself is at fault)."""
    ts = getattr(getattr(ds, "file_meta", None), "get", lambda *_: None)("TransferSyntaxUID")
    if ts is None or not getattr(ts, "is_compressed", False):
        return None
    detail = " ".join(str(error).split())
    try:
        from pydicom.pixels.decoders.base import get_decoder

        options = _pip_options(get_decoder(ts).missing_dependencies)
    except Exception:  # pydicom < 3, or no decoder registered for this transfer syntax
        options = [
            "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle",
            "pip install python-gdcm",
        ]
    bits = ds.get("BitsStored", None)
    what = f"{ts.name} ({ts})" + (f", {bits} bits stored" if bits else "")
    problem = f"cannot decode the DICOM pixel data, compressed as {what}: {detail}"
    if options:
        problem += f". No installed decoder can read it; install one that can: {options[0]}"
        problem += "".join(f" (or: {o})" for o in options[1:])
    else:
        problem += " (every decoder plugin pydicom knows is installed: the file may be corrupt)"
    return problem


EXTRA_META: dict[str, Any] = {
    "source_format": "",
    "modality": "",
    "photometric_interpretation": "",
    "inverted_monochrome1": False,
    "rescale_slope": 1.0,
    "rescale_intercept": 0.0,
    "window_center": math.nan,
    "window_width": math.nan,
    "value_min": math.nan,
    "value_max": math.nan,
    "nonfinite_replaced": 0,
    "volume_id": "",
    "slice_index": -1,
    "slice_axis": -1,
}


def detect_format(path: str | os.PathLike) -> str:
    """Return ``"picture"``, ``"dicom"``, ``"dicom_series"`` (a folder), ``"nifti"`` or ``"itk"``.

    Raises:
        InputDataError: the path does not exist or is no supported format.
    """
    p = Path(path)
    if not p.exists():
        raise InputDataError(p, "file not found")
    if p.is_dir():
        return "dicom_series"
    name = p.name.lower()
    if name.endswith(PICTURE_SUFFIXES):
        return "picture"
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(ITK_SUFFIXES):
        return "itk"
    if name.endswith(DICOM_SUFFIXES):
        return "dicom"
    if _is_dicom(p):  # no known suffix: sniff (DICOM files often have none)
        return "dicom"
    with open(p, "rb") as f:
        if f.read(4).startswith(_PICTURE_MAGIC):
            return "picture"
    raise InputDataError(p, f"unsupported file format {p.suffix or '(no suffix)'!r}; supported: {_SUPPORTED}")


def _is_dicom(path: Path) -> bool:
    if not path.is_file():
        return False
    if path.name.lower().endswith(DICOM_SUFFIXES):
        return True
    with open(path, "rb") as f:
        return f.read(132)[128:] == b"DICM"


def read_dicom_header(path: str | os.PathLike):
    """Read a DICOM file's header with pydicom (large values, pixel data included, are read lazily).

    Raises:
        InputDataError: not a DICOM file, unreadable header, or no pixel data.
    """
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), defer_size="4 KB")
    except Exception as e:
        raise InputDataError(path, f"not a readable DICOM file ({type(e).__name__}: {e})") from e
    if not any(t in ds for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        what = str(ds.get("SOPClassUID", "")) and f" (SOP class {ds.SOPClassUID.name})"
        raise InputDataError(path, f"DICOM file has no pixel data{what}; it is not an image")
    for tag in ("Rows", "Columns"):
        if tag not in ds:
            raise InputDataError(path, f"corrupt or truncated DICOM file: {tag} is missing")
    return ds


def dicom_frame_count(ds, path: str | os.PathLike | None = None) -> int:
    """NumberOfFrames of a DICOM header (1 when absent); InputDataError naming ``path`` when invalid."""
    try:
        return max(1, int(_first_float(ds.get("NumberOfFrames"), 1.0)))
    except (TypeError, ValueError) as e:
        raise InputDataError(path, f"invalid NumberOfFrames {ds.get('NumberOfFrames')!r}") from e


def _first_float(value: Any, default: float) -> float:
    if value is None or value == "":
        return default
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else default
    return float(value)


def dicom_value_range(ds) -> tuple[float, float]:
    """Representable value range of a DICOM image after RescaleSlope/Intercept: from BitsStored and
    PixelRepresentation (signed or not), e.g. ``(0, 1023)`` for 10 unsigned bits. NaN for float pixels."""
    if "PixelData" not in ds:
        return math.nan, math.nan
    bits = int(ds.get("BitsStored", None) or ds.get("BitsAllocated", 16))
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    slope, icpt = _first_float(ds.get("RescaleSlope"), 1.0), _first_float(ds.get("RescaleIntercept"), 0.0)
    return tuple(sorted((lo * slope + icpt, hi * slope + icpt)))  # type: ignore[return-value]


def _with_meta(img: torch.Tensor, meta: Mapping, **updates: Any) -> MetaTensor:
    """A fresh float32 MetaTensor holding ``img`` with ``meta`` (affine kept) updated by ``updates``."""
    meta = {**EXTRA_META, **dict(meta), **updates}
    affine = meta.pop("affine", None)
    data = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
    return MetaTensor(data.to(torch.float32), affine=affine, meta=meta)


def take_slice(volume: torch.Tensor, axis: int, index: int) -> MetaTensor:
    """Slice ``index`` of a RAS volume ``(C, X, Y, Z)`` along spatial ``axis`` (0=sagittal, 1=coronal,
    2=axial), as a ``(C, H, W)`` image in radiological display order: rows run anterior->posterior
    (axial) or superior->inferior (others), columns run patient right->left (axial, coronal) or
    anterior->posterior (sagittal) -- the layout of a DICOM slice of that orientation.
    Meta keeps the volume's keys plus ``slice_index`` and ``slice_axis``; the affine becomes identity."""
    n = volume.shape[axis + 1]
    if not -n <= index < n:
        fname = getattr(volume, "meta", {}).get("filename_or_obj")
        raise InputDataError(fname, f"slice {index} along axis {axis} is out of range: the volume has {n} slices")
    data = volume.as_tensor() if isinstance(volume, MetaTensor) else torch.as_tensor(volume)
    s = data.select(axis + 1, index % n).flip(1, 2).transpose(1, 2).contiguous()
    meta = {k: v for k, v in getattr(volume, "meta", {}).items() if k not in ("affine", "original_affine")}
    meta["spatial_shape"] = tuple(s.shape[1:])
    eye = torch.eye(4, dtype=torch.float64)
    return _with_meta(s, meta, slice_index=int(index % n), slice_axis=int(axis), affine=eye)


def _frames_to_volume(img: MetaTensor) -> MetaTensor:
    """``(C, F, H, W)`` frames -> ``(C, X, Y, F)`` laid out as an RAS axial stack (see :func:`take_slice`)."""
    vol = img.as_tensor().permute(0, 3, 2, 1).flip(1, 2).contiguous()
    return _with_meta(vol, img.meta, spatial_shape=tuple(vol.shape[1:]), affine=torch.eye(4, dtype=torch.float64))


def _pil_convert(im):
    """Make PIL modes numeric: 1-bit -> L (0/255), palette -> RGB(A), other colour spaces -> RGB."""
    if im.mode == "1":
        return im.convert("L")
    if im.mode in ("P", "PA"):
        return im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "RGB")
    if im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return im.convert("RGB")
    return im


class LoadMedicalImage(Transform):
    """Load one medical image file (or DICOM series folder) with MONAI's readers.

    Args:
        nonfinite: ``"error"`` (default) raises on NaN/inf values; ``"replace"`` sets NaN and -inf to the
            smallest finite value and +inf to the largest, warns, and records the count in meta
            ``nonfinite_replaced``.
        invert_monochrome1: invert MONOCHROME1 DICOM images so that high values are bright.
        min_size: smallest accepted size of every spatial axis of the result (default 2: a 1-pixel
            image is rejected as corrupt rather than stretched to a constant image).
        cache_volumes: how many loaded volumes to keep, so that reading a volume slice by slice (see
            :func:`~monai_skipts.transforms.expand_volume_datalist`) reads each file once.
        max_pixels: largest picture or DICOM frame accepted, in pixels (width x height), checked from
            the header before decoding. ``None`` (default): ``$MONAI_SKIPTS_MAX_PIXELS`` if set, else
            :data:`DEFAULT_MAX_PIXELS`; ``0``: no limit.

    ``__call__(path, slice_index=None, slice_axis=2)`` returns a float32 ``MetaTensor``: ``(C, H, W)``
    for 2-D sources or when ``slice_index`` is given (see :func:`take_slice`), ``(C, X, Y, Z)`` in RAS
    for volumes otherwise. See the module docstring for the meta keys and the errors.
    """

    def __init__(
        self,
        nonfinite: str = "error",
        invert_monochrome1: bool = True,
        min_size: int = 2,
        cache_volumes: int = 1,
        max_pixels: int | None = None,
    ):
        if nonfinite not in ("error", "replace"):
            raise ValueError(f"nonfinite must be 'error' or 'replace', got {nonfinite!r}")
        self.max_pixels = default_max_pixels() if max_pixels is None else int(max_pixels)
        if self.max_pixels < 0:
            raise ValueError(f"max_pixels must be 0 (no limit) or a positive number of pixels, got {max_pixels}")
        self.nonfinite = nonfinite
        self.invert_monochrome1 = invert_monochrome1
        self.min_size = int(min_size)
        self.cache_volumes = int(cache_volumes)
        self._cache: OrderedDict = OrderedDict()
        self._load_image: LoadImage | None = None

    def __call__(self, path: str | os.PathLike, slice_index: int | None = None, slice_axis: int = 2) -> MetaTensor:
        path = str(path)
        fmt = detect_format(path)
        key = (path, os.stat(path).st_mtime_ns)
        img = self._cache.get(key)
        if img is None:
            img = self._load(path, fmt)
            if img.ndim == 4 and self.cache_volumes > 0:
                self._cache[key] = img
                while len(self._cache) > self.cache_volumes:
                    self._cache.popitem(last=False)
        if img.ndim == 4:
            if slice_index is not None:
                img = take_slice(img, slice_axis, int(slice_index))
            elif 1 in img.shape[1:]:  # a single slice stored as a volume
                img = take_slice(img, img.shape[1:].index(1), 0)
            else:
                img = img.clone()
            if img.ndim == 3:
                img.meta["volume_id"] = path
        elif slice_index is not None:
            raise InputDataError(path, f"is a 2-D image of shape {tuple(img.shape)}; it has no slice {slice_index}")
        if min(img.shape[1:]) < self.min_size:
            size = "x".join(str(s) for s in img.shape[1:])
            raise InputDataError(path, f"image is {size} pixels, too small (every axis needs at least {self.min_size})")
        return img

    # ---- per-format loading --------------------------------------------------------------------------

    def _read(self, reader, path: str, what: str) -> MetaTensor:
        if self._load_image is None:  # LoadImage builds every default reader: once, and without the GPU-codec notice
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
                self._load_image = LoadImage(image_only=True, ensure_channel_first=True)
        try:
            return self._load_image(path, reader=reader)
        except Exception as e:
            msg = " ".join(str(e).split())  # every line: decoders list their reasons on the next lines
            problem = f"cannot read {what}: corrupt or truncated file, or an unsupported encoding"
            problem += f" ({type(e).__name__}: {msg})"
            raise InputDataError(path, problem) from e

    def _load(self, path: str, fmt: str) -> MetaTensor:
        if fmt == "picture":
            img = self._load_picture(path)
        elif fmt == "dicom":
            img = self._load_dicom(path)
        else:
            img = self._load_volume(path, fmt)
        return self._check_finite(img, path)

    def _check_pixels(self, path: str, width: int, height: int, what: str = "image") -> None:
        """Refuse a ``width x height`` image above ``max_pixels``, saying how to raise the limit."""
        n = width * height
        if self.max_pixels and n > self.max_pixels:
            problem = (
                f"{what} is {width}x{height} = {n:,} pixels, above the limit of {self.max_pixels:,} pixels "
                "(a guard against running out of memory on huge or malicious files). To score it, downscale "
                f"it first, or raise the limit: max_pixels={n} (LoadMedicalImage, AnomalyPredictor, "
                f"`python -m monai_skipts.inference --max_pixels {n}`) or the environment variable "
                f"{MAX_PIXELS_ENV}={n} (bundles; 0 = no limit)"
            )
            raise InputDataError(path, problem)

    def _load_picture(self, path: str) -> MetaTensor:
        size = _picture_size(path)
        if size is not None:
            self._check_pixels(path, *size, what="picture")
        with _pillow_bomb_check_off() if size is not None else contextlib.nullcontext():
            img = self._read(PILReader(converter=_pil_convert, reverse_indexing=False), path, "the picture")
        mode = img.meta.get("mode", "")
        if mode.startswith("I;16") or (mode == "I" and img.numel() and 0 <= img.min() and img.max() <= 65535):
            lo, hi = 0.0, 65535.0
        elif mode in ("I", "F"):
            lo, hi = math.nan, math.nan
        else:
            lo, hi = 0.0, 255.0
        meta = dict(source_format="picture", value_min=lo, value_max=hi, spatial_shape=tuple(img.shape[1:]))
        return _with_meta(img, img.meta, **meta)

    def _load_dicom(self, path: str) -> MetaTensor:
        ds = read_dicom_header(path)
        frames = dicom_frame_count(ds, path)
        try:
            rows, cols = int(ds.Rows), int(ds.Columns)
        except (TypeError, ValueError) as e:
            raise InputDataError(
                path, f"corrupt DICOM header: Rows {ds.get('Rows')!r}, Columns {ds.get('Columns')!r}"
            ) from e
        self._check_pixels(path, cols, rows, what="DICOM frame" if frames > 1 else "DICOM image")
        pi = str(ds.get("PhotometricInterpretation", "")).upper()
        colour = int(ds.get("SamplesPerPixel", 1) or 1) > 1
        # PydicomReader applies RescaleSlope/RescaleIntercept (once); swap_ij=False keeps (rows, columns).
        with warnings.catch_warnings():  # no patient geometry needed for 2-D images and frame stacks
            warnings.filterwarnings("ignore", message=".*ImageOrientationPatient.*")
            try:
                img = self._read(
                    PydicomReader(swap_ij=False, channel_dim=-1 if colour else None), path, "the DICOM file"
                )
            except InputDataError as e:
                problem = _dicom_decode_problem(ds, e.__cause__ or e)
                if problem is None:
                    raise
                raise InputDataError(path, problem) from e.__cause__
        lo, hi = dicom_value_range(ds)
        if pi == "PALETTE COLOR":
            from pydicom.pixels import apply_color_lut

            rgb = apply_color_lut(img.as_tensor()[0].numpy().astype(np.int64), ds)
            hi = float(np.iinfo(rgb.dtype).max) if rgb.dtype.kind == "u" else float(rgb.max())
            lo = 0.0
            img = MetaTensor(torch.from_numpy(np.moveaxis(rgb, -1, 0).astype(np.float32)), meta=img.meta)
        meta = dict(
            source_format="dicom",
            modality=str(ds.get("Modality", "")),
            photometric_interpretation=pi,
            rescale_slope=_first_float(ds.get("RescaleSlope"), 1.0),
            rescale_intercept=_first_float(ds.get("RescaleIntercept"), 0.0),
            window_center=_first_float(ds.get("WindowCenter"), math.nan),
            window_width=_first_float(ds.get("WindowWidth"), math.nan),
            value_min=lo,
            value_max=hi,
            spatial_shape=tuple(img.shape[1:]),
        )
        if pi == "MONOCHROME1" and self.invert_monochrome1:
            if not math.isfinite(lo + hi):  # float pixel data: mirror within the image's own range
                lo, hi = float(img.min()), float(img.max())
            img = (lo + hi) - img
            meta.update(inverted_monochrome1=True, window_center=lo + hi - meta["window_center"])
        img = _with_meta(img, img.meta, **meta)
        return _frames_to_volume(img) if frames > 1 else img

    def _load_volume(self, path: str, fmt: str) -> MetaTensor:
        if fmt == "nifti":
            _refuse_multi_volume_nifti(path)
            reader, what = NibabelReader(), "the NIfTI file"
        else:
            try:
                import itk  # noqa: F401
            except ImportError as e:
                problem = "reading NRRD/MetaImage files and DICOM series needs itk: pip install itk"
                raise InputDataError(path, problem) from e
            if fmt == "dicom_series" and not any(_is_dicom(f) for f in Path(path).iterdir()):
                raise InputDataError(path, "folder holds no DICOM files (a DICOM series folder was expected)")
            reader, what = ITKReader(), ("the DICOM series" if fmt == "dicom_series" else "the file")
        img = self._read(reader, path, what)
        if img.ndim not in (3, 4):
            problem = f"has {img.ndim - 1} spatial dimensions; only 2-D images and 3-D volumes are supported"
            raise InputDataError(path, problem)
        if img.ndim == 4 and img.shape[0] > 1 and min(img.shape[1:]) > 1:
            shape = tuple(int(s) for s in img.shape[1:])
            problem = (
                f"is a volume of shape {shape} with {img.shape[0]} values per voxel (a multi-channel, vector or "
                "time-series volume); only 2-D images (grey or colour) and single-channel 3-D volumes are "
                "supported: save the channel to score as its own volume"
            )
            raise InputDataError(path, problem)
        if img.ndim == 3:  # 2-D image in a volume format: one axial slice
            img = MetaTensor(img.as_tensor().unsqueeze(-1), meta=img.meta)
        img = Orientation(axcodes="RAS", labels=_RAS_LABELS)(img)
        return _with_meta(img, img.meta, source_format=fmt, spatial_shape=tuple(img.shape[1:]))

    def _check_finite(self, img: MetaTensor, path: str) -> MetaTensor:
        finite = torch.isfinite(img.as_tensor())
        bad = int((~finite).sum())
        if not bad:
            return img
        if self.nonfinite == "error" or bad == finite.numel():
            raise InputDataError(path, f"contains {bad} NaN/inf values (use nonfinite='replace' to replace them)")
        vals = img.as_tensor()[finite]
        lo, hi = float(vals.min()), float(vals.max())
        warnings.warn(f"{path}: replaced {bad} NaN/inf values (NaN and -inf by {lo}, +inf by {hi})", stacklevel=3)
        img = torch.nan_to_num(img, nan=lo, posinf=hi, neginf=lo)
        img.meta["nonfinite_replaced"] = bad
        return img


def _refuse_multi_volume_nifti(path: str) -> None:
    """Refuse a NIfTI holding more than one volume (a time series, or several channels per voxel), from
    its header: MONAI's reader would take the 4th axis as channels, and 3 time points would be scored
    as the red, green and blue of one picture."""
    import nibabel as nib

    try:
        shape = tuple(int(s) for s in nib.load(path).shape)
    except Exception:  # unreadable header: the reader reports it
        return
    n = int(np.prod(shape[3:])) if len(shape) > 3 else 1
    if n > 1:
        problem = (
            f"is a {len(shape)}-D NIfTI of shape {shape}: {n} volumes (time points or channels) of shape "
            f"{shape[:3]}; supported are 2-D images and single 3-D volumes (one value per voxel). Save the "
            "volume to score as its own file, e.g. with nibabel: nib.save(img.slicer[..., t], 'volume_t.nii.gz')"
        )
        raise InputDataError(path, problem)


def _slice_of(item: Mapping, index_key: str = "slice_index", axis_key: str = "slice_axis") -> tuple[int | None, int]:
    """``(slice_index or None, slice_axis)`` of a datalist item (negative or missing index: no slice)."""
    index, axis = item.get(index_key), item.get(axis_key)
    index = None if index is None or int(index) < 0 else int(index)
    return index, (2 if axis is None or int(axis) < 0 else int(axis))


class LoadMedicalImaged(MapTransform):
    """Dictionary version of :class:`LoadMedicalImage`.

    If the dictionary holds ``slice_index_key`` (and optionally ``slice_axis_key``, default axis 2), every
    key loads that slice of its volume -- the items made by
    :func:`~monai_skipts.transforms.expand_volume_datalist`. A ``volume_id`` in the dictionary is copied to
    the loaded image's meta. With ``allow_missing_keys=True`` a missing key or a ``None`` value is skipped.
    Other keyword arguments go to :class:`LoadMedicalImage`.
    """

    def __init__(
        self,
        keys: KeysCollection,
        slice_index_key: str = "slice_index",
        slice_axis_key: str = "slice_axis",
        allow_missing_keys: bool = False,
        **loader_kwargs: Any,
    ):
        super().__init__(keys, allow_missing_keys)
        self.slice_index_key, self.slice_axis_key = slice_index_key, slice_axis_key
        self.loader = LoadMedicalImage(**loader_kwargs)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        index, axis = _slice_of(d, self.slice_index_key, self.slice_axis_key)
        for key in self.key_iterator(d):
            if d[key] is None and self.allow_missing_keys:
                continue
            d[key] = self.loader(d[key], slice_index=index, slice_axis=axis)
            if d.get("volume_id") and d[key].ndim == 3:
                d[key].meta["volume_id"] = str(d["volume_id"])
        return d


def validate_datalist(
    datalist: Sequence[Mapping], keys: KeysCollection = ("image",), loader: LoadMedicalImage | None = None
) -> tuple[list[dict], list[InputDataError]]:
    """Skip-and-report: load every item's ``keys`` (missing or ``None`` values are skipped) and split the
    datalist into the items that load and the errors of those that don't (each also warned).

    Returns:
        ``(valid_items, errors)``; each error names its file.
    """
    loader = loader or LoadMedicalImage(cache_volumes=0)
    keys = [keys] if isinstance(keys, str) else list(keys)
    valid, errors = [], []
    for item in datalist:
        try:
            for key in keys:
                if item.get(key) is not None:
                    index, axis = _slice_of(item)
                    loader(item[key], slice_index=index, slice_axis=axis)
        except InputDataError as e:
            warnings.warn(f"skipping item: {e}", stacklevel=2)
            errors.append(e)
        else:
            valid.append(dict(item))
    return valid, errors


def array_to_image(array: Any, bit_depth: int | None = None, name: str | None = None) -> MetaTensor:
    """An in-memory image ``(H, W)`` or ``(C, H, W)`` (C in 1..4) as the loader would give it.

    Intensity conventions (so that an array read from a file scores like the file):

    - ``bit_depth`` 8 or 16, or an ``uint8``/``uint16`` array: a picture with that bit range
      (0..255 / 0..65535), like a PNG; CT presets scale such pictures by the bit range too;
    - otherwise raw values: HU for the CT windows, the image's own min-max for bit-range presets.

    Raises:
        InputDataError: wrong shape, not numeric or not finite (``name`` labels the input).
    """
    arr = np.asarray(array)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise InputDataError(name, f"is not a numeric image array (dtype {arr.dtype})")
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[0] not in (1, 2, 3, 4):
        raise InputDataError(name, f"has shape {tuple(np.shape(array))}; expected (H, W) or (C, H, W) with C in 1..4")
    if bit_depth in (None, 0):
        bit_depth = {np.dtype(np.uint8): 8, np.dtype(np.uint16): 16}.get(arr.dtype)
    if bit_depth not in (None, 8, 16):
        raise ValueError(f"bit_depth must be 8, 16 or 0/None (raw values), got {bit_depth}")
    data = torch.from_numpy(arr.astype(np.float32, copy=False))
    if not bool(torch.isfinite(data).all()):
        raise InputDataError(name, "contains NaN/inf values")
    if bit_depth is None:
        meta = {"source_format": "array", "value_min": math.nan, "value_max": math.nan}
    else:
        meta = {"source_format": "picture", "value_min": 0.0, "value_max": float(2**bit_depth - 1)}
    meta.update(filename_or_obj=name or "", spatial_shape=tuple(arr.shape[1:]))
    return MetaTensor(data, meta=meta)
