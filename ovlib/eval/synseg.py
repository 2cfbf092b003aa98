"""SynSeg's evaluation (chapter 05): OVSS mIoU of SynSeg's activation maps (one or five views) on a COCO-format
panoptic dataset, with and without a background class, and both protocols of the chapter from one inference
pass per image for SynSeg or a training-free dense baseline. The model and its inference
(:func:`ovlib.methods.synseg.predict_probs`, :func:`~ovlib.methods.synseg.label_map`) live with the method."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ovlib.eval._common import category_index, dataset_indices
from ovlib.eval.metrics import confusion_matrix, iou_acc_from_confusion, miou_from_confusion, miou_statistic
from ovlib.eval.segmentation import _resized, semantic_target, sliding_logits
from ovlib.methods.synseg import SynSeg, label_map, load_synseg, predict_probs
from ovlib.stats import bootstrap_ci
from ovlib.train.pretrain import _quiet

__all__ = ["ProtocolEval", "SynSegEvalConfig", "class_groups", "dense_score_fn", "evaluate_protocols",
           "evaluate_synseg",
           "synseg_from_run", "synseg_score_fn"]


@dataclass(frozen=True)
class SynSegEvalConfig:
    """``image_size``: the side (``resize``: ``"long"`` or ``"short"``, :func:`ovlib.eval.segmentation.resized_size`)
    the image is resized to before the views (aspect kept); ``views``: 5 or 1;
    ``threshold``: activation threshold of the background class; ``background``: evaluate with a background
    class (classes = ``class_ids``; pixels of other segments are background, as VOC / COCO-Object);
    ``present_only``: the classes absent from the image's ground truth are removed before the argmax -- an
    oracle that separates localisation from recognition (not the paper's protocol)."""

    image_size: int = 160
    resize: str = "long"
    views: int = 5
    threshold: float = 0.3
    background: bool = False
    present_only: bool = False  # diagnostic: argmax only among the classes of the image's GT (oracle recognition)


def _target(segments: Sequence[dict], shape: tuple[int, int], cidx: dict[int, int], background: bool,
            ignore_index: int = -1) -> torch.Tensor:
    if not background:
        return semantic_target(segments, shape, cidx, ignore_index)
    bg = len(cidx)
    gt = torch.full(shape, ignore_index, dtype=torch.long)
    for seg in segments:
        gt[torch.as_tensor(np.asarray(seg["mask"]), dtype=torch.bool)] = cidx.get(int(seg["category_id"]), bg)
    return gt


@torch.no_grad()
def evaluate_synseg(model: SynSeg, dataset: Sequence, text: torch.Tensor, class_ids: Sequence[int],
                    cfg: SynSegEvalConfig = SynSegEvalConfig(), thresholds: Sequence[float] | None = None,
                    n_images: int = 0, n_boot: int = 1000, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """mIoU / mAcc (percent, bootstrap intervals over images) of SynSeg on a COCO-format panoptic dataset
    (items with ``image (H, W, 3)`` and ``segments`` with ``mask``/``category_id``), with the metric functions
    of :mod:`ovlib.eval.segmentation`. Returns evaluate_ovss's dict (``miou``, ``macc``, ``confusion``,
    ``iou``); with ``thresholds`` (background mode), ``{threshold: that dict}`` from one inference pass."""
    if thresholds is not None and not cfg.background:
        raise ValueError("thresholds only matter with a background class (cfg.background=True)")
    thr = list(thresholds) if thresholds is not None else [cfg.threshold]
    cidx = category_index(class_ids)
    C = len(class_ids) + (1 if cfg.background else 0)
    bg = len(class_ids) if cfg.background else None
    model.eval()
    confs: dict[float, list[np.ndarray]] = {t: [] for t in thr}
    for i in tqdm(dataset_indices(dataset, n_images), desc="SynSeg OVSS", **_quiet(progress)):
        it = dataset[i]
        image = np.asarray(it["image"])
        H, W = image.shape[:2]
        x = _resized(image, cfg.image_size, side=cfg.resize)  # (3, h, w) in [0, 1]
        probs = predict_probs(model, x, text, cfg.views)  # (C, h, w)
        probs = F.interpolate(probs[None], size=(H, W), mode="bilinear", align_corners=False)[0].cpu()
        gt = _target(it["segments"], (H, W), cidx, cfg.background)
        if cfg.present_only:
            keep = torch.zeros(len(class_ids), dtype=torch.bool)
            keep[[cidx[int(s["category_id"])] for s in it["segments"] if int(s["category_id"]) in cidx]] = True
            probs = torch.where(keep[:, None, None], probs, torch.full_like(probs, -1.0))
        for t in thr:
            confs[t].append(confusion_matrix(label_map(probs, t, bg), gt, C))

    def summary(cs: list[np.ndarray]) -> dict[str, Any]:
        arr = np.stack(cs) if cs else np.zeros((0, C, C), np.int64)
        return {"miou": bootstrap_ci(arr, lambda s: miou_from_confusion(s)[0], n_boot=n_boot, seed=seed),
                "macc": bootstrap_ci(arr, lambda s: miou_from_confusion(s)[1], n_boot=n_boot, seed=seed),
                "confusion": arr, "iou": iou_acc_from_confusion(arr.sum(0))[0] if len(arr) else None}

    if thresholds is None:
        return summary(confs[thr[0]])
    return {t: summary(cs) for t, cs in confs.items()}


# --------------------------------------------------------------------------------------------- all protocols
def _protocol_summary(cs: list[np.ndarray], C: int, n_boot: int, seed: int) -> dict[str, Any]:
    arr = np.stack(cs) if cs else np.zeros((0, C, C), np.int64)
    return {"miou": bootstrap_ci(arr, lambda s: miou_from_confusion(s)[0], n_boot=n_boot, seed=seed),
            "macc": bootstrap_ci(arr, lambda s: miou_from_confusion(s)[1], n_boot=n_boot, seed=seed),
            "confusion": arr, "iou": iou_acc_from_confusion(arr.sum(0))[0] if len(arr) else None}


@torch.no_grad()
def evaluate_protocols(score_fn, dataset: Sequence, class_ids: Sequence[int], fg_ids: Sequence[int],
                       thresholds: Sequence[float], image_size: int = 160, n_images: int = 0, n_boot: int = 1000,
                       seed: int = 0, present_only: bool = False, bg_scores: str = "probs",
                       fg_logit_scale: float = 40.0, resize: str = "long") -> dict[str, Any]:
    """Both OVSS protocols of the chapter from **one** inference pass per image (SynSeg or a training-free
    baseline, the same images and targets):

    * ``"all"``: every class of ``class_ids`` (things + stuff), no background, argmax (Context / Stuff-like);
    * ``"bg"``: the classes ``fg_ids`` (things) + a background class = every pixel of any other segment
      (VOC / COCO-Object-like); a pixel is background when its best foreground score is below the threshold;
      ``{threshold: summary}`` for each of ``thresholds``.

    ``score_fn(image (3, h, w) in [0, 1]) -> (C, h, w)`` scores of the ``class_ids`` rows. ``bg_scores``:
    ``"probs"`` -- the scores are per-class probabilities already (SynSeg's sigmoid maps: foreground rows used
    as they are); ``"cosine"`` -- cosine logits (a training-free CLIP): foreground probabilities are
    ``softmax(fg_logit_scale * cos)`` over the foreground rows only (chapter 01's MaskCLIP-style rule).
    ``present_only``: the ``"all"`` argmax only among the classes of the image's ground truth (an oracle that
    separates localisation from recognition; also reported as ``"oracle"``). ``resize``: which side becomes
    ``image_size`` (``OVSSConfig.resize``: ``"short"`` in the paper profile). Summaries as evaluate_ovss's."""
    if bg_scores not in ("probs", "cosine"):
        raise ValueError(f"bg_scores must be 'probs' or 'cosine', got {bg_scores!r}")
    cidx = category_index(class_ids)
    fidx = category_index(fg_ids)
    missing = [c for c in fidx if c not in cidx]
    if missing:
        raise ValueError(f"foreground ids {missing} are not among class_ids")
    rows = torch.tensor([cidx[c] for c in fg_ids], dtype=torch.long)
    C, Cf = len(class_ids), len(fg_ids) + 1
    confs: dict[str, list[np.ndarray]] = {"all": [], "oracle": []}
    bconfs: dict[float, list[np.ndarray]] = {float(t): [] for t in thresholds}
    for i in dataset_indices(dataset, n_images):
        it = dataset[i]
        image = np.asarray(it["image"])
        H, W = image.shape[:2]
        s = score_fn(_resized(image, image_size, side=resize)).float()  # (C, h, w)
        s = F.interpolate(s[None], size=(H, W), mode="bilinear", align_corners=False)[0].cpu()
        gt = semantic_target(it["segments"], (H, W), cidx)
        confs["all"].append(confusion_matrix(s.argmax(0), gt, C))
        if present_only:
            keep = torch.zeros(C, dtype=torch.bool)
            keep[[cidx[int(g["category_id"])] for g in it["segments"]]] = True
            confs["oracle"].append(confusion_matrix(torch.where(keep[:, None, None], s, s.min() - 1.0).argmax(0),
                                                    gt, C))
        fs = s[rows]  # (Cf-1, H, W)
        prob = fs if bg_scores == "probs" else torch.softmax(fg_logit_scale * fs, dim=0)
        gtb = _target(it["segments"], (H, W), fidx, background=True)
        for t, cs in bconfs.items():
            cs.append(confusion_matrix(label_map(prob, t, len(fg_ids)), gtb, Cf))
    out = {"all": _protocol_summary(confs["all"], C, n_boot, seed),
           "bg": {t: _protocol_summary(cs, Cf, n_boot, seed) for t, cs in bconfs.items()}}
    if present_only:
        out["oracle"] = _protocol_summary(confs["oracle"], C, n_boot, seed)
    return out


def synseg_score_fn(model: SynSeg, text: torch.Tensor, views: int = 5):
    """``image (3, h, w) in [0, 1] -> (C, h, w)`` SynSeg activation probabilities (:func:`predict_probs`)."""
    def fn(image: torch.Tensor) -> torch.Tensor:
        return predict_probs(model, image, text, views)
    return fn


def dense_score_fn(dense_fn, text: torch.Tensor, crop: int, stride: int):
    """``image (3, h, w) in [0, 1] -> (C, h, w)`` sliding-window cosine logits of a training-free dense CLIP
    (:func:`ovlib.eval.segmentation.sliding_logits`, chapter 01's OVSS)."""
    def fn(image: torch.Tensor) -> torch.Tensor:
        return sliding_logits(dense_fn, image, text, crop, stride)
    return fn


# --------------------------------------------------------------------------------------------- study rows
def class_groups(categories: Sequence[dict]) -> dict[str, np.ndarray]:
    """Boolean selections over the rows of ``categories`` (the ``"all"`` protocol's classes): ``base`` -- every
    class the micro CLIPSeg was trained on (``split`` not ``"novel"``: base things and stuff), ``novel`` --
    the novel things (never shown to it), ``stuff``. A dataset without ``split`` (COCO) is all base."""
    split = np.array([str(c.get("split", "base")) for c in categories])
    return {"base": split != "novel", "novel": split == "novel", "stuff": split == "stuff"}


@dataclass
class ProtocolEval:
    """:func:`evaluate_protocols`' result as one evaluation of a study row (:meth:`ovlib.study.Study.record`):
    ``point(metric)`` and ``per_image[metric] = (per-image array, statistic of its sum)`` for

    * ``mIoU`` -- things + stuff, argmax over every class; ``mIoU base`` / ``mIoU novel`` / ``mIoU stuff`` --
      the same confusion matrices, mean IoU over a :func:`class_groups` selection;
    * ``bg mIoU @ t`` -- things + background at threshold ``t``;
    * ``bg spread`` -- max − min of the things + background mIoU over the thresholds, and ``bg spread rule`` --
      that spread minus 10 % of its mean over the thresholds (< 0: "robust" in the chapter's reading of Fig. 3):
      statistics of the per-image confusions of every threshold, ``(N, T, C+1, C+1)``."""

    res: dict[str, Any]
    groups: dict[str, np.ndarray]
    seconds: float = float("nan")
    per_image: dict[str, tuple[np.ndarray, Any]] = field(init=False)

    def __post_init__(self) -> None:
        conf = np.asarray(self.res["all"]["confusion"], dtype=np.float64)  # (N, C, C)
        self.per_image = {"mIoU": (conf, miou_statistic())}
        for g, sel in self.groups.items():
            if np.asarray(sel).any():
                self.per_image[f"mIoU {g}"] = (conf, miou_statistic(sel))
        thr = sorted(self.res["bg"])
        for t in thr:
            self.per_image[f"bg mIoU @ {t:g}"] = (np.asarray(self.res["bg"][t]["confusion"], dtype=np.float64),
                                                   miou_statistic())
        if len(thr) > 1:
            stack = np.stack([np.asarray(self.res["bg"][t]["confusion"], dtype=np.float64) for t in thr], 1)
            self.per_image["bg spread"] = (stack, _spread)
            self.per_image["bg spread rule"] = (stack, _spread_rule)

    def point(self, metric: str) -> float:
        """The metric on all the evaluation images."""
        arr, stat = self._get(metric)
        return float(stat(arr.sum(0)))

    def interval(self, metric: str, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
        """``(point, low, high)``: the percentile bootstrap over the evaluation images (:func:`bootstrap_ci`)."""
        arr, stat = self._get(metric)
        return bootstrap_ci(arr, stat, n_boot=n_boot, seed=seed)

    def _get(self, metric: str) -> tuple[np.ndarray, Any]:
        if metric not in self.per_image:
            raise KeyError(f"ProtocolEval has no metric {metric!r}; known: {sorted(self.per_image)}")
        return self.per_image[metric]


def _bg_curve(conf: np.ndarray) -> np.ndarray:
    """``(T, C, C)`` summed confusions of the thresholds -> ``(T,)`` mIoU."""
    f = miou_statistic()
    return np.array([f(c) for c in conf])


def _spread(conf: np.ndarray) -> float:
    c = _bg_curve(conf)
    return float(c.max() - c.min())


def _spread_rule(conf: np.ndarray) -> float:
    c = _bg_curve(conf)
    return float(c.max() - c.min() - 0.1 * c.mean())


def synseg_from_run(res: Mapping[str, Any], clip: torch.nn.Module, tokenizer: Any, categories: list[dict],
                    device: str | torch.device = "cpu") -> SynSeg:
    """The trained SynSeg of a run (``res``: ``results`` = the run's results.json, ``weights`` = its checkpoint,
    as :meth:`ovlib.study.Study.run` returns them) over the frozen ``clip``, built with the run's own options."""
    rec = json.loads(Path(res["results"]).read_text())
    args = rec["config"]["method_args"]
    return load_synseg(res["weights"], clip, tokenizer, categories=categories, **args).to(device)
