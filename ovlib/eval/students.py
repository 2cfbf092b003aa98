"""Trained students: train-or-load a distillation run in a config-keyed directory, load its weights into a fresh
CLIP, evaluate it with the chapter-01 protocols.

* :func:`train_or_load` -- :func:`ovlib.train.launch.launch` into ``root/<name>-<hash>`` where the hash covers
  the resolved :class:`~ovlib.train.distill.DistillConfig` *and* the micro CLIP's pre-training config (the
  distillation config names the backbone, not the weights it was pre-trained to), so a changed recipe or a
  re-trained micro CLIP never reuses a stale run. A run is finished only when its ``done.json`` exists
  (:func:`ovlib.io.run_once`: written last, atomically, after the trainer's results and weights); any other run
  directory is resumed (or restarted, its stale records set aside) by the trainer.
* :func:`load_student` -- the ``student.*`` weights of a run's ``ensemble-final.pt`` (the alpha ensemble the
  trainer saves, reference section 1.6) loaded into a fresh CLIP built like the trainer builds it.
* :func:`student_dense_fn` -- the dense map a run distils: the CLIP's own dense mode (CLIPSelf family) or, for a
  DenseRC run, the trained :class:`~ovlib.methods.denserc.DenseConstructor` (HSG gates) rebuilt from the run's
  ``method_args``.
* :func:`evaluate_student` -- region classification (boxes / thing masks / stuff masks, Top-1/Top-5 mean
  accuracy; the student's own crop CLS = its *global* zero-shot), sliding-window OVSS mIoU and k-means mIoU,
  on the dense mode the method distils (``x+v`` for the CLIPSelf family, reference section 2.2), or on any
  dense extractor (e.g. a Refiner). The region pooling convention (``pooling``: CLIPSelf's normalise-then-pool
  or DeCLIP / SynCLIP's pool-then-normalise, :data:`ovlib.eval.region_cls.POOLINGS`) is a typed field of the
  region config; :func:`student_pooling` gives a run's own (its method's ``Distiller.eval_pooling``), and the
  result records it (``StudentEval.protocol``).

Comparisons of students (intervals, tests over seeds, verdicts) live in :mod:`ovlib.stats`.
"""

from __future__ import annotations

import dataclasses
import json
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
    "KMEANS_EQ",
    "METRICS",
    "RUN_FILES",
    "StudentEval",
    "TrainJob",
    "evaluate_student",
    "load_student",
    "run_finished",
    "run_folder",
    "run_key",
    "student_dense_fn",
    "student_pooling",
    "train_job",
    "train_or_load",
]

#: Flat metric names of :class:`StudentEval` (percent). ``global.*`` is the model's own CLS of region crops.
METRICS = ("boxes.top1", "boxes.top5", "thing.top1", "thing.top5", "stuff.top1", "stuff.top5",
           "global.thing.top1", "global.stuff.top1", "ovss.miou", "kmeans.miou")
#: the colour-proof grouping metric (``kmeans_equalized=True``): k-means mIoU with every GT segment's mean colour
#: moved to the image's (:func:`ovlib.eval.segmentation.evaluate_kmeans`, ``colour="equalized"``)
KMEANS_EQ = "kmeans_eq.miou"


# ------------------------------------------------------------------------------------------------ runs
def run_key(params: Mapping[str, Any], method: str, overrides: Mapping[str, Any] = (),
            extra: Mapping[str, Any] | None = None) -> str:
    """Hash of everything a run's weights depend on: the resolved DistillConfig (minus bookkeeping fields) and,
    for a micro backbone without a ``pretrained`` file, the micro CLIP pre-training config of the profile;
    ``extra`` (e.g. the backbone checkpoint's hash and the data manifest, :mod:`ovlib.study`) joins the key."""
    from ovlib.io import config_hash
    from ovlib.models import MICRO_CLIP_CONFIGS
    from ovlib.train.recipes import distill_config

    cfg = distill_config(params, method, overrides, out_dir="unused")
    key: dict[str, Any] = {k: v for k, v in dataclasses.asdict(cfg).items()
                           if k not in ("out_dir", "device", "num_workers", "log_every", "save_every")}
    if cfg.backbone in MICRO_CLIP_CONFIGS and not cfg.pretrained:
        from ovlib.train.pretrain import pretrain_configs

        clip_cfg, vfm_cfg = pretrain_configs(params, params["steps_scale"], params["seed"])
        key["_clip_pretrain"] = dataclasses.asdict(clip_cfg)
        if cfg.vfm:
            key["_vfm_pretrain"] = dataclasses.asdict(vfm_cfg)
    if extra:
        key["_extra"] = dict(extra)
    return config_hash(key)


