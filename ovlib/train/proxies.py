"""Micro proxies of the dense models the papers start from: a *dense* self-supervised micro VFM (the stand-in
for DINOv2) and a micro CLIPSeg (text-conditioned decoder on the frozen micro CLIP, base classes only).

Both follow the rules of :mod:`ovlib.train.pretrain`: "load if present, else train", cache file keyed by a hash
of the whole config, resumable state written atomically every ``ckpt_every`` steps (the shared ``_RunLog``),
``torch.load(weights_only=True)``, a non-finite loss stops the run keeping the last good state.

**Dense VFM** (:func:`pretrain_vfm_dense`). DINO's image-level objective trained on small crops groups worse
than the micro CLIP (chapter 01). This objective is dense and works at the evaluation scale: two views of
a scene rendered at the evaluation resolution (crops of ``view_size`` px at scale ~1, flips, colour jitter),
an EMA teacher, and for every student token the teacher's prototype distribution *at the same scene point*
in the other view (bilinear sampling of the teacher's token logits at the known geometric correspondence).
The loss is DINO's centred, sharpened cross-entropy (Caron et al. 2021, Eq. 1-3) applied per token, as
iBOT's patch loss applies it per masked token (Zhou et al. 2022, Eq. 2) -- here across views, optionally
with iBOT's masking of student tokens (``mask_ratio``) -- so the tokens are trained to fall into a few
view-invariant prototypes: what k-means needs. Self-supervised only: no labels, captions or masks.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ovlib.io import cache_path, safe_load
from ovlib.train.optim import param_groups, warmup_cosine
from ovlib.train.pretrain import (
    _VFM_STREAM_OFFSET,
    PRETRAIN_NO_DECAY,
    DinoHead,
    _autocast,
    _fast_adam,
    _normalize,
    _RunLog,
    _training_peak,
    image_mean_std,
    resolve_precision,
)

__all__ = [
    "ClipSegPretrainConfig",
    "DenseVfmPretrainConfig",
    "base_class_ids",
    "clipseg_batches",
    "clipseg_config",
    "dense_dino_loss",
    "dense_vfm_config",
    "paired_views",
    "pretrain_clipseg",
    "pretrain_vfm_dense",
    "vfm_tokens",
    "view_correspondence",
]


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
    clip_grad: float = 3.0
    precision: str = "auto"
    num_workers: int = 0
    seed: int = 0
    ckpt_every: int = 100


#: smoke sizes of the dense VFM (its steps_scale is 0.01: floor 5 steps)
_DENSE_SMOKE = dict(batch_size=8, pairs_per_scene=4, ckpt_every=1000)


def dense_vfm_config(profile: str, steps_scale: float = 1.0, seed: int = 0) -> DenseVfmPretrainConfig:
    """The micro VFM config of a profile (:func:`ovlib.train.pretrain.pretrain_configs` returns it):
    ``steps_scale`` multiplies the steps and the warm-up (~10 %), floor 5 steps at ``smoke``."""
    if steps_scale <= 0:
        raise ValueError(f"steps_scale must be > 0, got {steps_scale}")
    v = DenseVfmPretrainConfig(seed=seed, world_seed=seed)
    if profile == "smoke":
        v = replace(v, **_DENSE_SMOKE)
    steps = max(5 if profile == "smoke" else 1, round(v.steps * steps_scale))
    return replace(v, steps=steps, warmup=max(1, min(v.warmup, steps // 10)))


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
def _scene_batches(world_seed: int, size: int, scenes: int, start: int):
    """Batches of ``scenes`` scenes ``(scenes, 3, size, size)`` in [0, 1] from the VFM's part of the stream."""
    from ovlib.data.microworld import MicroWorld, MicroWorldStream

    stream = MicroWorldStream(MicroWorld(seed=world_seed), size=size, start=start)
    it = iter(stream)
    while True:
        yield torch.stack([next(it)["image"] for _ in range(scenes)])


