"""Micro pre-training: contrastive CLIP on micro-world captions, DINO-style self-supervision of the micro VFM.

Both trainers follow the book's "load if present, else train" rule: the finished model lives at
``cache_path(cache_dir, kind, cfg)`` (``kind`` = ``"micro-clip"`` / ``"micro-vfm"``, keyed by a hash of the
whole config but its ``data_pipeline``, :data:`DATA_PIPELINES`), a resumable training state (model,
optimiser, scheduler, step, RNG, history) is written atomically every ``ckpt_every`` steps next to it
(``*.state.pt``) and removed when training finishes. A non-finite loss stops training with
:class:`FloatingPointError`; the last good state stays on disk.

* :func:`clip_loss` -- the symmetric InfoNCE of CLIP (Radford et al. 2021, Fig. 3 pseudo-code) with the
  learnable temperature ``logit_scale`` (clamped at ``ln 100`` after each step, as open_clip does).
* :func:`dino_loss` -- DINO's cross-entropy between the sharpened, centred teacher distribution of each
  global view and the student distribution of every other view (Caron et al. 2021, Eq. 1-3, Alg. 1).
* Measurements for the chapter: :func:`matmul_peak` (timed large matmul, the machine's measured peak),
  :func:`forward_flops` (``torch.utils.flop_counter``) and the throughput recorded in the histories.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ovlib.config import profile_sizes, training_precision
from ovlib.io import atomic_save, cache_path, fault_point, key_fields, load_cache, tqdm_disabled
from ovlib.models.images import image_mean_std  # re-exported: the trainers' callers import it from here
from ovlib.train.optim import param_groups, warmup_cosine

__all__ = [
    "ClipPretrainConfig",
    "DinoPretrainConfig",
    "pretrain_configs",
    "vfm_config",
    "VFM_OBJECTIVES",
    "register_vfm_objective",
    "scaled_budget",
    "clip_loss",
    "dino_loss",
    "DinoHead",
    "multicrop",
    "warmup_cosine",
    "param_groups",
    "PRETRAIN_NO_DECAY",
    "pretrain_clip",
    "pretrain_vfm",
    "matmul_peak",
    "forward_flops",
    "clip_train_flops_per_sample",
    "image_mean_std",
    "resolve_precision",
    "DATA_PIPELINES",
]


#: How a pre-training gets its micro-world data (the ``data_pipeline`` field of every pre-training config):
#: ``"shards"`` renders the items the run needs before its first step, in parallel worker processes of one thread
#: each, onto disk (:mod:`ovlib.data.stream_shards`, removed when the run finishes), so the optimiser loop only
#: reads them back; ``"inline"`` renders them in the training loop (a DataLoader with ``num_workers`` workers;
#: 0: between the steps, on one thread while torch's other threads wait; each worker is a process beside torch's
#: threads, so give the trainer that many fewer). Both give bit-identical batches, so the field is not part of
#: the cache key (``metadata={"cache_key": False}``, :func:`ovlib.io.key_fields`): either finds the other's model.
#: Measured (issue 22, cProfile and process CPU time at one thread): scene rendering + captioning is a quarter
#: (fp32) to a third (bf16 on AMX) of an inline micro CLIP step, tokenisation < 1 % (so it stays in the loop);
#: the rest is the model (matmuls, attention, GELU), which then bounds the step.
DATA_PIPELINES = ("shards", "inline")


def _pipeline_field() -> Any:
    return field(default="shards", metadata={"cache_key": False})


# ------------------------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class ClipPretrainConfig:
    """Contrastive pre-training of a micro CLIP on freshly generated micro-world scenes and captions."""

    model: str = "micro-clip"
    world_seed: int = 0
    image_size: int = 64
    batch_size: int = 128
    steps: int = 360             # ~8 min at the idle 2-core rate (~97 samples/s); see object_views
    lr: float = 1e-3
    warmup: int = 36
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    precision: str = "auto"      # "auto" | "bf16" | "fp32" (auto: bf16 autocast where it is faster)
    num_workers: int = 0
    seed: int = 0
    ckpt_every: int = 100
    object_views: float = 0.7    # fraction of close-ups of one thing (MicroWorld.object_view): whole scenes
    #   alone teach object names slowly. Measured (session 3, val-scene thing crops, thing names / all classes):
    #   views 0.5, lr 5e-4, 300 steps: 60.6 / 55.2 %; views 0.7, lr 1e-3, 360 steps: 75.0 / 71.1 %
    view_render_size: int = 128
    view_context: tuple[float, float] = (1.2, 2.5)
    # the text tower's positions (ovlib.models.clip.TEXT_CONTEXTS): "trim" runs it up to the batch's last
    # end-of-text token (the same function; the optimiser loop 1.07-1.13x faster at micro: make bench), "full"
    # over all 32 positions
    text_context: str = "trim"
    data_pipeline: str = _pipeline_field()  # "shards" | "inline" (DATA_PIPELINES); not part of the cache key


@dataclass(frozen=True)
class DinoPretrainConfig:
    """DINO self-distillation of the micro VFM on micro-world images (multi-crop, EMA teacher)."""

    model: str = "micro-vfm"
    world_seed: int = 0
    image_size: int = 64          # size of the generated scene
    global_size: int = 48
    local_size: int = 24
    n_local: int = 4
    global_scale: tuple[float, float] = (0.35, 1.0)
    local_scale: tuple[float, float] = (0.1, 0.35)
    batch_size: int = 48
    steps: int = 120
    lr: float = 1e-3
    warmup: int = 12
    weight_decay: float = 0.04
    out_dim: int = 1024
    hidden_dim: int = 256
    bottleneck_dim: int = 64
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    center_momentum: float = 0.9
    ema: tuple[float, float] = (0.996, 1.0)
    clip_grad: float = 3.0
    precision: str = "auto"
    num_workers: int = 0
    seed: int = 0
    ckpt_every: int = 100
    data_pipeline: str = _pipeline_field()  # "shards" | "inline" (DATA_PIPELINES); not part of the cache key


def scaled_budget(cfg: Any, sizes: Mapping[str, Any], steps_scale: float) -> Any:
    """``cfg`` with a profile's pre-training budget (``budgets.pretrain.<model>``, :data:`ovlib.config.SIZE_KEYS`):
    ``steps = max(min_steps, round(steps * steps_scale))``, warm-up the budget's, at most a tenth of the steps (at
    least 1); every other key replaces the config field of its name."""
    if steps_scale <= 0:
        raise ValueError(f"steps_scale must be > 0, got {steps_scale}")
    steps = max(int(sizes["min_steps"]), round(sizes["steps"] * steps_scale))
    rest = {k: v for k, v in sizes.items() if k not in ("steps", "warmup", "min_steps")}
    return replace(cfg, **rest, steps=steps, warmup=max(1, min(int(sizes["warmup"]), steps // 10)))


def pretrain_configs(profile: str | Mapping[str, Any], steps_scale: float = 1.0,
                     seed: int = 0) -> tuple[ClipPretrainConfig, Any]:
    """The micro CLIP and micro VFM pre-training configs of a profile (a name, or resolved parameters): the
    budgets of ``budgets.pretrain`` in ``params/PROFILE.yaml`` (:func:`ovlib.config.profile_sizes`), with
    ``steps_scale`` multiplying the steps (and the warm-up, kept at ~10 % of the run), at least the profile's
    ``min_steps``, and the profile's ``precision`` (:func:`ovlib.config.training_precision`). The ``paper``
    profile uses real pretrained weights; it gets the ``micro`` budgets should it ask.

    The micro VFM's config is the one of the profile's ``budgets.pretrain.vfm.objective`` (:func:`vfm_config`);
    :func:`pretrain_vfm` trains any of them."""
    sizes = profile_sizes(profile, "pretrain")["clip"]
    c = scaled_budget(ClipPretrainConfig(seed=seed, world_seed=seed, precision=training_precision(profile)), sizes,
                      steps_scale)
    return c, vfm_config(profile, steps_scale, seed)


# -------------------------------------------------------------------------------------------------- losses
def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE. ``image_features (B, D)``, ``text_features (B, D)`` unit norm, ``logit_scale`` the
    *log* temperature parameter: ``logits = exp(logit_scale) * I T^T``; pair i is the positive of row/col i.
    ``loss = (CE(logits, arange) + CE(logits^T, arange)) / 2``."""
    if image_features.shape != text_features.shape or image_features.ndim != 2:
        raise ValueError(f"clip_loss: features must both be (B, D), got {tuple(image_features.shape)} and "
                         f"{tuple(text_features.shape)}")
    logits = logit_scale.exp() * image_features.float() @ text_features.float().T  # (B, B)
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def dino_loss(student_out: list[torch.Tensor], teacher_out: list[torch.Tensor], center: torch.Tensor,
              student_temp: float, teacher_temp: float) -> torch.Tensor:
    """DINO's loss (Caron et al. 2021, Eq. 1/3): for every teacher view t and student view s != t,
    ``H(P_t, P_s) = -sum softmax((g_t - c)/tau_t) * log_softmax(g_s / tau_s)``, averaged over pairs and batch.

    ``student_out``: list over all views (global first) of ``(B, K)`` logits; ``teacher_out``: list over the
    global views of ``(B, K)`` logits (no gradient); ``center (1, K)``.
    """
    if not teacher_out or len(student_out) < len(teacher_out):
        raise ValueError("dino_loss: need >= 1 teacher view and at least as many student views")
    targets = [F.softmax((t.float() - center) / teacher_temp, dim=-1).detach() for t in teacher_out]
    logps = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student_out]
    total, n = 0.0, 0
    for ti, t in enumerate(targets):
        for si, lp in enumerate(logps):
            if si == ti:
                continue
            total = total + (-(t * lp).sum(-1)).mean()
            n += 1
    return total / n


