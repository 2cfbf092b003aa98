"""The chapters' experiment layer: budgets from the profile file, one run cache shared by every chapter, claims
judged by :mod:`ovlib.stats`, and the per-chapter claims file behind the book's Claims ledger page.

A chapter opens one :class:`Study`::

    study = Study(P, "02", device=DEV)
    B = study.budget                      # params/PROFILE.yaml: budgets["02"] (validated by ovlib.config)
    bb = study.backbones()                # frozen CLIP, tokenizer, evaluation data, class embeddings (once)
    study.evaluate("CLIP", bb.clip, fixed=True)
    for s in study.seeds:
        study.run("clipself", seed=s, row="CLIPSelf")            # train-or-load + evaluate
    c = study.claim("rla-boxes", "RLA improves region recognition", "CLIP", "CLIPSelf", "boxes.top1", +1,
                    headline=True, paper_ref="rsc.t1.clipself.boxes", section="2.2")
    study.ledger()                        # book/claims/02.json

**One run cache.** :meth:`Study.run` trains into ``cache_dir/runs/<method>-<key>`` where the key
(:func:`ovlib.eval.students.run_key`) covers the resolved distillation config (method, recipe, the named
training budget, seed and overrides), the backbone checkpoint's content hash and the training data's manifest
-- nothing chapter-specific. Chapter 03 asking for ``run("clipself", seed=0)`` with the same training budget as
chapter 02 loads chapter 02's run; the log says ``trained`` or ``loaded`` for every run.

**Claims.** :meth:`Study.claim` compares two rows on a metric with :func:`ovlib.stats.compare` (seeds decide;
one-seed rows are *indicative*); :meth:`Study.check` records an identity or numerical check. :meth:`Study.ledger`
applies Holm--Bonferroni across the chapter's headline claims and writes ``book/claims/NN.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from ovlib import stats
from ovlib.config import BUDGET_KEYS, ParamError, dry_run_depth, dry_run_eval, micro_world
from ovlib.data import CocoPanoptic, ensure_microworld
from ovlib.data.microworld import export_hash
from ovlib.eval import MICRO_TEMPLATES, VILD_TEMPLATES, class_name_sets, text_embeddings
from ovlib.eval.profiles import dense_eval_settings
from ovlib.eval.students import (
    TrainJob,
    evaluate_student,
    load_student,
    run_finished,
    run_folder,
    student_dense_fn,
    student_pooling,
    train_job,
    train_or_load,
)
from ovlib.io import atomic_write_text, cache_path
from ovlib.models import MICRO_CLIP_CONFIGS, MICRO_VFM_CONFIGS, load_clip, load_vfm
from ovlib.nb import ms, table
from ovlib.parallel import map_processes
from ovlib.train.launch import build_models
from ovlib.train.pretrain import pretrain_configs, pretrain_vfm
from ovlib.train.recipes import distill_config

__all__ = ["Backbones", "Claim", "Row", "Run", "Study", "load_benchmark", "paper_numbers", "LEDGER_FIELDS",
           "INTERVAL_TARGETS", "interval_target"]

#: The fields of one ledger entry (``book/claims/NN.json``), in order.
LEDGER_FIELDS = ("id", "chapter", "paper", "paper_ref", "paper_value", "claim", "section", "metric", "ours_a",
                 "ours_b", "delta", "ci_low", "ci_high", "p", "p_adjusted", "seeds_a", "seeds_b", "kind", "headline",
                 "verdict", "indication", "test", "rows", "half_width", "target", "meets_target", "seeds_needed")

#: The precision the book asks of every headline claim: the half-width of its 95 % interval, in points of the
#: metric -- mIoU-valued metrics (the metric's name contains ``miou``) ``1.5``, every other metric in points
#: (accuracies, AP) ``2.0``. A claim that misses it says so in the ledger, with its half-width and the seeds per side
#: that would reach it (:func:`ovlib.stats.seeds_to_reach`).
INTERVAL_TARGETS = {"miou": 1.5, "points": 2.0}


def interval_target(metric: str) -> float:
    """The half-width target of a claim on ``metric`` (:data:`INTERVAL_TARGETS`)."""
    return INTERVAL_TARGETS["miou" if "miou" in metric.lower() else "points"]
PAPER_NUMBERS = Path("book") / "paper_numbers.yaml"
CLAIMS_DIR = Path("book") / "claims"


def paper_numbers(root: str | Path = ".") -> dict[str, Any]:
    """``book/paper_numbers.yaml``: ``papers`` (key -> title, chapter) and ``numbers`` (key -> paper, ref, value;
    a table the chapters print is one entry whose value maps row names to value lists, e.g. ``rsc.table.t1``)."""
    path = Path(root) / PAPER_NUMBERS
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (the papers' reported numbers)")
    data = yaml.safe_load(path.read_text()) or {}
    for key in ("papers", "numbers"):
        if not isinstance(data.get(key), dict):
            raise ValueError(f"{path}: needs a mapping {key!r}")
    for k, v in data["numbers"].items():
        if not isinstance(v, dict) or not {"paper", "ref", "value"} <= set(v):
            raise ValueError(f"{path}: numbers[{k!r}] needs paper, ref and value")
        if v["paper"] not in data["papers"]:
            raise ValueError(f"{path}: numbers[{k!r}] names unknown paper {v['paper']!r}")
    return data


def load_benchmark(name: str) -> Any:
    """The module ``benchmarks/<name>.py`` of the repository (beside the ``ovlib`` package of an editable install,
    else under the working directory), its folder put on ``sys.path`` (for its ``_common``); ``None`` when absent."""
    import importlib.util
    import sys

    here = Path(__file__).resolve().parents[1] / "benchmarks"
    folder = next((d for d in (here, Path("benchmarks").resolve()) if (d / f"{name}.py").is_file()), None)
    if folder is None:
        return None
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()[:16]


@dataclass
class Backbones:
    """What every experiment of a chapter shares, loaded once (:meth:`Study.backbones`)."""

    clip: Any             # the frozen CLIP (eval mode, no grad), the teacher of every run
    tokenizer: Any
    vfm: Any              # the VFM of the recipe (None when not asked for)
    dataset: Any          # the evaluation split (COCO panoptic format)
    categories: list[dict]
    class_ids: list[int]
    text: torch.Tensor    # (C, D) unit-norm class embeddings of the categories' main names
    settings: Any         # ovlib.eval.profiles.DenseEvalSettings
    checkpoint: str       # content hash of the CLIP's weights file (or the named pretrained weights)
    templates: tuple[str, ...] = ()  # the prompt templates of the class embeddings
    this_is: bool = False            # the "This is a photo of ..." prefix (real data)


@dataclass
class Run:
    """One trained (or loaded) run and its evaluation."""

    method: str
    seed: int
    row: str
    res: dict
    eval: Any = None      # ovlib.eval.students.StudentEval
    student: Any = None   # kept when asked for (keep_model=True)
    trained_now: bool = False
    train_s: float = float("nan")
    wall_s: float = float("nan")

    @property
    def history(self) -> list[dict]:
        """The run's logged training records (``metrics.jsonl``)."""
        path = Path(self.res["out_dir"]) / "metrics.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []

    def record(self, **extra: Any) -> dict[str, Any]:
        """The run as a plain dict (name, seed, method, steps, res, cached, train_s, history) plus ``extra``."""
        return {"name": self.row, "seed": self.seed, "method": self.method, "steps": self.res.get("steps"),
                "res": self.res, "cached": not self.trained_now, "train_s": self.train_s, "history": self.history,
                **extra}


