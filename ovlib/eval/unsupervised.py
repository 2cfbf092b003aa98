"""Unsupervised segmentation of dense features: per-image k-means + Hungarian matching, mIoU.

Protocol (a diagnostic of how well dense tokens group, after DeCLIP's ``tools/k_means.py``, but with a
one-to-one Hungarian assignment instead of "best IoU per cluster", which would let one segment be claimed by
several clusters): for each image, the L2-normalised tokens of the valid (unpadded) part of the feature grid
are clustered by k-means (scikit-learn, fixed seed) with K = the number of ground-truth segments; the cluster
map is upsampled (nearest) to the label map; clusters are assigned one-to-one to segments maximising the total
IoU (``scipy.optimize.linear_sum_assignment``); the image score is the mean IoU over its GT segments (an
unmatched segment scores 0). The dataset score is the mean over images.

Two references keep the number honest in the micro world, where things and stuff differ in colour:

* :func:`mean_colour_dense` -- **no model**: the mean RGB of each patch as a 3-d token. Whatever a model adds
  over this row is more than colour.
* :func:`equalize_segment_colours` -- the measure colour cannot solve: every GT segment of the image is shifted
  so that its mean colour equals the image's mean colour (its texture, shading and shape are kept). On such
  images the mean-colour tokens carry no segment information beyond boundary patches; k-means on them (the
  ``colour="equalized"`` option of :func:`ovlib.eval.segmentation.evaluate_kmeans`) measures grouping by
  texture and shape.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans

__all__ = ["kmeans_labels", "iou_matrix", "hungarian_miou", "mean_colour_dense", "equalize_segment_colours"]


def kmeans_labels(dense: torch.Tensor, k: int, seed: int = 0, n_init: int = 3) -> np.ndarray:
    """``dense (C, h, w)`` -> ``(h, w)`` int cluster labels from k-means on L2-normalised tokens."""
    if dense.ndim != 3:
        raise ValueError(f"kmeans_labels: dense must be (C, h, w), got {tuple(dense.shape)}")
    c, h, w = dense.shape
    if k < 1:
        raise ValueError(f"kmeans_labels: k must be >= 1, got {k}")
    x = F.normalize(dense.float().reshape(c, h * w).T, dim=-1).cpu().numpy().astype(np.float64)  # (hw, C)
    k = min(k, h * w)
    if k == 1:
        return np.zeros((h, w), dtype=np.int64)
    km = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(x)
    return km.labels_.reshape(h, w).astype(np.int64)


def iou_matrix(pred: np.ndarray, gt: np.ndarray, n_pred: int, n_gt: int, ignore_index: int = -1) -> np.ndarray:
    """``(n_pred, n_gt)`` IoU between every predicted cluster and GT segment (labels ``0..n-1``)."""
    pred = np.asarray(pred).reshape(-1)
    gt = np.asarray(gt).reshape(-1)
    if pred.shape != gt.shape:
        raise ValueError(f"iou_matrix: pred and gt differ in size ({pred.size} vs {gt.size})")
    keep = gt != ignore_index
    pred, gt = pred[keep].astype(np.int64), gt[keep].astype(np.int64)
    inter = np.bincount(pred * n_gt + gt, minlength=n_pred * n_gt).reshape(n_pred, n_gt).astype(np.float64)
    area_p = inter.sum(1, keepdims=True)
    area_g = inter.sum(0, keepdims=True)
    union = area_p + area_g - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def hungarian_miou(pred: np.ndarray, gt: np.ndarray, ignore_index: int = -1) -> tuple[float, dict[int, int]]:
    """One-to-one cluster->segment assignment maximising summed IoU.

    ``pred (H, W)`` cluster labels (any ints), ``gt (H, W)`` segment labels (any ints, ``ignore_index``
    skipped). Returns ``(mIoU in percent over the GT segments, {cluster label: gt label})``.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"hungarian_miou: pred {pred.shape} and gt {gt.shape} must have the same shape")
    valid = gt != ignore_index
    gt_ids = np.unique(gt[valid])
    if gt_ids.size == 0:
        return float("nan"), {}
    pred_ids = np.unique(pred[valid])
    p = np.searchsorted(pred_ids, pred[valid])
    g = np.searchsorted(gt_ids, gt[valid])
    iou = iou_matrix(p, g, pred_ids.size, gt_ids.size)
    rows, cols = linear_sum_assignment(iou, maximize=True)
    per_seg = np.zeros(gt_ids.size)
    per_seg[cols] = iou[rows, cols]
    mapping = {int(pred_ids[r]): int(gt_ids[c]) for r, c in zip(rows, cols)}
    return float(100.0 * per_seg.mean()), mapping


def mean_colour_dense(images: torch.Tensor, patch: int) -> torch.Tensor:
    """The no-model baseline: ``images (B, 3, H, W)`` in [0, 1] -> ``(B, 3, H // patch, W // patch)`` mean RGB of
    every ``patch x patch`` cell, centred at grey (``- 0.5``) so that the L2 normalisation of k-means keeps hue
    *and* brightness differences (a raw RGB direction would merge dark and light versions of a colour)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"mean_colour_dense: images must be (B, 3, H, W), got {tuple(images.shape)}")
    if patch < 1:
        raise ValueError(f"mean_colour_dense: patch must be >= 1, got {patch}")
    return F.avg_pool2d(images.float() - 0.5, patch)


def equalize_segment_colours(image: np.ndarray, segments: np.ndarray, ignore_index: int = -1) -> np.ndarray:
    """``image (H, W, 3) uint8``, ``segments (H, W)`` int segment ids (``ignore_index`` pixels untouched) ->
    ``(H, W, 3) uint8`` where every segment's pixels are shifted by ``image mean - segment mean`` (per channel,
    means over the labelled pixels), then rounded and clipped to [0, 255]. Textures (deviations from the
    segment mean) are kept; the mean colour no longer tells segments apart."""
    img = np.asarray(image)
    seg = np.asarray(segments)
    if img.ndim != 3 or img.shape[2] != 3 or seg.shape != img.shape[:2]:
        raise ValueError(f"equalize_segment_colours: image must be (H, W, 3) and segments (H, W), got "
                         f"{img.shape} and {seg.shape}")
    x = img.astype(np.float64)
    valid = seg != ignore_index
    if not valid.any():
        return img.copy()
    target = x[valid].mean(0)  # (3,)
    ids, inv = np.unique(seg[valid], return_inverse=True)
    sums = np.zeros((ids.size, 3))
    np.add.at(sums, inv, x[valid])
    means = sums / np.bincount(inv, minlength=ids.size)[:, None]  # (S, 3)
    out = x.copy()
    out[valid] = x[valid] - means[inv] + target
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