def _train_seconds(out_dir: Path) -> float:
    """Training time of a run from its ``metrics.jsonl`` (elapsed seconds of its last record; a run trained in
    several sessions sums the last record of each)."""
    from ovlib.io import read_jsonl

    path = out_dir / "metrics.jsonl"
    if not path.is_file():
        return float("nan")
    recs, _ = read_jsonl(path)
    total, prev = 0.0, 0.0
    for r in recs:  # elapsed_s restarts at 0 when a run is resumed
        if r["elapsed_s"] < prev:
            total += prev
        prev = r["elapsed_s"]
    return total + prev


#: the files a finished run must hold besides its marker (``train_or_load``)
RUN_FILES = ("results.json", "ensemble-final.pt")


def run_folder(params: Mapping[str, Any], method: str, overrides: Mapping[str, Any], root: str | Path, name: str,
               key_extra: Mapping[str, Any] | None = None) -> Path:
    """``root/<name>-<run_key>``: where :func:`train_or_load` trains or finds the run (``name`` with characters
    other than letters, digits, ``.``, ``_``, ``-`` replaced by ``_``)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or method  # a portable directory name
    return Path(root) / f"{safe}-{run_key(params, method, overrides, key_extra)}"


def run_finished(folder: str | Path) -> bool:
    """Whether ``folder`` holds a finished run (its marker and :data:`RUN_FILES`): what :func:`train_or_load`
    loads instead of training."""
    from ovlib.io import read_done

    folder = Path(folder)
    return read_done(folder) is not None and all((folder / f).exists() for f in RUN_FILES)


@dataclass(frozen=True)
class TrainJob:
    """One :func:`train_or_load` call as a picklable job (:func:`train_job`, :mod:`ovlib.parallel`)."""

    params: dict
    method: str
    overrides: dict
    root: str
    name: str
    key_extra: dict | None = None


def train_job(job: TrainJob) -> dict[str, Any]:
    """:func:`train_or_load` of a :class:`TrainJob` (module-level: a worker process imports it by name)."""
    return train_or_load(job.params, job.method, job.overrides, job.root, job.name, key_extra=job.key_extra)


def train_or_load(params: Mapping[str, Any], method: str, overrides: Mapping[str, Any], root: str | Path,
                  name: str, key_extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Train ``method`` with ``overrides`` into ``root/<name>-<run_key>`` (``name`` with characters other than
    letters, digits, ``.``, ``_``, ``-`` replaced by ``_``) or load the finished run there.

    Returns the launcher's dict (``out_dir``, ``results``, ``weights``, ...) plus ``name``, ``train_s``
    (seconds the training took when it ran, from its log) and ``trained_now`` (False when it was loaded).
    The run counts as finished only through its ``done.json`` (:func:`ovlib.io.run_once`), written after the
    trainer's last write; a run killed anywhere before is resumed by the trainer, never taken as finished."""
    from ovlib.io import run_once
    from ovlib.train.launch import launch

    out = run_folder(params, method, overrides, root, name, key_extra)
    files = {"out_dir": str(out), "results": str(out / "results.json"), "weights": str(out / "ensemble-final.pt")}

    rec, produced = run_once(out, lambda: launch(params, method, overrides, out_dir=str(out)),
                             requires=RUN_FILES)
    trained_now = produced and rec.get("steps_run", 1) > 0  # a finished but unmarked run resumes at its end
    return {**rec, **files, "name": name, "method": method, "train_s": _train_seconds(out), "trained_now": trained_now}


