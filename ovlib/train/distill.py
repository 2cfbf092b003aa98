"""One teacher-student distillation loop for every method, on a laptop or under ``torchrun`` on many GPUs.

The loop owns everything a method should not have to think about:

* **processes**: plain single-process, or PyTorch DDP when launched by ``torchrun`` (``WORLD_SIZE > 1``;
  gloo on CPU, nccl on CUDA). Each rank reads its own shard of a seeded per-epoch permutation.
* **precision**: ``amp`` = ``bf16`` | ``fp16`` | ``none`` | ``auto`` (CUDA: bf16 where supported, else fp16 with a
  GradScaler; CPU: bf16 autocast only on CPUs with AMX bf16 tiles, else fp32: ``resolve_precision``).
* **optimisation**: AdamW without weight decay on norms, biases and the logit scale (parameters with
  ``ndim < 2`` or those names), betas/eps from open_clip's heuristic unless given, linear warmup + cosine,
  gradient accumulation (DDP gradient sync only on the last micro-batch), optional grad clipping.
* **freezing**: the public code's rules (:func:`lock_visual`): EVA — everything frozen but the last N blocks
  (patch embed, pos embed, cls, final norm and head stay frozen); open_clip ViT — open_clip's own
  ``VisionTransformer.lock`` groups. The text tower never trains.
* **checkpoints**: ``last.pt`` written atomically every ``save_every`` steps and at the end of each epoch; it holds
  model, optimiser, scheduler, scaler, step, epoch, sampler position and every rank's RNG states, so a resumed
  run continues bit-identically on CPU. A non-finite loss stops training with :class:`NonFiniteLoss` before any
  update or write, so the last good checkpoint is intact.
* **alpha ensemble** (reference §1.6): at every epoch end ``ensemble-epochE.pt`` = alpha * student + (1 - alpha) *
  teacher over the CLIP weights; training continues from the raw student.
* **teacher targets** (``teacher_cache``, default on): frozen-network outputs (teacher crop CLS, teacher dense
  maps, frozen-Refiner tokens, VFM patch features) come from a per-row cache keyed by the network's weights and
  the input's content (:mod:`ovlib.train.targets`; which methods hit, and when, is documented there). Results are
  identical with and without it, so it is not part of the run's identity (``out_dir`` hash, resume check);
  its hit counts go to ``results.json`` (``teacher_cache``).
* **what is kept** (``checkpoint``): ``"full"`` (default) as above; ``"final"`` (the paper profile's dry run, where a
  ViT-B run's ``last.pt`` with AdamW state and its ensemble would be ~1.8 GB for two steps) writes no ``last.pt``
  and no epoch ensembles, only ``ensemble-final.pt`` without the frozen student weights (they equal the base
  CLIP's; their keys are listed under ``omitted`` and :func:`ovlib.io.model_state` takes them from the base).
  Such a run cannot resume: killed before its end, it starts afresh.
* **records**: ``metrics.jsonl`` (rank 0) and ``results.json`` (metrics, config, git commit, package versions,
  hardware, and the ``recovery`` counts below).
* **crash safety** (a kill at any instant): a record is appended and fsynced before the checkpoint of its step;
  a resume keeps exactly the records of steps the checkpoint holds (later ones are replayed) and drops a torn last
  line (counted, logged); a start without a checkpoint moves an earlier run's records into ``stale-no-checkpoint-<k>``
  (``stale-no-resume-<k>`` for ``resume=False``) so the log starts afresh; an epoch's α-ensemble is written before
  the epoch-end checkpoint (a kill between them replays and rewrites it); ``results.json`` is written last and only
  for a finished run. ``tests/test_fault_tolerance.py`` kills runs at each of these instants
  (:func:`ovlib.io.fault_point`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from ovlib.io import (
    DONE,
    append_jsonl,
    atomic_save,
    atomic_write_text,
    fault_point,
    read_jsonl,
    remove_stale_temps,
    rewrite_jsonl,
    safe_load,
    set_aside,
    tqdm_disabled,
)
from ovlib.train.optim import param_groups, warmup_cosine
from ovlib.train.targets import shared_cache

__all__ = [
    "DistillConfig",
    "NonFiniteLoss",
    "LOCK_STYLES",
    "ResumableSampler",
    "Trainer",
    "default_betas",
    "lock_visual",
    "param_groups",
    "warmup_cosine",
    "weight_ensemble",
    "dist_info",
]


#: DistillConfig fields outside the run's identity (out_dir hash, resume check): the cache changes how fast a run
#: is, not what it computes; ``teacher_chunk_px`` changes the frozen networks' outputs at float rounding only
CACHE_FIELDS = ("teacher_cache", "teacher_cache_mb", "teacher_cache_dir", "teacher_chunk_px")


class NonFiniteLoss(FloatingPointError):
    """A loss term became NaN or Inf; training stopped before the update and before any checkpoint write."""


# --------------------------------------------------------------------------------------------- config


@dataclass
class DistillConfig:
    """Everything one distillation run depends on (the checkpoint stores it; the run directory is keyed by it).

    Image sizes are pixels of the square student tensor / teacher crop; batch sizes are per process, so the
    global batch is ``batch_size * grad_accum * world_size``.
    """

    method: str = "clipself"
    backbone: str = "micro-clip"  # open_clip name or a registered micro config
    pretrained: str | None = None  # open_clip tag or local checkpoint file
    vfm: str | None = None  # timm DINOv2 name or "micro-vfm" (methods that need one)
    vfm_pretrained: str | None = None
    data_root: str = "data/microworld"
    split: str = "train2017"
    max_images: int = 0  # 0 = every image of the split
    regions: str = "grid"  # "grid" (CLIPSelf image patches) | "gt_boxes" (SynCLIP)
    student_size: int = 160
    crop_size: int = 64
    max_split: int = 6
    max_boxes: int = 20
    thing_crop_scale: float = 1.5  # gt_boxes: crop = box expanded about its centre
    batch_size: int = 8
    grad_accum: int = 1
    epochs: int = 6
    max_steps: int = 0  # > 0 overrides epochs
    lr: float = 1e-5
    weight_decay: float = 0.1
    betas: tuple[float, float] | None = None  # None: open_clip's heuristic (see default_betas)
    eps: float | None = None
    warmup_steps: int = 1000
    grad_clip: float = 0.0  # 0 = off (the public code does not clip)
    unlocked_blocks: int = -1  # -1 = every block
    # "clipself": the reference's lock (CLIPSelf's EVA and OpenAI towers): only the last unlocked_blocks blocks
    # train; stem, position embedding, final norm and projection stay frozen. "open_clip": open_clip's lock
    # groups (ours before; -1 also trains the stem, ln_post and the projection). See lock_visual.
    lock_style: str = "clipself"
    alpha: float = 1.0  # weight of the student in saved ensembles; 1.0 = save the raw student only
    checkpoint: str = "full"  # "full": last.pt (resumable) + ensembles; "final": only what training changed, at the end
    amp: str = "auto"  # auto | bf16 | fp16 | none
    device: str = "auto"
    seed: int = 0
    num_workers: int = 0
    save_every: int = 0  # steps; 0 = at epoch ends only
    log_every: int = 10
    out_dir: str = "data/runs/distill"
    loss_weights: dict[str, float] = field(default_factory=dict)
    method_args: dict[str, Any] = field(default_factory=dict)
    # frozen-teacher outputs computed once per (network weights, input row) and reused (ovlib.train.targets);
    # the in-memory LRU (teacher_cache_mb) is shared by the trainers of a process; teacher_cache_dir adds a disk store
    teacher_cache: bool = True
    teacher_cache_mb: float = 1024.0
    teacher_cache_dir: str | None = None
    # input pixels per call of a frozen network (rows per call = this // a row's H*W, at least 1; see
    # ovlib.methods.base.run_chunked): a fixed chunk per kind makes each row's output independent of its batch,
    # which exact caching needs; 0 = the whole batch (a GPU wants larger chunks; 0 is exact only for identical
    # batches)
    teacher_chunk_px: int = 32768

    def __post_init__(self):
        if self.amp not in ("auto", "bf16", "fp16", "none"):
            raise ValueError(f"amp must be auto, bf16, fp16 or none; got {self.amp!r}")
        if self.lock_style not in LOCK_STYLES:
            raise ValueError(f"lock_style must be one of {LOCK_STYLES}; got {self.lock_style!r}")
        if self.checkpoint not in CHECKPOINT_MODES:
            raise ValueError(f"checkpoint must be one of {CHECKPOINT_MODES}; got {self.checkpoint!r}")
        if self.regions not in ("grid", "gt_boxes"):
            raise ValueError(f"regions must be 'grid' or 'gt_boxes'; got {self.regions!r}")
        for k in ("batch_size", "grad_accum"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.teacher_chunk_px < 0:
            raise ValueError(f"teacher_chunk_px must be >= 0 (0 = the whole batch), got {self.teacher_chunk_px}")
        if self.teacher_cache_mb < 0:
            raise ValueError(f"teacher_cache_mb must be >= 0, got {self.teacher_cache_mb}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] (1 = no ensemble), got {self.alpha}")
        if self.betas is not None:
            self.betas = tuple(self.betas)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DistillConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown DistillConfig field(s) {unknown}; known: {sorted(names)}")
        return cls(**d)


# --------------------------------------------------------------------------------------------- pieces


def default_betas(backbone: str) -> tuple[tuple[float, float], float]:
    """open_clip's heuristic as used by CLIPSelf/DeCLIP/SynCLIP: ``"vit" in name`` -> (0.9, 0.98), eps 1e-6,
    else (0.9, 0.999), eps 1e-8 — so EVA02 runs get the latter (``wusize/CLIPSelf:src/training/params.py``
    ``get_default_params``; reference §1.6)."""
    if "vit" in backbone.lower():
        return (0.9, 0.98), 1e-6
    return (0.9, 0.999), 1e-8


LOCK_STYLES = ("clipself", "open_clip")
#: ``DistillConfig.checkpoint``: "full" = last.pt (model, optimiser, scheduler, RNG: resumable) and the alpha
#: ensembles; "final" = ensemble-final.pt only, frozen student weights left out (module docstring)
CHECKPOINT_MODES = ("full", "final")


def lock_visual(model: nn.Module, unlocked_blocks: int, style: str = "clipself") -> list[str]:
    """Freeze the CLIP model for distillation; return the names of trainable parameters.

    Text tower and logit scale are always frozen. ``style="clipself"`` (default, the reference's lock,
    reference §1.6): every visual parameter frozen, then the last ``unlocked_blocks`` transformer blocks
    unfrozen (``-1`` = every block); patch embedding, position embedding, cls token, pre/final norm and the
    projection stay frozen -- CLIPSelf's ``EVAVisionTransformer.lock``
    (``wusize/CLIPSelf:src/open_clip/eva_clip/eva_vit_model.py``) and its OpenAI ``VisionTransformer.lock``
    (``wusize/CLIPSelf:src/open_clip/transformer.py``: groups [conv1, class_embedding, ln_pre],
    positional_embedding, blocks; ``ln_post`` and ``proj`` commented out as "fix"), where ``unlocked_blocks``
    beyond the depth also unlocks the position embedding, then the stem (open_clip towers).

    ``style="open_clip"``: open_clip's own ``VisionTransformer.lock(unlocked_groups)``, groups [stem],
    blocks[:-1], [last block, ln_post], proj (``mlfoundations/open_clip:src/open_clip/transformer.py``), ``-1``
    = every group, so the projection and the final LN train too (a trained projection moves the student's own
    crop CLS). EVA towers have no such groups: both styles lock them the same way.
    """
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer

    if style not in LOCK_STYLES:
        raise ValueError(f"lock_visual: style must be one of {LOCK_STYLES}, got {style!r}")
    model.requires_grad_(False)
    v = model.visual
    if isinstance(v, TimmModel):
        blocks = list(v.trunk.blocks)
        n = len(blocks) if unlocked_blocks < 0 else unlocked_blocks
        for blk in blocks[len(blocks) - n:] if n > 0 else []:
            blk.requires_grad_(True)
    elif isinstance(v, VisionTransformer) and style == "clipself":
        blocks = list(v.transformer.resblocks)
        # CLIPSelf's groups, shallow -> deep: stem, position embedding, then one group per block
        groups: list[list] = [[v.conv1, v.class_embedding, v.ln_pre], [v.positional_embedding],
                              *[[b] for b in blocks]]
        n = len(blocks) if unlocked_blocks < 0 else min(unlocked_blocks, len(groups))
        for group in groups[len(groups) - n:] if n > 0 else []:
            for part in group:
                part.requires_grad_(True)
    elif isinstance(v, VisionTransformer):
        n_groups = len(v.transformer.resblocks) + 2
        n = n_groups if unlocked_blocks < 0 else unlocked_blocks
        if n > 0:
            v.lock(unlocked_groups=n)
    else:
        raise TypeError(f"lock_visual: unsupported visual tower {type(v).__name__}")
    return [name for name, p in model.named_parameters() if p.requires_grad]


@torch.no_grad()
def weight_ensemble(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], alpha: float,
                    prefix: str = "") -> dict[str, torch.Tensor]:
    """``alpha * student + (1 - alpha) * teacher`` for every floating tensor whose key (minus ``prefix`` on the
    student side) the teacher has; other entries are the student's (reference §1.6,
    ``wusize/CLIPSelf:src/training/train.py`` ``student_teacher_ensemble``)."""
    out = {}
    for k, s in student.items():
        tk = k[len(prefix):] if prefix and k.startswith(prefix) else None
        t = teacher.get(tk) if tk is not None else None
        if t is not None and s.is_floating_point():
            if t.shape != s.shape:
                raise ValueError(f"weight_ensemble: {k} has shape {tuple(s.shape)} but the teacher's is "
                                 f"{tuple(t.shape)}")
            out[k] = alpha * s + (1.0 - alpha) * t.to(s.dtype)
        else:
            out[k] = s.clone()
    return out


# --------------------------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info(device: str = "auto") -> DistInfo:
    """Initialise the process group when launched by torchrun (``WORLD_SIZE > 1``); gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, dev)