@dataclass
class Row:
    """A table row: one evaluation per seed (``fixed``: a deterministic model evaluated once)."""

    name: str
    evals: dict[int, Any] = field(default_factory=dict)
    fixed: bool = False
    order: str = ""

    def values(self, metric: str) -> list[float]:
        return [e.point(metric) for _, e in sorted(self.evals.items())]

    def sample(self, metric: str) -> stats.Sample:
        seeds = sorted(self.evals)
        missing = [s for s in seeds if metric not in self.evals[s].per_image]
        if missing:
            raise KeyError(f"row {self.name!r} has no per-image {metric!r} for seed(s) {missing}")
        arrays = tuple(np.asarray(self.evals[s].per_image[metric][0], dtype=np.float64) for s in seeds)
        statistic = self.evals[seeds[0]].per_image[metric][1]
        return stats.Sample(arrays, statistic, () if self.fixed else tuple(seeds), fixed=self.fixed,
                            order=self.order)


@dataclass
class Claim:
    """One entry of the chapter's ledger."""

    id: str
    text: str
    metric: str
    comparison: stats.Comparison
    headline: bool = False
    paper: str = ""
    paper_ref: str = ""
    paper_value: Any = None
    section: str = ""
    rows: tuple[str, str] = ("", "")
    negligible: float | None = None  # a resolved |delta| below this is flagged negligible (in the metric's unit)

    @property
    def verdict(self) -> str:
        return self.comparison.verdict

    @property
    def is_negligible(self) -> bool:
        """Resolved (holds / reversed) with ``|delta|`` below :attr:`negligible`."""
        c = self.comparison
        return (self.negligible is not None and c.kind == "claim" and c.verdict in ("holds", "reversed")
                and abs(c.delta) < self.negligible)

    def describe(self, digits: int = 1) -> str:
        """``+1.2 [-0.3, +2.5], p = 0.040 → holds`` (indicative: ``… → indicative, higher``)."""
        c = self.comparison
        tail = f"indicative ({c.indication})" if c.kind == "indicative" else (
            ("check passed" if c.verdict == "holds" else "check FAILED") if c.kind == "check" else c.verdict)
        small = f" (|Δ| < {self.negligible:g}: negligible)" if self.is_negligible else ""
        return f"{c.describe(digits)} → *{tail}*{small}"

    @property
    def target(self) -> float:
        """The half-width this claim's interval should reach (:func:`interval_target` of its metric)."""
        return interval_target(self.metric)

    @property
    def meets_target(self) -> bool | None:
        """Whether the interval's half-width is within :attr:`target` (``None`` for checks and claims without an
        interval)."""
        h = self.comparison.half_width
        if self.comparison.kind == "check" or not math.isfinite(h):
            return None
        return bool(h <= self.target + 1e-12)

    @property
    def seeds_needed(self) -> int | None:
        """Seeds per side that would bring a seeded claim's half-width within :attr:`target`
        (:func:`ovlib.stats.seeds_to_reach`; ``None`` when seeds cannot, or for claims without seeds)."""
        if self.comparison.kind != "claim" or "se_seeds" not in self.comparison.extra:
            return None
        return stats.seeds_to_reach(self.comparison.extra, self.target)

    @property
    def paper_text(self) -> str:
        """The paper's reported number for the claim: ``Tab. 1: 3.9`` (``–`` without one)."""
        if not self.paper_ref:
            return "–"
        return self.paper_ref + ("" if self.paper_value is None else f": {self.paper_value:+g}"
                                 if isinstance(self.paper_value, (int, float)) else f": {self.paper_value}")


