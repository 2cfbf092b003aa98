"""Open-vocabulary detection metrics: COCO box AP through ``pycocotools.COCOeval``, per vocabulary part.

OV-COCO reports box AP50 on the novel categories, the base categories and all of them, from **one** detector run
over the whole vocabulary (the "generalized" setting: novel objects compete with base ones). :func:`coco_box_ap`
restricts ``COCOeval`` to a category subset (``params.catIds``) over the same detections, which is what the
OV-COCO evaluators do (e.g. OVR-CNN's and F-VLM's: AP50 of the novel subset of one result file).
:func:`evaluate_detector` runs a detector over every image of an instances file (images without a box included:
their detections are false positives) and reports ``ap50.novel``, ``ap50.base``, ``ap50.all`` (and AP@[.5:.95]).

**AP over images, for the statistics of the ledger.** AP is not a mean over images, but COCO's AP50 of a category
is a function of *summed per-image counts*: COCOeval matches detections to ground truth image by image (greedy by
score, IoU >= 0.5), and the precision-recall curve only needs, per score level, how many true and false positives
the images have and how many boxes they hold. :func:`ap_counts` writes, per image, per category, the true- and
false-positive counts in ``bins`` fixed score bins (log-spaced from the detector's score threshold to 1; the
same grid for every model, so two models' arrays are comparable) and the number of ground-truth boxes;
:func:`ap50_from_counts` (the statistic) rebuilds COCO's 101-point interpolated AP50 from their sum, averaged over
the categories that have ground truth (``nanmean``, as F-ViT's OV-COCO evaluator). Detections in one bin form one
step of the curve (their order inside it is lost), so it equals COCOeval's AP50 when no bin holds a tie between a
true and a false positive (tested); otherwise COCOeval's AP50 lies between the AP of each bin ranked misses first
and hits first (:func:`ap50_bounds_from_counts`; the one-step reading of a bin is at or near the low end: seen at
micro, a bracket up to 0.8 point wide for 7 novel classes with a few boxes each), and the exact value is reported
beside it. This is what lets :mod:`ovlib.stats` bootstrap detection AP over evaluation images and seeds
like every other metric of the book.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ovlib.data.coco import read_image
from ovlib.data.detection import VocabSplit

__all__ = ["coco_box_ap", "detections_to_coco", "evaluate_detector", "ap_counts", "ap50_from_counts",
           "ap50_bounds_from_counts", "score_bins",
           "DetectionEval", "with_protocol", "evaluate_vocabularies"]

#: COCO's recall thresholds (101 points)
REC_THRS = np.linspace(0.0, 1.0, 101)


def coco_box_ap(coco_gt, detections: Sequence[dict], cat_ids: Sequence[int], img_ids: Sequence[int] | None = None,
                ) -> dict[str, float]:
    """Box AP of ``detections`` (COCO result dicts: ``image_id``, ``category_id``, ``bbox`` xywh, ``score``) against
    the ``pycocotools.coco.COCO`` ``coco_gt``, on the categories ``cat_ids`` and images ``img_ids`` (default all):
    ``{"ap": AP@[.5:.95], "ap50": AP@.5, "ap75": AP@.75}`` in percent (area all, 100 detections per image).
    A subset without any ground-truth box gives NaN (COCOeval's -1); no detection at all gives 0."""
    from pycocotools.cocoeval import COCOeval

    cat_ids = [int(c) for c in cat_ids]
    img_ids = sorted(coco_gt.getImgIds()) if img_ids is None else [int(i) for i in img_ids]
    n_gt = len(coco_gt.getAnnIds(imgIds=img_ids, catIds=cat_ids, iscrowd=False))
    if n_gt == 0:
        return {"ap": math.nan, "ap50": math.nan, "ap75": math.nan}
    dets = [d for d in detections if int(d["category_id"]) in set(cat_ids)]
    if not dets:
        return {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes([dict(d) for d in dets])
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.catIds = cat_ids
        ev.params.imgIds = img_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    s = [float(v) for v in ev.stats[:3]]
    return {k: (math.nan if v < 0 else 100.0 * v) for k, v in zip(("ap", "ap50", "ap75"), s)}


def detections_to_coco(out: dict[str, torch.Tensor], image_id: int, vocab: Sequence[int]) -> list[dict]:
    """One torchvision detection output (``boxes (K, 4)`` xyxy px, ``labels (K,)`` 1-based rows of ``vocab``,
    ``scores (K,)``) as COCO result dicts."""
    boxes = out["boxes"].detach().float().cpu().numpy()
    labels = out["labels"].detach().cpu().numpy()
    scores = out["scores"].detach().float().cpu().numpy()
    res = []
    for b, lab, s in zip(boxes, labels, scores):
        if not 1 <= int(lab) <= len(vocab):
            raise ValueError(f"detection label {int(lab)} is outside the vocabulary's 1..{len(vocab)}")
        res.append({"image_id": int(image_id), "category_id": int(vocab[int(lab) - 1]),
                    "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])], "score": float(s)})
    return res


def score_bins(lo: float, n: int) -> np.ndarray:
    """``n + 1`` ascending bin edges, log-spaced from ``lo`` to 1 (scores below ``lo`` fall in the first bin)."""
    if not 0 < lo < 1 or n < 1:
        raise ValueError(f"score_bins: need 0 < lo < 1 and n >= 1, got {lo}, {n}")
    return np.exp(np.linspace(math.log(lo), 0.0, n + 1))


def ap_counts(coco_gt, detections: Sequence[dict], cat_ids: Sequence[int], img_ids: Sequence[int], edges: np.ndarray,
              ) -> np.ndarray:
    """Per-image AP50 counts ``(I, K, 2 * nb + 1)`` (float64): for image ``i`` and category ``k``, the true positives
    ``[:nb]`` and false positives ``[nb:2nb]`` of each score bin (bins in *descending* score order) at IoU 0.5 and
    the number of its non-crowd ground-truth boxes ``[2nb]``, as COCOeval's ``evaluateImg`` matches them (area all,
    100 detections per image and category)."""
    from pycocotools.cocoeval import COCOeval

    cat_ids, img_ids = [int(c) for c in cat_ids], [int(i) for i in img_ids]
    nb = len(edges) - 1
    out = np.zeros((len(img_ids), len(cat_ids), 2 * nb + 1))
    for ki, c in enumerate(cat_ids):
        for ii, i in enumerate(img_ids):
            out[ii, ki, 2 * nb] = len(coco_gt.getAnnIds(imgIds=[i], catIds=[c], iscrowd=False))
    dets = [dict(d) for d in detections if int(d["category_id"]) in set(cat_ids)]
    if not dets:
        return out
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco_gt, coco_gt.loadRes(dets), "bbox")
        ev.params.catIds, ev.params.imgIds = cat_ids, img_ids
        ev.params.iouThrs = np.array([0.5])
        ev.params.areaRng, ev.params.areaRngLbl = [[0.0, 1e10]], ["all"]
        ev.params.maxDets = [100]
        ev.evaluate()
    # evalImgs is category-major, [k * n_area * n_img + a * n_img + i], over COCOeval's *sorted unique* ids
    cat_row = {c: k for k, c in enumerate(cat_ids)}
    img_row = {i: k for k, i in enumerate(img_ids)}
    n_img = len(ev.params.imgIds)
    for kk, c in enumerate(ev.params.catIds):
        for jj, i in enumerate(ev.params.imgIds):
            e = ev.evalImgs[kk * n_img + jj]
            if e is None:
                continue
            ki, ii = cat_row[int(c)], img_row[int(i)]
            scores = np.asarray(e["dtScores"], dtype=np.float64)
            matched = np.asarray(e["dtMatches"][0]) > 0
            keep = ~np.asarray(e["dtIgnore"][0], dtype=bool)
            b = nb - 1 - np.clip(np.searchsorted(edges, scores, side="right") - 1, 0, nb - 1)  # descending bins
            np.add.at(out[ii, ki], b[keep & matched], 1.0)
            np.add.at(out[ii, ki], nb + b[keep & ~matched], 1.0)
    return out


def ap50_from_counts(s: np.ndarray, n_cat: int) -> float:
    """COCO's 101-point AP50 (percent), averaged over categories with ground truth, from summed :func:`ap_counts`
    (``(K * (2 nb + 1),)`` or ``(K, 2 nb + 1)``); NaN when no category has ground truth.

    The cumulative counts, recall and COCO's precision envelope of every category at once (the bootstrap calls this
    a thousand times per metric); the envelope is read at the first bin whose recall reaches each of the 101
    thresholds, with COCOeval's own ``searchsorted`` per category (the same floating-point comparisons)."""
    s = np.asarray(s, dtype=np.float64).reshape(n_cat, -1)
    nb = (s.shape[1] - 1) // 2
    n_gt = s[:, 2 * nb]  # (K,)
    valid = n_gt > 0
    if not valid.any():
        return float("nan")
    s, n_gt = s[valid], n_gt[valid]
    tp, fp = np.cumsum(s[:, :nb], axis=1), np.cumsum(s[:, nb:2 * nb], axis=1)  # (K, nb)
    rc = tp / n_gt[:, None]
    pr = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1e-12), 0.0)
    pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]  # COCO's precision envelope
    idx = np.stack([np.searchsorted(r, REC_THRS, side="left") for r in rc])  # (K, 101): first bin reaching each
    q = np.where(idx < nb, np.take_along_axis(pr, np.minimum(idx, nb - 1), axis=1), 0.0)
    return float(np.mean(100.0 * q.mean(axis=1)))