def pretrain_vfm_dense(cfg: DenseVfmPretrainConfig, cache_dir: str | Path, device: str | torch.device = "cpu",
                       progress: bool = True, max_steps: int | None = None) -> tuple[nn.Module, dict]:
    """Load the densely self-distilled micro VFM from the cache, else train it. Returns ``(teacher backbone
    (eval), info)``; ``info["history"]`` has per-step ``loss``, ``lr``, ``ema``, ``teacher_entropy`` (mean
    entropy of the per-token teacher distribution) and ``seconds``. Same cache/resume rules as
    :func:`ovlib.train.pretrain.pretrain_vfm`."""
    from ovlib.models import load_vfm

    if cfg.batch_size % cfg.pairs_per_scene:
        raise ValueError(f"batch_size ({cfg.batch_size}) must be a multiple of pairs_per_scene "
                         f"({cfg.pairs_per_scene})")
    device = torch.device(device)
    final = cache_path(cache_dir, cfg.model, cfg)
    student = load_vfm(cfg.model, device="cpu", seed=cfg.seed)
    if final.is_file():
        ck = safe_load(final)
        student.load_state_dict(ck["model"])
        return student.to(device).eval(), dict(ck["info"], loaded=True, path=str(final))

    patch = student.patch_embed.patch_size
    patch = patch[0] if isinstance(patch, tuple) else int(patch)
    if cfg.view_size % patch:
        raise ValueError(f"view_size ({cfg.view_size}) must be a multiple of the VFM patch ({patch})")
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

    mean, std = image_mean_std(student)
    use_bf16 = resolve_precision(cfg.precision, device)
    peak = _training_peak(use_bf16, device)
    stop = cfg.steps if max_steps is None else min(cfg.steps, max_steps)
    scenes = cfg.batch_size // cfg.pairs_per_scene
    batches = _scene_batches(cfg.world_seed, cfg.scene_size, scenes, _VFM_STREAM_OFFSET + run.step * scenes)
    run.start()
    while run.step < stop:
        step = run.step
        images = next(batches).to(device)  # (scenes, 3, S, S) in [0, 1]
        views, boxes, flips = paired_views(images, cfg.pairs_per_scene, cfg.view_size, cfg.view_scale, gen)
        views = [_normalize(_jitter(v, cfg.jitter, gen), mean, std) for v in views]  # 2 x (n, 3, V, V)
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


# ---------------------------------------------------------------------------------------------- CLIPSeg
#: The CLIPSeg stream reads its own part of the world's stream (the CLIP and the VFM read others).
_CLIPSEG_STREAM_OFFSET = 70_000_000


@dataclass(frozen=True)
class ClipSegPretrainConfig:
    """CLIPSeg-style pre-training of a text-conditioned decoder on the frozen micro CLIP: text prompt of a
    **base** class -> its binary mask (dense BCE), on micro-world scenes without any novel thing.

    ``clip`` is the cache key of the frozen CLIP (``config_hash`` of its pre-training config), so a new CLIP
    gets a new CLIPSeg. CLIPSeg (Lüddecke & Ecker 2022, §3-4): frozen CLIP, decoder on layers (3, 6, 9) of 12
    (here :func:`~ovlib.models.film_decoder.default_extract_layers`: 1, 2, 3 of 4), reduce_dim 64, FiLM at
    the deepest level, binary cross-entropy, AdamW with cosine decay, negative prompts (a class absent from the
    image, empty mask) with probability ``negative_prob``."""

    model: str = "micro-clipseg"
    clip: str = ""
    world_seed: int = 0
    image_size: int = 64            # SynSeg's micro input size (the CLIP's native 64 px)
    batch_size: int = 32            # scenes per step
    prompts_per_image: int = 2
    negative_prob: float = 0.2
    steps: int = 500
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 1e-4
    templates: str = "micro"        # text anchors, as SynSeg's (unit-norm template ensembles of the main name)
    precision: str = "auto"
    seed: int = 0
    ckpt_every: int = 100