def load_student(params: Mapping[str, Any], res: Mapping[str, Any], device: str | torch.device = "cpu"):
    """The trained student of a run as a fresh CLIP in eval mode.

    ``res``: a :func:`train_or_load` / ``launch`` result (``results`` = results.json, ``weights`` =
    ensemble-final.pt). The base CLIP is built as the trainer built it (:func:`ovlib.train.launch.build_models`
    with the run's config), then the checkpoint's ``student.*`` entries are loaded strictly (those a
    ``checkpoint="final"`` run leaves out, its frozen weights, are the base's: :func:`ovlib.io.model_state`)."""
    from ovlib.io import model_state, safe_load
    from ovlib.train.distill import DistillConfig
    from ovlib.train.launch import build_models

    rec = json.loads(Path(res["results"]).read_text())
    cfg = DistillConfig.from_dict(rec["config"])
    student, _, _, _ = build_models(cfg, params, frozenset(), teacher=False)
    # a checkpoint="final" run leaves out its frozen weights: the base CLIP just built supplies them
    sd = model_state(safe_load(res["weights"]), {f"student.{k}": v for k, v in student.state_dict().items()},
                     where=str(res["weights"]))
    sub = {k[len("student."):]: v for k, v in sd.items() if k.startswith("student.")}
    if not sub:
        raise ValueError(f"{res['weights']} holds no 'student.*' weights (keys start with "
                         f"{sorted({k.split('.')[0] for k in sd})[:6]})")
    student.load_state_dict(sub)
    return student.to(device).eval().requires_grad_(False)


def student_pooling(res: Mapping[str, Any]) -> str:
    """The region pooling convention of a trained run's method (``Distiller.eval_pooling``, read from the run's
    results.json): ``"pool-then-normalize"`` for DeCLIP / SynCLIP, ``"normalize-then-pool"`` otherwise."""
    from ovlib.methods import get_method

    rec = json.loads(Path(res["results"]).read_text())
    return get_method(rec["config"]["method"]).eval_pooling


def student_dense_fn(res: Mapping[str, Any], student: Any, mode: str = "x+v", normalize: bool = True
                     ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``images (B, 3, H, W) in [0, 1] -> (B, C, h, w)`` dense map of a trained run's ``student`` (from
    :func:`load_student`): for a ``denserc`` run its ``X_dense`` -- the constructor built from the run's
    ``method_args`` (results.json) with the ``constructor.*`` weights of ``res["weights"]``
    (:func:`ovlib.methods.denserc.load_constructor`, unit-norm tokens); for any other method the CLIP's dense
    ``mode`` (a mode or preset name; unit-norm tokens unless ``normalize=False``)."""
    from ovlib.eval._common import dense_fn_for_clip

    rec = json.loads(Path(res["results"]).read_text())
    cfg = rec["config"]
    if cfg["method"] != "denserc":
        return dense_fn_for_clip(student, mode, normalize=normalize)
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
    comparisons of two models evaluated on the same images (:mod:`ovlib.stats`)."""

    name: str
    ci: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    per_image: dict[str, tuple[np.ndarray, Callable[[np.ndarray], float]]] = field(default_factory=dict)
    seconds: float = 0.0
    n_regions: int = 0
    regions: Any = None  # the RegionFeatures, when evaluate_student(keep_regions=True)
    protocol: dict[str, Any] = field(default_factory=dict)  # region conventions + dense spec (RegionFeatures)

    def point(self, metric: str) -> float:
        return self.ci[metric][0] if metric in self.ci else float("nan")