def _ap50_of_sequence(tp: np.ndarray, n_gt: float) -> float:
    """COCOeval's 101-point AP50 of one category from its detections' match flags ``tp (D,)`` in ranking order."""
    if tp.size == 0:
        return 0.0
    ctp, cfp = np.cumsum(tp), np.cumsum(1.0 - tp)
    rc, pr = ctp / n_gt, ctp / (ctp + cfp)
    pr = np.maximum.accumulate(pr[::-1])[::-1]
    idx = np.searchsorted(rc, REC_THRS, side="left")
    return 100.0 * float(np.where(idx < tp.size, pr[np.minimum(idx, tp.size - 1)], 0.0).mean())


def ap50_bounds_from_counts(s: np.ndarray, n_cat: int) -> tuple[float, float]:
    """``(low, high)``: the AP50 (as :func:`ap50_from_counts`) when the detections inside every score bin are ranked
    false positives first, and true positives first. A bin loses its detections' order, and AP only grows when a
    true positive moves ahead of a false positive, so COCOeval's AP of the same detections -- and the binned
    statistic -- lie in ``[low, high]``; ``low == high`` when no bin holds both."""
    s = np.asarray(s, dtype=np.float64).reshape(n_cat, -1)
    nb = (s.shape[1] - 1) // 2
    lo, hi = [], []
    for row in s:
        if row[2 * nb] <= 0:
            continue
        tp, fp = np.rint(row[:nb]).astype(np.int64), np.rint(row[nb:2 * nb]).astype(np.int64)
        for out, first, counts in ((lo, 0.0, np.stack([fp, tp], 1)), (hi, 1.0, np.stack([tp, fp], 1))):
            flags = np.tile([first, 1.0 - first], nb)  # per bin: the first kind, then the other
            out.append(_ap50_of_sequence(np.repeat(flags, counts.ravel()), row[2 * nb]))
    return (float(np.mean(lo)), float(np.mean(hi))) if lo else (float("nan"), float("nan"))


