"""Training an F-ViT open-vocabulary detector (:mod:`ovlib.methods.fvit`) on the base classes of a COCO-format split.

``train_detector(cfg, clip, dataset, text, background, cache_dir)`` loads the finished detector from the cache
(key: the whole :class:`DetectorTrainConfig`, whose ``clip`` and ``data`` name the frozen CLIP and the training
data -- the caller's contract) or trains it: AdamW, linear warm-up then a constant lr, gradient clipping,
horizontal flips (F-ViT CFG: AdamW lr 1e-4, weight decay 0.1, clip 1.0, 250 warm-up iterations, its lr step at
epoch 100 of 3 = none; ``wusize/CLIPSelf`` ``F-ViT/configs/ov_coco/fvit_vitb16_upsample_fpn_bs64_3e_ovcoco_eva_
original.py``). F-ViT's large-scale jitter (random resize 0.1-2.0 and 640 crops) is **not** implemented: images
keep their size (or the detector's ``min_size`` resize); say so wherever its numbers are compared with the paper's.

Batches are a function of the step (a seeded permutation per epoch), so a resumed run sees the batches an
uninterrupted one would; the resumable state (trainable weights, optimiser, scheduler, step, history, torch's RNG
for the RPN / RoI samplers) is written atomically every ``ckpt_every`` steps by the pre-trainings' ``_RunLog``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ovlib.io import cache_path, load_cache
from ovlib.methods.fvit import DenseFn, FViT, FViTConfig
from ovlib.train.pretrain import _fast_adam, _RunLog, _same_config, _training_peak
from ovlib.train.proxies import _StateHolder

__all__ = ["DetectorTrainConfig", "train_detector", "batch_indices", "hflip"]


@dataclass(frozen=True)
class DetectorTrainConfig:
    """One detector run. ``clip`` names the frozen CLIP (e.g. a student run's key) and ``data`` the training data
    (e.g. an export hash); both are part of the cache key and must change with what they name."""

    clip: str
    data: str
    fvit: FViTConfig = field(default_factory=FViTConfig)
    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.1
    warmup: int = 250
    grad_clip: float = 1.0
    flip: float = 0.5
    seed: int = 0
    ckpt_every: int = 100
    model: str = "fvit"

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.ckpt_every < 1:
            raise ValueError(f"DetectorTrainConfig: steps, batch_size and ckpt_every must be >= 1 ({self})")
        if not self.clip or not self.data:
            raise ValueError("DetectorTrainConfig: `clip` and `data` must name the frozen CLIP and the training data")


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The dataset indices of batch ``step`` (0-based): consecutive slices of a seeded permutation per epoch,
    wrapping into the next epoch's permutation."""
    out = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, k = divmod(pos, n)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g)
        take = min(batch_size - len(out), n - k)
        out += perm[k:k + take].tolist()
        pos += take
    return out


def hflip(image: torch.Tensor, target: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mirror ``image (3, H, W)`` and its ``boxes (K, 4)`` xyxy px left-right."""
    W = image.shape[-1]
    b = target["boxes"]
    return image.flip(-1), {**target, "boxes": torch.stack([W - b[:, 2], b[:, 1], W - b[:, 0], b[:, 3]], dim=1)}


def _load_final(final, cfg: DetectorTrainConfig, model: FViT) -> dict | None:
    want = {k: tuple(v.shape) for k, v in model.trainable_state().items()}

    def valid(ck: dict) -> None:
        _same_config(ck["info"]["config"], cfg, final)
        got = {k: tuple(v.shape) for k, v in ck["model"].items()}
        if got != want:
            bad = sorted(set(got) ^ set(want)) or sorted(k for k in got if got[k] != want[k])
            raise ValueError(f"weights do not fit the detector (keys/shapes differ: {bad[:5]})")

    return load_cache(final, valid, what="F-ViT detector")


def train_detector(cfg: DetectorTrainConfig, clip: nn.Module, dataset, text: torch.Tensor, background: torch.Tensor,
                   cache_dir, device: str | torch.device = "cpu", progress: bool = True,
                   max_steps: int | None = None, dense_fn: DenseFn | None = None) -> tuple[FViT, dict]:
    """The F-ViT of ``cfg`` on the frozen ``clip``, from the cache or trained on ``dataset`` (a
    :class:`ovlib.data.detection.DetectionDataset` of the base classes) with the base vocabulary ``text (C, D)`` and
    the ``background (D,)`` embedding. Returns ``(detector in eval mode, info)`` (``info``: ``history`` of per-step
    losses, ``train_seconds``, ``loaded``, ``path``). ``max_steps`` stops early, keeping the resumable state.
    ``dense_fn``: the student's own dense map (:data:`ovlib.methods.fvit.DenseFn`); ``cfg.clip`` must name it."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = FViT(clip, cfg.fvit, dense_fn)
    model.to(device)
    model.set_vocabulary(text.to(device), background.to(device), [False] * text.shape[0])
    final = cache_path(cache_dir, cfg.model, cfg)
    ck = _load_final(final, cfg, model)
    if ck is not None:
        model.load_trainable_state(ck["model"])
        return model.eval(), dict(ck["info"], loaded=True, path=str(final))
    if len(dataset) == 0:
        raise ValueError("train_detector: the training dataset is empty")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **_fast_adam(device))
    warm = max(cfg.warmup, 0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    run = _RunLog(final, cfg, "train_detector", f"F-ViT {cfg.clip}", progress)
    st = run.resume()
    if st is not None:
        model.load_trainable_state(st["model"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])

    def payload() -> dict:
        return {"model": model.trainable_state(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                "torch_rng": torch.get_rng_state()}

    peak = _training_peak(False, device)  # before the samplers' RNG is set: it draws random matrices
    stop = cfg.steps if max_steps is None else min(cfg.steps, max_steps)
    model.train()
    run.start()
    with torch.random.fork_rng(devices=[]):  # the caller's RNG is left as it was
        # the RPN / RoI samplers draw from torch's global RNG: seeded, or restored with the state
        if st is not None:
            torch.set_rng_state(st["torch_rng"])
        else:
            torch.manual_seed(cfg.seed)
        while run.step < stop:
            images, targets = [], []
            for i in batch_indices(len(dataset), cfg.batch_size, run.step, cfg.seed):
                x, t = dataset[i]
                g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + run.step * 4096 + i)
                if torch.rand((), generator=g) < cfg.flip:
                    x, t = hflip(x, t)
                images.append(x.to(device))
                targets.append({k: v.to(device) for k, v in t.items()})
            losses = model(images, targets)
            loss = sum(losses.values())
            run.check(loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            run.record({"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in losses.items()},
                        "lr": float(sched.get_last_lr()[0])}, payload)
        info = run.finish(_StateHolder(model.trainable_state()), payload, False, peak)  # the state's RNG: the samplers'

    return model.eval(), info
