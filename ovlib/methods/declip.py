"""DeCLIP: decoupled content and context distillation (Wang et al., CVPR'25) -- the SynCLIP baseline.

The student's **last block** is replaced by self-self attention (``qq``: ``softmax(q q^T)``; ``csa``:
``softmax(q q^T) + softmax(k k^T)``) with **no** ``d^-1/2`` scale, no RoPE, no residual and no FFN, as
``xiaomoguhz/DeCLIP:src/open_clip/eva_clip/eva_vit_model.py`` ``Attention.ss_attn`` +
``Block.forward_without_rcffn`` on ``main`` (``reference/implementations.md`` §3.2, §9). Two losses:

* **content** (§3.3): RoIAlign 1x1 of the *unnormalised* projected dense map over each region, then
  L2-normalise, against the frozen teacher's L2-normalised CLS embedding of the region's crop:
  ``L_content = 1 - mean_r cos(s_r, t_r)`` (``xiaomoguhz/DeCLIP:src/training/declip.py`` ``DeCLIP.__call__``).
  Pool-then-normalise is the difference from CLIPSelf (normalise-then-pool).
* **context** (§3.3): the student's last-block per-head ``q`` (``qq``) -- or ``q`` and ``k`` (``csa``) -- of the
  patch tokens, heads concatenated into channels ``(B, N, H*d)``, L2-normalised, cosine matrix
  ``S_s (B, N, N)`` (``csa``: the mean of the q-q and k-k cosine matrices, SynCLIP's fixed reshaping,
  ``Justlovesmile/SynCLIP:src/training/synclip.py`` ``get_student_context_similarity``); the frozen VFM's patch
  cosine matrix ``S_t (B, N, N)`` (``get_teacher_context_similarity``);
  ``L_context = mean_{b, m} || S_t[b, m, :] - S_s[b, m, :] ||_2`` -- the mean of the row-wise, **non-squared**
  L2 norms.

DeCLIP's ``main`` csa path does not merge the heads (valid only for batch 1, §3.3); we always merge them as
SynCLIP and DeCLIP's CAT-Seg branch do. When the student grid differs from the VFM grid, the student's
``q``/``k`` maps are bilinearly resized to the VFM grid before the cosine matrix (DeCLIP's qq path); with the
launcher's proxy image (``vfm_size = grid * vfm_patch``) the grids are equal and nothing is resized.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ovlib.methods.base import Distiller
from ovlib.models import dense_features, patch_correlation, roi_features, vfm_patch_features

__all__ = [
    "CONTEXT_MODES",
    "DeCLIP",
    "content_loss",
    "context_loss",
    "merge_heads",
    "resize_tokens",
    "student_context_similarity",
    "vfm_grid",
]

CONTEXT_MODES = ("qq", "kk", "csa")


def content_loss(student_rois: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``1 - mean_r cos(s_r, t_r)`` for ``student_rois, teacher (R, C)``; both are L2-normalised here.

    DeCLIP's content loss (``xiaomoguhz/DeCLIP:src/training/declip.py`` ``DeCLIP.__call__``); ``student_rois``
    are RoIAlign features of the unnormalised map. In [0, 2]; 0 when every region points at its teacher.
    """
    if student_rois.ndim != 2 or student_rois.shape != teacher.shape:
        raise ValueError(f"student_rois and teacher must both be (R, C); got {tuple(student_rois.shape)} and "
                         f"{tuple(teacher.shape)}")
    if student_rois.shape[0] == 0:
        raise ValueError("content_loss needs at least one region (R = 0)")
    cos = (F.normalize(student_rois.float(), dim=-1) * F.normalize(teacher.float(), dim=-1)).sum(-1)  # (R,)
    return 1.0 - cos.mean()


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """Per-head tokens ``(B, H, N, d)`` -> ``(B, N, H*d)``, channel ``h*d + j`` = head ``h``, dim ``j`` (the
    order of DeCLIP's ``transpose(0, 1).view(N, B, H*d)`` on ``(B*H, N, d)``)."""
    if x.ndim != 4:
        raise ValueError(f"expected per-head tokens (B, H, N, d), got {tuple(x.shape)}")
    B, H, N, d = x.shape
    return x.permute(0, 2, 1, 3).reshape(B, N, H * d)