def _all_reduce_mean(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= world
    return t


# --------------------------------------------------------------------------------------------- sampling


class ResumableSampler(torch.utils.data.Sampler[int]):
    """A seeded per-epoch permutation, sharded over ranks, that can start mid-epoch.

    Every rank gets ``per_rank = floor(n / world / unit) * unit`` indices (``unit`` = batch * accumulation), so
    every optimiser step sees full batches on every rank and no rank waits for another.
    """

    def __init__(self, n: int, world: int = 1, rank: int = 0, seed: int = 0, unit: int = 1, shuffle: bool = True):
        if n < world * unit:
            raise ValueError(f"dataset of {n} samples is smaller than one global step ({world} ranks x {unit})")
        self.n, self.world, self.rank, self.seed, self.unit, self.shuffle = n, world, rank, seed, unit, shuffle
        self.per_rank = (n // world) // unit * unit
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        """Iterate ``epoch`` from its ``start``-th index of this rank's shard."""
        self.epoch, self.start = epoch, start

    def indices(self, epoch: int) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
        else:
            perm = list(range(self.n))
        return perm[self.rank: self.rank + self.per_rank * self.world: self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices(self.epoch)[self.start:])

    def __len__(self) -> int:
        return self.per_rank - self.start


# --------------------------------------------------------------------------------------------- RNG state


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather_objects(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------------------------- records


def run_record(cfg: DistillConfig, info: DistInfo) -> dict[str, Any]:
    """Provenance of a run: git commit, package versions, hardware."""
    import importlib.metadata as md

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    hw = {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count(),
          "device": str(info.device), "world_size": info.world}
    if info.device.type == "cuda":
        hw["gpu"] = torch.cuda.get_device_name(info.device)
    return {
        "config": dataclasses.asdict(cfg),
        "git_commit": commit,
        "packages": {p: version(p) for p in ("torch", "torchvision", "open_clip_torch", "timm", "numpy")},
        "hardware": hw,
    }


# --------------------------------------------------------------------------------------------- trainer


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "none":
        return None
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        # CPUs without native bf16 instructions run bf16 matmuls tens of times slower than fp32: measure once
        from ovlib.train.pretrain import resolve_precision

        return torch.bfloat16 if resolve_precision("auto", device) else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


class Trainer:
    """Trains ``method`` (a :class:`~ovlib.methods.base.Distiller`) on ``dataset`` under ``cfg``.

    ``dataset`` is a map-style dataset whose ``__getitem__(i)`` may depend on the epoch through
    ``dataset.set_epoch(e)`` (per-sample randomness must be a function of (seed, epoch, index) for exact resume);
    ``collate`` builds the method's batch.
    """

    def __init__(self, cfg: DistillConfig, method: nn.Module, dataset: torch.utils.data.Dataset,
                 collate: Callable[[list], dict], teacher_state: dict[str, torch.Tensor] | None = None,
                 info: DistInfo | None = None):
        self.cfg = cfg
        self.info = info or dist_info(cfg.device)
        self.out = Path(cfg.out_dir)
        self.method = method.to(self.info.device)
        for m in getattr(method, "frozen", {}).values():
            m.to(self.info.device)
        self.dataset, self.collate = dataset, collate
        self.teacher_state = teacher_state
        self.target_cache = (shared_cache(cfg.teacher_cache_mb, cfg.teacher_cache_dir) if cfg.teacher_cache
                             else None)
        if hasattr(method, "frozen_call"):  # a Distiller (ovlib.methods.base): its frozen networks read the cache
            method.target_cache = self.target_cache
            method.teacher_chunk_px = cfg.teacher_chunk_px
        self._cache_stats0 = dict(self.target_cache.stats) if self.target_cache is not None else {}
        self.amp_dtype = _amp_dtype(cfg.amp, self.info.device)
        params = [p for p in method.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the method has no trainable parameters (check unlocked_blocks)")
        if cfg.betas is None or cfg.eps is None:
            betas, eps = default_betas(cfg.backbone)
            betas, eps = cfg.betas or betas, cfg.eps or eps
        else:
            betas, eps = cfg.betas, cfg.eps
        # a method may train new modules faster than the pretrained tower (Distiller.lr_multipliers)
        groups = param_groups(method, cfg.weight_decay, lr_mult=method.lr_multipliers(), base_lr=cfg.lr)
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=eps)
        self.unit = cfg.batch_size * cfg.grad_accum
        self.sampler = ResumableSampler(len(dataset), self.info.world, self.info.rank, cfg.seed, self.unit)
        self.steps_per_epoch = self.sampler.per_rank // self.unit
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * self.steps_per_epoch
        warmup, total = cfg.warmup_steps, self.total_steps
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: warmup_cosine(s, warmup, total))
        self.scaler = torch.amp.GradScaler(self.info.device.type, enabled=self.amp_dtype == torch.float16)
        self.ddp = (DDP(method, device_ids=[self.info.device] if self.info.device.type == "cuda" else None)
                    if self.info.world > 1 else None)
        self.step, self.epoch, self.pos = 0, 0, 0  # pos: index into this rank's shard of the current epoch
        self.history: list[dict[str, Any]] = []  # the records of metrics.jsonl (restored on resume)
        # what crash recovery did over the run's life (saved in checkpoints, reported in results.json)
        self.recovery: dict[str, Any] = {"resumes": 0, "torn_records": 0, "replayed_records_dropped": 0,
                                         "set_aside": []}

    # -------------------------------------------------------------------------------- checkpoints
    @property
    def last_path(self) -> Path:
        return self.out / "last.pt"

    def save(self) -> None:
        if self.cfg.checkpoint == "final":  # no resumable state: only ensemble-final.pt at the end
            return
        rng = _gather_objects(_rng_state(), self.info.world)
        if self.info.is_main:
            atomic_save({
                "model": self.method.state_dict(),
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(),
                "scaler": self.scaler.state_dict(),
                "step": self.step, "epoch": self.epoch, "pos": self.pos,
                "rng": rng,
                "config": json.dumps(dataclasses.asdict(self.cfg)),
                "recovery": json.dumps(self.recovery),
            }, self.last_path)
        if self.info.world > 1:
            dist.barrier()

    def resume(self, path: Path | None = None) -> bool:
        """Restore everything from ``path`` (default ``out_dir/last.pt``); False when there is nothing to resume."""
        path = Path(path) if path else self.last_path
        if not path.is_file():
            return False
        ck = safe_load(path, map_location="cpu")
        saved = json.loads(ck["config"])
        mine = dataclasses.asdict(self.cfg)
        differs = sorted(k for k in mine if k not in ("out_dir", "device", "num_workers", "log_every", "save_every",
                                                      "max_steps", "epochs", *CACHE_FIELDS)
                         and json.dumps(saved.get(k)) != json.dumps(mine[k], default=list))
        if differs:
            raise ValueError(f"{path} was written by a run with a different config ({differs}); "
                             f"use another out_dir or remove the checkpoint")
        self.method.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        self.scaler.load_state_dict(ck["scaler"])
        self.step, self.epoch, self.pos = ck["step"], ck["epoch"], ck["pos"]
        rngs = ck["rng"]
        if len(rngs) != self.info.world:
            raise ValueError(f"{path} holds RNG states of {len(rngs)} ranks but this run has {self.info.world}")
        _set_rng_state(rngs[self.info.rank])
        if "recovery" in ck:
            self.recovery = json.loads(ck["recovery"])
        self.recovery["resumes"] += 1
        if self.info.is_main:
            self._align_records()
        if self.info.world > 1:
            dist.barrier()
        return True

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    def _align_records(self) -> None:
        """After a resume: keep exactly the records of the steps the checkpoint holds (the others are replayed),
        drop a torn last line, and retire a finished-run record when the run trains further (a longer schedule)."""
        remove_stale_temps(self.out)
        recs, torn = read_jsonl(self.metrics_path)
        keep = [r for r in recs if r["step"] <= self.step]
        self.recovery["torn_records"] += torn
        self.recovery["replayed_records_dropped"] += len(recs) - len(keep)
        if torn or len(keep) != len(recs):
            rewrite_jsonl(self.metrics_path, keep)
        self.history = keep
        if self.step < self.total_steps:
            moved = set_aside([self.out / "results.json", self.out / DONE, self.out / "ensemble-final.pt"],
                              self.out / "stale-unfinished", f"{self.out}: resuming at step {self.step} of "
                              f"{self.total_steps}, the earlier finished-run files are stale")
            if moved is not None:
                self.recovery["set_aside"].append(moved.name)

    def _start_records(self, resume: bool) -> None:
        """A fresh start: an earlier run's records in ``out_dir`` (records without a checkpoint: killed before its
        first one; or ``resume=False``) are moved aside, named, so the new log starts at step 1."""
        if not self.info.is_main:
            return
        remove_stale_temps(self.out)
        old = [self.metrics_path, self.out / "results.json", self.out / DONE, self.last_path,
               *sorted(self.out.glob("ensemble-*.pt"))]
        why = "no-checkpoint" if resume else "no-resume"
        moved = set_aside(old, self.out / f"stale-{why}",
                          f"{self.out}: fresh start ({'no checkpoint to resume from' if resume else 'resume=False'}),"
                          f" the earlier run's records are kept aside")
        if moved is not None:
            self.recovery["set_aside"].append(moved.name)

    def save_ensemble(self, tag: str) -> Path | None:
        """``alpha * student + (1 - alpha) * teacher`` of the CLIP weights (reference §1.6); raw student if
        alpha = 1."""
        if not self.info.is_main:
            return None
        sd = self.method.state_dict()
        omitted: list[str] = []
        student = getattr(self.method, "student", None)
        if self.cfg.checkpoint == "final" and isinstance(student, nn.Module):  # frozen = the base CLIP's weights
            omitted = sorted(f"student.{n}" for n, p in student.named_parameters() if not p.requires_grad)
            drop = set(omitted)
            sd = {k: v for k, v in sd.items() if k not in drop}
        if self.cfg.alpha < 1.0:
            if self.teacher_state is None:
                raise ValueError("alpha < 1 needs the teacher's state_dict")
            sd = weight_ensemble(sd, self.teacher_state, self.cfg.alpha, prefix="student.")
        payload = {"model": sd, "alpha": self.cfg.alpha, "step": self.step}
        if omitted:
            payload["omitted"] = omitted
        path = atomic_save(payload, self.out / f"ensemble-{tag}.pt")
        fault_point("distill.ensemble-saved")
        return path

    def cache_stats(self) -> dict[str, int] | None:
        """What the teacher-target cache did for this trainer (row counts since it was built); None when off."""
        if self.target_cache is None:
            return None
        return {k: v - self._cache_stats0.get(k, 0) for k, v in self.target_cache.stats.items()}

    # -------------------------------------------------------------------------------- loop
    def _loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        module = self.ddp if self.ddp is not None else self.method
        dev = self.info.device
        with torch.autocast(dev.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            terms = module(batch)
        w = self.cfg.loss_weights
        unknown = sorted(set(w) - set(terms))
        if unknown:
            raise ValueError(f"loss_weights name unknown loss term(s) {unknown}; the method returns {sorted(terms)}")
        total = sum(float(w.get(k, 1.0)) * v.float() for k, v in terms.items())
        return total, {k: v.detach().float() for k, v in terms.items()}

    def _check_finite(self, total: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        ok = torch.tensor([float(torch.isfinite(total).item())], device=self.info.device)
        if self.info.world > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if ok.item() < 1:
            vals = {k: float(v) for k, v in terms.items()}
            raise NonFiniteLoss(f"non-finite loss at step {self.step} (epoch {self.epoch}) on some rank: local terms "
                                f"{vals}; training stopped, the last good checkpoint {self.last_path} is unchanged")

    def _log(self, rec: dict[str, Any]) -> None:
        self.history.append(rec)
        if self.info.is_main:
            append_jsonl(self.metrics_path, rec)

    def fit(self, resume: bool = True, stop_after: int | None = None) -> dict[str, Any]:
        """Train to ``total_steps`` (or until ``stop_after`` more steps); returns the run summary."""
        cfg, info = self.cfg, self.info
        resumed = self.resume() if resume else False
        if not resumed and self.step == 0:  # fresh run: an earlier run's records go aside; seed the RNG per rank
            self._start_records(resume)
            if info.world > 1:
                dist.barrier()
            torch.manual_seed(cfg.seed * 7919 + info.rank)
        self.method.train()
        t0, seen, steps_here = time.perf_counter(), 0, 0
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not info.is_main or tqdm_disabled(),
                   desc=f"{cfg.method}")
        while self.step < self.total_steps and (stop_after is None or steps_here < stop_after):
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.epoch)
            self.sampler.set_position(self.epoch, self.pos)
            # the loader's own generator (not the global RNG, which a mid-epoch resume would draw from once more
            # than the uninterrupted run): worker seeds are a function of (seed, epoch); no loader when a
            # resume lands at the end of an epoch
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.epoch)
            loader = torch.utils.data.DataLoader(self.dataset, batch_size=cfg.batch_size, sampler=self.sampler,
                                                 collate_fn=self.collate, num_workers=cfg.num_workers,
                                                 drop_last=True, persistent_workers=False, generator=gen)
            it = iter(loader) if self.pos < self.sampler.per_rank else iter(())
            while self.pos < self.sampler.per_rank and self.step < self.total_steps:
                if stop_after is not None and steps_here >= stop_after:
                    break
                sums: dict[str, torch.Tensor] = {}
                for micro in range(cfg.grad_accum):
                    batch = _to_device(next(it), info.device)
                    sync = self.ddp is None or micro == cfg.grad_accum - 1
                    ctx = self.ddp.no_sync() if (self.ddp is not None and not sync) else _nullcontext()
                    with ctx:
                        total, terms = self._loss(batch)
                        self._check_finite(total, terms)
                        self.scaler.scale(total / cfg.grad_accum).backward()
                    for k, v in terms.items():
                        sums[k] = sums.get(k, 0.0) + v / cfg.grad_accum
                    sums["loss"] = sums.get("loss", 0.0) + total.detach() / cfg.grad_accum
                if cfg.grad_clip > 0:
                    self.scaler.unscale_(self.opt)
                    torch.nn.utils.clip_grad_norm_([p for p in self.method.parameters() if p.requires_grad],
                                                   cfg.grad_clip)
                self.scaler.step(self.opt)
                self.scaler.update()
                self.opt.zero_grad(set_to_none=True)
                self.sched.step()
                self.step += 1
                steps_here += 1
                self.pos += self.unit
                seen += self.unit * info.world
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    vals = {k: float(_all_reduce_mean(v.reshape(1), info.world)) for k, v in sums.items()}
                    dt = time.perf_counter() - t0
                    self._log({"step": self.step, "epoch": self.epoch, "lr": self.sched.get_last_lr()[-1],
                               **vals, "samples_per_s": seen / max(dt, 1e-9), "elapsed_s": dt})
                    bar.set_postfix(loss=f"{vals['loss']:.4f}")
                fault_point("distill.recorded")  # after the step's record (if any), before its checkpoint
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save()
            if self.pos >= self.sampler.per_rank:  # epoch finished
                self.epoch += 1
                self.pos = 0
                if self.cfg.alpha < 1.0 and self.cfg.checkpoint == "full":  # before the checkpoint: a kill in
                    # between replays the epoch's end
                    self.save_ensemble(f"epoch{self.epoch}")
                self.save()
        bar.close()
        if self.pos != 0:  # stopped mid-epoch (max_steps or stop_after): keep the exact position
            self.save()
        if self.step >= self.total_steps:
            self.save_ensemble("final")
        summary = {"steps": self.step, "epoch": self.epoch, "wall_s": time.perf_counter() - t0,
                   "samples_per_s": seen / max(time.perf_counter() - t0, 1e-9), "steps_run": steps_here,
                   "final": self.history[-1] if self.history else None}
        results = self.out / "results.json"
        if self.step >= self.total_steps and steps_here == 0 and results.is_file():
            # a finished run resumed at its end: its record (training time, throughput) stays as written
            try:
                return {**json.loads(results.read_text())["train"], "steps_run": 0}
            except (json.JSONDecodeError, KeyError):
                pass  # unreadable (outside damage): rewrite it below
        if info.is_main and self.step >= self.total_steps:
            rec = run_record(cfg, info)
            rec["train"] = summary
            rec["recovery"] = self.recovery
            rec["teacher_cache"] = self.cache_stats()
            atomic_write_text(json.dumps(rec, indent=2, default=str), results)  # the run's last write
        return summary


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
