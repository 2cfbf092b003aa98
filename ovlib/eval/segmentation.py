"""Open-vocabulary semantic segmentation (MaskCLIP-style, training-free) and the k-means grouping diagnostic
over a COCO-format panoptic dataset.

OVSS protocol (``reference/implementations.md`` section 8.5; SCLIP/ClearCLIP/NACLIP segmentors, conventions
only): the image is resized, aspect kept, so that its longest side (``resize="long"``, the micro profile's
choice) or its short side (``resize="short"``, SCLIP's ``Resize(scale=(2048, S), keep_ratio=True)``, the
paper profile's) is ``image_size`` (:func:`resized_size`); a ``crop x crop`` window
slides with ``stride`` (the last window is aligned to the border; an image smaller than a crop is
zero-padded); each window's unit-norm dense map gives cosine logits against unit class embeddings, bilinearly
upsampled to the window; overlapping logits are averaged; the map is upsampled to the original image size;
``softmax(logit_scale * cos)``; argmax; with ``prob_threshold`` pixels whose max probability is lower go to
``background_index`` (datasets with a background class only). Classes with several names (``query_class``):
the softmax runs over all names and a class takes the max probability of its names (SCLIP/ProxyCLIP
``postprocess_result``); ``area_threshold`` (SCLIP's ``area_thd``, VOC21) zeroes the probabilities of
foreground classes predicted on fewer than that fraction of the foreground-predicted pixels before the
argmax. Ground truth: every pixel of a panoptic segment takes its category; pixels of no segment are
ignored; or, for the standard benchmarks (:mod:`ovlib.data.benchmarks`), an item's ``label (H, W)`` map with
255 = ignore. mIoU / mAcc from the summed confusion matrix; a class
absent from both ground truth and prediction is excluded from the mean (mmseg ``IoUMetric``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ovlib.eval._common import category_index, dataset_indices
from ovlib.eval.metrics import confusion_matrix, iou_acc_from_confusion, miou_from_confusion
from ovlib.eval.unsupervised import equalize_segment_colours, hungarian_miou, kmeans_labels
from ovlib.stats import Sample, bootstrap_ci, ratio_stat
from ovlib.train.pretrain import _quiet

__all__ = ["kmeans_sample", "OVSSConfig", "RESIZE_SIDES", "resized_size", "window_starts", "sliding_logits",
           "predict_labels", "semantic_target", "label_target", "evaluate_ovss", "evaluate_kmeans",
           "evaluate_object_affinity"]

#: ``"long"``: the longest side becomes ``image_size``; ``"short"``: the short side does (SCLIP-style).
RESIZE_SIDES = ("long", "short")


@dataclass(frozen=True)
class OVSSConfig:
    """Settings of :func:`evaluate_ovss` (see the module docstring).

    ``resize`` names which side becomes ``image_size``; with ``"short"`` the longest side is also capped at
    ``max_long`` (mmseg's ``scale=(max_long, image_size)``). ``area_threshold``: SCLIP's ``area_thd``."""

    image_size: int = 160
    crop: int = 64
    stride: int = 32
    logit_scale: float = 40.0
    prob_threshold: float | None = None
    background_index: int | None = None
    resize: str = "long"
    max_long: int = 2048
    area_threshold: float | None = None

    def __post_init__(self):
        if self.resize not in RESIZE_SIDES:
            raise ValueError(f"OVSSConfig.resize must be one of {RESIZE_SIDES}, got {self.resize!r}")


def resized_size(H: int, W: int, size: int, side: str = "long", max_long: int = 2048) -> tuple[int, int]:
    """``(h, w)`` of an ``H x W`` image resized with its aspect kept.

    ``side="long"``: the longest side becomes ``size`` (``round``). ``side="short"``: mmcv's ``rescale_size``
    for ``scale=(max_long, size)``, as SCLIP/ClearCLIP/NACLIP/ProxyCLIP's ``Resize(scale=(2048, S),
    keep_ratio=True)``: factor ``min(max_long / max(H, W), size / min(H, W))``, sides ``int(x * f + 0.5)``
    (``open-mmlab/mmcv:mmcv/image/geometric.py`` ``rescale_size``/``_scale_size``)."""
    if side == "long":
        s = size / max(H, W)
        return max(1, round(H * s)), max(1, round(W * s))
    if side == "short":
        f = min(max(max_long, size) / max(H, W), min(max_long, size) / min(H, W))
        return max(1, int(H * f + 0.5)), max(1, int(W * f + 0.5))
    raise ValueError(f"side must be one of {RESIZE_SIDES}, got {side!r}")


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Start offsets of windows of ``crop`` covering ``[0, length)`` with ``stride``; the last one ends at
    ``length`` (mmseg ``slide_inference``). A length shorter than the crop gives one window at 0."""
    if crop <= 0 or stride <= 0:
        raise ValueError(f"crop and stride must be > 0, got {crop}, {stride}")
    if length <= crop:
        return [0]
    n = (length - crop + stride - 1) // stride + 1
    return sorted({min(i * stride, length - crop) for i in range(n)})


