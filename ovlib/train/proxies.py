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
view-invariant prototypes: what k-means needs. Self-supervised only: no labels, captions or masks. Its code
lives in :mod:`ovlib.train.pretrain` beside DINO's (the CLIPSeg below depends on the pre-training module, not
the other way round); this module re-exports it. It grouped no better than the untrained ViT in the VFM trials
(``benchmarks/vfm_grouping.py``); the profiles' micro VFM is MAE's (:mod:`ovlib.train.mae`,
``budgets.pretrain.vfm.objective``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ovlib.config import profile_sizes
from ovlib.io import cache_path, safe_load
from ovlib.train.optim import warmup_cosine
from ovlib.train.pretrain import (  # the dense VFM lives in pretrain (its default micro VFM); re-exported here
    DenseVfmPretrainConfig,
    _autocast,
    _fast_adam,
    _normalize,
    _RunLog,
    _training_peak,
    colour_permute,
    dense_dino_loss,
    dense_vfm_config,
    image_mean_std,
    paired_views,
    pretrain_configs,
    pretrain_vfm_dense,
    resolve_precision,
    scaled_budget,
    vfm_tokens,
    view_correspondence,
)

__all__ = [
    "ClipSegPretrainConfig",
    "DenseVfmPretrainConfig",
    "base_class_ids",
    "clipseg_batches",
    "clipseg_config",
    "clipseg_templates",
    "colour_permute",
    "clipseg_weights",
    "file_key",
    "dense_dino_loss",
    "dense_vfm_config",
    "paired_views",
    "pretrain_clipseg",
    "pretrain_vfm_dense",
    "vfm_tokens",
    "view_correspondence",
]


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
    image, empty mask) with probability ``negative_prob``.

    The conditional vector: by default the unit-norm template ensemble of the class name (SynSeg's text
    anchor). CLIPSeg's own (``timojl/clipseg:training.py``, the ``rd64-uni`` configuration of
    ``experiments/phrasecut.yaml``) is selectable: ``prompt="shuffle"`` embeds one template drawn per prompt
    (its ``prompt: shuffle+``); ``with_visual`` mixes it with the CLIP image embedding of a *support* -- the
    prompted class in another (base-only) scene of the stream, cut out by
    :func:`~ovlib.data.regions.highlight_crop` --
    ``c = w t + (1 - w) v``, ``w ~ U(mix_text)`` (``mix_text_max: 0.5``). In PhraseCut a phrase without a
    second sample has no support and trains on text alone (``w = 1`` there); every micro-world class has one,
    so ``text_only_prob`` of the prompts keep that text-only share. ``t`` and ``v`` are unit-norm here (the
    text bank's convention; CLIPSeg mixes raw embeddings). ``benchmarks/clipseg_transfer.py`` scores the three
    (chapter 01's table): they were meant to let the decoder transfer to novel names, and measured no
    different there."""

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
    templates: str = "micro"        # the template set (MICRO_TEMPLATES), as SynSeg's text anchors
    prompt: str = "ensemble"        # "ensemble" | "shuffle": one template per prompt (CLIPSeg's shuffle+)
    with_visual: bool = False       # mix in a support image's embedding (CLIPSeg's rd64-uni: with_visual, mix)
    mix_text: tuple[float, float] = (0.0, 0.5)  # text weight w ~ U(lo, hi) (mix_text_min / mix_text_max)
    text_only_prob: float = 0.5     # prompts trained on text alone (w = 1), PhraseCut's support-less phrases
    support_context: float = 0.1    # highlight_crop: box widened by this (CLIPSeg's center_context)
    support_background: float = 0.1  # contrast kept outside the mask (CLIPSeg's bg_fac)
    support_blur: float = 0.5       # blur std in px of the 64-px scene (CLIPSeg's 3 px at 352 px, scaled)
    support_search: int = 64        # scenes searched ahead of a prompt's own for its support
    precision: str = "auto"
    seed: int = 0
    ckpt_every: int = 100


def clipseg_config(profile: str | Mapping[str, Any], steps_scale: float = 1.0, seed: int = 0) -> ClipSegPretrainConfig:
    """The micro CLIPSeg config of a profile (a name, or resolved parameters), keyed to that profile's micro CLIP
    (``pretrain_configs``): the budget of ``budgets.pretrain.clipseg`` (``steps_scale`` multiplies the steps,
    :func:`~ovlib.train.pretrain.scaled_budget`)."""
    from ovlib.io import config_hash

    clip_cfg, _ = pretrain_configs(profile, steps_scale, seed)
    base = ClipSegPretrainConfig(clip=config_hash(clip_cfg), world_seed=seed, seed=seed, precision=clip_cfg.precision)
    return scaled_budget(base, profile_sizes(profile, "pretrain")["clipseg"], steps_scale)


def clipseg_weights(params, name: str | None, clip: nn.Module, tokenizer, device: str | torch.device = "cpu",
                    progress: bool = False, clip_key: str | None = None) -> dict[str, torch.Tensor] | None:
    """The CLIPSeg weights (CLIPSeg's key names) SynSeg's decoder starts from, for ``method_args.clipseg = name``
    in the profile ``params``:

    * ``None``: no CLIPSeg (the decoder starts from scratch) -> ``None``;
    * ``"micro-clipseg"``: the micro CLIPSeg of the profile on the frozen ``clip`` (:func:`clipseg_config`,
      :func:`pretrain_clipseg`: loaded from ``cache_dir``, else trained);
    * another named CLIPSeg (:data:`ovlib.models.clipseg.CLIPSEG_ARCHS`, e.g. ``rd64-uni``): the file
      ``weights_dir/rd64-uni.pth`` (:func:`ovlib.models.weights.clipseg_weight_file`; an error naming it when
      absent); ``None`` in a dry run with ``random_init`` (the CLIPSeg-form decoder stays random);
    * a path: that checkpoint file.

    ``clip_key`` names the frozen CLIP the micro CLIPSeg is trained on (part of its cache key): ``None`` -- the
    profile's pre-trained micro CLIP (:func:`clipseg_config`'s key, the one chapter 01 uses); a run whose CLIP
    comes from elsewhere (a ``pretrained`` file) passes its own key, so it never loads a CLIPSeg of another CLIP."""
    from ovlib.models.clipseg import CLIPSEG_ARCHS, read_clipseg_checkpoint
    from ovlib.models.weights import clipseg_weight_file

    if name is None:
        return None
    if name == "micro-clipseg":
        cfg = clipseg_config(params, params["steps_scale"], params["seed"])
        cfg = cfg if clip_key is None else replace(cfg, clip=clip_key)
        return pretrain_clipseg(cfg, clip, tokenizer, params["cache_dir"], device=device, progress=progress)[0]
    if name in CLIPSEG_ARCHS:
        if params.get("dry_run") and (params.get("dry_run_settings") or {}).get("random_init"):
            return None
        return read_clipseg_checkpoint(clipseg_weight_file(params.get("weights_dir", ""), name))
    return read_clipseg_checkpoint(name)


def file_key(pretrained: str) -> str:
    """What names a CLIP's weights in a cache key: a local file by the SHA-256 of its bytes (16 hex digits; its
    content, not its path), a named weight (``openai``, a hub tag) by its name."""
    import hashlib

    path = Path(pretrained)
    if not path.is_file():
        return str(pretrained)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def base_class_ids(world) -> list[int]:
    """Category ids of every class (things and stuff) that is not novel."""
    return [int(c.id) for c in world.classes if not c.novel]


def clipseg_templates(cfg: ClipSegPretrainConfig) -> tuple[str, ...]:
    """The template set of ``cfg.templates``."""
    from ovlib.models.text import MICRO_TEMPLATES, VILD_TEMPLATES

    sets = {"micro": MICRO_TEMPLATES, "vild": VILD_TEMPLATES, "bare": ("{}",)}
    if cfg.templates not in sets:
        raise ValueError(f"ClipSegPretrainConfig.templates must be one of {sorted(sets)}, got {cfg.templates!r}")
    if cfg.prompt not in ("shuffle", "ensemble"):
        raise ValueError(f"ClipSegPretrainConfig.prompt must be 'shuffle' or 'ensemble', got {cfg.prompt!r}")
    return sets[cfg.templates]


def clipseg_batches(cfg: ClipSegPretrainConfig, start_step: int = 0, mean: tuple[float, float, float] = (0.5,) * 3):
    """The CLIPSeg training stream from step ``start_step`` on: dicts with ``images (B, 3, S, S)`` in [0, 1],
    ``owner (P,)`` image of each prompt, ``category_id (P,)`` the prompted class, ``masks (P, S, S)`` float
    {0, 1}, ``scene_ids (B,)`` scene indices, ``present (B, n_classes)`` bool: the classes drawn in each scene,
    ``template (P,)`` the template of each prompt (0 with ``prompt="ensemble"``), ``text_weight (P,)`` ``w`` of
    ``c = w t + (1 - w) v`` (1: text alone), and with ``with_visual`` ``support (P, 3, S, S)`` in [0, 1] and
    ``support_ids (P,)`` (the support's scene, -1 where none).

    Scenes are taken in order from the CLIPSeg part of the stream, **skipping every scene that contains a novel
    thing** (so novel classes appear neither as prompts nor as pixels, supports included); prompts: with
    probability ``negative_prob`` a base class absent from the scene (empty mask), else a class present in it
    (uniform). A prompt's support is the class in the first later base-only scene (at most
    ``support_search`` ahead) where it covers >= 4 pixels, cut out by
    :func:`~ovlib.data.regions.highlight_crop` (``mean``: the CLIP's normalisation mean); none found, the
    prompt trains on text alone. Deterministic: scene ``i`` draws from ``np.random.default_rng([world_seed, i,
    7])``, and step ``s`` starts at the first scene the previous steps did not use (the stream is replayed to
    find it on resume)."""
    import numpy as np

    from ovlib.data.microworld import MicroWorld
    from ovlib.data.regions import highlight_crop

    templates = clipseg_templates(cfg)  # validates templates and prompt
    n_tpl = len(templates) if cfg.prompt == "shuffle" else 1
    lo, hi = (float(v) for v in cfg.mix_text)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"ClipSegPretrainConfig.mix_text must be 0 <= lo <= hi <= 1, got {cfg.mix_text!r}")
    world = MicroWorld(seed=cfg.world_seed)
    novel = {int(c.id) for c in world.classes if c.novel}
    base = np.array(base_class_ids(world))
    layouts: dict[int, Any] = {}
    scenes: dict[int, Any] = {}  # rendered scenes at or after the current one (supports are rendered ahead)

    def layout(j: int):
        if j not in layouts:
            layouts[j] = world.layout(j)
        return layouts[j]

    def base_only(j: int) -> bool:
        return not any(t.category_id in novel for t in layout(j).things)

    def scene(j: int):
        if j not in scenes:
            scenes[j] = world.sample(j, cfg.image_size, annotations=False)
        return scenes[j]

    def support(c: int, i: int) -> tuple[torch.Tensor | None, int]:
        for j in range(i + 1, i + 1 + cfg.support_search):
            lay = layout(j)
            if not base_only(j) or (c not in lay.stuff and all(t.category_id != c for t in lay.things)):
                continue
            sc = scene(j)
            m = torch.from_numpy(sc.semantic == c)
            if int(m.sum()) < 4:
                continue
            img = torch.from_numpy(np.ascontiguousarray(sc.image.transpose(2, 0, 1))).float() / 255.0
            return highlight_crop(img, m, cfg.image_size, mean, cfg.support_context, cfg.support_background,
                                  cfg.support_blur), j
        return None, -1

    i = _CLIPSEG_STREAM_OFFSET
    step = 0
    while True:
        images, owner, cats, masks, ids, present = [], [], [], [], [], []
        tpl, weight, sup, sup_ids = [], [], [], []
        while len(images) < cfg.batch_size:
            for k in [k for k in layouts if k < i]:
                del layouts[k]
            for k in [k for k in scenes if k < i]:
                del scenes[k]
            if not base_only(i):
                i += 1
                continue
            rng = np.random.default_rng([cfg.world_seed, i, 7])
            if step >= start_step:
                sc = scene(i)
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
                    tpl.append(int(rng.integers(n_tpl)) if n_tpl > 1 else 0)  # no draw: the ensemble's stream
                    w = 1.0
                    if cfg.with_visual:
                        w = float(rng.uniform(lo, hi)) if rng.random() >= cfg.text_only_prob else 1.0
                        v, j = support(c, i)
                        sup.append(v if v is not None else torch.zeros(3, cfg.image_size, cfg.image_size))
                        sup_ids.append(j)
                        w = w if v is not None else 1.0
                    weight.append(w)
                images.append(torch.from_numpy(np.ascontiguousarray(sc.image.transpose(2, 0, 1))).float() / 255.0)
                ids.append(i)
                present.append(torch.from_numpy(np.isin(np.array([c.id for c in world.classes]), here)))
            else:
                images.append(None)
            i += 1
        if step >= start_step:
            out = {"images": torch.stack(images), "owner": torch.tensor(owner), "category_id": torch.tensor(cats),
                   "masks": torch.stack(masks).float(), "scene_ids": torch.tensor(ids),
                   "present": torch.stack(present), "template": torch.tensor(tpl),
                   "text_weight": torch.tensor(weight)}
            if cfg.with_visual:
                out["support"], out["support_ids"] = torch.stack(sup), torch.tensor(sup_ids)
            yield out
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
    from ovlib.models.adapter import vit_adapter
    from ovlib.models.clipseg import build_clipseg_decoder, clipseg_arch, decoder_to_clipseg_state
    from ovlib.models.film_decoder import clip_block_activations, default_extract_layers
    from ovlib.models.text import text_embeddings

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
    templates = clipseg_templates(cfg)
    base_names = [names[c] for c in base]
    if cfg.prompt == "shuffle":  # (Kb, T, D): one unit-norm embedding per (class, template)
        bank = torch.stack([text_embeddings(clip, tokenizer, base_names, (t,), device=device).float()
                            for t in templates], 1)
    else:  # (Kb, 1, D): the unit-norm template ensemble
        bank = text_embeddings(clip, tokenizer, base_names, templates, device=device).float()[:, None]
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
    batches = clipseg_batches(cfg, start_step=run.step, mean=tuple(float(m) for m in mean))
    run.start()
    while run.step < stop:
        b = next(batches)
        images = _normalize(b["images"].to(device), mean, std)  # (B, 3, S, S)
        rows = torch.tensor([row[int(c)] for c in b["category_id"]], device=device)
        cond = bank[rows, b["template"].to(device)]  # (P, D) unit-norm text
        with _autocast(use_bf16, device):
            if cfg.with_visual:  # CLIPSeg's conditional: w t + (1 - w) v, v the support's image embedding
                w = b["text_weight"].to(device).unsqueeze(1)  # (P, 1)
                with torch.no_grad():
                    v = F.normalize(clip.encode_image(_normalize(b["support"].to(device), mean, std)).float(),
                                    dim=-1)  # (P, D)
                cond = w * cond + (1 - w) * v
            acts, grid = clip_block_activations(ad, images, layers)
            logits, _ = decoder(acts, cond, grid, owner=b["owner"].to(device), project=False)  # (P, S, S)
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
