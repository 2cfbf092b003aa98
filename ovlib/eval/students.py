"""Trained students: train-or-load a distillation run in a config-keyed directory, load its weights into a fresh
CLIP, evaluate it with the chapter-01 protocols, and compare students (across seeds or, for one seed, by a
paired bootstrap over the evaluation images).

* :func:`train_or_load` -- :func:`ovlib.train.launch.launch` into ``root/<name>-<hash>`` where the hash covers
  the resolved :class:`~ovlib.train.distill.DistillConfig` *and* the micro CLIP's pre-training config (the
  distillation config names the backbone, not the weights it was pre-trained to), so a changed recipe or a
  re-trained micro CLIP never reuses a stale run; a finished run is loaded (the trainer resumes at its end).
* :func:`load_student` -- the ``student.*`` weights of a run's ``ensemble-final.pt`` (the alpha ensemble the
  trainer saves, reference section 1.6) loaded into a fresh CLIP built like the trainer builds it.
* :func:`student_dense_fn` -- the dense map a run distils: the CLIP's own dense mode (CLIPSelf family) or, for a
  DenseRC run, the trained :class:`~ovlib.methods.denserc.DenseConstructor` (HSG gates) rebuilt from the run's
  ``method_args``.
* :func:`evaluate_student` -- region classification (boxes / thing masks / stuff masks, Top-1/Top-5 mean
  accuracy; the student's own crop CLS = its *global* zero-shot), sliding-window OVSS mIoU and k-means mIoU,
  on the dense mode the method distils (``x+v`` for the CLIPSelf family, reference section 2.2), or on any
  dense extractor (e.g. a Refiner).
* :func:`paired_diff_ci`, :func:`welch`, :func:`verdict` -- the comparisons behind a chapter's "holds / does not
  hold" statements.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ovlib.eval.metrics import macc_from_counts, miou_from_confusion

__all__ = [
    "METRICS",
    "StudentEval",
    "evaluate_student",
    "load_student",
    "mean_std",
    "paired_diff_ci",
    "run_key",
    "student_dense_fn",
    "train_or_load",
    "verdict",
    "welch",
]

#: Flat metric names of :class:`StudentEval` (percent). ``global.*`` is the model's own CLS of region crops.
METRICS = ("boxes.top1", "boxes.top5", "thing.top1", "thing.top5", "stuff.top1", "stuff.top5",
           "global.thing.top1", "global.stuff.top1", "ovss.miou", "kmeans.miou")


# ------------------------------------------------------------------------------------------------ runs
def run_key(params: Mapping[str, Any], method: str, overrides: Mapping[str, Any] = ()) -> str:
    """Hash of everything a run's weights depend on: the resolved DistillConfig (minus bookkeeping fields) and,
    for a micro backbone without a ``pretrained`` file, the micro CLIP pre-training config of the profile."""
    from ovlib.io import config_hash
    from ovlib.models import MICRO_CLIP_CONFIGS
    from ovlib.train.recipes import distill_config

    cfg = distill_config(params, method, overrides, out_dir="unused")
    key: dict[str, Any] = {k: v for k, v in dataclasses.asdict(cfg).items()
                           if k not in ("out_dir", "device", "num_workers", "log_every", "save_every")}
    if cfg.backbone in MICRO_CLIP_CONFIGS and not cfg.pretrained:
        from ovlib.train.pretrain import pretrain_configs

        clip_cfg, vfm_cfg = pretrain_configs(params["profile"], params["steps_scale"], params["seed"])
        key["_clip_pretrain"] = dataclasses.asdict(clip_cfg)
        if cfg.vfm:
            key["_vfm_pretrain"] = dataclasses.asdict(vfm_cfg)
    return config_hash(key)


def _train_seconds(out_dir: Path) -> float:
    """Training time of a run from its ``metrics.jsonl`` (elapsed seconds of its last record; a run trained in
    several sessions sums the last record of each)."""
    path = out_dir / "metrics.jsonl"
    if not path.is_file():
        return float("nan")
    recs = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    total, prev = 0.0, 0.0
    for r in recs:  # elapsed_s restarts at 0 when a run is resumed
        if r["elapsed_s"] < prev:
            total += prev
        prev = r["elapsed_s"]
    return total + prev


def train_or_load(params: Mapping[str, Any], method: str, overrides: Mapping[str, Any], root: str | Path,
                  name: str) -> dict[str, Any]:
    """Train ``method`` with ``overrides`` into ``root/<name>-<run_key>`` (``name`` with characters other than
    letters, digits, ``.``, ``_``, ``-`` replaced by ``_``) or load the finished run there.

    Returns the launcher's dict (``out_dir``, ``results``, ``weights``, ...) plus ``name``, ``train_s``
    (seconds the training took when it ran, from its log) and ``trained_now`` (False when it was loaded)."""
    from ovlib.train.launch import launch

    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or method  # a portable directory name
    out = Path(root) / f"{safe}-{run_key(params, method, overrides)}"
    done = (out / "results.json").is_file() and (out / "ensemble-final.pt").is_file()
    res = launch(params, method, overrides, out_dir=str(out))
    return {**res, "name": name, "method": method, "train_s": _train_seconds(out), "trained_now": not done}


def load_student(params: Mapping[str, Any], res: Mapping[str, Any], device: str | torch.device = "cpu"):
    """The trained student of a run as a fresh CLIP in eval mode.

    ``res``: a :func:`train_or_load` / ``launch`` result (``results`` = results.json, ``weights`` =
    ensemble-final.pt). The base CLIP is built as the trainer built it (:func:`ovlib.train.launch.build_models`
    with the run's config), then the checkpoint's ``student.*`` entries are loaded strictly."""
    from ovlib.io import safe_load
    from ovlib.train.distill import DistillConfig
    from ovlib.train.launch import build_models

    rec = json.loads(Path(res["results"]).read_text())
    cfg = DistillConfig.from_dict(rec["config"])
    student, _, _, _ = build_models(cfg, params, frozenset())
    ck = safe_load(res["weights"])
    sd = ck["model"] if isinstance(ck, dict) and isinstance(ck.get("model"), dict) else ck
    sub = {k[len("student."):]: v for k, v in sd.items() if k.startswith("student.")}
    if not sub:
        raise ValueError(f"{res['weights']} holds no 'student.*' weights (keys start with "
                         f"{sorted({k.split('.')[0] for k in sd})[:6]})")
    student.load_state_dict(sub)
    return student.to(device).eval().requires_grad_(False)


def student_dense_fn(res: Mapping[str, Any], student: Any, mode: str = "x+v"
                     ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``images (B, 3, H, W) in [0, 1] -> (B, C, h, w)`` unit-norm dense map of a trained run's ``student`` (from
    :func:`load_student`): for a ``denserc`` run its ``X_dense`` -- the constructor built from the run's
    ``method_args`` (results.json) with the ``constructor.*`` weights of ``res["weights"]``
    (:func:`ovlib.methods.denserc.load_constructor`); for any other method the CLIP's dense ``mode``."""
    from ovlib.eval._common import dense_fn_for_clip

    rec = json.loads(Path(res["results"]).read_text())
    cfg = rec["config"]
    if cfg["method"] != "denserc":
        return dense_fn_for_clip(student, mode)
    from ovlib.methods.denserc import denserc_dense_fn, load_constructor

    cons = load_constructor(res["weights"], student, **dict(cfg.get("method_args") or {}))
    cons = cons.to(next(student.parameters()).device)
    return denserc_dense_fn(student, cons)


# ------------------------------------------------------------------------------------------------ evaluation
def _ovss_stat(s: np.ndarray) -> float:
    return miou_from_confusion(s)[0]


def _kmeans_stat(s: np.ndarray) -> float:
    return float(s[0] / s[1]) if s[1] > 0 else float("nan")


@dataclass
class StudentEval:
    """Metrics of one model (percent). ``ci[m] = (point, lo, hi)`` (95 % bootstrap over images);
    ``per_image[m] = (array (N, ...), statistic)`` with ``statistic(array.sum(0)) == ci[m][0]``, for paired
    comparisons of two models evaluated on the same images (:func:`paired_diff_ci`)."""

    name: str
    ci: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    per_image: dict[str, tuple[np.ndarray, Callable[[np.ndarray], float]]] = field(default_factory=dict)
    seconds: float = 0.0
    n_regions: int = 0
    regions: Any = None  # the RegionFeatures, when evaluate_student(keep_regions=True)

    def point(self, metric: str) -> float:
        return self.ci[metric][0] if metric in self.ci else float("nan")


@torch.no_grad()
def evaluate_student(model: Any, dataset: Sequence, text: torch.Tensor, class_ids: Sequence[int], settings: Any,
                     mode: str = "x+v", name: str = "", region_images: int = 0, seg_images: int = 0,
                     region: bool = True, crops: bool = True, ovss: bool = True, kmeans: bool = True,
                     dense_fn: Callable[[torch.Tensor], torch.Tensor] | None = None, seed: int = 0,
                     device: str | torch.device = "cpu", keep_regions: bool = False,
                     progress: bool = False) -> StudentEval:
    """The chapter-01 protocols on one model.

    ``model``: a CLIP (its dense mode ``mode`` and its own crop CLS are evaluated); ``dense_fn`` (images in
    [0, 1] -> ``(B, C, h, w)``) replaces the CLIP's dense map when given (the CLIP still supplies the image
    normalisation and, with ``crops``, the crop CLS). ``settings``: :class:`ovlib.eval.profiles.DenseEvalSettings`.
    ``region_images`` / ``seg_images``: first images of ``dataset`` used (0: the settings' defaults).
    ``region`` / ``crops`` / ``ovss`` / ``kmeans`` switch the protocols (``crops`` needs ``region``);
    ``keep_regions`` keeps the region features (e.g. mask-pooled features for a t-SNE) in ``.regions``.
    """
    from ovlib.eval._common import dense_fn_for_clip
    from ovlib.eval.region_cls import extract_region_features, score_regions, summarize
    from ovlib.eval.segmentation import evaluate_kmeans, evaluate_ovss

    t0 = time.perf_counter()
    model = model.to(device).eval()
    n_reg = region_images or len(dataset)
    n_seg = seg_images or settings.ovss_images
    key = "dense" if dense_fn is not None else mode
    fn = dense_fn if dense_fn is not None else dense_fn_for_clip(model, mode)
    ev = StudentEval(name=name or key)
    cols: dict[str, tuple[str, str]] = {}
    if region:
        preds = ("rois", "maskpool") + (("crops",) if crops else ())
        rf = extract_region_features(model, dataset, settings.region, modes=(), predictors=preds, n_images=n_reg,
                                     device=device, dense_fns={key: fn}, progress=progress)
        scores = score_regions(rf, text, class_ids)
        summ = summarize(scores, n_boot=settings.n_boot, seed=seed)
        ev.n_regions = len(rf.category_id)
        ev.regions = rf if keep_regions else None
        cols = {"boxes": (f"rois/{key}", "thing"), "thing": (f"maskpool/{key}", "thing"),
                "stuff": (f"maskpool/{key}", "stuff")}
        if crops:
            cols.update({"global.thing": ("crops", "thing"), "global.stuff": ("crops", "stuff")})
    for col, (fk, part) in cols.items():
        for i, k in enumerate((1, 5)):
            m = f"{col}.top{k}"
            if m not in METRICS:
                continue
            ev.ci[m] = summ[fk][f"{part}.macc{k}"]
            ev.per_image[m] = (scores[fk][part][:, [0, 1 + i]],
                               lambda s: macc_from_counts(s[1], s[0]))
    if ovss:
        ov = evaluate_ovss(fn, dataset, text, class_ids, settings.ovss, n_images=n_seg, n_boot=settings.n_boot,
                           seed=seed, progress=progress)
        ev.ci["ovss.miou"] = ov["miou"]
        ev.per_image["ovss.miou"] = (ov["confusion"], _ovss_stat)
    if kmeans:
        from ovlib.models import vit_adapter

        patch = int(vit_adapter(model).patch_size[0])  # EVA towers (timm) have no `visual.patch_size`
        km = evaluate_kmeans(fn, dataset, image_size=settings.region.image_size, n_images=n_seg, seed=seed,
                             n_boot=settings.n_boot, patch=patch, progress=progress)
        ev.ci["kmeans.miou"] = km["miou"]
        per = np.asarray(km["per_image"], dtype=np.float64)
        ev.per_image["kmeans.miou"] = (np.stack([per, np.ones_like(per)], 1), _kmeans_stat)
    ev.seconds = time.perf_counter() - t0
    return ev


# ------------------------------------------------------------------------------------------------ comparisons
def paired_diff_ci(a: np.ndarray, b: np.ndarray, statistic: Callable[[np.ndarray], float], n_boot: int = 1000,
                   seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """``statistic(sum b) - statistic(sum a)`` with a percentile-bootstrap interval from resampling the *same*
    images for both (``a, b (N, ...)`` per-image arrays of two models on the same N images)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"paired_diff_ci: the two models were evaluated on {a.shape[0]} and {b.shape[0]} images")
    n = a.shape[0]
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    point = float(statistic(b.sum(0)) - statistic(a.sum(0)))
    rng = np.random.default_rng(seed)
    w = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)  # (n_boot, N)
    sa = (w @ a.reshape(n, -1)).reshape((n_boot,) + a.shape[1:])
    sb = (w @ b.reshape(n, -1)).reshape((n_boot,) + b.shape[1:])
    d = np.array([statistic(y) - statistic(x) for x, y in zip(sa, sb)], dtype=np.float64)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return point, float("nan"), float("nan")
    q = (1.0 - level) / 2.0
    lo, hi = np.quantile(d, [q, 1.0 - q])
    return point, float(lo), float(hi)


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof = 1; nan for one value) and count of the finite values."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan"), int(v.size)


def welch(a: Sequence[float], b: Sequence[float], a_fixed: bool = False) -> tuple[float, float]:
    """``(mean(b) - mean(a), two-sided p)`` of Welch's t-test over seeds (needs >= 2 values on each side;
    p = nan otherwise; identical constant samples give p = 1). ``a_fixed``: ``a`` is one deterministic reference
    value (e.g. the frozen teacher): one-sample t-test of ``b`` against it."""
    from scipy import stats

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    d = float(b.mean() - a.mean()) if a.size and b.size else float("nan")
    if a_fixed:
        if a.size != 1:
            raise ValueError(f"welch(a_fixed=True) needs exactly one reference value, got {a.size}")
        if b.size < 2:
            return d, float("nan")
        if np.ptp(b) == 0:
            return d, 1.0 if d == 0 else 0.0
        return d, float(stats.ttest_1samp(b, a[0]).pvalue)
    if a.size < 2 or b.size < 2:
        return d, float("nan")
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        return d, 1.0 if d == 0 else 0.0
    return d, float(stats.ttest_ind(b, a, equal_var=False).pvalue)


def verdict(diff: float, lo: float = float("nan"), hi: float = float("nan"), p: float = float("nan"),
            expected: int = 1, alpha: float = 0.05, n: int | None = None, min_n: int = 5) -> str:
    """``"holds"`` when the measured difference has the ``expected`` sign (+1 / -1) and is resolved -- Welch
    ``p < alpha`` when ``p`` is given, else a bootstrap interval ``[lo, hi]`` that excludes 0 --; ``"reversed"``
    when it is resolved with the other sign; ``"not resolved"`` otherwise (``"n/a"`` without a number).
    ``n``: the number of resampled units behind a bootstrap interval; fewer than ``min_n`` resolve nothing (a
    bootstrap over one or two images has a degenerate interval)."""
    if not math.isfinite(diff):
        return "n/a"
    if n is not None and n < min_n:
        return "not resolved"
    if math.isfinite(p):
        resolved = p < alpha and diff != 0
    elif math.isfinite(lo) and math.isfinite(hi):
        resolved = lo > 0 or hi < 0
    else:
        resolved = False
    if not resolved:
        return "not resolved"
    return "holds" if (diff > 0) == (expected > 0) else "reversed"