class DinoHead(nn.Module):
    """DINO projection head: MLP (GELU) -> L2-normalised bottleneck -> weight-normalised linear to K logits
    (``facebookresearch/dino:vision_transformer.py`` ``DINOHead`` structure, 3 layers)."""

    def __init__(self, in_dim: int, out_dim: int = 1024, hidden_dim: int = 256, bottleneck_dim: int = 64):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        self.last = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        with torch.no_grad():
            self.last.parametrizations.weight.original0.fill_(1.0)  # weight-norm gain 1 (DINO)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, K)
        return self.last(F.normalize(self.mlp(x), dim=-1))


# ------------------------------------------------------------------------------------------------- helpers
#: pre-training from scratch also keeps embeddings (token/positional/cls) out of weight decay
PRETRAIN_NO_DECAY = ("logit_scale", "embedding", "bias", "norm", "cls_token", "pos_embed")


def _to_float01(img: torch.Tensor) -> torch.Tensor:
    return img.float().div_(255.0) if img.dtype == torch.uint8 else img.float()


def _normalize(x: torch.Tensor, mean, std) -> torch.Tensor:  # x (B, 3, H, W) in [0, 1]
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def _collate(items: list[dict]) -> dict:
    return {"image": torch.stack([_to_float01(torch.as_tensor(it["image"])) for it in items]),  # (B, 3, H, W)
            "caption": [it["caption"] for it in items],
            "index": torch.tensor([int(it["index"]) for it in items])}


def _stream_loader(world_seed: int, size: int, batch_size: int, start: int, num_workers: int,
                   **views: Any) -> Iterator[dict]:
    """Batches of the micro-world stream from scene ``start`` on; ``views``: ``object_views``,
    ``view_render_size``, ``view_context`` of :class:`~ovlib.data.microworld.MicroWorldStream`."""
    from ovlib.data.microworld import MicroWorld, MicroWorldStream

    stream = MicroWorldStream(MicroWorld(seed=world_seed), size=size, start=start, **views)
    loader = torch.utils.data.DataLoader(stream, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=_collate, persistent_workers=False)
    return iter(loader)


#: The VFM reads scenes from another part of the same world's stream than the CLIP.
_VFM_STREAM_OFFSET = 50_000_000


def _shard_processes() -> int:
    """Worker processes that render shards: the threads torch was given (``OMP_NUM_THREADS`` /
    ``torch.set_num_threads``), at most the cores this process may run on. The trainer waits while they work
    and they run one thread each, so threads x processes never exceeds what the caller allotted."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(torch.get_num_threads(), cores))


def _data_batches(cfg: Any, cache_dir: str | Path, world_seed: int, size: int, batch_size: int, start: int,
                  stop: int, end: int, run: _RunLog, progress: bool, **views: Any) -> Iterator[dict]:
    """The batches of the micro-world stream from item ``start`` on through ``cfg.data_pipeline``
    (:data:`DATA_PIPELINES`; the inline one is :func:`_stream_loader`). ``stop``: the item after the last one
    this call trains on (shards up to it are rendered before the first batch), ``end``: the item after the
    run's last one (the shards ``[end - steps * batch, end)`` are removed when ``run`` finishes). Nothing is
    rendered before the first ``next()``, so the trainer's clock (``run.start()``) counts it."""
    from ovlib.data.stream_shards import StreamSpec, ensure_shards, remove_shards, shard_batches

    if cfg.data_pipeline not in DATA_PIPELINES:
        raise ValueError(f"data_pipeline must be one of {DATA_PIPELINES}, got {cfg.data_pipeline!r}")
    if cfg.data_pipeline == "inline":
        return _stream_loader(world_seed, size, batch_size, start, cfg.num_workers, **views)
    spec = StreamSpec(world_seed, size, **views)
    root = Path(cache_dir) / "stream"

    def gen() -> Iterator[dict]:
        run.data_seconds += ensure_shards(root, spec, start, stop, processes=_shard_processes(),
                                          progress=_quiet(progress))["seconds"]
        run.cleanup.append(lambda: remove_shards(root, spec, end - cfg.steps * batch_size, end))
        yield from shard_batches(root, spec, start, batch_size)

    return gen()


_BF16_FASTER: dict[str, bool] = {}