class Study:
    """A chapter's experiments (module docstring). ``params``: the validated contract (``ovlib.nb.setup``);
    ``chapter``: ``"01"`` … ``"05"`` (or ``"recipes"``, the recipe sweep of :mod:`ovlib.sweep`); ``root``: the
    project root (``book/``, ``params/`` live there); ``split``: the split :meth:`backbones` evaluates on
    (``val2017``; the recipe sweep chooses on the micro world's ``test2017``, never on the evaluation split)."""

    def __init__(self, params: Mapping[str, Any], chapter: str, device: str | torch.device = "cpu",
                 root: str | Path = ".", log: bool = True, split: str = "val2017") -> None:
        if chapter not in BUDGET_KEYS:
            raise ParamError(f"Study: unknown chapter {chapter!r}; known: {sorted(BUDGET_KEYS)}")
        self.params = dict(params)
        self.chapter = chapter
        self.split = split  # the evaluation split (the recipe sweep evaluates on a tuning split instead)
        self.device = torch.device(device)
        self.root = Path(root)
        self.log = log
        budgets = self.params.get("budgets") or {}
        self.budget: dict[str, Any] = dict(budgets.get(chapter) or {})
        self._train_budgets: dict[str, dict] = dict(budgets.get("train") or {})
        n = int(self.budget.get("seeds") or 0) or int(self.params["seeds"])
        self.seeds = [int(self.params["seed"]) + i for i in range(n)]
        self.runs_dir = Path(self.params["cache_dir"]) / "runs"  # shared by every chapter
        self.rows: dict[str, Row] = {}
        self.runs: list[Run] = []
        self._trained_by_workers: set[str] = set()  # out_dir of the runs run_many's workers trained
        self.claims: list[Claim] = []
        self.section = ""  # the chapter section claims are made in when they do not name one (the ledger links it)
        self.negligible: float | None = None  # default of claim(negligible=...): flag smaller resolved differences
        self._backbones: dict[tuple, Backbones] = {}
        self._hashes: dict[str, str] = {}
        self._numbers: dict[str, Any] | None = None
        self._vfm: Any = None
        self.t0 = time.perf_counter()

    @property
    def region_images(self) -> int:
        """Images of region classification: the budget's ``region_images``, else the profile's ``eval_images``
        (0: the whole evaluation split). A dry run's ``eval_images`` is its handful of images."""
        return int(self.budget.get("region_images") or 0) or int(self.params["eval_images"])

    @property
    def n_boot(self) -> int:
        """Bootstrap replicates of the profile's evaluation settings."""
        return int(self.eval_settings.n_boot)

    @property
    def eval_settings(self) -> Any:
        """The profile's evaluation settings (:func:`ovlib.eval.profiles.dense_eval_settings`), at a dry run's
        sizes (``dry_run_settings.eval``) in a dry run."""
        return dense_eval_settings(self.params, self.params["eval_images"], **dry_run_eval(self.params))

    def prompts(self) -> tuple[tuple[str, ...], bool]:
        """``(templates, this_is)`` of the profile's class embeddings: the micro world's caption frames, else
        ViLD's prompts, ``this is``-prefixed (a dry run keeps ``templates`` of them)."""
        if micro_world(self.params):
            return tuple(MICRO_TEMPLATES), False
        return tuple(VILD_TEMPLATES[:self.eval_settings.templates or None]), True

    # ------------------------------------------------------------------------------------------- budgets
    def train_budget(self, name: str) -> dict[str, Any]:
        """The named training budget (``budgets.train.<name>``) as DistillConfig overrides; ``max_steps`` is
        multiplied by ``steps_scale`` (at least 1 step) and, unless given, warm-up is a tenth of it."""
        if name not in self._train_budgets:
            raise ParamError(f"params/{self.params['profile']}.yaml: no training budget {name!r} under "
                             f"budgets.train; known: {sorted(self._train_budgets)}")
        ov = dict(self._train_budgets[name])
        if "max_steps" in ov:
            ov["max_steps"] = max(1, round(ov["max_steps"] * float(self.params["steps_scale"])))
            ov.setdefault("warmup_steps", max(1, ov["max_steps"] // 10))
        return ov

    # ------------------------------------------------------------------------------------------- backbones
    def backbones(self, method: str | None = None, vfm: bool = False) -> Backbones:
        """The frozen CLIP of ``method``'s recipe (and its VFM when ``vfm``), the evaluation split, its categories
        and class embeddings; loaded once per (backbone, vfm). ``method=None``: the ones the chapter loaded first
        (CLIPSelf's recipe when none was loaded)."""
        if method is None:  # the chapter's backbones: the first loaded, else the CLIPSelf recipe's
            if self._backbones:
                return next(iter(self._backbones.values()))
            method = "clipself"
        cfg = distill_config(self.params, method, {}, out_dir="unused")
        key = (cfg.backbone, cfg.pretrained, cfg.vfm if vfm else None)
        for (bk, pr, v), bb in self._backbones.items():  # one with the VFM also serves a request without it
            if (bk, pr) == key[:2] and (not vfm or v == key[2]):
                return bb
        P = self.params
        clip, _, vfm_model, tok = build_models(cfg, P, frozenset({"vfm"}) if vfm else frozenset())
        clip = clip.to(self.device).eval().requires_grad_(False)
        if vfm_model is not None:
            vfm_model = vfm_model.to(self.device).eval().requires_grad_(False)
        settings = self.eval_settings
        if micro_world(P):
            root = ensure_microworld(P["data_root"], self.split, n=P["eval_images"], size=settings.export_size,
                                     seed=P["seed"], progress=False)
        else:
            root = P["data_root"]
        ds = CocoPanoptic(root, self.split)
        cats = list(ds.categories)
        text = self.class_text(clip, tok, cats)
        bb = Backbones(clip, tok, vfm_model, ds, cats, [c["id"] for c in cats], text, settings,
                       self._checkpoint_hash(cfg), *self.prompts())
        self._backbones[key] = bb
        return bb

    def named_clip(self, role: str = "clip") -> tuple[Any, Any, torch.Tensor, str]:
        """The profile's named model ``models[role]`` (e.g. an OpenAI-style ViT-B/16 beside the recipes' EVA02),
        frozen, with its tokenizer, the chapter's class embeddings under it (:meth:`backbones`' categories and
        templates) and a display name."""
        P = self.params
        if role not in (P.get("models") or {}):
            raise ParamError(f"params/{P['profile']}.yaml: no named model {role!r} under models")
        spec = P["models"][role]
        clip, tok, _ = load_clip(**spec, device=self.device, allow_download=P["allow_download"],
                                 weights_dir=P["weights_dir"] or None, seed=P["seed"], depth=dry_run_depth(P))
        clip = clip.eval().requires_grad_(False)
        text = self.class_text(clip, tok)
        return clip, tok, text, f"{spec['name']} ({spec['pretrained'] or 'random init'})"

    def vfm(self) -> Any:
        """The profile's VFM for the chapters' analyses (k-means baselines, figures), frozen, loaded once: the
        micro VFM pre-trained into the cache (micro profiles), else the named ``models.vfm`` (paper)."""
        if self._vfm is None:
            P = self.params
            if micro_world(P):
                cfg = pretrain_configs(P, P["steps_scale"], P["seed"])[1]
                m = pretrain_vfm(cfg, P["cache_dir"], device=self.device, progress=False)[0]
            else:
                m = load_vfm(**P["models"]["vfm"], device=self.device, allow_download=P["allow_download"],
                             weights_dir=P["weights_dir"] or None, seed=P["seed"], depth=dry_run_depth(P))
            self._vfm = m.to(self.device).eval().requires_grad_(False)
        return self._vfm

    def class_text(self, clip: Any, tokenizer: Any, categories: Sequence[Mapping] | None = None) -> torch.Tensor:
        """``(C, D)`` unit-norm embeddings of the categories' main names (default: the evaluation split's, from
        :meth:`backbones`) by ``clip``'s text tower, with the profile's prompts (:meth:`prompts`). On CPU."""
        cats = list(categories) if categories is not None else self.backbones().categories
        templates, this_is = self.prompts()
        return text_embeddings(clip, tokenizer, class_name_sets(cats, "main", seed=self.params["seed"]), templates,
                               this_is_prefix=this_is, device=self.device).cpu()

    def _checkpoint_hash(self, cfg: Any) -> str:
        """Content hash of the backbone weights a run starts from: the micro CLIP's pre-training checkpoint, a
        local ``pretrained`` file, or the name of downloadable weights (their content is fixed by the name)."""
        if cfg.backbone in MICRO_CLIP_CONFIGS and not cfg.pretrained:

            clip_cfg, _ = pretrain_configs(self.params, self.params["steps_scale"], self.params["seed"])
            path = cache_path(self.params["cache_dir"], clip_cfg.model, clip_cfg)
        elif cfg.pretrained and Path(cfg.pretrained).is_file():
            path = Path(cfg.pretrained)
        else:  # a named weight, or a random init (of the dry run's depth, when it cuts the towers)
            depth = dry_run_depth(self.params) if cfg.pretrained is None else None
            return f"{cfg.backbone}:{cfg.pretrained}" + (f":depth{depth}" if depth else "")
        if not path.is_file():
            raise FileNotFoundError(f"backbone checkpoint {path} not found (Study.backbones() trains it)")
        return self._file_hash(path)

    def _file_hash(self, path: Path) -> str:
        """Content hash of a weights file, computed once per file and study."""
        k = str(path.resolve())
        if k not in self._hashes:
            self._hashes[k] = _sha256_file(path)
        return self._hashes[k]

    def _vfm_hash(self, cfg: Any) -> str | None:
        """What the VFM of a run's recipe is (``None``: the recipe has none): the content hash of the micro VFM's
        pre-training checkpoint (pre-trained here when missing) or of a local ``vfm_pretrained`` file, else the
        name of the weights. A run distilled from one VFM is never loaded for another (the micro VFM's objective
        or budget changed, or another checkpoint file)."""
        if not cfg.vfm:
            return None
        if cfg.vfm in MICRO_VFM_CONFIGS and not cfg.vfm_pretrained:
            _, vfm_cfg = pretrain_configs(self.params, self.params["steps_scale"], self.params["seed"])
            path = cache_path(self.params["cache_dir"], vfm_cfg.model, vfm_cfg)
            if not path.is_file():
                self.vfm()  # pre-trains it into the cache (the trainer would, loading it)
        elif cfg.vfm_pretrained and Path(cfg.vfm_pretrained).is_file():
            path = Path(cfg.vfm_pretrained)
        else:
            depth = dry_run_depth(self.params) if cfg.vfm_pretrained is None else None
            return f"{cfg.vfm}:{cfg.vfm_pretrained}" + (f":depth{depth}" if depth else "")
        return self._file_hash(path)

    def _clipseg_hash(self, cfg: Any) -> str | None:
        """What the CLIPSeg a run's decoder starts from is (``None``: the recipe has none, SynSeg's
        ``method_args.clipseg``): the micro CLIPSeg's config hash (its cache key: budget, conditioning and the
        CLIP it is trained on), else the content hash of the local checkpoint file (a named CLIPSeg's file in
        ``weights_dir``, or a path), else the name (a file not there yet: the trainer's error names it). A
        SynSeg run trained from one CLIPSeg is never loaded for another."""
        from ovlib.io import config_hash
        from ovlib.models.clipseg import CLIPSEG_ARCHS
        from ovlib.models.weights import WeightsUnavailable, clipseg_weight_file
        from ovlib.train.proxies import clipseg_config

        name = (cfg.method_args or {}).get("clipseg")
        if name is None:
            return None
        if name == "micro-clipseg":
            return "micro-clipseg:" + config_hash(clipseg_config(self.params, self.params["steps_scale"],
                                                                 self.params["seed"]))
        path = Path(name)
        if name in CLIPSEG_ARCHS:
            try:
                path = clipseg_weight_file(self.params.get("weights_dir", ""), name)
            except WeightsUnavailable:
                return str(name)
        return self._file_hash(path) if path.is_file() else str(name)

    def _data_manifest(self, cfg: Any) -> dict[str, Any]:
        """What the training data is: the micro world export's content key (world config, split, images, size,
        start: :func:`ovlib.data.microworld.export_hash`, what the export's manifest stores), or the COCO
        annotation file of the split (name and size)."""
        if micro_world(self.params):
            return {"microworld": export_hash(cfg.split, cfg.max_images, cfg.student_size, int(self.params["seed"]))}
        ann = Path(cfg.data_root) / "annotations" / f"instances_{cfg.split}.json"
        return {"annotations": ann.name, "bytes": ann.stat().st_size if ann.is_file() else None,
                "max_images": cfg.max_images}

    # ------------------------------------------------------------------------------------------- runs
    def run(self, method: str, seed: int = 0, budget: str = "main", row: str | None = None,
            evaluate: bool = True, keep_model: bool = False, eval_kw: Mapping[str, Any] | None = None,
            **overrides: Any) -> Run:
        """Train ``method`` (or load the finished run) with the named training ``budget``, ``seed`` and
        ``overrides``, then evaluate its student (``eval_kw``: :meth:`evaluate` options) as ``row`` / seed."""
        t = time.perf_counter()
        ov, extra = self._run_key_parts(method, seed, budget, overrides)
        res = train_or_load(self.params, method, ov, self.runs_dir, method, key_extra=extra)
        trained_now = bool(res.get("trained_now")) or res["out_dir"] in self._trained_by_workers
        self._trained_by_workers.discard(res["out_dir"])  # counted once: a second spec of the same run loads it
        r = Run(method, seed, row or method, res, trained_now=trained_now,
                train_s=float(res.get("train_s", float("nan"))))
        if self.log:
            print(f"[study {self.chapter}] {'trained' if r.trained_now else 'loaded'} {method} seed {seed} "
                  f"({budget}) -> {res['out_dir']}", flush=True)
        if evaluate or keep_model:
            student = load_student(self.params, res, self.device)
            if evaluate:
                # the run's own region convention (Distiller.eval_pooling: DeCLIP / SynCLIP pool raw tokens,
                # then normalise); raw tokens serve both conventions (OVSS and k-means normalise themselves)
                kw = {"pooling": student_pooling(res), **dict(eval_kw or {})}
                r.eval = self.evaluate(r.row, student, seed=seed,
                                       dense_fn=student_dense_fn(res, student, normalize=False), **kw)
            if keep_model:
                r.student = student
        r.wall_s = time.perf_counter() - t
        self.runs.append(r)
        return r

    def _run_key_parts(self, method: str, seed: int, budget: str, overrides: Mapping[str, Any]
                       ) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(overrides, key_extra)`` of :func:`ovlib.eval.students.train_or_load` for a run: the named budget,
        the seed and the overrides; the backbone checkpoint's content hash, the data manifest and, for a recipe with
        a VFM, the VFM's identity (:meth:`_vfm_hash`; the micro CLIP and VFM are pre-trained here when they are
        not yet); for one with a CLIPSeg initialisation, the CLIPSeg's (:meth:`_clipseg_hash`)."""
        ov = {**self.train_budget(budget), "seed": seed, **overrides}
        cfg = distill_config(self.params, method, ov, out_dir="unused")
        try:
            ck = self._checkpoint_hash(cfg)
        except FileNotFoundError:  # the micro CLIP is not pre-trained yet: loading the backbones trains it
            self.backbones(method)
            ck = self._checkpoint_hash(cfg)
        extra = {"checkpoint": ck, "data": self._data_manifest(cfg)}
        vfm = self._vfm_hash(cfg)
        if vfm is not None:  # only recipes with a VFM: every other run keeps its key
            extra["vfm"] = vfm
        clipseg = self._clipseg_hash(cfg)
        if clipseg is not None:  # only recipes with a CLIPSeg initialisation (SynSeg)
            extra["clipseg"] = clipseg
        return ov, extra

    @property
    def workers(self) -> int:
        """Processes that train a batch of runs side by side (:meth:`run_many`): the chapter budget's ``workers``
        on the CPU, 1 on an accelerator (one device: its runs go one after the other)."""
        return int(self.budget.get("workers") or 1) if self.device.type == "cpu" else 1

    def run_many(self, specs: Sequence[Mapping[str, Any]], **run_kw: Any) -> list[Run]:
        """:meth:`run` of every spec, in order: ``{"method": ..., "seed": 0, "budget": "main", "row": None,
        "overrides": {...}}`` (``run_kw``: ``evaluate``, ``keep_model``, ``eval_kw`` of every run), after
        :meth:`train_missing` of them."""
        norm = self._specs(specs)
        self.train_missing(norm)
        return [self.run(sp["method"], seed=int(sp["seed"]), budget=sp["budget"], row=sp["row"], **run_kw,
                         **sp["overrides"]) for sp in norm]

    @staticmethod
    def _specs(specs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        keys = ("method", "seed", "budget", "row", "overrides")
        norm = []
        for sp in specs:
            unknown = sorted(set(sp) - set(keys))
            if unknown or "method" not in sp:
                raise ValueError(f"run_many: a spec has keys {sorted(sp)}; it needs 'method' and may have "
                                 f"{list(keys[1:])} (unknown: {unknown})")
            norm.append({"seed": 0, "budget": "main", "row": None, "overrides": {}, **sp})
        return norm

    def train_missing(self, specs: Sequence[Mapping[str, Any]]) -> int:
        """Train the runs of ``specs`` (as :meth:`run_many`'s) that are not in the shared cache in worker
        processes and return how many it trained; :meth:`run` then loads them (and counts them as trained in this
        chapter). With one worker, or one missing run, it trains nothing (0): :meth:`run` trains them, here. A
        chapter calls it before a loop of :meth:`run` whose runs are known in advance.

        The runs are trained side by side in :attr:`workers` processes of
        ``threads // workers`` torch threads each (:func:`ovlib.parallel.map_processes`; one worker: here, one
        after the other, as :meth:`run` would). Before the workers start, this process builds one trainer per
        distinct method of the batch (nothing is trained) so that every shared cache they read -- the micro world
        export, the micro CLIP, VFM and CLIPSeg -- exists and no two workers produce it at once; each worker
        trains distinct runs (distinct folders). Evaluation and the records stay here, in order; a run trained
        by a worker counts as trained in this chapter (:meth:`cost_table`). What a worker changes: the
        floating-point order of its one thread, and its own in-memory teacher-target cache
        (:mod:`ovlib.train.targets`: shared by the runs of one worker, not with this process)."""
        jobs, seen = [], set()
        for sp in self._specs(specs):
            ov, extra = self._run_key_parts(sp["method"], int(sp["seed"]), sp["budget"], sp["overrides"])
            out = run_folder(self.params, sp["method"], ov, self.runs_dir, sp["method"], extra)
            if str(out) not in seen and not run_finished(out):
                seen.add(str(out))
                jobs.append(TrainJob(dict(self.params), sp["method"], ov, str(self.runs_dir), sp["method"], extra))
        if len(jobs) > 1 and self.workers > 1:
            t = time.perf_counter()
            self._warm_caches(jobs)
            done = map_processes(train_job, jobs, self.workers,
                                 label=lambda j: f"{j.method} seed {j.overrides['seed']}")
            self._trained_by_workers.update(r["out_dir"] for r in done if r.get("trained_now"))
            if self.log:
                print(f"[study {self.chapter}] trained {len(jobs)} runs in {self.workers} processes "
                      f"({time.perf_counter() - t:.0f} s)", flush=True)
            return len(jobs)
        return 0

    def _warm_caches(self, jobs: Sequence[TrainJob]) -> None:
        """Build (not train) one trainer per distinct method of ``jobs`` in this process: every shared cache a
        run reads is produced here, once, before worker processes start (:meth:`run_many`)."""
        import tempfile

        from ovlib.train.launch import build_trainer

        warmed = set()
        for j in jobs:
            margs = j.overrides.get("method_args")
            tag = (j.method, str(margs.get("clipseg")) if isinstance(margs, Mapping) else None)
            if tag in warmed:
                continue
            warmed.add(tag)
            with tempfile.TemporaryDirectory() as tmp:
                build_trainer(self.params, j.method, j.overrides, out_dir=tmp)

    def evaluate(self, row: str, model: Any, seed: int | None = None, fixed: bool = False, dense_fn: Any = None,
                 mode: str = "x+v", **kw: Any) -> Any:
        """The chapter-01 protocols (:func:`ovlib.eval.students.evaluate_student`) on the chapter's evaluation
        images (``budget``: ``region_images``, else the profile's ``eval_images``, see :attr:`region_images`;
        ``seg_images``), recorded as ``row`` / ``seed`` (``fixed``: a
        deterministic model, one evaluation). ``kw``: ``crops``, ``ovss``, ``kmeans``, ``region``,
        ``keep_regions``."""
        bb = self.backbones()
        ev = evaluate_student(model, bb.dataset, bb.text, bb.class_ids, bb.settings, mode=mode,
                              name=f"{row}" if seed is None else f"{row}-s{seed}",
                              region_images=self.region_images,
                              seg_images=int(self.budget.get("seg_images", 0) or 0), dense_fn=dense_fn,
                              seed=int(self.params["seed"]), device=self.device, **kw)
        self.record(row, ev, seed=seed, fixed=fixed)
        return ev

    def record(self, row: str, ev: Any, seed: int | None = None, fixed: bool = False) -> None:
        """Add an evaluation (anything with ``point(metric)`` and ``per_image``) to a row."""
        r = self.rows.setdefault(row, Row(row, fixed=fixed, order="study-eval"))
        if r.fixed != fixed:
            raise ValueError(f"row {row!r} is {'fixed' if r.fixed else 'seeded'}; cannot add a "
                             f"{'fixed' if fixed else 'seeded'} evaluation")
        if fixed and r.evals:
            raise ValueError(f"row {row!r} is a fixed model with one evaluation already")
        r.evals[0 if seed is None else int(seed)] = ev

    def values(self, row: str, metric: str) -> list[float]:
        """Per-seed values of ``row`` (empty when the row was not run at this budget)."""
        return self.rows[row].values(metric) if row in self.rows else []

    def pm(self, row: str, metric: str, digits: int = 1) -> str:
        """``mean ± std`` over the row's seeds (``–`` when absent)."""
        return ms(self.values(row, metric), digits)

    # ------------------------------------------------------------------------------------------- claims
    def _paper(self, paper_ref: str | None) -> tuple[str, str, Any]:
        """``(paper, table/figure, value)`` of a reported number; without one, the chapter's own paper."""
        if self._numbers is None:
            self._numbers = paper_numbers(self.root)
        if not paper_ref:
            own = [k for k, v in self._numbers["papers"].items() if str(v.get("chapter")) == self.chapter]
            return (own[0] if own else ""), "", None
        nums = self._numbers["numbers"]
        if paper_ref not in nums:
            raise KeyError(f"{self.root / PAPER_NUMBERS}: no reported number {paper_ref!r}")
        n = nums[paper_ref]
        return n["paper"], n["ref"], n["value"]

    def paper_value(self, key: str) -> Any:
        """The ``value`` of a reported number (or table) of ``book/paper_numbers.yaml``."""
        return self._paper(key)[2]

    def paper_table(self, key: str, cols: slice = slice(None), sep: str = " / ", digits: int = 1) -> dict[str, str]:
        """A table of ``book/paper_numbers.yaml`` (value: ``{row: number or list}``) as printable cells:
        ``{str(row): "76.0 / 77.9"}`` (``cols`` picks the list's entries)."""
        val = self.paper_value(key)
        if not isinstance(val, Mapping):
            raise ValueError(f"{self.root / PAPER_NUMBERS}: {key!r} is not a table (row -> values)")
        return {str(k): sep.join(f"{x:.{digits}f}" for x in (v[cols] if isinstance(v, list) else [v]))
                for k, v in val.items()}

    def _sample(self, side: str | stats.Sample, metric: str) -> stats.Sample | None:
        if isinstance(side, stats.Sample):
            return side
        if side not in self.rows or not self.rows[side].evals:
            return None
        return self.rows[side].sample(metric)

    def compare(self, a: str | stats.Sample, b: str | stats.Sample, metric: str, expect: int = 1
                ) -> stats.Comparison | None:
        """:func:`ovlib.stats.compare` of two rows without recording a claim (``None`` when a row is absent)."""
        sa, sb = self._sample(a, metric), self._sample(b, metric)
        if sa is None or sb is None:
            return None
        return stats.compare(sa, sb, expect=expect, n_boot=self.n_boot, seed=int(self.params["seed"]))

    def claim(self, id: str, text: str, a: str | stats.Sample, b: str | stats.Sample, metric: str, expect: int = 1,
              headline: bool = False, paper_ref: str | None = None, section: str = "",
              paper: str | None = None, negligible: float | None = None) -> Claim | None:
        """``b - a`` on ``metric``, expected with sign ``expect``, judged by :func:`ovlib.stats.compare`.

        ``a`` / ``b``: row names (:meth:`run`, :meth:`evaluate`) or :class:`ovlib.stats.Sample` s. A row not
        run at this budget gives no claim (``None``). ``headline``: one of the chapter's main claims (Holm
        across them in :meth:`ledger`). ``paper_ref``: key of ``book/paper_numbers.yaml``. ``negligible``: a
        resolved difference smaller than this is flagged in the tables (not in the verdict)."""
        if any(c.id == id for c in self.claims):
            raise ValueError(f"claim id {id!r} is used twice in chapter {self.chapter}")
        cmp_ = self.compare(a, b, metric, expect)
        if cmp_ is None:
            return None
        pp, ref, val = self._paper(paper_ref)
        c = Claim(id, text, metric, cmp_, headline, paper or pp, ref, val, section or self.section,
                  (a if isinstance(a, str) else "", b if isinstance(b, str) else ""),
                  self.negligible if negligible is None else negligible)
        self.claims.append(c)
        return c

    def add_claim(self, id: str, text: str, comparison: stats.Comparison, metric: str = "", headline: bool = False,
                  paper_ref: str | None = None, section: str = "", paper: str | None = None) -> Claim:
        """Record a comparison made outside :meth:`claim` (a rank test over heads, a threshold on a bootstrap
        interval, a timing): the caller states its kind in ``comparison.kind``."""
        if any(c.id == id for c in self.claims):
            raise ValueError(f"claim id {id!r} is used twice in chapter {self.chapter}")
        pp, ref, val = self._paper(paper_ref)
        c = Claim(id, text, metric, comparison, headline, paper or pp, ref, val, section or self.section)
        self.claims.append(c)
        return c

    def judge(self, text: str, res: tuple[stats.Sample, stats.Sample] | stats.Comparison, expect: int = 1,
              metric: str = "", headline: bool = False, paper_ref: str | None = None, section: str = "",
              negligible: float | None = None) -> Claim:
        """A claim from two :class:`ovlib.stats.Sample` s (judged by :meth:`claim`) or a ready comparison
        (:meth:`add_claim`), its id made of the chapter, its rank and the text."""
        cid = f"{self.chapter}-{len(self.claims)}-" + re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:70]
        if isinstance(res, stats.Comparison):
            return self.add_claim(cid, text, res, metric, headline=headline, paper_ref=paper_ref, section=section)
        c = self.claim(cid, text, res[0], res[1], metric, expect, headline=headline, paper_ref=paper_ref,
                       section=section, negligible=negligible)
        assert c is not None  # two Samples always compare
        return c

    def claim_in(self, section: str, text: str, a: str | stats.Sample, b: str | stats.Sample, metric: str,
                 expected: int = 1, headline: bool = False, paper_ref: str | None = None,
                 negligible: float | None = None) -> Claim | None:
        """:meth:`claim` with the id made of the section, the text and the metric (``expected``: the sign)."""
        cid = f"{section}-" + re.sub(r"[^a-z0-9]+", "-", f"{text} {metric}".lower()).strip("-")[:80]
        return self.claim(cid, text, a, b, metric, expected, headline=headline, paper_ref=paper_ref, section=section,
                          negligible=negligible)

    def check(self, id: str, text: str, value: float, target: float = 0.0, tol: float = 1e-6,
              relation: str = "==", section: str = "", paper_ref: str | None = None,
              paper: str | None = None) -> Claim:
        """An identity or numerical check (:func:`ovlib.stats.check`): it passes or fails, never an empirical
        claim."""
        if any(c.id == id for c in self.claims):
            raise ValueError(f"claim id {id!r} is used twice in chapter {self.chapter}")
        pp, ref, val = self._paper(paper_ref)
        c = Claim(id, text, "check", stats.check(value, target, tol, relation), False, paper or pp, ref, val,
                  section or self.section)
        self.claims.append(c)
        return c

    def finalize(self) -> None:
        """Holm--Bonferroni across the headline claims (kind ``claim``) of the chapter."""
        family = [c for c in self.claims if c.headline and c.comparison.kind == "claim"]
        for c, padj in zip(family, stats.holm([c.comparison.p for c in family])):
            c.comparison.p_adjusted = padj

    def entries(self) -> list[dict[str, Any]]:
        """The ledger entries (:data:`LEDGER_FIELDS`), after :meth:`finalize`."""
        self.finalize()

        def num(x: Any) -> Any:
            return float(x) if isinstance(x, (int, float, np.floating)) and math.isfinite(float(x)) else None

        out = []
        for c in self.claims:
            k = c.comparison
            out.append({"id": c.id, "chapter": self.chapter, "paper": c.paper, "paper_ref": c.paper_ref,
                        "paper_value": c.paper_value, "claim": c.text, "section": c.section, "metric": c.metric,
                        "ours_a": num(k.ours_a), "ours_b": num(k.ours_b), "delta": num(k.delta),
                        "ci_low": num(k.ci_low), "ci_high": num(k.ci_high), "p": num(k.p),
                        "p_adjusted": num(k.p_adjusted), "seeds_a": k.seeds_a, "seeds_b": k.seeds_b,
                        "kind": k.kind, "headline": c.headline, "verdict": k.verdict,
                        "indication": k.indication if k.kind == "indicative" else None, "test": k.test,
                        "rows": list(c.rows), "half_width": num(k.half_width),
                        "target": None if k.kind == "check" else c.target, "meets_target": c.meets_target,
                        "seeds_needed": c.seeds_needed})
        return out

    def ledger(self, path: str | Path | None = None) -> Path:
        """Write the chapter's claims to ``book/claims/NN.json`` (atomically) and return the path."""
        path = Path(path) if path is not None else self.root / CLAIMS_DIR / f"{self.chapter}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"chapter": self.chapter, "profile": self.params["profile"], "seeds": len(self.seeds),
               "claims": self.entries()}
        atomic_write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n", path)
        return path

    def claims_table(self, ids: Sequence[str] | None = None, since: int | None = None, digits: int = 1) -> str:
        """A Markdown table of the chapter's claims (all, those with ``ids``, or those recorded after the first
        ``since``): claim, test, effect, verdict; a ``paper`` column (table and number of
        ``book/paper_numbers.yaml``) when one of them quotes the paper."""
        self.finalize()
        sel = [c for i, c in enumerate(self.claims)
               if (ids is None or c.id in ids) and (since is None or i >= since)]
        quote = any(c.paper_ref for c in sel)
        rows = [[c.section, c.text + (" **(headline)**" if c.headline else ""), c.metric, c.comparison.test]
                + ([c.paper_text] if quote else []) + [c.describe(digits)] for c in sel]
        return table(["§", "claim (paper's direction)", "metric", "test"] + (["paper"] if quote else [])
                     + ["measured → verdict"], rows)

    def tally(self) -> dict[str, int]:
        """Counts of the verdicts of kind ``claim`` (indicative comparisons and checks are counted apart)."""
        self.finalize()
        out = {v: 0 for v in stats.VERDICTS}
        out.update(indicative=0, checks_passed=0, checks_failed=0)
        for c in self.claims:
            k = c.comparison.kind
            if k == "claim":
                out[c.verdict] += 1
            elif k == "indicative":
                out["indicative"] += 1
            else:
                out["checks_passed" if c.verdict == "holds" else "checks_failed"] += 1
        return out

    def summary(self, setting: str) -> str:
        """The chapter's closing paragraph, generated from the ledger: how many claims are judged on seeds and
        how they came out (the texts of those that hold / are reversed), the indicative ones and the checks;
        ``setting`` says what budget produced them (e.g. ``"micro profile, 100 steps, 3 seeds"``)."""
        t = self.tally()
        judged = [c for c in self.claims if c.comparison.kind == "claim"]
        held = [c.text for c in judged if c.verdict == "holds"]
        rev = [c.text for c in judged if c.verdict == "reversed"]
        checks = (f"; {t['checks_passed']} checks passed, {t['checks_failed']} failed"
                  if t["checks_passed"] or t["checks_failed"] else "")
        return (f"Of {len(self.claims)} entries, {len(judged)} are claims judged on seeds: **{t['holds']} hold**, "
                f"**{t['reversed']} are reversed** and **{t['not resolved']} are not resolved**; "
                f"{t['indicative']} rest on one seed (*indicative*: shown, not counted){checks} ({setting}). "
                "Headline claims are Holm–Bonferroni corrected; the book's Claims ledger collects every chapter's.\n\n"
                + ("Hold: " + "; ".join(held) + ".\n\n" if held
                   else "No claim judged on seeds holds at this budget.\n\n")
                + ("Reversed: " + "; ".join(rev) + "." if rev else "None is reversed.")
                + self.precision_summary())

    def precision_summary(self) -> str:
        """How precise the headline claims judged on seeds are: how many reach their interval target
        (:data:`INTERVAL_TARGETS`), each that misses with its half-width and the seeds that would reach it, and the
        claims whose interval excludes 0 but that Holm's correction holds back (generated from the ledger)."""
        self.finalize()
        head = [c for c in self.claims if c.headline and c.comparison.kind == "claim"]
        if not head:
            return ""
        miss = [c for c in head if c.meets_target is False]

        def need(c: Claim) -> str:
            n = c.seeds_needed
            return (f"{n} seeds per side would reach it" if n is not None
                    else "more seeds alone would not reach it" if "se_seeds" in c.comparison.extra
                    else "deterministic models: only more evaluation images would narrow it")

        out = (f"\n\nPrecision: {len(head) - len(miss)} of {len(head)} headline claims reach their interval target "
               f"(95 % half-width ≤ {INTERVAL_TARGETS['points']:g} points, ≤ {INTERVAL_TARGETS['miou']:g} for mIoU)"
               + (": all." if not miss else "; missing it: " + "; ".join(
                   f"{c.text} (±{c.comparison.half_width:.1f}, target ±{c.target:g}; {need(c)})" for c in miss) + "."))
        held_back = [c for c in head if c.verdict == "not resolved" and stats.verdict(
            c.comparison.delta, c.comparison.expect, lo=c.comparison.ci_low, hi=c.comparison.ci_high) != "not resolved"]
        if held_back:
            out += (" Interval excludes 0 but not resolved after Holm's correction across the chapter's headline "
                    "claims: " + "; ".join(f"{c.text} (p = {c.comparison.p:.3f}, Holm {c.comparison.p_adjusted:.3f})"
                                           for c in held_back) + ".")
        return out

    # ------------------------------------------------------------------------------------------- cost
    def cost_table(self) -> str:
        """What the chapter's runs cost: one row per run (trained now or loaded from the shared cache)."""
        rows = [[r.row, r.method, r.seed, "trained" if r.trained_now else "loaded",
                 f"{r.train_s:.0f}" if math.isfinite(r.train_s) else "–",
                 f"{r.eval.seconds:.0f}" if r.eval is not None else "–", f"{r.wall_s:.0f}",
                 re.sub(r".*/", "", str(r.res.get("out_dir", "")))] for r in self.runs]
        trained = sum(r.trained_now for r in self.runs)
        return (table(["row", "method", "seed", "run", "training (s)", "evaluation (s)", "wall (s)", "cache entry"],
                      rows) + f"\n\n{len(self.runs)} runs ({trained} trained here, {len(self.runs) - trained} "
                f"loaded from the shared run cache); chapter wall time {time.perf_counter() - self.t0:.0f} s.")
