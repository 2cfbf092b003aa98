"""Unsupervised segmentation of dense features: per-image k-means + Hungarian matching, mIoU.

Protocol (a diagnostic of how well dense tokens group, after DeCLIP's ``tools/k_means.py``, but with a
one-to-one Hungarian assignment instead of "best IoU per cluster", which would let one segment be claimed by
several clusters): for each image, the L2-normalised tokens of the valid (unpadded) part of the feature grid
are clustered by k-means (scikit-learn, fixed seed) with K = the number of ground-truth segments; the cluster
map is upsampled (nearest) to the label map; clusters are assigned one-to-one to segments maximising the total
IoU (``scipy.optimize.linear_sum_assignment``); the image score is the mean IoU over its GT segments (an
unmatched segment scores 0). The dataset score is the mean over images.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans

__all__ = ["kmeans_labels", "iou_matrix", "hungarian_miou"]


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