def resize_tokens(x: torch.Tensor, grid: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """Tokens ``(B, N, C)`` on ``grid = (h, w)`` -> ``(B, h'*w', C)`` on ``target = (h', w')`` by bilinear
    interpolation (``align_corners=False``); unchanged when the grids are equal."""
    h, w = grid
    B, N, C = x.shape
    if N != h * w:
        raise ValueError(f"{N} tokens do not form a {h}x{w} grid")
    if tuple(grid) == tuple(target):
        return x
    m = x.transpose(1, 2).reshape(B, C, h, w)
    m = F.interpolate(m, size=tuple(target), mode="bilinear", align_corners=False)
    return m.flatten(2).transpose(1, 2)


def student_context_similarity(qkv: dict[str, torch.Tensor], mode: str = "qq", grid: tuple[int, int] | None = None,
                               target_grid: tuple[int, int] | None = None) -> torch.Tensor:
    """The student's context cosine matrix ``S_s (B, M, M)`` from last-block per-head ``q``/``k (B, H, N, d)``.

    ``qq``: ``cos`` of the head-merged ``q``; ``kk``: of ``k``; ``csa``: ``(cos(q, q) + cos(k, k)) / 2``
    (``Justlovesmile/SynCLIP:src/training/synclip.py`` ``get_student_context_similarity``). With
    ``target_grid != grid`` the merged tokens are bilinearly resized to ``target_grid`` first (``M`` = its size).
    """
    if mode not in CONTEXT_MODES:
        raise ValueError(f"context mode must be one of {CONTEXT_MODES}, got {mode!r}")
    names = {"qq": ("q",), "kk": ("k",), "csa": ("q", "k")}[mode]
    sims = []
    for n in names:
        if n not in qkv:
            raise ValueError(f"context mode {mode!r} needs {n!r} in qkv (got {sorted(qkv)})")
        x = merge_heads(qkv[n].float())  # (B, N, H*d)
        if grid is not None and target_grid is not None:
            x = resize_tokens(x, grid, target_grid)  # (B, M, H*d)
        x = F.normalize(x, dim=-1)
        sims.append(x @ x.transpose(1, 2))  # (B, M, M)
    return sims[0] if len(sims) == 1 else (sims[0] + sims[1]) / 2


def context_loss(student_sim: torch.Tensor, teacher_sim: torch.Tensor) -> torch.Tensor:
    """``mean_{b, m} || S_t[b, m, :] - S_s[b, m, :] ||_2`` for ``(B, M, M)`` similarity matrices.

    DeCLIP's context loss (``xiaomoguhz/DeCLIP:src/training/declip.py`` ``DeCLIP.__call__``): the row-wise
    L2 norm (not squared, not an MSE), averaged over images and rows. 0 iff the matrices are equal.
    """
    if student_sim.ndim != 3 or student_sim.shape != teacher_sim.shape:
        raise ValueError(f"student_sim and teacher_sim must both be (B, M, M); got {tuple(student_sim.shape)} and "
                         f"{tuple(teacher_sim.shape)}")
    diff = teacher_sim.float() - student_sim.float()  # (B, M, M)
    return torch.linalg.vector_norm(diff, dim=-1).mean()


def vfm_grid(vfm: torch.nn.Module, vfm_images: torch.Tensor) -> tuple[int, int]:
    """The VFM's own token grid ``(h', w')`` of ``vfm_images (B, 3, H, W)``; an error unless the size is a
    multiple of its patch."""
    p = vfm.patch_embed.patch_size
    ph, pw = (p, p) if isinstance(p, int) else tuple(p)
    H, W = vfm_images.shape[-2:]
    if H % ph or W % pw:
        raise ValueError(f"vfm_images of size {H}x{W} are not a multiple of the VFM patch {ph}x{pw}")
    return H // ph, W // pw


@dataclass(frozen=True)
class DeCLIPOptions:
    """``mode``: the context branch's attention (``qq`` | ``csa``); ``scale``: scale the attention logits."""

    mode: str = "qq"
    scale: bool = False


class DeCLIP(Distiller):
    """DeCLIP's content + context distillation (loss terms ``content``, ``context``; unweighted).

    Options (``DistillConfig.method_args``): ``mode`` ``"qq"`` (``main`` scripts, default) | ``"csa"`` (the
    released checkpoints) | ``"kk"``; ``scale`` multiply the last-block logits by ``d^-1/2`` (False, as
    ``main``; True = the ZSSS branch). Batch keys: ``images``, ``boxes``, ``crops``, ``vfm_images``.
    """

    name = "declip"
    loss_names = ("content", "context")
    needs = frozenset({"teacher", "vfm"})
    eval_pooling = "pool-then-normalize"  # xiaomoguhz/DeCLIP zero_shot.py (reference §3.5); SynCLIP inherits it

    option_types = (DeCLIPOptions,)

    def __init__(self, student, frozen, mode: str = "qq", scale: bool = False, **options: Any):
        super().__init__(student, frozen, **options)
        if mode not in CONTEXT_MODES:
            raise ValueError(f"{self.name}: mode must be one of {CONTEXT_MODES}, got {mode!r}")
        self.mode, self.scale = mode, bool(scale)

    def student_dense(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Unnormalised projected map ``(B, C, h, w)`` and the last block's per-head q/k/v ``(B, H, N, d)``."""
        return dense_features(self.student, images, self.mode, normalize=False, scale=self.scale, residual=False,
                              ffn=False, rope=False, return_qkv=True)

    @torch.no_grad()
    def vfm_similarity(self, vfm_images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """The VFM's patch cosine matrix ``(B, M, M)`` on the VFM's own grid of ``vfm_images``, and that grid."""
        vfm = self.frozen["vfm"]
        grid = vfm_grid(vfm, vfm_images)
        feats = self.frozen_call("vfm.patch_features", vfm, lambda x: vfm_patch_features(vfm, x, grid),
                                 vfm_images)  # (B, C_v, h', w'), cached per image
        return patch_correlation(feats.float()), grid

    def losses(self, batch: dict[str, Any], dense: torch.Tensor, qkv: dict[str, torch.Tensor],
               vfm_sim: torch.Tensor, vfm_grid: tuple[int, int]) -> dict[str, torch.Tensor]:
        images = batch["images"]  # (B, 3, S, S)
        rois = roi_features(dense, batch["boxes"], images.shape[-2:])  # (R, C) of the unnormalised map
        teacher = self.teacher_crop_cls(batch["crops"])  # (R, C) CLS of each crop, no grad
        s_sim = student_context_similarity(qkv, self.mode, tuple(dense.shape[-2:]), vfm_grid)  # (B, M, M)
        return {"content": content_loss(rois, teacher), "context": context_loss(s_sim, vfm_sim)}

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if "vfm_images" not in batch:
            raise KeyError(f"{self.name} needs batch['vfm_images'] (set vfm=... in the recipe)")
        dense, qkv = self.student_dense(batch["images"])
        vfm_sim, vfm_grid = self.vfm_similarity(batch["vfm_images"])
        return self.losses(batch, dense, qkv, vfm_sim, vfm_grid)
