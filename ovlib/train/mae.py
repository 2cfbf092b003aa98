"""Masked-autoencoder pre-training of the micro VFM (a candidate objective of the micro-proxies issue).

MAE (He et al. 2022, §3): the image is cut into patches, a random ``mask_ratio`` of them is dropped, the ViT
encoder sees only the visible patches (with their positional embeddings), and a light decoder -- the encoder's
tokens projected to ``decoder_dim``, a shared learned mask token at every dropped position, its own positional
embeddings, ``decoder_depth`` transformer blocks -- predicts the pixels of the dropped patches; the loss is the
mean squared error on the dropped patches only, against pixels normalised per patch (``norm_pix``: MAE's
default, §A.1: the target keeps a patch's texture and shape, not its mean colour). To predict a dropped part of
an object the encoder has to know which object its visible parts belong to, which is what k-means on its tokens
needs; the micro world's classes are (shape, colour, texture) triples whose colours are shared between classes.

Trained here at the evaluation resolution (160-px scenes, a 20 x 20 token grid at patch 8) on the VFM's part of
the micro-world stream: self-supervised only (no labels, captions or masks). The encoder is the ordinary timm
``VisionTransformer`` of :data:`ovlib.models.vfm.MICRO_VFM_CONFIGS` (what every other part of the code loads);
the decoder is thrown away. Cache, resume and checkpoint rules are those of :mod:`ovlib.train.pretrain` (the
shared ``_RunLog``: load if present, else train; resumable state written atomically every ``ckpt_every`` steps;
``torch.load(weights_only=True)``). ``benchmarks/vfm_grouping.py`` scores it beside the other trials.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ovlib.models.images import image_mean_std
from ovlib.train.optim import param_groups, warmup_cosine
from ovlib.train.pretrain import (
    _VFM_STREAM_OFFSET,
    PRETRAIN_NO_DECAY,
    _autocast,
    _fast_adam,
    _normalize,
    _pipeline_field,
    _RunLog,
    _scene_batches,
    _training_peak,
    cached_vfm,
    register_vfm_objective,
    resolve_precision,
)

__all__ = ["MaeVfmPretrainConfig", "MaeDecoder", "mae_encode", "mae_loss", "patchify", "pretrain_vfm_mae",
           "random_keep"]


@dataclass(frozen=True)
class MaeVfmPretrainConfig:
    """MAE pre-training of the micro VFM on whole scenes at the evaluation resolution."""

    model: str = "micro-vfm"
    world_seed: int = 0
    scene_size: int = 160           # scenes at chapter 01's evaluation resolution (20 x 20 tokens at patch 8)
    batch_size: int = 32            # scenes per step
    steps: int = 300
    lr: float = 1e-3
    warmup: int = 30
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)  # MAE's AdamW betas (§A.1)
    mask_ratio: float = 0.75        # MAE's default
    decoder_dim: int = 96
    decoder_depth: int = 2
    decoder_heads: int = 4
    norm_pix: bool = True           # per-patch normalised pixel targets
    flip: float = 0.5               # probability of a horizontal flip per scene
    clip_grad: float = 3.0
    precision: str = "auto"
    num_workers: int = 0
    seed: int = 0
    ckpt_every: int = 100
    data_pipeline: str = _pipeline_field()  # "shards" | "inline"; not part of the cache key


# ------------------------------------------------------------------------------------------------ kernels
def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """``(n, 3, H, W)`` -> ``(n, (H/p)(W/p), p*p*3)``: the patches in row-major token order, each flattened as
    ``(row, column, channel)``."""
    n, c, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f"patchify: image {h}x{w} is not a multiple of the patch {patch}")
    x = images.unfold(2, patch, patch).unfold(3, patch, patch)  # (n, c, h/p, w/p, p, p)
    return x.permute(0, 2, 3, 4, 5, 1).reshape(n, (h // patch) * (w // patch), patch * patch * c)


def random_keep(n: int, tokens: int, mask_ratio: float, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """MAE's per-image random masking: ``(keep (n, k) long, masked (n, tokens) bool)`` with
    ``k = tokens - round(tokens * mask_ratio)`` (at least 1) visible token indices per image, in ascending order
    (the encoder sees them in raster order), and ``masked`` true at the dropped ones."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    k = max(1, tokens - int(round(tokens * mask_ratio)))
    keep = torch.rand(n, tokens, generator=generator).argsort(1)[:, :k].sort(1).values
    masked = torch.ones(n, tokens, dtype=torch.bool)
    masked.scatter_(1, keep, False)
    return keep, masked


def mae_loss(pred: torch.Tensor, target: torch.Tensor, masked: torch.Tensor, norm_pix: bool = True,
             eps: float = 1e-6) -> torch.Tensor:
    """MAE's loss: ``pred`` / ``target`` ``(n, N, D)``, ``masked (n, N)`` bool; the per-token mean squared error
    averaged over the masked tokens, the target normalised per token (``(t - mean) / sqrt(var + eps)``, unbiased
    variance as MAE's code computes it) when ``norm_pix``."""
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + eps).sqrt()
    m = masked.to(pred.dtype)
    return (((pred - target) ** 2).mean(-1) * m).sum() / m.sum().clamp_min(1.0)


