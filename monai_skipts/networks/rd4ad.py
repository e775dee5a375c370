"""RD4AD-style reverse distillation (Deng & Li, CVPR 2022), the peer Skip-TS improves on.

Frozen teacher E1..E4 (the same registry as :class:`~monai_skipts.networks.SkipTS`). The student
is a *one-class bottleneck embedding* (OCBE) followed by a decoder *without* skip connections:

- multi-scale feature fusion (MFF): E1 is brought to E3's grid by two stride-2 3×3 convolutions,
  E2 by one, E3 by none (each ``c3`` channels, BatchNorm, ReLU); the three are concatenated;
- the one-class embedding (OCE): one down-sampling residual block from ``3 * c3`` channels at
  E3's grid to ``c4`` channels at E4's grid (RD4AD: one wide bottleneck block of ``layer4``'s kind),
  a compact code that the decoder must expand;
- the decoder D3, D2, D1: the Skip-TS decoder of the same teacher with ``skip="none"``, i.e.
  each stage sees only the previous stage's output, never the teacher's features.

``forward(x)`` gives ``(teacher_feats [E1, E2, E3], student_feats [F_s^1, F_s^2, F_s^3])`` like
SkipTS, so :class:`~monai_skipts.engines.SkipTSTrainer`, ``TeacherFeatureCache``,
:class:`~monai_skipts.engines.SkipTSEvaluator` and the inferers work unchanged.
:class:`~monai_skipts.losses.RD4ADLoss` is RD4AD's training loss (1 − cosine of the flattened maps per sample, summed
over levels); RD4AD's anomaly map is eq 1/7/8 of Skip-TS (per-pixel 1 − cos, summed, Gaussian σ = 4).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from monai_skipts.networks.bottleneck import RD4ADStudent
from monai_skipts.networks.skipts import TeacherStudentModel, student_preset
from monai_skipts.networks.student import SkipStudent
from monai_skipts.networks.teacher import TeacherEncoder, build_teacher

__all__ = ["RD4AD"]


class RD4AD(TeacherStudentModel):
    """RD4AD-style reverse distillation with the same interface as :class:`SkipTS`.

    Args:
        teacher: registered teacher name, ``"auto"`` or a :class:`TeacherEncoder` (shared instances
            are fine: the teacher is frozen).
        pretrained, teacher_weights, download: as for :class:`SkipTS`.
        upsample_kernel: decoder up-sampling kernel (RD4AD's code: 2; default 3 like Skip-TS so the
            only differences from Skip-TS are the bottleneck and the missing skips).
        student_kind, student_blocks: override the decoder preset of the teacher.

    ``forward(x, teacher_feats=None)`` returns ``([E1, E2, E3], [F_s^1, F_s^2, F_s^3])``; shapes as
    for :class:`SkipTS`. ``teacher_feats`` (E1..E4, e.g. from ``TeacherFeatureCache``) skips the
    teacher.
    """

    def __init__(
        self,
        teacher: str | TeacherEncoder = "auto",
        pretrained: bool = True,
        teacher_weights: str | os.PathLike | None = None,
        upsample_kernel: int = 3,
        student_kind: str | None = None,
        student_blocks: Sequence[int] | None = None,
        download: bool = True,
    ):
        super().__init__()
        self.teacher = (
            teacher
            if isinstance(teacher, TeacherEncoder)
            else build_teacher(teacher, pretrained=pretrained, weights=teacher_weights, download=download)
        )
        name = self.teacher.name
        preset = student_preset(self.teacher, student_kind, student_blocks)
        decoder = SkipStudent(
            self.teacher.out_channels,
            upsample_kernel=upsample_kernel,
            skip="none",
            final_activation=self.teacher.nonnegative,
            **preset,
        )
        self.student = RD4ADStudent(self.teacher.out_channels, decoder, depthwise=preset["kind"] == "inverted")
        self.config: dict[str, Any] = {
            "model": "rd4ad",
            "teacher": name,
            "teacher_pretrained": bool(pretrained),
            "teacher_weights_sha256": self.teacher.weights_sha256,
            "student": "rd4ad",
            "skip": "none",
            "upsample_kernel": int(upsample_kernel),
            "student_kind": preset["kind"],
            "student_blocks": list(preset["blocks"]),
        }

    def student_features(self, t_feats: Sequence[torch.Tensor], x: torch.Tensor | None = None) -> list[torch.Tensor]:  # noqa: ARG002
        """``[F_s^1, F_s^2, F_s^3]`` from the teacher's ``[E1..E4]``."""
        student = self.__dict__.get("_student_ddp") or self.student  # see engines.distribute_student
        return student(t_feats)