@dataclass
class DetectionEval:
    """AP of one detector (percent). ``ci[m] = (point, lo, hi)``: the point from the summed per-image counts (95 %
    bootstrap over images); ``per_image[m] = (counts (I, K * (2 nb + 1)), statistic)`` for :mod:`ovlib.stats`;
    ``exact``: COCOeval's own AP50 / AP of each part (the binned point differs only by ties inside a score bin)."""

    name: str
    ci: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    per_image: dict[str, tuple[np.ndarray, Callable[[np.ndarray], float]]] = field(default_factory=dict)
    exact: dict[str, float] = field(default_factory=dict)
    images: int = 0
    detections: int = 0
    seconds: float = 0.0

    def point(self, metric: str) -> float:
        return self.ci[metric][0] if metric in self.ci else float("nan")


@torch.no_grad()
def _detect(detector: torch.nn.Module, root, split: str, vocab: VocabSplit, batch_size: int, max_images: int | None,
            device, vocabularies: Sequence[tuple] | None) -> tuple[Any, list[int], list[list[dict]]]:
    """``(COCO ground truth, image ids, [COCO result dicts per vocabulary])`` of one pass over the images."""
    from pycocotools.coco import COCO

    ann = Path(root) / "annotations" / f"instances_{split}.json"
    if not ann.is_file():
        raise FileNotFoundError(f"instances annotation file not found: {ann}")
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann))
    img_ids = sorted(gt.getImgIds())[:max_images]
    was_training = detector.training
    detector.eval()
    dets: list[list[dict]] = [[] for _ in (vocabularies or [None])]
    for s in range(0, len(img_ids), batch_size):
        ids = img_ids[s:s + batch_size]
        images = []
        for i in ids:
            im = read_image(Path(root) / split / gt.imgs[i]["file_name"])  # (H, W, 3) uint8
            images.append(torch.from_numpy(np.array(im)).permute(2, 0, 1).float().div_(255).to(device))
        outs = detector(images, vocabularies=vocabularies) if vocabularies else [detector(images)]
        for k, out in enumerate(outs):
            for i, o in zip(ids, out):
                dets[k] += detections_to_coco(o, i, vocab.vocab)
    detector.train(was_training)
    return gt, img_ids, dets


