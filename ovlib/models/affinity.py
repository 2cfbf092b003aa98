"""Point affinity maps: the cosine similarity of one token to every token of the same dense map.

Used for the figures of chapter 01 (where does a query token "look"?): a well-localised dense representation
gives a map that covers the query's object and nothing else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["pixel_to_cell", "affinity_map", "object_affinity"]


def pixel_to_cell(points_xy: torch.Tensor, image_size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """``(P, 2)`` pixel coordinates ``(x, y)`` in an image tensor of ``image_size=(H, W)`` -> ``(P, 2)`` grid
    cells ``(row, col)`` of a ``grid=(h, w)`` map that covers the same tensor."""
    pts = torch.as_tensor(points_xy, dtype=torch.float64).reshape(-1, 2)
    H, W = image_size
    h, w = grid
    if ((pts[:, 0] < 0) | (pts[:, 0] >= W) | (pts[:, 1] < 0) | (pts[:, 1] >= H)).any():
        raise ValueError(f"pixel_to_cell: points {pts.tolist()} outside the image of size (H, W)={image_size}")
    row = torch.floor(pts[:, 1] * h / H).long().clamp_(0, h - 1)
    col = torch.floor(pts[:, 0] * w / W).long().clamp_(0, w - 1)
    return torch.stack([row, col], dim=1)


def affinity_map(dense: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """``dense (B, C, h, w)``, ``cells (B, 2)`` ``(row, col)`` -> ``(B, h, w)`` cosine of the query token of
    each image to all tokens of the same image (the query cell has value 1)."""
    if dense.ndim != 4:
        raise ValueError(f"affinity_map: dense must be (B, C, h, w), got {tuple(dense.shape)}")
    b, c, h, w = dense.shape
    cells = torch.as_tensor(cells).reshape(-1, 2).long()
    if cells.shape[0] != b:
        raise ValueError(f"affinity_map: need one cell per image, got {cells.shape[0]} for batch {b}")
    if ((cells[:, 0] < 0) | (cells[:, 0] >= h) | (cells[:, 1] < 0) | (cells[:, 1] >= w)).any():
        raise ValueError(f"affinity_map: cells {cells.tolist()} outside the grid ({h}, {w})")
    x = F.normalize(dense.float(), dim=1)  # (B, C, h, w)
    q = x[torch.arange(b), :, cells[:, 0], cells[:, 1]]  # (B, C)
    return torch.einsum("bc,bchw->bhw", q, x)


def object_affinity(dense: torch.Tensor, segments: torch.Tensor, query_ids) -> tuple[float, float]:
    """Does a query token's affinity stay inside its object? ``dense (C, h, w)``, ``segments (h, w)`` int segment
    id of every cell (-1 = none), ``query_ids``: the segments to query. For each, the query is the segment's
    cell nearest to the mean position of its cells; returns the mean over queries of ``(mean affinity to the
    other cells of the segment, mean affinity to cells of other segments)`` -- a good grouping has the first
    high and the second low. Segments with fewer than 2 cells, or no cell outside, are skipped (``nan`` if
    none is left)."""
    if dense.ndim != 3 or segments.shape != dense.shape[1:]:
        raise ValueError(f"object_affinity: dense must be (C, h, w) and segments (h, w), got "
                         f"{tuple(dense.shape)} and {tuple(segments.shape)}")
    inside, outside = [], []
    for sid in query_ids:
        m = segments == int(sid)
        rest = (segments != int(sid)) & (segments >= 0)
        if int(m.sum()) < 2 or not bool(rest.any()):
            continue
        cells = m.nonzero().float()  # (n, 2)
        q = cells[(cells - cells.mean(0)).pow(2).sum(1).argmin()].long()
        a = affinity_map(dense[None], q[None])[0]  # (h, w)
        m_other = m.clone()
        m_other[q[0], q[1]] = False
        inside.append(float(a[m_other].mean()))
        outside.append(float(a[rest].mean()))
    if not inside:
        return float("nan"), float("nan")
    return sum(inside) / len(inside), sum(outside) / len(outside)