@torch.no_grad()
def sliding_logits(dense_fn: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, text: torch.Tensor,
                   crop: int, stride: int) -> torch.Tensor:
    """``image (3, H, W)`` in [0, 1], ``text (C, D)`` unit norm -> ``(C, H, W)`` cosine logits averaged over
    the sliding windows (each window's map bilinearly upsampled to the window)."""
    _, H, W = image.shape
    Hp, Wp = max(H, crop), max(W, crop)
    if (Hp, Wp) != (H, W):
        image = F.pad(image, (0, Wp - W, 0, Hp - H))
    ys, xs = window_starts(Hp, crop, stride), window_starts(Wp, crop, stride)
    wins = torch.stack([image[:, y:y + crop, x:x + crop] for y in ys for x in xs])  # (n, 3, crop, crop)
    dense = F.normalize(dense_fn(wins).float(), dim=1)  # (n, D, h, w)
    logits = torch.einsum("ndhw,cd->nchw", dense, text.float().to(dense.device))  # (n, C, h, w)
    logits = F.interpolate(logits, size=(crop, crop), mode="bilinear", align_corners=False)
    acc = torch.zeros(text.shape[0], Hp, Wp, device=logits.device)
    cnt = torch.zeros(1, Hp, Wp, device=logits.device)
    i = 0
    for y in ys:
        for x in xs:
            acc[:, y:y + crop, x:x + crop] += logits[i]
            cnt[:, y:y + crop, x:x + crop] += 1
            i += 1
    return (acc / cnt)[:, :H, :W]


def predict_labels(logits: torch.Tensor, logit_scale: float, prob_threshold: float | None = None,
                   background_index: int | None = None, query_class: Sequence[int] | torch.Tensor | None = None,
                   area_threshold: float | None = None) -> torch.Tensor:
    """``(Q, H, W)`` cosine logits -> ``(H, W)`` labels: argmax of ``softmax(logit_scale * logits)``.

    ``query_class (Q,)``: the class of each text row (several names per class); the softmax runs over all
    ``Q`` rows and a class's probability is the max over its rows (SCLIP ``clip_segmentor.py``
    ``postprocess_result``). ``area_threshold`` (SCLIP ``area_thd``; needs ``background_index``): a
    non-background class predicted on at most that fraction of the non-background-predicted pixels gets
    probability 0. With a ``prob_threshold``, pixels whose max probability is below it get
    ``background_index``."""
    prob = F.softmax(logit_scale * logits.float(), dim=0)  # (Q, H, W)
    if query_class is not None:
        qc = torch.as_tensor(query_class, dtype=torch.long, device=prob.device)
        if qc.shape != (prob.shape[0],):
            raise ValueError(f"query_class must have one entry per text row ({prob.shape[0]}), got {tuple(qc.shape)}")
        n_cls = int(qc.max()) + 1
        if set(qc.tolist()) != set(range(n_cls)):
            raise ValueError(f"query_class must cover every class 0..{n_cls - 1}, got {sorted(set(qc.tolist()))}")
        prob = torch.stack([prob[qc == c].amax(0) for c in range(n_cls)])  # (C, H, W)
    if area_threshold is not None:
        if background_index is None:
            raise ValueError("predict_labels: area_threshold needs a background_index")
        C = prob.shape[0]
        counts = torch.bincount(prob.argmax(0).reshape(-1), minlength=C).to(prob.dtype)  # (C,)
        fg = torch.ones(C, dtype=torch.bool, device=prob.device)
        fg[background_index] = False
        keep = (counts > area_threshold * counts[fg].sum()) | ~fg
        prob = prob * keep.to(prob.dtype)[:, None, None]
    conf, lab = prob.max(0)
    if prob_threshold is not None:
        if background_index is None:
            raise ValueError("predict_labels: prob_threshold needs a background_index")
        lab = torch.where(conf < prob_threshold, torch.full_like(lab, background_index), lab)
    return lab


