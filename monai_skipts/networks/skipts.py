"""The Skip-TS model: frozen teacher + skip-connected student decoder."""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from torch import nn

from monai_skipts.networks.bottleneck import RD4ADStudent
from monai_skipts.networks.student import EXPANSION, SKIP_LEVELS, SkipStudent
from monai_skipts.networks.teacher import TeacherEncoder, build_teacher

__all__ = [
    "SkipTS",
    "TeacherStudentModel",
    "EncoderStudent",
    "STUDENT_PRESETS",
    "student_preset",
    "student_expansion",
    "teacher_name_of",
]

#: default student decoder per teacher (kind, blocks per D3/D2/D1, bottleneck widths)
STUDENT_PRESETS: dict[str, dict[str, Any]] = {
    "wide_resnet50_2": {
        "kind": "bottleneck",
        "blocks": (6, 4, 3),
        "widths": (512, 256, 128),
        "up_widths": (1024, 512, 256),
    },
    "resnet50": {"kind": "bottleneck", "blocks": (6, 4, 3), "widths": (256, 128, 64), "up_widths": (512, 256, 128)},
    "resnet18": {"kind": "basic", "blocks": (2, 2, 2)},
}
#: any other teacher (EfficientNet-Lite): the mirror of its MBConv blocks (expansion 6)
_GENERIC_STUDENT = {"kind": "inverted", "blocks": (3, 3, 2)}
_DEFAULT_BLOCKS = {"basic": (2, 2, 2), "inverted": (3, 3, 2), "bottleneck": (6, 4, 3)}
#: inverted-student expansion per teacher tap kind: the "expanded" taps already are the teacher's
#: 6×-expanded features, so widths equal to their channel counts give the student the same block
#: widths as over the "project" taps (Lite0: 672/240/144 in D3/D2/D1 either way); expansion 6 of
#: the expanded channels would give 2.8× the parameters (see student_preset)
_EXPANSION_BY_TAPS = {"expanded": 1}


def student_expansion(teacher: TeacherEncoder) -> int:
    """Expansion of the inverted-residual student's widths over ``teacher``'s tap channels: 6 (the
    teacher's MBConv expansion) for its projected taps, 1 for ``"expanded"`` taps."""
    return _EXPANSION_BY_TAPS.get(getattr(teacher, "tap_kind", ""), EXPANSION)


