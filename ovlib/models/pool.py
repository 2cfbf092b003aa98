"""Region pooling of dense maps: RoIAlign over boxes and average pooling over masks.

Conventions (``reference/implementations.md`` §1.5, §1.7):

* :func:`roi_features` -- boxes are ``xyxy`` in pixels of the input image tensor of size ``image_size = (H, W)``;
  they are converted once to feature-grid units (``x * w / W``, ``y * h / H``) and pooled with
  ``torchvision.ops.roi_align(aligned=True, sampling_ratio=-1, spatial_scale=1)``, as
  ``wusize/CLIPSelf:src/open_clip/eva_clip/eva_vit_model.py`` ``_denormalize_boxes`` + ``extract_roi_features``.
  With ``aligned=True`` the box ``[j, i, j+1, i+1]`` (grid units) pools exactly token ``(i, j)``.
* :func:`mask_pool` -- ``sum(f * m) / sum(m)`` per mask (``wusize/CLIPSelf`` ``mask_pool``), masks given at
  feature-grid resolution.

Whether the map is L2-normalised before pooling is the caller's choice (CLIPSelf: before; DeCLIP/SynCLIP:
after), see :mod:`ovlib.models.dense`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.ops import roi_align

__all__ = ["roi_features", "mask_pool", "boxes_to_grid"]


def _check_dense(dense: torch.Tensor) -> None:
    if not isinstance(dense, torch.Tensor) or dense.ndim != 4:
        raise ValueError(f"dense must be a (B, C, h, w) tensor, got {getattr(dense, 'shape', type(dense))}")


def boxes_to_grid(boxes: torch.Tensor, image_size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """``(K, 4)`` xyxy boxes in image pixels -> feature-grid units of a ``grid = (h, w)`` map."""
    H, W = image_size
    h, w = grid
    s = boxes.new_tensor([w / W, h / H, w / W, h / H])
    return boxes * s


def roi_features(dense: torch.Tensor, boxes: Sequence[torch.Tensor], image_size: tuple[int, int],
                 output_size: int = 1) -> torch.Tensor:
    """RoIAlign of ``dense (B, C, h, w)`` over per-image boxes.

    Args:
        dense: dense map.
        boxes: list of length B of ``(K_b, 4)`` xyxy boxes in pixels of the input image tensor.
        image_size: ``(H, W)`` of that image tensor.
        output_size: ``k`` of the ``k x k`` output grid.

    Returns:
        ``(R, C)`` for ``output_size == 1`` else ``(R, C, k, k)``, ``R = sum_b K_b`` in batch order.
    """
    _check_dense(dense)
    B, C, h, w = dense.shape
    if len(boxes) != B:
        raise ValueError(f"boxes has {len(boxes)} entries for a batch of {B} dense maps")
    H, W = image_size
    if H <= 0 or W <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if output_size < 1:
        raise ValueError(f"output_size must be >= 1, got {output_size}")
    rois = []
    for b, bx in enumerate(boxes):
        bx = torch.as_tensor(bx, dtype=dense.dtype, device=dense.device)
        if bx.ndim != 2 or bx.shape[1] != 4:
            raise ValueError(f"boxes[{b}] must be (K, 4) xyxy, got shape {tuple(bx.shape)}")
        if not torch.isfinite(bx).all():
            k = int((~torch.isfinite(bx)).any(1).nonzero()[0])
            raise ValueError(f"boxes[{b}][{k}] is not finite: {bx[k].tolist()}")
        bad = (bx[:, 2] <= bx[:, 0]) | (bx[:, 3] <= bx[:, 1])
        if bad.any():
            k = int(bad.nonzero()[0])
            raise ValueError(f"boxes[{b}][{k}] = {bx[k].tolist()} is empty: need x2 > x1 and y2 > y1 (xyxy pixels)")
        g = boxes_to_grid(bx, (H, W), (h, w))
        rois.append(torch.cat([g.new_full((g.shape[0], 1), b), g], dim=1))  # (K, 5) batch index + xyxy
    rois = torch.cat(rois, dim=0) if rois else dense.new_zeros(0, 5)
    out = roi_align(dense, rois, output_size=(output_size, output_size), spatial_scale=1.0,
                    sampling_ratio=-1, aligned=True)  # (R, C, k, k)
    return out[:, :, 0, 0] if output_size == 1 else out


def mask_pool(dense: torch.Tensor, masks: Sequence[torch.Tensor], allow_empty: bool = False) -> torch.Tensor:
    """Average of ``dense (B, C, h, w)`` over each mask: ``sum(f * m) / sum(m)`` -> ``(R, C)``.

    Args:
        masks: list of length B of ``(K_b, h, w)`` bool/float masks at feature-grid resolution (float masks
            weight the average).
        allow_empty: an all-zero mask is an error naming it, unless allowed (then its row is 0).
    """
    _check_dense(dense)
    B, C, h, w = dense.shape
    if len(masks) != B:
        raise ValueError(f"masks has {len(masks)} entries for a batch of {B} dense maps")
    out = []
    for b, m in enumerate(masks):
        m = torch.as_tensor(m, device=dense.device)
        if m.ndim != 3 or tuple(m.shape[1:]) != (h, w):
            raise ValueError(f"masks[{b}] must be (K, {h}, {w}) at the feature grid, got {tuple(m.shape)}")
        m = m.to(dense.dtype)
        if (m < 0).any():
            raise ValueError(f"masks[{b}] has negative weights")
        area = m.flatten(1).sum(1)  # (K,)
        if not allow_empty and (area == 0).any():
            k = int((area == 0).nonzero()[0])
            raise ValueError(f"masks[{b}][{k}] is empty at the {h}x{w} feature grid")
        f = torch.einsum("chw,khw->kc", dense[b], m)  # (K, C)
        out.append(f / area.clamp_min(torch.finfo(dense.dtype).tiny)[:, None])
    return torch.cat(out, dim=0) if out else dense.new_zeros(0, C)
