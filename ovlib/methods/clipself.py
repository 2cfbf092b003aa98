"""CLIPSelf: region-language alignment by self-distillation (Wu et al., ICLR'24; R-SC-CLIPSelf paper Eq. 1).

The student's dense map (last block as the value path with residual and FFN kept, ``x+v``) is L2-normalised
per token, RoIAligned 1x1 over each region, normalised again, and pulled towards the frozen teacher's CLS
embedding of the region's crop: ``L_RLA = 1 - mean_r cos(s_r, t_r)``, mean over every valid region of the
local batch (``wusize/CLIPSelf:src/training/clipself.py`` ``CLIPSelf.__call__``; normalise-then-pool as
``src/open_clip/eva_clip/eva_vit_model.py`` ``extract_roi_features``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ovlib.methods.base import Distiller
from ovlib.models import DENSE_MODES, dense_features, roi_features


def rla_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``1 - mean_r cos(student_r, teacher_r)`` for ``student, teacher (R, C)`` (R-SC-CLIPSelf Eq. 1).

    0 when every region embedding points where its teacher does; in [0, 2].
    """
    if student.ndim != 2 or student.shape != teacher.shape:
        raise ValueError(f"student and teacher must both be (R, C); got {tuple(student.shape)} and "
                         f"{tuple(teacher.shape)}")
    if student.shape[0] == 0:
        raise ValueError("rla_loss needs at least one region (R = 0)")
    cos = (F.normalize(student.float(), dim=-1) * F.normalize(teacher.float(), dim=-1)).sum(-1)  # (R,)
    return 1.0 - cos.mean()


@dataclass(frozen=True)
class CLIPSelfOptions:
    """``dense_mode``: the student's dense map distilled (``x+v``: the public code's ``forward_without_attn``)."""

    dense_mode: str = "x+v"


class CLIPSelf(Distiller):
    """CLIPSelf's RLA on grid (or proposal) regions; dense mode ``x+v`` as the public code."""

    name = "clipself"
    loss_names = ("rla",)
    needs = frozenset({"teacher"})
    option_types = (CLIPSelfOptions,)

    def __init__(self, student, frozen, dense_mode: str = "x+v", **options: Any):
        super().__init__(student, frozen, **options)
        if dense_mode not in DENSE_MODES:  # resolved once, here
            raise ValueError(f"method 'clipself': dense_mode must be one of {DENSE_MODES}, got {dense_mode!r}")
        self.dense_mode = dense_mode

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = batch["images"]  # (B, 3, S, S) student images
        dense = dense_features(self.student, images, self.dense_mode, normalize=True)  # (B, C, h, w)
        rois = roi_features(dense, batch["boxes"], images.shape[-2:])  # (R, C)
        teacher = self.teacher_crop_cls(batch["crops"])  # (R, C) CLS of each crop, no grad
        return {"rla": rla_loss(rois, teacher)}