def semantic_target(segments: Sequence[dict], shape: tuple[int, int], cidx: dict[int, int],
                    ignore_index: int = -1) -> torch.Tensor:
    """``(H, W)`` long: class index of each pixel's segment, ``ignore_index`` where no segment covers it."""
    gt = torch.full(shape, ignore_index, dtype=torch.long)
    for seg in segments:
        c = int(seg["category_id"])
        if c not in cidx:
            raise ValueError(f"segment category {c} is not among the evaluated classes")
        gt[torch.as_tensor(np.asarray(seg["mask"]), dtype=torch.bool)] = cidx[c]
    return gt


def _resized(image: np.ndarray, size: int, multiple: int = 1, side: str = "long",
             max_long: int = 2048) -> torch.Tensor:
    """``(H, W, 3) uint8`` -> ``(3, h, w)`` float [0, 1] resized by :func:`resized_size` (``side="long"``: the
    longest side ``size``; ``"short"``: the short side ``size``, SCLIP-style), bilinear with antialiasing;
    both sides rounded to a multiple of ``multiple`` (the patch size, where a whole image is one forward)."""
    t = torch.from_numpy(np.array(image, dtype=np.float32, copy=True)).permute(2, 0, 1) / 255.0
    H, W = t.shape[-2:]
    h, w = resized_size(H, W, size, side, max_long)
    if multiple > 1:
        h, w = max(multiple, round(h / multiple) * multiple), max(multiple, round(w / multiple) * multiple)
    if (h, w) == (H, W):
        return t
    return F.interpolate(t[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]


def label_target(label: np.ndarray | torch.Tensor, num_classes: int, ignore_label: int = 255,
                 name: str = "label") -> torch.Tensor:
    """A benchmark label map ``(H, W)`` (``ignore_label`` = ignore) -> ``(H, W)`` long with -1 = ignore; a
    value outside ``[0, num_classes)`` is an error naming ``name``."""
    gt = torch.as_tensor(np.asarray(label)).long()
    bad = (gt != ignore_label) & ((gt < 0) | (gt >= num_classes))
    if bool(bad.any()):
        raise ValueError(f"{name}: label value {int(gt[bad][0])} outside [0, {num_classes}) and not the ignore "
                         f"label {ignore_label}")
    return torch.where(gt == ignore_label, torch.full_like(gt, -1), gt)


@torch.no_grad()
def evaluate_ovss(dense_fn: Callable[[torch.Tensor], torch.Tensor], dataset: Sequence, text: torch.Tensor,
                  class_ids: Sequence[int], cfg: OVSSConfig = OVSSConfig(), n_images: int = 0,
                  n_boot: int = 1000, seed: int = 0, progress: bool = True,
                  query_class: Sequence[int] | None = None) -> dict[str, Any]:
    """mIoU / mAcc (percent, with bootstrap intervals over images) of sliding-window OVSS.

    Items are ``{"image", "segments"}`` (COCO-format panoptic; ``class_ids`` = the category ids, one per class)
    or ``{"image", "label"}`` (a benchmark of :mod:`ovlib.data.benchmarks`: ``label (H, W)`` class indices,
    255 = ignore; ``class_ids`` = ``range(num_classes)``). ``text (Q, D)``: one row per class, or one per name
    with ``query_class (Q,)`` giving each row's class.

    Returns ``{"miou": (pt, lo, hi), "macc": (pt, lo, hi), "confusion": (N, C', C') per-image, "iou": per-class,
    "protocol": the settings as a dict}`` where ``C' = C`` (+1 with a background class beyond the classes)."""
    cidx = category_index(class_ids)
    n_cls = len(class_ids)
    if query_class is None and text.shape[0] != n_cls:
        raise ValueError(f"evaluate_ovss: text has {text.shape[0]} rows for {n_cls} classes; pass query_class")
    if query_class is not None and (len(query_class) != text.shape[0] or set(query_class) != set(range(n_cls))):
        raise ValueError(f"evaluate_ovss: query_class must give each of the {text.shape[0]} text rows a class in "
                         f"[0, {n_cls}) and cover every class")
    C = n_cls + (1 if cfg.background_index is not None and cfg.background_index >= n_cls else 0)
    idx = dataset_indices(dataset, n_images)
    confs = []
    for i in tqdm(idx, desc="OVSS", **_quiet(progress)):
        it = dataset[i]
        image = np.asarray(it["image"])
        H, W = image.shape[:2]
        x = _resized(image, cfg.image_size, side=cfg.resize, max_long=cfg.max_long)
        logits = sliding_logits(dense_fn, x, text, cfg.crop, cfg.stride)  # (Q, h, w)
        logits = F.interpolate(logits[None], size=(H, W), mode="bilinear", align_corners=False)[0]
        pred = predict_labels(logits, cfg.logit_scale, cfg.prob_threshold, cfg.background_index, query_class,
                              cfg.area_threshold)
        if "label" in it:
            gt = label_target(it["label"], n_cls, name=str(it.get("label_path", f"item {i}")))
        else:
            gt = semantic_target(it["segments"], (H, W), cidx)
        confs.append(confusion_matrix(pred, gt, C))
    confs = np.stack(confs) if confs else np.zeros((0, C, C), np.int64)
    return {"miou": bootstrap_ci(confs, lambda s: miou_from_confusion(s)[0], n_boot=n_boot, seed=seed),
            "macc": bootstrap_ci(confs, lambda s: miou_from_confusion(s)[1], n_boot=n_boot, seed=seed),
            "confusion": confs, "iou": iou_acc_from_confusion(confs.sum(0))[0] if len(confs) else None,
            "protocol": asdict(cfg)}


@torch.no_grad()
def evaluate_kmeans(dense_fn: Callable[[torch.Tensor], torch.Tensor], dataset: Sequence, image_size: int = 160,
                    n_images: int = 0, seed: int = 0, n_boot: int = 1000, patch: int = 8,
                    progress: bool = True, colour: str = "as_is") -> dict[str, Any]:
    """Unsupervised segmentation (``ovlib.eval.unsupervised``): per image, k-means with K = number of GT
    panoptic segments on the unit-norm dense map of the image (longest side ``image_size``, sides rounded
    to multiples of ``patch``, unpadded), the
    cluster map upsampled (nearest) to the image, Hungarian matching to the segments, mean IoU over segments.
    ``colour="equalized"``: every segment's mean colour is first moved to the image's
    (:func:`~ovlib.eval.unsupervised.equalize_segment_colours`), so colour alone cannot group.
    Returns ``{"miou": (pt, lo, hi) over images, "per_image": (N,)}``."""
    if colour not in ("as_is", "equalized"):
        raise ValueError(f"evaluate_kmeans: colour must be 'as_is' or 'equalized', got {colour!r}")
    idx = dataset_indices(dataset, n_images)
    per = []
    for i in tqdm(idx, desc="k-means", **_quiet(progress)):
        it = dataset[i]
        image = np.asarray(it["image"])
        H, W = image.shape[:2]
        segs = it["segments"]
        if not segs:
            continue
        gt = np.full((H, W), -1, dtype=np.int64)
        for j, seg in enumerate(segs):
            gt[np.asarray(seg["mask"], dtype=bool)] = j
        if colour == "equalized":
            image = equalize_segment_colours(image, gt)
        x = _resized(image, image_size, patch)
        dense = dense_fn(x[None])[0]  # (C, h, w)
        lab = kmeans_labels(dense, k=len(segs), seed=seed)
        up = F.interpolate(torch.as_tensor(lab)[None, None].float(), size=(H, W), mode="nearest")[0, 0].long()
        per.append(hungarian_miou(up.numpy(), gt)[0])
    per = np.asarray(per, dtype=np.float64)  # (N,) image scores; the mean's interval by resampling images
    arr = np.stack([per, np.ones_like(per)], 1) if per.size else np.zeros((0, 2))
    return {"miou": bootstrap_ci(arr, lambda s: s[0] / s[1], n_boot=n_boot, seed=seed), "per_image": per}


@torch.no_grad()
def evaluate_object_affinity(dense_fn: Callable[[torch.Tensor], torch.Tensor], dataset: Sequence,
                             image_size: int = 160, n_images: int = 0, seed: int = 0, n_boot: int = 1000,
                             patch: int = 8) -> dict[str, Any]:
    """Point affinity inside vs outside the query's object (:func:`ovlib.models.affinity.object_affinity`), over
    the thing segments of each image (the cell grid labelled by the segment at each cell's centre pixel).
    Returns ``{"inside": (pt, lo, hi), "outside": (pt, lo, hi)}``: per-image means, intervals over images."""
    from ovlib.models.affinity import object_affinity

    per = []
    for i in dataset_indices(dataset, n_images):
        it = dataset[i]
        image = np.asarray(it["image"])
        H, W = image.shape[:2]
        segs = it["segments"]
        gt = np.full((H, W), -1, dtype=np.int64)
        for j, seg in enumerate(segs):
            gt[np.asarray(seg["mask"], dtype=bool)] = j
        dense = dense_fn(_resized(image, image_size, patch)[None])[0].float().cpu()  # (C, h, w)
        h, w = dense.shape[-2:]
        rows = np.minimum(((np.arange(h) + 0.5) * H / h).astype(int), H - 1)
        cols = np.minimum(((np.arange(w) + 0.5) * W / w).astype(int), W - 1)
        cells = torch.from_numpy(gt[np.ix_(rows, cols)])  # (h, w) segment of each cell centre
        inside, outside = object_affinity(dense, cells, [j for j, s in enumerate(segs) if s.get("isthing", True)])
        if not np.isnan(inside):
            per.append((inside, outside))
    arr = np.asarray(per, dtype=np.float64).reshape(-1, 2)
    ones = np.ones((arr.shape[0], 1))
    return {k: bootstrap_ci(np.concatenate([arr[:, j:j + 1], ones], 1), lambda s: s[0] / s[1], n_boot=n_boot,
                            seed=seed) for j, k in enumerate(("inside", "outside"))}


def kmeans_sample(res: dict[str, Any]) -> Sample:
    """An :func:`evaluate_kmeans` result of a deterministic model (frozen CLIP, an aggregate of it) as a fixed
    :class:`ovlib.stats.Sample` of per-image ``[mIoU, 1]`` (the mean over images): what claims compare."""
    per = np.asarray(res["per_image"], dtype=np.float64)  # (N,)
    return Sample((np.stack([per, np.ones_like(per)], 1),), ratio_stat, fixed=True)