def clipseg_config(profile: str, steps_scale: float = 1.0, seed: int = 0) -> ClipSegPretrainConfig:
    """The micro CLIPSeg config of a profile, keyed to that profile's micro CLIP (``pretrain_configs``);
    ``steps_scale`` multiplies the steps (floor: 20 at ``smoke``)."""
    from ovlib.io import config_hash
    from ovlib.train.pretrain import pretrain_configs

    clip_cfg, _ = pretrain_configs(profile, steps_scale, seed)
    base = ClipSegPretrainConfig(clip=config_hash(clip_cfg), world_seed=seed, seed=seed)
    if profile == "smoke":
        base = replace(base, batch_size=8, ckpt_every=1000)
    steps = max(20 if profile == "smoke" else 1, round(base.steps * steps_scale))
    return replace(base, steps=steps, warmup=max(1, min(base.warmup, steps // 10)))


def base_class_ids(world) -> list[int]:
    """Category ids of every class (things and stuff) that is not novel."""
    return [int(c.id) for c in world.classes if not c.novel]


def clipseg_batches(cfg: ClipSegPretrainConfig, start_step: int = 0):
    """The CLIPSeg training stream from step ``start_step`` on: dicts with ``images (B, 3, S, S)`` in [0, 1],
    ``owner (P,)`` image of each prompt, ``category_id (P,)`` the prompted class, ``masks (P, S, S)`` float
    {0, 1}, ``scene_ids (B,)`` scene indices and ``present (B, n_classes)`` bool: the classes drawn in each scene.

    Scenes are taken in order from the CLIPSeg part of the stream, **skipping every scene that contains a novel
    thing** (so novel classes appear neither as prompts nor as pixels); prompts: with probability
    ``negative_prob`` a base class absent from the scene (empty mask), else a class present in it (uniform).
    Deterministic: scene ``i`` draws from ``np.random.default_rng([world_seed, i, 7])``, and step ``s`` starts
    at the first scene the previous steps did not use (the stream is replayed to find it on resume)."""
    import numpy as np

    from ovlib.data.microworld import MicroWorld

    world = MicroWorld(seed=cfg.world_seed)
    novel = {int(c.id) for c in world.classes if c.novel}
    base = np.array(base_class_ids(world))
    i = _CLIPSEG_STREAM_OFFSET
    step = 0
    while True:
        images, owner, cats, masks, ids, present = [], [], [], [], [], []
        while len(images) < cfg.batch_size:
            lay = world.layout(i)
            if any(t.category_id in novel for t in lay.things):
                i += 1
                continue
            rng = np.random.default_rng([cfg.world_seed, i, 7])
            if step >= start_step:
                sc = world.sample(i, cfg.image_size, annotations=False)
                here = np.unique(sc.semantic)
                absent = np.setdiff1d(base, here)
                b = len(images)
                for _ in range(cfg.prompts_per_image):
                    if absent.size and rng.random() < cfg.negative_prob:
                        c = int(rng.choice(absent))
                    else:
                        c = int(rng.choice(here))
                    owner.append(b)
                    cats.append(c)
                    masks.append(torch.from_numpy(sc.semantic == c))
                images.append(torch.from_numpy(np.ascontiguousarray(sc.image.transpose(2, 0, 1))).float() / 255.0)
                ids.append(i)
                present.append(torch.from_numpy(np.isin(np.array([c.id for c in world.classes]), here)))
            else:
                images.append(None)
            i += 1
        if step >= start_step:
            yield {"images": torch.stack(images), "owner": torch.tensor(owner), "category_id": torch.tensor(cats),
                   "masks": torch.stack(masks).float(), "scene_ids": torch.tensor(ids), "present": torch.stack(present)}
        step += 1


def pretrain_clipseg(cfg: ClipSegPretrainConfig, clip: nn.Module, tokenizer, cache_dir: str | Path,
                     device: str | torch.device = "cpu", progress: bool = True,
                     max_steps: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Load the micro CLIPSeg trained with ``cfg`` on the frozen ``clip`` from the cache, else train it.

    Returns ``(state, info)``: ``state`` the decoder weights under **CLIPSeg's key names**
    (:func:`ovlib.models.clipseg.decoder_to_clipseg_state`, loadable exactly as a real CLIPSeg checkpoint),
    ``info`` with ``history`` (step, loss, lr, seconds), ``path``, ``loaded``. ``clip`` must be the CLIP whose
    config hash is ``cfg.clip`` (the caller's contract; the hash is part of the cache key)."""
    # the text anchors are SynSeg's (ovlib.methods.synseg embeds them with the same function)
    from ovlib.models.text import MICRO_TEMPLATES, VILD_TEMPLATES, text_embeddings
    from ovlib.models.adapter import vit_adapter
    from ovlib.models.clipseg import build_clipseg_decoder, clipseg_arch, decoder_to_clipseg_state
    from ovlib.models.film_decoder import clip_block_activations, default_extract_layers

    if not cfg.clip:
        raise ValueError("ClipSegPretrainConfig.clip must name the frozen CLIP (its config hash); use clipseg_config")
    device = torch.device(device)
    final = cache_path(cache_dir, cfg.model, cfg)
    if final.is_file():
        ck = safe_load(final)
        return dict(ck["model"]), dict(ck["info"], loaded=True, path=str(final))

    clip = clip.to(device).eval().requires_grad_(False)
    ad = vit_adapter(clip)
    layers = default_extract_layers(ad.num_blocks)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        decoder = build_clipseg_decoder(ad.width, ad.out_dim, len(layers), ad.patch_size,
                                        clipseg_arch(cfg.model),
                                        n_prefix=ad.num_prefix)
    decoder = decoder.to(device).train()
    from ovlib.data.microworld import MicroWorld

    world = MicroWorld(seed=cfg.world_seed)
    names = {int(c.id): c.name for c in world.classes}
    base = base_class_ids(world)
    templates = {"micro": MICRO_TEMPLATES, "vild": VILD_TEMPLATES, "bare": ("{}",)}[cfg.templates]
    bank = text_embeddings(clip, tokenizer, [names[c] for c in base], templates, device=device).float()  # (Kb, D)
    row = {c: r for r, c in enumerate(base)}
    params = [p for n, p in decoder.named_parameters() if not n.startswith("projector.")]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **_fast_adam(device))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, cfg.warmup, cfg.steps))
    run = _RunLog(final, cfg, "pretrain_clipseg", f"pretrain {cfg.model}", progress)
    st = run.resume()
    if st is not None:
        decoder.load_state_dict(st["decoder"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])

    def payload() -> dict:
        return {"decoder": decoder.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}

    mean, std = image_mean_std(clip)
    use_bf16 = resolve_precision(cfg.precision, device)
    peak = _training_peak(use_bf16, device)
    stop = cfg.steps if max_steps is None else min(cfg.steps, max_steps)
    batches = clipseg_batches(cfg, start_step=run.step)
    run.start()
    while run.step < stop:
        b = next(batches)
        images = _normalize(b["images"].to(device), mean, std)  # (B, 3, S, S)
        rows = torch.tensor([row[int(c)] for c in b["category_id"]], device=device)
        with _autocast(use_bf16, device):
            acts, grid = clip_block_activations(ad, images, layers)
            logits, _ = decoder(acts, bank[rows], grid, owner=b["owner"].to(device), project=False)  # (P, S, S)
        loss = F.binary_cross_entropy_with_logits(logits.float(), b["masks"].to(device))
        run.check(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        run.record({"loss": float(loss.detach()), "lr": float(sched.get_last_lr()[0])}, payload)
    decoder.eval()
    state = decoder_to_clipseg_state(decoder)
    info = run.finish(_StateHolder(state), payload, use_bf16, peak)
    return state, info


class _StateHolder(nn.Module):
    """What ``_RunLog.finish`` saves under ``"model"``: a fixed state dict (the CLIPSeg-format weights)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        self._state = state

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return self._state