def cpu_has_amx_bf16(cpuinfo: str | None = None) -> bool:
    """Does this CPU have Intel AMX bf16 tiles (``amx_bf16`` in ``/proc/cpuinfo``)? ``cpuinfo``: the file's
    text (for tests); ``False`` where the file cannot be read (not Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    return any("amx_bf16" in line.split(":", 1)[1].split()
               for line in cpuinfo.splitlines() if line.startswith("flags") and ":" in line)


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> bool:
    """Use bf16 autocast? ``"bf16"``/``"fp32"`` force it; ``"auto"`` on CUDA uses bf16 where supported and on
    CPU only where the CPU has AMX bf16 tiles (:func:`cpu_has_amx_bf16`; measured there: bf16 matmul ~3.5x
    fp32). The choice is a fact of the machine, never a timing: an earlier rule timed a matmul once per process
    and, on a loaded CPU with AVX512-BF16 (near the threshold), flipped between processes -- two same-seed runs
    then trained in different precisions. ``_BF16_FASTER`` records the choice per device type."""
    device = torch.device(device)
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {precision!r}")
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type not in _BF16_FASTER:
        _BF16_FASTER[device.type] = device.type == "cpu" and cpu_has_amx_bf16()
    return _BF16_FASTER[device.type]


def _blas_single_thread():
    """Limit numpy's BLAS (OpenBLAS) to one thread while scenes are rendered in the training process: its idle
    threads spin and starve torch's threads (measured on 2 cores: 20 -> 83 samples/s for the micro CLIP)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def _quiet(progress: bool) -> dict:
    """tqdm kwargs: ``progress=False`` or a true ``TQDM_DISABLE`` environment variable silences the bar. The
    variable is read here because ``tqdm.auto`` in a notebook is ``tqdm.notebook``, whose own ``disable=False``
    default shadows tqdm's environment defaults (:func:`ovlib.io.tqdm_disabled`)."""
    return {"disable": True} if not progress or tqdm_disabled() else {}


def _autocast(enabled: bool, device: torch.device):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def _fast_adam(device: torch.device) -> dict:
    """The fused AdamW kernel (CPU and CUDA): several times faster than the per-tensor loop on CPU, where
    the micro CLIP's 49408 x 128 token embedding dominates the parameter count."""
    return {"fused": True} if device.type in ("cpu", "cuda") else {}


def _training_peak(bf16: bool, device: torch.device) -> float:
    """The matmul peak (FLOP/s, in the precision the run uses) measured by the process that trains, so a
    cached model's MFU is against the machine state of its own run (stored in ``info["matmul_peak"]``)."""
    return matmul_peak(torch.bfloat16 if bf16 else torch.float32, n=512, seconds=0.3, device=device)


def _state_path(final: Path) -> Path:
    return final.with_name(final.name[: -len(".pt")] + ".state.pt")