def student_preset(
    teacher: TeacherEncoder,
    kind: str | None = None,
    blocks: Sequence[int] | None = None,
    widths: Sequence[int] | None = None,
    up_widths: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The student decoder options for ``teacher`` (its preset, then the given overrides):
    ``{"kind", "blocks"[, "widths", "up_widths"]}`` as :class:`SkipStudent` takes them.

    The inverted-residual student's widths default to :func:`student_expansion` × the channels of
    the teacher taps each block maps between. For EfficientNet-Lite0 (blocks 3, 3, 2, kernel 3;
    teacher 2.96 M parameters) the student has 1.73 M parameters over the ``"project"`` taps (24,
    40, 112, 320 channels, expansion 6) and 13.7 M over the ``"expanded"`` taps (144, 240, 672, 1152
    channels, expansion 1). 8.7 M of those are the dense 3×3 transposed-convolution shortcuts of the
    three up-sampling blocks, fixed by the channel counts whatever the widths (expansion 0.5 would
    still need 11.2 M); expansion 6 would need 38.4 M.
    """
    preset = dict(STUDENT_PRESETS.get(teacher.name, _GENERIC_STUDENT))
    if kind is not None and kind != preset["kind"]:
        preset = {"kind": kind, "blocks": _DEFAULT_BLOCKS.get(kind, (2, 2, 2))}
    if blocks is not None:
        preset["blocks"] = tuple(blocks)
    if widths is not None:
        preset["widths"] = tuple(widths)
    if up_widths is not None:
        preset["up_widths"] = tuple(up_widths)
    if preset["kind"] == "inverted":  # MBConv-style expansion of the in/out channels
        c1, c2, c3, c4 = teacher.out_channels
        e = student_expansion(teacher)
        preset.setdefault("widths", tuple(e * c for c in (c3, c2, c1)))
        preset.setdefault("up_widths", tuple(e * c for c in (c4, c3, c2)))
    return preset


def teacher_name_of(model: nn.Module) -> str:
    """The teacher a built model uses (``model.config["teacher"]``, DDP unwrapped): the name its
    ``teacher`` argument resolved to (``"auto"`` is resolved once, when the model builds its teacher).

    A bundle passes ``"teacher": "@teacher"`` (possibly ``"auto"``) to the model and reads the resolved
    name back from the model (``{"_target_": "monai_skipts.networks.teacher_name_of", "model":
    "@network_def"}``) instead of resolving it a second time."""
    return getattr(model, "module", model).config["teacher"]


class EncoderStudent(nn.Module):
    """Ablation "traditional KD": a randomly initialised copy of the teacher's architecture fed the
    image, whose E1..E3 are matched to the teacher's (the same ``teacher_taps``). Input ``(B, 3, H, W)``."""

    def __init__(self, teacher_name: str, teacher_taps: str | None = None):
        super().__init__()
        self.encoder = build_teacher(teacher_name, pretrained=False, taps=teacher_taps)
        for p in self.encoder.parameters():
            p.requires_grad_(True)

    def train(self, mode: bool = True) -> "EncoderStudent":
        for m in self.modules():  # the encoder class pins itself to eval; a student must train
            m.training = mode
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.encoder(x)[:3]


class TeacherStudentModel(nn.Module):
    """What every teacher-student detector here shares: a frozen ``teacher`` whose features are
    computed without autograd, a ``student_features`` the subclass defines, ``forward`` returning
    ``(teacher_feats[:3], student_feats)`` (optionally from cached teacher features). The anomaly map
    and score come from :class:`~monai_skipts.networks.AnomalyDetector`."""

    teacher: TeacherEncoder

    def teacher_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``[E1, E2, E3, E4]`` of the frozen teacher, computed without autograd."""
        with torch.no_grad():
            return [f.detach() for f in self.teacher(x)]

    def student_features(self, t_feats: Sequence[torch.Tensor], x: torch.Tensor | None = None) -> list[torch.Tensor]:
        raise NotImplementedError

    def forward(
        self, x: torch.Tensor, teacher_feats: Sequence[torch.Tensor] | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        t_all = list(teacher_feats) if teacher_feats is not None else self.teacher_features(x)
        return t_all[:3], self.student_features(t_all, x)


class SkipTS(TeacherStudentModel):
    """Skip-TS (Liu et al., IEEE TIM 2024).

    Args:
        teacher: registered teacher name or ``"auto"`` (see :mod:`monai_skipts.networks.teacher`),
            resolved here, once; :attr:`config` ``["teacher"]`` (:func:`teacher_name_of`) holds the name.
        pretrained: ImageNet teacher weights (``False`` only for tests/ablations).
        teacher_weights: a weights file for the teacher instead of the default location.
        student: ``"decoder"`` (Skip-TS) or ``"encoder"`` (ablation: traditional KD).
        skip: ``"add"`` (paper), ``"add_relu"`` (official code), ``"none"`` (ablation DRKD w/o SC)
            or ``"gate"`` (ours: a learned per-channel gate on the teacher part, initially 0.5).
        upsample_kernel: 3 (paper) or 2 (official code).
        student_kind, student_blocks, student_widths, student_up_widths: override the student
            preset for the teacher (see :class:`~monai_skipts.networks.SkipStudent`).
        skip_levels: (ours) teacher levels feeding a skip, a subset of ``(3, 2)`` (3: ``F_t^3``
            before D2; 2: ``F_t^2`` before D1). Default ``(3, 2)`` (paper).
        skip_dropout: (ours) channel dropout probability on the teacher part of each skip, training
            mode only. Default 0 (paper).
        skip_noise: (ours) Gaussian noise on the teacher part of each skip, in units of its
            per-sample, per-channel spatial standard deviation, training mode only. Default 0 (paper).
        teacher_taps: which teacher features are E1..E4 (see :mod:`monai_skipts.networks.teacher`):
            ``None`` for the teacher's default (ResNets: ``"layer"``, the paper's; EfficientNet-Lite:
            ``"project"``), or ``"expanded"`` (ours, EfficientNet-Lite only: the 6× wider,
            non-negative depthwise outputs; the student preset then uses expansion 1). Recorded in
            :attr:`config` resolved, so a checkpoint rebuilds the same taps. For a ``teacher``
            instance it must be ``None`` or the instance's own tap kind.
        download: allow downloading the teacher's weights.
        bottleneck: (ours) D3 gets RD4AD's one-class bottleneck embedding of ``[E1, E2, E3]``
            (:class:`~monai_skipts.networks.OneClassBottleneck`) instead of ``E4``; the skips, when
            on, still add the teacher's ``F_t^3`` / ``F_t^2``. With ``skip="none"`` this is RD4AD's
            architecture (trained with the DRKD loss here).

    The options of the student decoder and the teacher taps are recorded in :attr:`config`, from
    which :func:`monai_skipts.checkpoint.load_detector` rebuilds the model.

    ``forward(x)`` with ``x`` of shape ``(B, 3, H, W)`` returns ``(teacher_feats, student_feats)``,
    two lists ``[F^1, F^2, F^3]`` of shapes ``(B, C_l, H/2^(l+1), W/2^(l+1))``. The teacher runs
    without autograd and in eval mode whatever the model's mode;
    :class:`~monai_skipts.networks.AnomalyDetector` gives the anomaly map and score.
    """

    def __init__(
        self,
        teacher: str | TeacherEncoder = "auto",
        pretrained: bool = True,
        teacher_weights: str | os.PathLike | None = None,
        student: str = "decoder",
        skip: str = "add",
        upsample_kernel: int = 3,
        student_kind: str | None = None,
        student_blocks: Sequence[int] | None = None,
        student_widths: Sequence[int] | None = None,
        student_up_widths: Sequence[int] | None = None,
        download: bool = True,
        skip_levels: Sequence[int] = SKIP_LEVELS,
        skip_dropout: float = 0.0,
        skip_noise: float = 0.0,
        teacher_taps: str | None = None,
        bottleneck: bool = False,
    ):
        super().__init__()
        if bottleneck and student != "decoder":
            raise ValueError("bottleneck=True needs the decoder student")
        if isinstance(teacher, TeacherEncoder):
            if teacher_taps is not None and teacher_taps != teacher.tap_kind:
                raise ValueError(
                    f"teacher_taps='{teacher_taps}' but the given teacher '{teacher.name}' has "
                    f"'{teacher.tap_kind}' taps; build it with build_teacher(..., taps='{teacher_taps}')"
                )
            self.teacher = teacher
        else:
            self.teacher = build_teacher(
                teacher, pretrained=pretrained, weights=teacher_weights, download=download, taps=teacher_taps
            )
        name = self.teacher.name
        preset = student_preset(self.teacher, student_kind, student_blocks, student_widths, student_up_widths)
        if student == "decoder":
            self.student: nn.Module = SkipStudent(
                self.teacher.out_channels,
                upsample_kernel=upsample_kernel,
                skip=skip,
                final_activation=self.teacher.nonnegative,
                skip_levels=skip_levels,
                skip_dropout=skip_dropout,
                skip_noise=skip_noise,
                **preset,
            )
            levels = list(self.student.skip_levels)
            if bottleneck:  # RD4AD's one-class bottleneck in front of D3 (built after the decoder, as RD4AD does)
                self.student = RD4ADStudent(
                    self.teacher.out_channels, self.student, depthwise=preset["kind"] == "inverted"
                )
        elif student == "encoder":
            self.student = EncoderStudent(name, self.teacher.tap_kind)
            levels = []
        else:
            raise ValueError(f"student must be 'decoder' or 'encoder', got '{student}'")
        self.config: dict[str, Any] = {
            "teacher": name,
            "teacher_pretrained": bool(pretrained),
            "teacher_weights_sha256": self.teacher.weights_sha256,
            "student": student,
            "skip": skip,
            "upsample_kernel": int(upsample_kernel),
            "student_kind": preset["kind"],
            "student_blocks": list(preset["blocks"]),
            "student_widths": list(preset["widths"]) if "widths" in preset else None,
            "student_up_widths": list(preset["up_widths"]) if "up_widths" in preset else None,
            "skip_levels": levels,
            "skip_dropout": float(skip_dropout),
            "skip_noise": float(skip_noise),
            "teacher_taps": self.teacher.tap_kind,
            "bottleneck": bool(bottleneck),
        }

    def student_features(self, t_feats: Sequence[torch.Tensor], x: torch.Tensor | None = None) -> list[torch.Tensor]:
        """``[F_s^1, F_s^2, F_s^3]`` from the teacher's ``[E1..E4]`` (or from ``x`` for the encoder student)."""
        student = self.__dict__.get("_student_ddp") or self.student  # see distribute_student
        if isinstance(self.student, EncoderStudent):
            if x is None:
                raise ValueError("the encoder student (traditional KD) needs the image")
            return student(x)
        return student(t_feats)