@torch.no_grad()
def evaluate_student(model: Any, dataset: Sequence, text: torch.Tensor, class_ids: Sequence[int], settings: Any,
                     mode: str = "x+v", name: str = "", region_images: int = 0, seg_images: int = 0,
                     region: bool = True, crops: bool = True, ovss: bool = True, kmeans: bool = True,
                     kmeans_equalized: bool = False,
                     dense_fn: Callable[[torch.Tensor], torch.Tensor] | None = None, seed: int = 0,
                     device: str | torch.device = "cpu", keep_regions: bool = False,
                     progress: bool = False, pooling: str | None = None) -> StudentEval:
    """The chapter-01 protocols on one model.

    ``model``: a CLIP (its dense mode ``mode`` and its own crop CLS are evaluated); ``dense_fn`` (images in
    [0, 1] -> ``(B, C, h, w)``) replaces the CLIP's dense map when given (the CLIP still supplies the image
    normalisation and, with ``crops``, the crop CLS). ``settings``: :class:`ovlib.eval.profiles.DenseEvalSettings`.
    ``region_images`` / ``seg_images``: first images of ``dataset`` used (0: the settings' defaults).
    ``region`` / ``crops`` / ``ovss`` / ``kmeans`` switch the protocols (``crops`` needs ``region``);
    ``kmeans_equalized`` adds the colour-proof k-means (:data:`KMEANS_EQ`, the same images and seed);
    ``keep_regions`` keeps the region features (e.g. mask-pooled features for a t-SNE) in ``.regions``.
    ``pooling``: the region pooling convention (``None``: ``settings.region.pooling``; a run's own is
    :func:`student_pooling`); it matters only for a ``dense_fn`` that returns unnormalised tokens (the CLIP's
    own dense mode is extracted unnormalised). Recorded in ``.protocol``.
    """
    from ovlib.eval._common import dense_fn_for_clip
    from ovlib.eval.region_cls import extract_region_features, score_regions, summarize
    from ovlib.eval.segmentation import evaluate_kmeans, evaluate_ovss

    t0 = time.perf_counter()
    model = model.to(device).eval()
    n_reg = region_images or len(dataset)
    n_seg = seg_images or settings.ovss_images
    key = "dense" if dense_fn is not None else mode
    fn = dense_fn if dense_fn is not None else dense_fn_for_clip(model, mode, normalize=False)
    rcfg = settings.region if pooling is None else dataclasses.replace(settings.region, pooling=pooling)
    ev = StudentEval(name=name or key)
    ev.protocol = {**rcfg.protocol(), "dense": {key: getattr(fn, "dense_spec", None)}}
    cols: dict[str, tuple[str, str]] = {}
    if region:
        preds = ("rois", "maskpool") + (("crops",) if crops else ())
        rf = extract_region_features(model, dataset, rcfg, modes=(), predictors=preds, n_images=n_reg,
                                     device=device, dense_fns={key: fn}, progress=progress)
        scores = score_regions(rf, text, class_ids)
        summ = summarize(scores, n_boot=settings.n_boot, seed=seed)
        ev.n_regions = len(rf.category_id)
        ev.regions = rf if keep_regions else None
        ev.protocol = dict(rf.protocol)
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
    # k-means as is and, with ``kmeans_equalized``, with every segment's mean colour equalised (colour-proof)
    colours = (("kmeans.miou", "as_is"),) * kmeans + ((KMEANS_EQ, "equalized"),) * kmeans_equalized
    if colours:
        from ovlib.models import vit_adapter

        patch = int(vit_adapter(model).patch_size[0])  # EVA towers (timm) have no `visual.patch_size`
    for metric, colour in colours:
        km = evaluate_kmeans(fn, dataset, image_size=settings.region.image_size, n_images=n_seg, seed=seed,
                             n_boot=settings.n_boot, patch=patch, progress=progress, colour=colour)
        ev.ci[metric] = km["miou"]
        per = np.asarray(km["per_image"], dtype=np.float64)
        ev.per_image[metric] = (np.stack([per, np.ones_like(per)], 1), _kmeans_stat)
    ev.seconds = time.perf_counter() - t0
    return ev