def mae_encode(vfm: nn.Module, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """The visible tokens ``(n, k, C)`` of a timm ``VisionTransformer`` on ``x (n, 3, S, S)``: patch embedding and
    positional embedding of every patch, then only the patches ``keep (n, k)`` (with the prefix tokens) through
    the blocks and the final norm. ``keep=None``: every patch (timm's ``forward_features`` without the prefix)."""
    t = vfm.patch_embed(x)
    t = vfm._pos_embed(t)  # (n, P + N, C) (dynamic image size: flattened here)
    p = vfm.num_prefix_tokens
    if keep is not None:
        vis = torch.gather(t[:, p:], 1, keep.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
        t = torch.cat([t[:, :p], vis], 1)
    t = vfm.norm(vfm.blocks(vfm.norm_pre(vfm.patch_drop(t))))
    return t[:, p:]


class MaeDecoder(nn.Module):
    """MAE's light decoder: ``(visible (n, k, C), keep (n, k))`` -> pixel predictions ``(n, N, p*p*3)`` for every
    token of the ``grid`` x ``grid`` image (the loss reads the masked ones)."""

    def __init__(self, in_dim: int, dim: int, depth: int, heads: int, patch: int, grid: int):
        super().__init__()
        from timm.models.vision_transformer import Block

        self.tokens = grid * grid
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.pos = nn.Parameter(torch.zeros(1, self.tokens, dim))
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, patch * patch * 3)

    def forward(self, visible: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        d = self.embed(visible)  # (n, k, D)
        n, _, dim = d.shape
        full = self.mask_token.to(d.dtype).view(1, 1, dim).expand(n, self.tokens, dim)
        full = full.scatter(1, keep.unsqueeze(-1).expand(-1, -1, dim), d)  # (n, N, D)
        return self.pred(self.norm(self.blocks(full + self.pos)))


# ------------------------------------------------------------------------------------------------ training
def pretrain_vfm_mae(cfg: MaeVfmPretrainConfig, cache_dir: str | Path, device: str | torch.device = "cpu",
                     progress: bool = True, max_steps: int | None = None) -> tuple[nn.Module, dict]:
    """Load the MAE-trained micro VFM from the cache, else train it. Returns ``(encoder (eval), info)``;
    ``info["history"]`` has per-step ``loss``, ``lr`` and ``seconds``. ``max_steps`` stops early keeping the
    resumable state (the next call resumes exactly: weights, decoder, optimiser, schedule, generator, stream)."""
    device = torch.device(device)
    enc, final, patch, loaded = cached_vfm(cfg, cache_dir, device, "the MAE micro VFM cache", "scene_size")
    if loaded is not None:
        return enc, loaded
    grid = cfg.scene_size // patch
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        dec = MaeDecoder(enc.embed_dim, cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads, patch, grid)
    net = nn.ModuleDict({"encoder": enc, "decoder": dec}).to(device).train()
    opt = torch.optim.AdamW(param_groups(net, cfg.weight_decay, PRETRAIN_NO_DECAY + ("mask_token", "pos")),
                            lr=cfg.lr, betas=tuple(cfg.betas), **_fast_adam(device))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, cfg.warmup, cfg.steps))
    gen = torch.Generator().manual_seed(cfg.seed)
    run = _RunLog(final, cfg, "pretrain_vfm_mae", f"pretrain {cfg.model} (MAE)", progress)
    st = run.resume()
    if st is not None:
        net.load_state_dict(st["net"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        gen.set_state(st["gen"])

    def payload() -> dict:
        return {"net": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "gen": gen.get_state()}

    mean, std = image_mean_std(enc)
    use_bf16 = resolve_precision(cfg.precision, device)
    peak = _training_peak(use_bf16, device)
    stop = cfg.steps if max_steps is None else min(cfg.steps, max_steps)
    o = _VFM_STREAM_OFFSET
    batches = _scene_batches(cfg.world_seed, cfg.scene_size, cfg.batch_size, o + run.step * cfg.batch_size, {
        "cfg": cfg, "cache_dir": cache_dir, "stop": o + stop * cfg.batch_size, "end": o + cfg.steps * cfg.batch_size,
        "run": run, "progress": progress})
    run.start()
    while run.step < stop:
        images = next(batches)  # (n, 3, S, S) in [0, 1]
        n = images.shape[0]
        flip = torch.rand(n, generator=gen) < cfg.flip
        images = torch.where(flip.view(n, 1, 1, 1), images.flip(-1), images).to(device)
        keep, masked = random_keep(n, grid * grid, cfg.mask_ratio, gen)
        keep, masked = keep.to(device), masked.to(device)
        with _autocast(use_bf16, device):
            pred = net["decoder"](mae_encode(net["encoder"], _normalize(images, mean, std), keep), keep)
        loss = mae_loss(pred.float(), patchify(images, patch), masked, cfg.norm_pix)
        run.check(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad:
            nn.utils.clip_grad_norm_(net.parameters(), cfg.clip_grad)
        opt.step()
        sched.step()
        run.record({"loss": loss.item(), "lr": float(sched.get_last_lr()[0])}, payload)
    info = run.finish(enc, payload, use_bf16, peak)
    return enc.eval(), info


register_vfm_objective("mae", MaeVfmPretrainConfig, pretrain_vfm_mae)  # budgets.pretrain.vfm.objective: mae
