"""Pure metric functions shared by every evaluation protocol.

* region classification: :func:`topk_hits`, :func:`mean_class_accuracy` (CLIPSelf's ``macc``: the mean over
  the classes present of the per-class accuracy, ``wusize/CLIPSelf:src/training/zero_shot.py`` ``_macc``);
* segmentation: :func:`confusion_matrix`, :func:`iou_acc_from_confusion` (mmseg ``IoUMetric`` convention:
  a class absent from both the ground truth and the prediction has IoU ``nan`` and is excluded from the mean);

Their uncertainty (bootstrap over images, tests over seeds) lives in :mod:`ovlib.stats`.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "topk_hits",
    "mean_class_accuracy",
    "per_class_counts",
    "macc_from_counts",
    "confusion_matrix",
    "iou_acc_from_confusion",
    "miou_over",
    "miou_from_confusion",
    "miou_statistic",
]


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, torch.Tensor]:
    """``logits (N, C)``, ``labels (N,)`` class indices -> ``{k: (N,) bool}``: is the label among the top k.

    ``k`` larger than ``C`` is clipped to ``C`` (every label is then a hit).
    """
    if logits.ndim != 2 or labels.ndim != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"topk_hits: logits must be (N, C) and labels (N,), got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    n, c = logits.shape
    if n and (labels.min() < 0 or labels.max() >= c):
        raise ValueError(f"topk_hits: labels must lie in [0, {c}), got range [{labels.min()}, {labels.max()}]")
    out = {}
    kmax = min(max(ks), c) if ks else 0
    top = logits.topk(kmax, dim=1).indices if n and kmax else torch.zeros(n, 0, dtype=torch.long)  # (N, kmax)
    for k in ks:
        out[k] = (top[:, : min(k, c)] == labels[:, None]).any(dim=1)
    return out


def per_class_counts(hits: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(hits per class, samples per class)``, both ``(num_classes,)`` int64."""
    hits = np.asarray(hits, dtype=bool).reshape(-1)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if hits.shape != labels.shape:
        raise ValueError(f"hits {hits.shape} and labels {labels.shape} differ in shape")
    return (np.bincount(labels[hits], minlength=num_classes)[:num_classes].astype(np.int64),
            np.bincount(labels, minlength=num_classes)[:num_classes].astype(np.int64))


def macc_from_counts(hits: np.ndarray, totals: np.ndarray) -> float:
    """Mean over classes with ``totals > 0`` of ``hits / totals``, in percent; ``nan`` if no class is present."""
    hits, totals = np.asarray(hits, dtype=np.float64), np.asarray(totals, dtype=np.float64)
    present = totals > 0
    if not present.any():
        return float("nan")
    return float(100.0 * np.mean(hits[present] / totals[present]))


def mean_class_accuracy(hits: np.ndarray, labels: np.ndarray, num_classes: int | None = None) -> float:
    """CLIPSelf's ``macc`` in percent: a class that never occurs as a label does not count (not a zero)."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.size else 0
    return macc_from_counts(*per_class_counts(hits, labels, num_classes))


def confusion_matrix(pred: torch.Tensor | np.ndarray, gt: torch.Tensor | np.ndarray, num_classes: int,
                     ignore_index: int = -1) -> np.ndarray:
    """``(C, C)`` int64 matrix, rows = ground truth, columns = prediction; ``gt == ignore_index`` pixels skipped.

    A ground-truth or predicted label outside ``[0, C)`` (other than the ignore index) is an error.
    """
    pred = torch.as_tensor(pred).reshape(-1).long().cpu()  # predictions may come from a GPU, ground truth not
    gt = torch.as_tensor(gt).reshape(-1).long().cpu()
    if pred.shape != gt.shape:
        raise ValueError(f"confusion_matrix: pred and gt must have the same number of pixels, got "
                         f"{pred.numel()} and {gt.numel()}")
    keep = gt != ignore_index
    pred, gt = pred[keep], gt[keep]
    for name, t in (("gt", gt), ("pred", pred)):
        if t.numel() and (t.min() < 0 or t.max() >= num_classes):
            raise ValueError(f"confusion_matrix: {name} labels must lie in [0, {num_classes}) "
                             f"(or be the ignore index {ignore_index}), got [{t.min()}, {t.max()}]")
    idx = gt * num_classes + pred
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes).numpy()


def iou_acc_from_confusion(conf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class IoU and accuracy (percent). IoU is ``nan`` for a class absent from GT *and* prediction
    (mmseg: ``0/0``); accuracy is ``nan`` for a class absent from GT."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    gt_n = conf.sum(1)
    pred_n = conf.sum(0)
    union = gt_n + pred_n - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, 100.0 * tp / union, np.nan)
        acc = np.where(gt_n > 0, 100.0 * tp / gt_n, np.nan)
    return iou, acc


def miou_from_confusion(conf: np.ndarray) -> tuple[float, float]:
    """``(mIoU, mAcc)`` in percent, nan-classes excluded; ``nan`` if nothing is defined."""
    iou, acc = iou_acc_from_confusion(conf)
    m1 = float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")
    m2 = float(np.nanmean(acc)) if np.isfinite(acc).any() else float("nan")
    return m1, m2


def miou_over(conf: np.ndarray, rows) -> float:
    """mIoU (percent) over the classes ``rows`` only (e.g. the novel classes) of a confusion matrix; classes
    absent from ground truth and prediction are excluded as in :func:`miou_from_confusion`; ``nan`` if none."""
    iou = iou_acc_from_confusion(conf)[0][np.asarray(rows, dtype=np.int64)]
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


def miou_statistic(selection: np.ndarray | None = None):
    """``conf (C, C) -> mIoU`` (percent) over the classes of the boolean ``selection`` (all when ``None``) with a
    defined IoU (mmseg's nan classes excluded): the statistic a bootstrap over per-image confusions resamples."""

    def f(conf: np.ndarray) -> float:
        iou, _ = iou_acc_from_confusion(conf)
        x = iou if selection is None else iou[: len(selection)][np.asarray(selection, dtype=bool)]
        x = x[np.isfinite(x)]
        return float(x.mean()) if x.size else float("nan")

    return f