def _score(gt, img_ids: list[int], dets: list[dict], vocab: VocabSplit, name: str, score_lo: float, bins: int,
           n_boot: int, seed: int) -> DetectionEval:
    from ovlib.stats import bootstrap_ci

    ev = DetectionEval(name, images=len(img_ids), detections=len(dets))
    counts = ap_counts(gt, dets, vocab.vocab, img_ids, score_bins(score_lo, bins))  # (I, K, 2 nb + 1)
    col = vocab.index
    for part, cats in (("novel", vocab.novel), ("base", vocab.base), ("all", vocab.vocab)):
        if not cats:
            continue
        exact = coco_box_ap(gt, dets, cats, img_ids)
        ev.exact[f"ap50.{part}"], ev.exact[f"ap.{part}"] = exact["ap50"], exact["ap"]
        arr = counts[:, [col[c] for c in cats]].reshape(len(img_ids), -1)  # (I, K_part * (2 nb + 1))
        stat = functools.partial(ap50_from_counts, n_cat=len(cats))
        ev.ci[f"ap50.{part}"] = bootstrap_ci(arr, stat, n_boot=n_boot, seed=seed)
        ev.per_image[f"ap50.{part}"] = (arr, stat)
    return ev


def evaluate_detector(detector: torch.nn.Module, root, split: str, vocab: VocabSplit, batch_size: int = 4,
                      max_images: int | None = None, device: str | torch.device = "cpu", name: str = "",
                      score_lo: float = 0.01, bins: int = 500, n_boot: int = 1000, seed: int = 0) -> DetectionEval:
    """AP of ``detector`` (a torchvision-style detection model whose labels are 1-based rows of ``vocab.vocab``;
    the caller sets its vocabulary to ``vocab.vocab``, with whatever class names it tests) on every image of
    ``root/annotations/instances_{split}.json`` (the first ``max_images`` in id order when given; images without a
    box included).

    Metrics (percent): ``ap50.novel``, ``ap50.base``, ``ap50.all`` (``all`` = base + novel, the OV vocabulary,
    not every category of the file), each with its per-image counts (:func:`ap_counts` on ``bins`` score bins from
    ``score_lo``, the detector's score threshold) and a bootstrap interval over images; ``exact`` holds COCOeval's
    AP50 and AP@[.5:.95] of each part."""
    t0 = time.perf_counter()
    gt, img_ids, (dets,) = _detect(detector, root, split, vocab, batch_size, max_images, device, None)
    ev = _score(gt, img_ids, dets, vocab, name, score_lo, bins, n_boot, seed)
    ev.seconds = time.perf_counter() - t0
    return ev