class _RunLog:
    """The bookkeeping both pre-trainings share: the resumable state file next to the final cache file, the
    step counter and per-step history, training time that excludes checkpoint writes, the progress bar,
    numpy's BLAS held to one thread, and the final file (written atomically, state file removed)."""

    def __init__(self, final: Path, cfg: Any, name: str, desc: str, progress: bool):
        self.final, self.state_file, self.cfg, self.name = final, _state_path(final), cfg, name
        self.step, self.history, self.train_seconds = 0, [], 0.0
        self.desc, self.progress = desc, progress
        self.cleanup: list[Callable[[], Any]] = []  # run once the final file is written (e.g. remove data shards)
        self.data_seconds = 0.0  # shard rendering before the first step of this call (part of train_seconds)

    def resume(self) -> dict | None:
        """The saved state (and counters restored from it), or ``None`` when there is none -- or when it is
        unusable (corrupt, truncated, another config: set aside and counted by :func:`ovlib.io.load_cache`, and
        training starts over). The history is part of the state, so the records always match its weights."""

        def valid(st: dict) -> None:
            _same_config(st.get("config"), self.cfg, self.state_file)
            if len(st["history"]) != int(st["step"]) or any(h["step"] != i + 1 for i, h in enumerate(st["history"])):
                raise ValueError(f"history of {len(st['history'])} records does not match step {st['step']}")

        st = load_cache(self.state_file, valid, what=f"{self.name} training state")
        if st is None:
            return None
        self.step, self.history, self.train_seconds = int(st["step"]), list(st["history"]), float(st["train_seconds"])
        return st

    def save(self, payload: dict) -> None:
        atomic_save({**payload, "step": self.step, "history": self.history, "train_seconds": self.train_seconds,
                     "config": asdict(self.cfg)}, self.state_file)

    def start(self) -> None:
        self.bar = tqdm(total=self.cfg.steps, initial=self.step, desc=self.desc, **_quiet(self.progress))
        self.blas = _blas_single_thread()
        self.t_last = time.perf_counter()

    def check(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            self.close()
            raise FloatingPointError(f"{self.name}: non-finite loss at step {self.step}; last good state kept in "
                                     f"{self.state_file if self.state_file.is_file() else '(none yet)'}")

    def record(self, entry: dict, payload: Callable[[], dict]) -> None:
        """Count one finished step (``entry``: its logged values), save the state every ``ckpt_every`` steps."""
        self.step += 1
        now = time.perf_counter()
        self.train_seconds += now - self.t_last
        self.t_last = now
        self.history.append({"step": self.step, **entry, "seconds": self.train_seconds})
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{entry['loss']:.3f}")
        fault_point("pretrain.recorded")  # the step is counted in memory, its state not yet saved
        if self.step % self.cfg.ckpt_every == 0 and self.step < self.cfg.steps:
            self.save(payload())
            self.t_last = time.perf_counter()  # do not count checkpoint writes as training time

    def close(self) -> None:
        self.bar.close()
        self.blas.restore_original_limits()

    def finish(self, model: nn.Module, payload: Callable[[], dict], bf16: bool, peak: float) -> dict:
        """Close the run; write the final file when all steps are done (else the resumable state). Returns
        ``info`` with ``loaded=False`` and ``path``."""
        self.close()
        info = {"history": self.history, "train_seconds": self.train_seconds,
                "samples_per_s": len(self.history) and self.step * self.cfg.batch_size / max(self.train_seconds, 1e-9),
                "bf16": bf16, "matmul_peak": peak, "config": asdict(self.cfg), "data_seconds": self.data_seconds}
        if self.step < self.cfg.steps:
            self.save(payload())
            return dict(info, loaded=False, path=str(self.state_file))
        atomic_save({"model": model.state_dict(), "info": info}, self.final)
        fault_point("pretrain.final-written")  # the final file exists, the state file not yet removed
        if self.state_file.is_file():
            self.state_file.unlink()
        for fn in self.cleanup:
            fn()
        return dict(info, loaded=False, path=str(self.final))


def _same_config(saved: Any, cfg: Any, path: Path) -> None:
    """``saved`` (a config dict read from a file) is ``cfg`` up to the fields outside the cache key
    (:func:`ovlib.io.key_fields`: a state written by the inline pipeline resumes under the shards one)."""
    import json

    mine = key_fields(cfg)
    if isinstance(saved, dict):
        outside = {f.name for f in fields(cfg)} - set(mine)
        saved = {k: v for k, v in saved.items() if k not in outside}
    if json.dumps(saved, sort_keys=True, default=list) != json.dumps(mine, sort_keys=True, default=list):
        raise ValueError(f"{path} was written for another config")


def _load_final(final: Path, cfg: Any, model: nn.Module, what: str) -> dict | None:
    """The finished cache file of a pre-training, checked before use (:func:`ovlib.io.load_cache`: a corrupt,
    truncated or mismatched file is set aside, counted and rebuilt, never loaded as a wrong model): its config
    is ``cfg`` and its weights have exactly the model's keys and shapes. A state file left by a kill between
    the final write and its removal is removed."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    def valid(ck: dict) -> None:
        _same_config(ck["info"]["config"], cfg, final)
        got = {k: tuple(v.shape) for k, v in ck["model"].items()}
        if got != want:
            bad = sorted(set(got) ^ set(want)) or sorted(k for k in got if got[k] != want[k])
            raise ValueError(f"weights do not fit the {cfg.model} model (keys/shapes differ: {bad[:5]})")

    ck = load_cache(final, valid, what=what)
    if ck is not None and _state_path(final).is_file():
        _state_path(final).unlink()
    return ck


# --------------------------------------------------------------------------------------------------- CLIP
def pretrain_clip(cfg: ClipPretrainConfig, cache_dir: str | Path, device: str | torch.device = "cpu",
                  progress: bool = True, max_steps: int | None = None) -> tuple[nn.Module, Callable, dict]:
    """Load the micro CLIP trained with ``cfg`` from the cache, else train it (resuming a saved state).

    Returns ``(model (eval mode), tokenizer, info)``; ``info`` has ``history`` (list of per-step dicts:
    step, loss, lr, logit_scale, text_len -- the text positions the step ran, ``cfg.text_context`` --, seconds),
    ``samples_per_s`` and ``train_seconds`` (end to end: data rendering included), ``data_seconds`` (the part of
    it spent rendering shards before the first step of the call that trained), ``path`` and ``loaded`` (True when
    nothing was trained in this call). ``max_steps`` stops early after
    that many *total* steps, leaving a resumable state (used by tests of resume); the final file is written only
    at ``cfg.steps``.
    """
    from ovlib.models.clip import load_clip, text_encoder

    device = torch.device(device)
    final = cache_path(cache_dir, cfg.model, cfg)
    model, tokenizer, _ = load_clip(cfg.model, device="cpu", seed=cfg.seed)
    encode_text = text_encoder(model, cfg.text_context)

    def text_len(tokens: torch.Tensor) -> int:  # text positions the step ran (FLOPs accounting)
        return int(tokens.argmax(-1).max()) + 1 if cfg.text_context == "trim" else tokens.shape[1]
    ck = _load_final(final, cfg, model, f"micro CLIP cache ({cfg.model})")
    if ck is not None:
        model.load_state_dict(ck["model"])
        info = dict(ck["info"], loaded=True, path=str(final))
        return model.to(device).eval(), tokenizer, info

    model = model.to(device).train()
    mean, std = image_mean_std(model)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay, PRETRAIN_NO_DECAY), lr=cfg.lr, betas=cfg.betas,
                            eps=cfg.eps, **_fast_adam(device))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, cfg.warmup, cfg.steps))
    run = _RunLog(final, cfg, "pretrain_clip", f"pretrain {cfg.model}", progress)
    st = run.resume()
    if st is not None:
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        torch.set_rng_state(st["rng"])

    def payload() -> dict:
        return {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                "rng": torch.get_rng_state()}

    stop = cfg.steps if max_steps is None else min(cfg.steps, max_steps)
    use_bf16 = resolve_precision(cfg.precision, device)
    peak = _training_peak(use_bf16, device)
    B = cfg.batch_size
    batches = _data_batches(cfg, cache_dir, cfg.world_seed, cfg.image_size, B, run.step * B, stop * B, cfg.steps * B,
                            run, progress, object_views=cfg.object_views, view_render_size=cfg.view_render_size,
                            view_context=cfg.view_context)
    run.start()
    while run.step < stop:
        batch = next(batches)
        images = _normalize(batch["image"].to(device), mean, std)  # (B, 3, S, S)
        tokens = tokenizer(batch["caption"]).to(device)  # (B, L)
        with _autocast(use_bf16, device):
            img = F.normalize(model.encode_image(images), dim=-1)  # (B, D)
            txt = F.normalize(encode_text(tokens), dim=-1)  # (B, D)
        loss = clip_loss(img, txt, model.logit_scale)
        run.check(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        run.record({"loss": loss.item(), "lr": float(sched.get_last_lr()[0]),
                    "logit_scale": model.logit_scale.exp().item(), "text_len": text_len(tokens)}, payload)
    info = run.finish(model, payload, use_bf16, peak)
    return model.eval(), tokenizer, info


# ---------------------------------------------------------------------------------------------------- DINO
def multicrop(images: torch.Tensor, n: int, size: int, scale: tuple[float, float], generator: torch.Generator,
              ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True, sampling_ratio: int = 2
              ) -> list[torch.Tensor]:
    """``n`` random-resized crops (area fraction in ``scale``, aspect in ``ratio``, random horizontal flip)
    of every image of ``images (B, 3, H, W)``, each ``(B, 3, size, size)``, computed with one RoIAlign call
    per view (bilinear, ``aligned=True``, ``sampling_ratio`` points per bin side: 2 averages 4 bilinear samples
    per output pixel, a little anti-aliasing; 1 samples the bin centre). Deterministic given ``generator``."""
    from torchvision.ops import roi_align

    b, _, H, W = images.shape
    views = []
    for _ in range(n):
        area = torch.empty(b).uniform_(scale[0], scale[1], generator=generator) * H * W
        logr = torch.empty(b).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
        r = logr.exp()
        w = (area * r).sqrt().clamp(max=W)
        h = (area / r).sqrt().clamp(max=H)
        x0 = torch.rand(b, generator=generator) * (W - w)
        y0 = torch.rand(b, generator=generator) * (H - h)
        boxes = torch.stack([torch.arange(b, dtype=torch.float32), x0, y0, x0 + w, y0 + h], 1)  # (B, 5)
        v = roi_align(images, boxes.to(images), output_size=(size, size), spatial_scale=1.0,
                      sampling_ratio=sampling_ratio, aligned=True)  # (B, 3, size, size)
        if flip:
            f = torch.rand(b, generator=generator) < 0.5
            v = torch.where(f.view(b, 1, 1, 1).to(v.device), v.flip(-1), v)
        views.append(v)
    return views


def _vfm_embed(vfm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """CLS embedding ``(B, D)`` of a timm ViT (``forward_head(pre_logits=True)`` pools as configured)."""
    return vfm.forward_head(vfm.forward_features(x), pre_logits=True)


def _resume_self_distillation(run: _RunLog, s_net: nn.Module, t_net: nn.Module, center: torch.Tensor, opt,
                              sched, gen: torch.Generator) -> Callable[[], dict]:
    """Restore a DINO-style run (student, EMA teacher, centre, optimiser, schedule, generator) from the
    resumable state of ``run`` when there is one, and return the ``payload()`` that saves exactly that state
    (shared by the DINO and the dense micro VFM)."""
    st = run.resume()
    if st is not None:
        s_net.load_state_dict(st["student"])
        t_net.load_state_dict(st["teacher"])
        center.copy_(st["center"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        gen.set_state(st["gen"])

    def payload() -> dict:
        return {"student": s_net.state_dict(), "teacher": t_net.state_dict(), "center": center,
                "opt": opt.state_dict(), "sched": sched.state_dict(), "gen": gen.get_state()}

    return payload


def pretrain_vfm(cfg: Any, cache_dir: str | Path, device: str | torch.device = "cpu",
                 progress: bool = True, max_steps: int | None = None) -> tuple[nn.Module, dict]:
    """Load the DINO-trained micro VFM from the cache, else train it. Returns ``(teacher backbone (eval),
    info)``; the EMA teacher is the model kept, as in DINO. Same cache/resume rules as :func:`pretrain_clip`.
    The config of a registered objective (:data:`VFM_OBJECTIVES`: :class:`DenseVfmPretrainConfig`,
    :class:`ovlib.train.mae.MaeVfmPretrainConfig`) goes to that objective's trainer."""
    from ovlib.models import load_vfm

    for cls, trainer in VFM_OBJECTIVES.values():
        if isinstance(cfg, cls):
            return trainer(cfg, cache_dir, device=device, progress=progress, max_steps=max_steps)
    device = torch.device(device)
    final = cache_path(cache_dir, cfg.model, cfg)
    student = load_vfm(cfg.model, device="cpu", seed=cfg.seed)
    ck = _load_final(final, cfg, student, f"micro VFM cache ({cfg.model})")
    if ck is not None:
        student.load_state_dict(ck["model"])
        return student.to(device).eval(), dict(ck["info"], loaded=True, path=str(final))

    embed_dim = _vfm_embed(student, torch.zeros(1, 3, cfg.global_size, cfg.global_size)).shape[-1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        s_head = DinoHead(embed_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim)
    s_net = nn.ModuleDict({"backbone": student, "head": s_head}).to(device).train()
    t_net = copy.deepcopy(s_net).requires_grad_(False)
    center = torch.zeros(1, cfg.out_dim, device=device)
    opt = torch.optim.AdamW(param_groups(s_net, cfg.weight_decay, PRETRAIN_NO_DECAY),
                            lr=cfg.lr * cfg.batch_size / 256,
                            **_fast_adam(device))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, cfg.warmup, cfg.steps))
    gen = torch.Generator().manual_seed(cfg.seed)
    run = _RunLog(final, cfg, "pretrain_vfm", f"pretrain {cfg.model} (DINO)", progress)
    payload = _resume_self_distillation(run, s_net, t_net, center, opt, sched, gen)

    mean, std = image_mean_std(student)
    use_bf16 = resolve_precision(cfg.precision, device)
    peak = _training_peak(use_bf16, device)
    stop = cfg.steps if max_steps is None else min(cfg.steps, max_steps)
    B, o = cfg.batch_size, _VFM_STREAM_OFFSET
    batches = _data_batches(cfg, cache_dir, cfg.world_seed, cfg.image_size, B, o + run.step * B, o + stop * B,
                            o + cfg.steps * B, run, progress)
    run.start()
    while run.step < stop:
        step = run.step
        images = next(batches)["image"].to(device)  # (B, 3, S, S) in [0, 1]
        g = multicrop(images, 2, cfg.global_size, cfg.global_scale, gen)
        loc = multicrop(images, cfg.n_local, cfg.local_size, cfg.local_scale, gen) if cfg.n_local else []
        g = [_normalize(v, mean, std) for v in g]
        loc = [_normalize(v, mean, std) for v in loc]
        with _autocast(use_bf16, device):
            with torch.no_grad():
                t_out = t_net["head"](_vfm_embed(t_net["backbone"], torch.cat(g))).float().chunk(2)
            s_out = list(s_net["head"](_vfm_embed(s_net["backbone"], torch.cat(g))).float().chunk(2))
            if loc:
                s_out += list(s_net["head"](_vfm_embed(s_net["backbone"], torch.cat(loc))).float()
                              .chunk(len(loc)))
        loss = dino_loss(s_out, list(t_out), center, cfg.student_temp, cfg.teacher_temp)
        run.check(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad:
            nn.utils.clip_grad_norm_(s_net.parameters(), cfg.clip_grad)
        opt.step()
        sched.step()
        with torch.no_grad():
            m = cfg.ema[1] - (cfg.ema[1] - cfg.ema[0]) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
            for pt, ps in zip(t_net.parameters(), s_net.parameters()):
                pt.mul_(m).add_(ps.detach(), alpha=1 - m)
            batch_center = torch.cat(t_out).mean(0, keepdim=True)
            center.mul_(cfg.center_momentum).add_(batch_center, alpha=1 - cfg.center_momentum)
            t_prob = F.softmax((torch.cat(t_out) - center) / cfg.teacher_temp, dim=-1)
            entropy = float(-(t_prob * t_prob.clamp_min(1e-12).log()).sum(-1).mean())
        run.record({"loss": loss.item(), "lr": float(sched.get_last_lr()[0]), "ema": m, "teacher_entropy": entropy},
                   payload)
    teacher = t_net["backbone"]
    info = run.finish(teacher, payload, use_bf16, peak)
    return teacher.eval(), info


# ------------------------------------------------------------------------------------------- measurement
def matmul_peak(dtype: torch.dtype = torch.float32, n: int = 1024, seconds: float = 1.0,
                device: str | torch.device = "cpu") -> float:
    """Measured peak of this machine: FLOP/s of a timed ``(n, n) @ (n, n)`` matmul (``2 n^3`` FLOPs each),
    best of repeated runs over about ``seconds``."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def forward_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls,
    convolutions, attention; element-wise ops are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def clip_train_flops_per_sample(model: nn.Module, tokenizer: Callable, image_size: int,
                                text_len: int | None = None) -> float:
    """Training FLOPs per image-caption pair: 3x the forward FLOPs of both towers (forward + backward,
    the usual ``6 N`` accounting) plus the ``B x B`` logits, which are negligible and not counted. The text
    tower runs over all its context positions, or, with ``text_len``, over the first ``text_len`` of them
    (what :func:`ovlib.models.clip.encode_text_trimmed` computes for a batch whose last end-of-text token is
    at ``text_len - 1``)."""
    from ovlib.models.clip import encode_text_trimmed

    img = torch.zeros(1, 3, image_size, image_size)
    tok = tokenizer(["a photo of a thing"])  # (1, L)
    if text_len is None:
        text = lambda: model.encode_text(tok)  # noqa: E731
    else:
        if not 1 <= text_len <= tok.shape[1]:
            raise ValueError(f"text_len must be in [1, {tok.shape[1]}], got {text_len}")
        tok = torch.arange(1, text_len + 1).unsqueeze(0)  # (1, text_len): its end-of-text token is the last
        text = lambda: encode_text_trimmed(model, tok)  # noqa: E731
    return 3.0 * (forward_flops(lambda: model.encode_image(img)) + forward_flops(text))


# ============================================================================ dense micro VFM (the default)
# Dense self-distillation at the evaluation scale (ovlib.train.proxies explains the objective).
# ------------------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class DenseVfmPretrainConfig:
    """Dense self-distillation of the micro VFM across two views of evaluation-scale scenes."""

    model: str = "micro-vfm"
    world_seed: int = 0
    scene_size: int = 160           # scenes rendered at the evaluation resolution of chapter 01
    view_size: int = 64             # px of each view fed to the ViT (8x8 tokens at patch 8)
    view_scale: tuple[float, float] = (0.8, 1.25)  # crop side / view_size: objects keep ~their eval size
    pairs_per_scene: int = 4        # view pairs cut from each rendered scene
    batch_size: int = 32            # view pairs per step
    steps: int = 400
    lr: float = 5e-4
    warmup: int = 40
    weight_decay: float = 0.04
    out_dim: int = 256              # prototypes
    hidden_dim: int = 256
    bottleneck_dim: int = 64
    student_temp: float = 0.1
    teacher_temp: float = 0.05
    center_momentum: float = 0.9
    ema: tuple[float, float] = (0.99, 1.0)
    mask_ratio: float = 0.0         # iBOT: fraction of student tokens replaced by a learned mask token
    jitter: float = 0.2             # colour jitter strength (brightness, contrast, per-channel gain), per view
    channel_shuffle: float = 0.0    # probability that a view's RGB channels are permuted (a random permutation)
    grayscale: float = 0.0          # probability that a view is replaced by its luma (after any permutation)
    clip_grad: float = 3.0
    precision: str = "auto"
    num_workers: int = 0
    seed: int = 0
    ckpt_every: int = 100
    data_pipeline: str = _pipeline_field()  # "shards" | "inline" (DATA_PIPELINES); not part of the cache key


#: ``budgets.pretrain.vfm.objective`` -> ``(config class, trainer)`` of the micro VFM's pre-training: "dense"
#: (:class:`DenseVfmPretrainConfig`, dense self-distillation across views, below) and "mae" (masked patches of
#: whole scenes), which :mod:`ovlib.train.mae` registers -- it builds on this module, and the ``ovlib.train``
#: package imports it, so the registry is complete whenever this module is loaded through the package.
VFM_OBJECTIVES: dict[str, tuple[type, Callable[..., tuple[nn.Module, dict]]]] = {}


def register_vfm_objective(name: str, config_cls: type, trainer: Callable[..., tuple[nn.Module, dict]]) -> None:
    """Make ``name`` a value of ``budgets.pretrain.vfm.objective``: :func:`vfm_config` builds ``config_cls``,
    :func:`pretrain_vfm` hands its configs to ``trainer(cfg, cache_dir, device=, progress=, max_steps=)``."""
    VFM_OBJECTIVES[name] = (config_cls, trainer)


def vfm_config(profile: str | Mapping[str, Any], steps_scale: float = 1.0, seed: int = 0) -> Any:
    """The micro VFM config of a profile (:func:`pretrain_configs` returns it): the config class of
    ``budgets.pretrain.vfm.objective`` (:data:`VFM_OBJECTIVES`) with that budget, ``steps_scale`` multiplying the
    steps and the warm-up (~10 %) (:func:`scaled_budget`), and the profile's precision."""
    sizes = profile_sizes(profile, "pretrain")["vfm"]
    objective = sizes.pop("objective")
    if objective not in VFM_OBJECTIVES:
        raise ValueError(f"budgets.pretrain.vfm.objective {objective!r} is not one of {tuple(VFM_OBJECTIVES)}")
    return scaled_budget(VFM_OBJECTIVES[objective][0](seed=seed, world_seed=seed,
                                                      precision=training_precision(profile)), sizes, steps_scale)


def dense_vfm_config(profile: str | Mapping[str, Any], steps_scale: float = 1.0,
                     seed: int = 0) -> DenseVfmPretrainConfig:
    """The dense self-distillation config with a profile's VFM budget (``budgets.pretrain.vfm`` without its
    ``objective``), whatever objective the profile trains (the VFM trials compare them)."""
    sizes = profile_sizes(profile, "pretrain")["vfm"]
    sizes.pop("objective")
    return scaled_budget(DenseVfmPretrainConfig(seed=seed, world_seed=seed, precision=training_precision(profile)),
                         sizes, steps_scale)


# --------------------------------------------------------------------------------------------- geometry
def paired_views(images: torch.Tensor, pairs: int, size: int, scale: tuple[float, float],
                 generator: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Two square views of each image, ``pairs`` times: ``images (S, 3, H, W)`` -> ``views [a, b]`` each
    ``(S * pairs, 3, size, size)`` (image ``i`` at rows ``i * pairs ...``), ``boxes [a, b]`` each
    ``(S * pairs, 4)`` xyxy in image pixels and ``flips [a, b]`` each ``(S * pairs,)`` bool.

    The crop side is ``size * u``, ``u ~ U(scale)`` (clamped to the image), its position uniform; each view is
    RoIAlign-resampled (bilinear, ``aligned=True``) and horizontally flipped with probability 1/2."""
    from torchvision.ops import roi_align

    s, _, H, W = images.shape
    n = s * pairs
    src = torch.arange(s).repeat_interleave(pairs)  # (n,) image of each pair
    views, boxes, flips = [], [], []
    for _ in range(2):
        side = (torch.empty(n).uniform_(scale[0], scale[1], generator=generator) * size).clamp(max=min(H, W))
        x0 = torch.rand(n, generator=generator) * (W - side)
        y0 = torch.rand(n, generator=generator) * (H - side)
        box = torch.stack([x0, y0, x0 + side, y0 + side], 1)  # (n, 4)
        v = roi_align(images, torch.cat([src[:, None].float(), box], 1).to(images), output_size=(size, size),
                      spatial_scale=1.0, sampling_ratio=2, aligned=True)  # (n, 3, size, size)
        f = torch.rand(n, generator=generator) < 0.5
        v = torch.where(f.view(n, 1, 1, 1).to(v.device), v.flip(-1), v)
        views.append(v)
        boxes.append(box)
        flips.append(f)
    return views, boxes, flips


def view_correspondence(box_a: torch.Tensor, flip_a: torch.Tensor, box_b: torch.Tensor, flip_b: torch.Tensor,
                        grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each token centre of view ``a`` lies in view ``b``.

    ``box_* (n, 4)`` xyxy in image pixels, ``flip_* (n,)`` bool, ``grid`` tokens per side. Token ``(i, j)`` of
    a view covers ``[j, j+1] / grid`` of its width (after the flip, if any). Returns ``coords (n, grid, grid, 2)``
    -- ``(x, y)`` in ``grid_sample``'s normalised coordinates of view ``b`` (``align_corners=False``: -1 and 1
    are the outer pixel edges) -- and ``valid (n, grid, grid)``: the point lies inside view ``b``."""
    c = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid  # (g,) token centres in [0, 1]
    ua = c.view(1, 1, grid).expand(box_a.shape[0], grid, grid)  # (n, g, g) x fraction in view a
    va = c.view(1, grid, 1).expand(box_a.shape[0], grid, grid)  # (n, g, g) y fraction
    ua = torch.where(flip_a.view(-1, 1, 1), 1 - ua, ua)
    wa, ha = (box_a[:, 2] - box_a[:, 0]).view(-1, 1, 1), (box_a[:, 3] - box_a[:, 1]).view(-1, 1, 1)
    x = box_a[:, 0].view(-1, 1, 1) + ua * wa  # (n, g, g) image pixels
    y = box_a[:, 1].view(-1, 1, 1) + va * ha
    wb, hb = (box_b[:, 2] - box_b[:, 0]).view(-1, 1, 1), (box_b[:, 3] - box_b[:, 1]).view(-1, 1, 1)
    ub = (x - box_b[:, 0].view(-1, 1, 1)) / wb
    vb = (y - box_b[:, 1].view(-1, 1, 1)) / hb
    ub = torch.where(flip_b.view(-1, 1, 1), 1 - ub, ub)
    valid = (ub >= 0) & (ub <= 1) & (vb >= 0) & (vb <= 1)
    return torch.stack([2 * ub - 1, 2 * vb - 1], -1), valid


def _jitter(views: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Colour jitter of ``views (n, 3, S, S)`` in [0, 1]: brightness and contrast factors ``1 + U(-s, s)`` and a
    per-channel gain ``1 + U(-s/2, s/2)``, clamped to [0, 1]."""
    if strength <= 0:
        return views
    n = views.shape[0]

    def u(*shape, s=strength):
        return (torch.rand(*shape, generator=generator) * 2 - 1) * s

    mean = views.mean(dim=(1, 2, 3), keepdim=True)
    x = (views - mean) * (1 + u(n, 1, 1, 1)).to(views) + mean
    x = x * (1 + u(n, 1, 1, 1)).to(views) * (1 + u(n, 3, 1, 1, s=strength / 2)).to(views)
    return x.clamp(0, 1)


_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma weights (torchvision's rgb_to_grayscale)


def colour_permute(views: torch.Tensor, shuffle: float, grayscale: float, generator: torch.Generator
                   ) -> torch.Tensor:
    """Colour made useless as a shortcut between the two views: ``views (n, 3, S, S)`` in [0, 1]; each view's
    channels are permuted with probability ``shuffle`` (a uniformly random permutation of (R, G, B), identity
    included), then with probability ``grayscale`` every channel becomes the luma ``0.299 R + 0.587 G + 0.114 B``.
    The two views of a pair draw independently, so a token's colour in one view does not predict its colour in
    the other; texture, shading and shape do."""
    if not (0 <= shuffle <= 1 and 0 <= grayscale <= 1):
        raise ValueError(f"colour_permute: shuffle and grayscale must be probabilities, got {shuffle}, {grayscale}")
    n = views.shape[0]
    perm = torch.argsort(torch.rand(n, 3, generator=generator), dim=1)  # (n, 3) a random permutation per view
    use = torch.rand(n, generator=generator) < shuffle
    perm = torch.where(use[:, None], perm, torch.arange(3).expand(n, 3)).to(views.device)
    x = torch.gather(views, 1, perm.view(n, 3, 1, 1).expand_as(views))
    gray = (torch.rand(n, generator=generator) < grayscale).to(views.device)
    luma = (x * torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return torch.where(gray.view(n, 1, 1, 1), luma.expand_as(x), x)


# ------------------------------------------------------------------------------------------------ losses
def dense_dino_loss(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor, center: torch.Tensor,
                    student_temp: float, teacher_temp: float) -> torch.Tensor:
    """DINO's cross-entropy per token (iBOT's patch loss form): ``student (n, K, g, g)`` logits, ``teacher
    (n, K, g, g)`` logits at the corresponding points (no gradient), ``valid (n, g, g)`` bool, ``center (1, K)``.
    ``mean over valid tokens of -sum_k softmax((t - c)/tau_t)_k log_softmax(s/tau_s)_k``."""
    if student.shape != teacher.shape or student.ndim != 4:
        raise ValueError(f"dense_dino_loss: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} "
                         "must both be (n, K, g, g)")
    if not valid.any():
        return student.sum() * 0.0
    t = F.softmax((teacher.float() - center.view(1, -1, 1, 1)) / teacher_temp, dim=1).detach()
    lp = F.log_softmax(student.float() / student_temp, dim=1)
    ce = -(t * lp).sum(1)  # (n, g, g)
    return ce[valid].mean()


# ------------------------------------------------------------------------------------------------ model
def vfm_tokens(vfm: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None,
               mask_token: torch.Tensor | None = None) -> torch.Tensor:
    """Patch tokens ``(n, C, g, g)`` of a timm ``VisionTransformer`` on ``x (n, 3, S, S)``, with the patch
    embeddings where ``mask (n, g, g)`` is true replaced by ``mask_token (C,)`` before the positional
    embedding (iBOT). Follows timm's ``forward_features`` (patch_embed, _pos_embed, norm_pre, blocks, norm)."""
    t = vfm.patch_embed(x)  # (n, g, g, C) with dynamic_img_size, else (n, g*g, C)
    n = t.shape[0]
    g = x.shape[-1] // (vfm.patch_embed.patch_size[0] if isinstance(vfm.patch_embed.patch_size, tuple)
                        else vfm.patch_embed.patch_size)
    if mask is not None:
        m = mask.view(n, g, g, 1) if t.ndim == 4 else mask.view(n, g * g, 1)
        t = torch.where(m, mask_token.to(t.dtype).view(*([1] * (t.ndim - 1)), -1), t)
    t = vfm._pos_embed(t)
    t = vfm.norm_pre(vfm.patch_drop(t))
    t = vfm.norm(vfm.blocks(t))  # (n, P + g*g, C)
    t = t[:, vfm.num_prefix_tokens:]
    return t.transpose(1, 2).reshape(n, -1, g, g)


class _TokenHead(nn.Module):
    """DINO's head applied to every token: ``(n, C, g, g)`` -> ``(n, K, g, g)``."""

    def __init__(self, head: DinoHead):
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, g, _ = x.shape
        y = self.head(x.permute(0, 2, 3, 1).reshape(-1, c))  # (n*g*g, K)
        return y.view(n, g, g, -1).permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------- training
def _scene_batches(world_seed: int, size: int, scenes: int, start: int, data: dict | None = None):
    """Batches of ``scenes`` scenes ``(scenes, 3, size, size)`` in [0, 1] from the VFM's part of the stream;
    ``data``: the keyword arguments ``cfg, cache_dir, stop, end, run, progress`` of :func:`_data_batches`
    (``None``: the inline stream, rendered here)."""
    if data is not None:
        for b in _data_batches(world_seed=world_seed, size=size, batch_size=scenes, start=start, **data):
            yield b["image"]
        return
    from ovlib.data.microworld import MicroWorld, MicroWorldStream

    stream = MicroWorldStream(MicroWorld(seed=world_seed), size=size, start=start)
    it = iter(stream)
    while True:
        yield torch.stack([next(it)["image"] for _ in range(scenes)])


def cached_vfm(cfg: Any, cache_dir: str | Path, device: torch.device, what: str, size_field: str
               ) -> tuple[nn.Module, Path, int, dict | None]:
    """The start of a micro-VFM pre-training (dense here, MAE in :mod:`ovlib.train.mae`): ``(model, final cache
    file, patch, info)``. ``info`` is the finished run's (``loaded=True``) with the model on ``device`` in eval
    mode when the cache holds it (:func:`_load_final`), else ``None`` with the model freshly initialised on the
    CPU. ``cfg.<size_field>`` must be a multiple of the model's patch."""
    from ovlib.models import load_vfm

    final = cache_path(cache_dir, cfg.model, cfg)
    vfm = load_vfm(cfg.model, device="cpu", seed=cfg.seed)
    ck = _load_final(final, cfg, vfm, what) if final.is_file() else None
    patch = vfm.patch_embed.patch_size
    patch = patch[0] if isinstance(patch, tuple) else int(patch)
    if ck is not None:
        vfm.load_state_dict(ck["model"])
        return vfm.to(device).eval(), final, patch, dict(ck["info"], loaded=True, path=str(final))
    if getattr(cfg, size_field) % patch:
        raise ValueError(f"{size_field} ({getattr(cfg, size_field)}) must be a multiple of the VFM patch ({patch})")
    return vfm, final, patch, None


def pretrain_vfm_dense(cfg: DenseVfmPretrainConfig, cache_dir: str | Path, device: str | torch.device = "cpu",
                       progress: bool = True, max_steps: int | None = None) -> tuple[nn.Module, dict]:
    """Load the densely self-distilled micro VFM from the cache, else train it. Returns ``(teacher backbone
    (eval), info)``; ``info["history"]`` has per-step ``loss``, ``lr``, ``ema``, ``teacher_entropy`` (mean
    entropy of the per-token teacher distribution) and ``seconds``. Same cache/resume rules as
    :func:`pretrain_vfm`."""

    if cfg.batch_size % cfg.pairs_per_scene:
        raise ValueError(f"batch_size ({cfg.batch_size}) must be a multiple of pairs_per_scene "
                         f"({cfg.pairs_per_scene})")
    device = torch.device(device)
    student, final, patch, loaded = cached_vfm(cfg, cache_dir, device, "the dense micro VFM cache", "view_size")
    if loaded is not None:
        return student, loaded
    grid = cfg.view_size // patch
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        head = _TokenHead(DinoHead(student.embed_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim))
        mask_token = nn.Parameter(torch.randn(student.embed_dim) * 0.02)
    s_net = nn.ModuleDict({"backbone": student, "head": head}).to(device).train()
    s_net.register_parameter("mask_token", mask_token)
    t_net = copy.deepcopy(s_net).requires_grad_(False)
    center = torch.zeros(1, cfg.out_dim, device=device)
    opt = torch.optim.AdamW(param_groups(s_net, cfg.weight_decay, PRETRAIN_NO_DECAY + ("mask_token",)),
                            lr=cfg.lr, **_fast_adam(device))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, cfg.warmup, cfg.steps))
    gen = torch.Generator().manual_seed(cfg.seed)
    run = _RunLog(final, cfg, "pretrain_vfm_dense", f"pretrain {cfg.model} (dense)", progress)
    payload = _resume_self_distillation(run, s_net, t_net, center, opt, sched, gen)

    mean, std = image_mean_std(student)
    use_bf16 = resolve_precision(cfg.precision, device)
    peak = _training_peak(use_bf16, device)
    stop = cfg.steps if max_steps is None else min(cfg.steps, max_steps)
    scenes = cfg.batch_size // cfg.pairs_per_scene
    o = _VFM_STREAM_OFFSET
    batches = _scene_batches(cfg.world_seed, cfg.scene_size, scenes, o + run.step * scenes, {
        "cfg": cfg, "cache_dir": cache_dir, "stop": o + stop * scenes, "end": o + cfg.steps * scenes, "run": run,
        "progress": progress})
    run.start()
    while run.step < stop:
        step = run.step
        images = next(batches).to(device)  # (scenes, 3, S, S) in [0, 1]
        views, boxes, flips = paired_views(images, cfg.pairs_per_scene, cfg.view_size, cfg.view_scale, gen)
        views = [_jitter(v, cfg.jitter, gen) for v in views]
        if cfg.channel_shuffle > 0 or cfg.grayscale > 0:
            views = [colour_permute(v, cfg.channel_shuffle, cfg.grayscale, gen) for v in views]
        views = [_normalize(v, mean, std) for v in views]  # 2 x (n, 3, V, V)
        n = views[0].shape[0]
        masks = None
        if cfg.mask_ratio > 0:
            masks = torch.rand(2 * n, grid, grid, generator=gen).to(device) < cfg.mask_ratio
        x = torch.cat(views)  # (2n, 3, V, V)
        with _autocast(use_bf16, device):
            with torch.no_grad():
                t_out = t_net["head"](vfm_tokens(t_net["backbone"], x)).float()  # (2n, K, g, g)
            s_out = s_net["head"](vfm_tokens(s_net["backbone"], x, masks, s_net.mask_token)).float()
        loss, pairs = 0.0, ((0, 1), (1, 0))
        for a, b in pairs:  # student view a learns the teacher of view b at the same scene points
            coords, valid = view_correspondence(boxes[a], flips[a], boxes[b], flips[b], grid)
            tb = F.grid_sample(t_out[b * n:(b + 1) * n], coords.to(device), mode="bilinear",
                               align_corners=False)  # (n, K, g, g)
            loss = loss + dense_dino_loss(s_out[a * n:(a + 1) * n], tb, valid.to(device), center,
                                          cfg.student_temp, cfg.teacher_temp) / len(pairs)
        run.check(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad:
            nn.utils.clip_grad_norm_(s_net.parameters(), cfg.clip_grad)
        opt.step()
        sched.step()
        with torch.no_grad():
            m = cfg.ema[1] - (cfg.ema[1] - cfg.ema[0]) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
            for pt, ps in zip(t_net.parameters(), s_net.parameters()):
                pt.mul_(m).add_(ps.detach(), alpha=1 - m)
            tok = t_out.permute(0, 2, 3, 1).reshape(-1, cfg.out_dim)  # (2n*g*g, K)
            center.mul_(cfg.center_momentum).add_(tok.mean(0, keepdim=True), alpha=1 - cfg.center_momentum)
            p = F.softmax((tok - center) / cfg.teacher_temp, dim=-1)
            entropy = float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean())
        run.record({"loss": loss.item(), "lr": float(sched.get_last_lr()[0]), "ema": m, "teacher_entropy": entropy},
                   payload)
    teacher = t_net["backbone"]
    info = run.finish(teacher, payload, use_bf16, peak)
    return teacher.eval(), info


register_vfm_objective("dense", DenseVfmPretrainConfig, pretrain_vfm_dense)