def evaluate_vocabularies(detector: torch.nn.Module, root, split: str, vocab: VocabSplit,
                          vocabularies: Mapping[str, tuple], batch_size: int = 4, max_images: int | None = None,
                          device: str | torch.device = "cpu", name: str = "", score_lo: float = 0.01, bins: int = 500,
                          n_boot: int = 1000, seed: int = 0) -> dict[str, DetectionEval]:
    """:func:`evaluate_detector` under several sets of class names at once: ``vocabularies`` maps a protocol name
    to ``(text (C, D), background (D,), novel (C,))`` of ``vocab.vocab`` (``FViT.forward``'s ``vocabularies``: the
    images, proposals and box features are computed once; only the scores differ). Returns one
    :class:`DetectionEval` per protocol (``seconds``: the shared pass split evenly, plus its own scoring)."""
    t0 = time.perf_counter()
    keys = list(vocabularies)
    gt, img_ids, dets = _detect(detector, root, split, vocab, batch_size, max_images, device,
                                [vocabularies[k] for k in keys])
    shared = (time.perf_counter() - t0) / len(keys)
    out = {}
    for k, d in zip(keys, dets):
        t1 = time.perf_counter()
        out[k] = _score(gt, img_ids, d, vocab, f"{name} [{k}]" if name else k, score_lo, bins, n_boot, seed)
        out[k].seconds = shared + time.perf_counter() - t1
    return out


def _diff_stat(s: np.ndarray, n: int, f_a: Callable[[np.ndarray], float], f_b: Callable[[np.ndarray], float]
               ) -> float:
    return f_a(s[:n]) - f_b(s[n:])


def with_protocol(orig: DetectionEval, other: DetectionEval, tag: str, n_boot: int = 1000, seed: int = 0
                  ) -> DetectionEval:
    """``orig``'s metrics plus, for every metric ``m`` of both (the same detector, images and bins, another set
    of class names), ``"m [tag]"`` (``other``'s value) and ``"drop m [tag]"`` = ``other − orig``, whose per-image
    array is the two counts side by side (a paired difference, bootstrapped over the shared images)."""
    if other.images != orig.images:
        raise ValueError(f"with_protocol: {other.images} images against {orig.images}")
    out = DetectionEval(orig.name, dict(orig.ci), dict(orig.per_image), dict(orig.exact), orig.images,
                        orig.detections, orig.seconds + other.seconds)
    from ovlib.stats import bootstrap_ci

    for m in orig.per_image:
        if m not in other.per_image:
            continue
        a, fa = other.per_image[m]
        b, fb = orig.per_image[m]
        out.per_image[f"{m} [{tag}]"], out.ci[f"{m} [{tag}]"] = (a, fa), other.ci[m]
        arr = np.concatenate([a, b], axis=1)  # (I, 2 W)
        stat = functools.partial(_diff_stat, n=a.shape[1], f_a=fa, f_b=fb)
        out.per_image[f"drop {m} [{tag}]"] = (arr, stat)
        out.ci[f"drop {m} [{tag}]"] = bootstrap_ci(arr, stat, n_boot=n_boot, seed=seed)
    out.exact.update({f"{k} [{tag}]": v for k, v in other.exact.items()})
    return out
