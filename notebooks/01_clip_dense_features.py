# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 1. CLIP's dense features
#
# CLIP is trained to match *whole images* with captions. Its image tower nevertheless produces one token per
# patch, and every dense open-vocabulary method of this book (CLIPSelf, DeCLIP, SynCLIP, DenseRC, SynSeg)
# starts from the same observation: **those patch tokens are poorly aligned with text**, far worse than the
# embedding of a crop of the same region. This chapter
#
# 1. builds the book's default backbones on a laptop: a *micro CLIP* trained contrastively on captions of a
#    procedural *micro world*, and a *micro VFM* trained self-supervised (MAE) on its images;
# 2. measures the gap between dense tokens and crop embeddings with the region-classification protocol of
#    CLIPSelf (boxes, thing masks, stuff masks; Top-1/Top-5 mean per-class accuracy), for the training-free
#    last-block modifications of MaskCLIP, SCLIP, ClearCLIP and NACLIP;
# 3. adds open-vocabulary segmentation (MaskCLIP-style sliding windows), k-means grouping of the dense
#    features, and point affinity maps.
#
# Every number below is computed when the notebook runs; intervals are 95 % percentile-bootstrap intervals
# over evaluation images.

# %% tags=["parameters"]
profile = "micro"
device = "cpu"
gpus = 1
seed = 0
seeds = 3
data_root = "data/microworld"
cache_dir = "data/cache"
steps_scale = 1.0
eval_images = 400
allow_download = False
backbone = "micro-clip"
recipes = []  # distillation recipes: injected from params/PROFILE.yaml; this chapter trains none
budgets = {}  # the chapters' budgets: injected from params/PROFILE.yaml (read through ovlib.study.Study)
models = {}  # named models of the paper profile (role -> {name, pretrained})
weights_dir = ""  # local named weights (offline clusters)
precision = "fp32"  # numerics of every training: fp32 | bf16 | auto (injected from params/PROFILE.yaml)
dry_run = False  # the profile at dry-run sizes: random weights, at most 2 steps
dry_run_settings = {}

# %%
import math
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

from ovlib.config import dry_run_depth, dry_run_eval
from ovlib.data import CocoPanoptic, MicroWorld, ensure_microworld
from ovlib.data.coco import dry_run_data
from ovlib.eval import (
    MICRO_TEMPLATES,
    VILD_TEMPLATES,
    affinity_map,
    class_name_sets,
    extract_region_features,
    score_regions,
    summarize,
    text_embeddings,
)
from ovlib.eval._common import dense_fn_for_clip, dense_fn_for_proxyclip, dense_fn_for_vfm, student_image
from ovlib.eval.metrics import macc_from_counts
from ovlib.eval.profiles import dense_eval_settings
from ovlib.eval.segmentation import evaluate_kmeans, evaluate_object_affinity, evaluate_ovss
from ovlib.eval.unsupervised import mean_colour_dense
from ovlib.eval.zeroshot import isolated_objects, zero_shot_hits, zero_shot_summary
from ovlib.nb import ci, md, setup, table
from ovlib.stats import Sample, fixed_mean
from ovlib.study import Study
from ovlib.train.mae import MaeDecoder, MaeVfmPretrainConfig, mae_encode, random_keep
from ovlib.train.pretrain import (
    clip_train_flops_per_sample,
    forward_flops,
    matmul_peak,
    pretrain_clip,
    pretrain_configs,
    pretrain_vfm,
)

# every contract key comes from the parameters cell above (``backbone``/``recipes`` are not used here)
P, DEV = setup(globals())  # validates the contract, seeds torch, resolves the device
T0 = time.perf_counter()
P, DRY = dry_run_data(P)  # a dry run reads the shared COCO subset (instances derived, captions synthesised)
EV = dense_eval_settings(P["profile"], P["eval_images"], **dry_run_eval(P))
clip_cfg, vfm_cfg = pretrain_configs(P, P["steps_scale"], P["seed"])  # its budgets and precision





md(f"Profile **{P['profile']}** on `{DEV}` with {torch.get_num_threads()} threads; "
   f"{len(EV.modes)} dense modes; evaluation on {P['eval_images'] or 'all'} images." + (f"\n\n{DRY}" if DRY else ""))

# %% [markdown]
# ## 1.1 The micro world
#
# A seeded generator of scenes (`ovlib.data.microworld`): *things* (shape × colour × texture, with object
# names) on *stuff* backgrounds (textured regions such as grass, water, sand, sky), 1–6 things per scene with
# occlusion, scale and rotation. Each thing prefers some stuff (**context bias**: boats on water), so a
# CLIP trained on these captions can learn to read context instead of the object. Every class has a main name,
# 3–6 synonyms (used rarely in captions, some *held out* and never used) and a definition. The evaluation
# split is written to disk in the COCO panoptic format and read back with the same loader as real COCO.

# %%
world = MicroWorld(seed=P["seed"])
fig, axes = plt.subplots(4, 8, figsize=(12, 6.4))
rng = np.random.default_rng(P["seed"])
for ax, i in zip(axes.flat, rng.choice(100_000, size=32, replace=False)):
    sc = world.sample(int(i), 64)
    ax.imshow(sc.image)
    ax.set_title(sc.captions[0][:28], fontsize=5)
    ax.axis("off")
fig.suptitle("32 random 64-px micro-world scenes (first caption above each)")
plt.tight_layout()
plt.show()

# %%
cls = world.classes
ncol = 9
fig, axes = plt.subplots(math.ceil(len(cls) / ncol), ncol, figsize=(13, 1.75 * math.ceil(len(cls) / ncol)))
for ax in axes.flat:
    ax.axis("off")
for ax, c in zip(axes.flat, cls):
    ax.imshow(world.class_image(c.id, 64))
    held = set(c.heldout_synonyms)
    syn = ", ".join(s + ("*" if s in held else "") for s in c.synonyms[:4])
    ax.set_title(f"{c.id} {c.name}{' (novel)' if c.novel else ''}\n{syn}", fontsize=5.5)
fig.suptitle("Class sheet: id, main name, synonyms (* = held out from the captions)")
plt.tight_layout()
plt.show()
md(f"{len(world.things)} thing classes ({sum(c.novel for c in world.things)} marked novel) and "
   f"{len(world.stuff)} stuff classes.")

# %% [markdown]
# ## 1.2 Pre-training the micro CLIP and the micro VFM
#
# **Micro CLIP** (`ovlib.models.load_clip("micro-clip")`, an ordinary open_clip `CLIP`): ViT image tower
# (patch 8, width 128, 4 layers, 4 heads, 64-px input = an 8×8 grid), causal text tower (width 128, 3
# layers, context 32, open_clip's BPE tokenizer), joint dimension 128. It is trained with CLIP's symmetric
# InfoNCE loss
#
# $$\mathcal L = \tfrac12\big[\mathrm{CE}(s\, I T^\top, \mathrm{id}) + \mathrm{CE}(s\, T I^\top, \mathrm{id})\big],
# \qquad s = e^{\theta}\ \text{(learnable, clamped at 100)},$$
#
# on freshly generated 64-px scenes and one of their captions (nothing is stored), with AdamW (no decay on
# norms, biases, embeddings and $\theta$), linear warm-up and cosine decay.
#
# **Close-ups.** A fraction `object_views` of the training pairs (printed below) are *object-centric views*
# (`MicroWorld.object_view`): a square window around one thing of the scene, 1.2–2.5× its box, rendered at
# 128 px and resized to 64, captioned with the things whose centre lies in the window (always the chosen
# one). Web caption data is full of such close-ups, and they are what the crop predictor and the distillation
# teachers of the later chapters see (a region cut out and resized to the CLIP input). Trained on whole
# scenes alone (1–6 small things, captions naming 1–3 of them) the micro CLIP learned object names far more
# slowly: at the same budget it mostly read the stuff background. The pre-training stream never touches the
# evaluation scenes (they start at index 10⁹).
#
# **Micro VFM** (`load_vfm("micro-vfm")`, a timm ViT of the same size; `ovlib.train.mae`): a *masked
# autoencoder* (He et al. 2022) at the evaluation resolution, self-supervised only (scenes; no labels, captions
# or masks). Whole 160-px scenes (20 × 20 tokens), flipped with p 0.5; 75 % of the patches of each scene dropped
# at random before the encoder, which sees only the visible quarter (with their position embeddings); a
# 2-block decoder (width 96) takes the encoded tokens and a learned mask token at every dropped position and
# predicts each dropped patch's pixels, normalised per patch (MAE's `norm_pix`); the loss is the mean squared
# error on the dropped patches only. The encoder is kept, the decoder discarded. MAE was chosen by measurement
# (the trials of §1.7, `benchmarks/vfm_grouping.py`): DINO's image-level objective on 48/24-px crops and dense
# self-distillation across views at the evaluation scale (the previous default) grouped no better than the
# untrained ViT; MAE groups better than both, on the k-means protocol and with colours equalised. Its budget is
# the shortest of the MAE trials (`budgets.pretrain.vfm`): in the trials, MAE's grouping did not grow with more
# steps.
#
# Both are cached under `cache_dir`, keyed by a hash of their config: a second run loads them.

# %%
if P["profile"] == "paper":  # the real backbones of params/paper.yaml `models` (OpenAI ViT-B/16, DINOv2 ViT-B/14)
    from ovlib.models import load_clip, load_vfm

    clip_model, tokenizer, _ = load_clip(**P["models"]["clip"], device=DEV, allow_download=P["allow_download"],
                                         weights_dir=P["weights_dir"] or None, seed=P["seed"], depth=dry_run_depth(P))
    vfm = load_vfm(**P["models"]["vfm"], device=DEV, allow_download=P["allow_download"],
                   weights_dir=P["weights_dir"] or None, seed=P["seed"], depth=dry_run_depth(P))
    clip_info = vfm_info = None
    CLIP_NAME = f"{P['models']['clip']['name']} CLIP ({P['models']['clip']['pretrained'] or 'random init'})"
    VFM_NAME = f"{P['models']['vfm']['name']} ({P['models']['vfm']['pretrained'] or 'random init'})"
else:
    CLIP_NAME, VFM_NAME = "micro CLIP", "micro VFM"
    clip_model, tokenizer, clip_info = pretrain_clip(clip_cfg, P["cache_dir"], device=DEV)
    vfm, vfm_info = pretrain_vfm(vfm_cfg, P["cache_dir"], device=DEV)
clip_model.eval()
vfm.eval()
if clip_info is not None:
    md(f"micro CLIP: {clip_cfg.steps} steps × batch {clip_cfg.batch_size}, lr {clip_cfg.lr:g} (warm-up "
       f"{clip_cfg.warmup}), object views {100 * clip_cfg.object_views:.0f} % (context "
       f"{clip_cfg.view_context[0]:g}–{clip_cfg.view_context[1]:g}× the box, rendered at "
       f"{clip_cfg.view_render_size} px); micro VFM ({type(vfm_cfg).__name__}): {vfm_cfg.steps} steps × batch "
       f"{vfm_cfg.batch_size}, lr {vfm_cfg.lr:g}" +
       (f", views of {vfm_cfg.view_scale[0]:g}–{vfm_cfg.view_scale[1]:g} × {vfm_cfg.view_size} px, channels "
        f"shuffled with p {vfm_cfg.channel_shuffle:g}, grey with p {vfm_cfg.grayscale:g}."
        if hasattr(vfm_cfg, "view_scale") else
        f", {vfm_cfg.scene_size}-px scenes, {100 * vfm_cfg.mask_ratio:.0f} % of the patches masked, decoder "
        f"{vfm_cfg.decoder_depth} blocks × width {vfm_cfg.decoder_dim}." if hasattr(vfm_cfg, "mask_ratio") else "."))

fig, ax = plt.subplots(1, 3, figsize=(13, 3))
h = clip_info["history"] if clip_info else []
ax[0].plot([r["step"] for r in h], [r["loss"] for r in h], lw=0.8)
ax[0].axhline(math.log(clip_cfg.batch_size), ls="--", c="grey", lw=0.8, label="ln(batch): chance")
ax[0].set(title="micro CLIP: InfoNCE loss", xlabel="step")
ax[0].legend(fontsize=7)
ax[1].plot([r["step"] for r in h], [r["logit_scale"] for r in h], lw=0.8)
ax[1].set(title="micro CLIP: logit scale exp(θ)", xlabel="step")
hv = vfm_info["history"] if vfm_info else []
VFM_MAE = isinstance(vfm_cfg, MaeVfmPretrainConfig)
ax[2].plot([r["step"] for r in hv], [r["loss"] for r in hv], lw=0.8,
           label="MSE of the masked patches" + (" (normalised pixels)" if VFM_MAE and vfm_cfg.norm_pix else "")
           if VFM_MAE else "DINO loss")
if VFM_MAE and vfm_cfg.norm_pix:  # predicting every normalised patch as 0 (its mean) scores 1
    ax[2].axhline(1.0, ls="--", c="grey", lw=0.8, label="predicting the patch mean")
elif not VFM_MAE:
    ax[2].plot([r["step"] for r in hv], [r["teacher_entropy"] for r in hv], lw=0.8, label="teacher entropy")
    ax[2].axhline(math.log(vfm_cfg.out_dim), ls="--", c="grey", lw=0.8, label="ln K (collapse to uniform)")
ax[2].set(title="micro VFM: " + ("MAE" if VFM_MAE else "DINO"), xlabel="step")
ax[2].legend(fontsize=7)
plt.tight_layout()
plt.show()

# %% [markdown]
# ### Throughput and model FLOP utilisation
#
# MFU = achieved model FLOP/s ÷ the machine's *measured* matmul peak (a timed square matmul in this process,
# in the precision the run used). Model FLOPs per training sample are 3× the forward FLOPs of both towers
# counted by `torch.utils.flop_counter` (matmuls and attention; element-wise work is not counted), the text
# tower's at the run's mean number of text positions (`text_context: trim` runs it up to each batch's last
# end-of-text token: the same function with less work, `ovlib.models.clip.encode_text_trimmed`). The book
# trains in fp32 (`precision: fp32`): bf16 pre-training gives other numbers (the README's precision paragraph);
# `-p precision=bf16` trades them for speed where the hardware has bf16 (Intel AMX, GPUs), and `auto` picks bf16
# only there -- CPUs without native bf16 instructions run bf16 matmuls far slower than fp32.

# %%
p32 = matmul_peak(torch.float32, device=DEV)
p16 = matmul_peak(torch.bfloat16, n=512, seconds=0.3, device=DEV)
# the text positions the run's steps computed (text_context "trim": up to each batch's last end-of-text token)
text_lens_ = [h["text_len"] for h in (clip_info or {}).get("history", []) if "text_len" in h]
clip_flops = clip_train_flops_per_sample(clip_model.cpu(), tokenizer, clip_cfg.image_size,
                                         round(sum(text_lens_) / len(text_lens_)) if text_lens_ else None
                                         ) if clip_info else 0.0
clip_model.to(DEV)
vfm_cpu = vfm.cpu()
if not vfm_info:  # real weights (paper): nothing trained here
    vfm_flops = 0.0
elif VFM_MAE:  # per scene: fwd+bwd of the encoder on the visible tokens and of the decoder on every token
    vp_ = vfm_cpu.patch_embed.patch_size
    vp_ = int(vp_[0] if isinstance(vp_, (tuple, list)) else vp_)
    grid_ = vfm_cfg.scene_size // vp_
    keep_, _ = random_keep(1, grid_ * grid_, vfm_cfg.mask_ratio, torch.Generator().manual_seed(0))
    dec_ = MaeDecoder(vfm_cpu.embed_dim, vfm_cfg.decoder_dim, vfm_cfg.decoder_depth, vfm_cfg.decoder_heads, vp_,
                      grid_)  # FLOPs do not depend on the (discarded) decoder's weights
    s_ = torch.zeros(1, 3, vfm_cfg.scene_size, vfm_cfg.scene_size)
    vfm_flops = 3 * forward_flops(lambda: dec_(mae_encode(vfm_cpu, s_, keep_), keep_))
elif hasattr(vfm_cfg, "view_size"):  # dense objective, per view pair: student fwd+bwd and teacher fwd on 2 views
    v = torch.zeros(1, 3, vfm_cfg.view_size, vfm_cfg.view_size)
    vfm_flops = (3 * 2 + 2) * forward_flops(lambda: vfm_cpu.forward_features(v)) if vfm_info else 0.0
else:  # DINO per image: student fwd+bwd on 2 global + n_local local views, teacher fwd on the 2 global views
    g = torch.zeros(1, 3, vfm_cfg.global_size, vfm_cfg.global_size)
    loc = torch.zeros(1, 3, vfm_cfg.local_size, vfm_cfg.local_size)
    vfm_flops = (3 * (2 * forward_flops(lambda: vfm_cpu.forward_features(g))
                      + vfm_cfg.n_local * forward_flops(lambda: vfm_cpu.forward_features(loc)))
                 + 2 * forward_flops(lambda: vfm_cpu.forward_features(g))) if vfm_info else 0.0
vfm.to(DEV)
rows = []
trained = [] if clip_info is None else [("micro CLIP", clip_info, clip_flops, clip_cfg),
                                        ("micro VFM", vfm_info, vfm_flops, vfm_cfg)]
for name, info, fl, cfg in trained:
    # MFU against the peak measured by the run that trained the model (older caches did not record it)
    peak = info.get("matmul_peak")
    sps = info["samples_per_s"]
    rows.append([name, cfg.steps, cfg.batch_size, f"{info['train_seconds']:.0f}", f"{sps:.0f}",
                 f"{fl / 1e6:.0f}", f"{100 * sps * fl / peak:.1f}" if peak else "— (peak not recorded)",
                 f"{peak / 1e9:.0f}" if peak else "—", "bf16" if info.get("bf16") else "fp32",
                 "cache" if info.get("loaded") else "this run"])
md(f"Matmul peak measured now: fp32 **{p32 / 1e9:.0f} GFLOP/s**, bf16 **{p16 / 1e9:.1f} GFLOP/s** "
   f"({p16 / p32:.2f}× fp32).\n\n" +
   table(["model", "steps", "batch", "train s", "samples/s", "MFLOP/sample (train)", "MFU %",
          "peak of its run (GFLOP/s)", "precision", "trained in"], rows) +
   "\n\nSamples/s are end to end (scene generation, tokenisation, optimiser); times of a cached model are "
   "those of the run that trained it.")

# %% [markdown]
# ## 1.3 Evaluation data and class embeddings
#
# The evaluation split of the micro world (scenes never used for training) is exported in the COCO panoptic
# layout at 160 px — the ratio of the papers' 1024-px student images to their 224-px crops, here 160 to 64 —
# and read with `ovlib.data.CocoPanoptic`, the loader of real COCO.
#
# Class embeddings are template ensembles (per-prompt L2 norm, mean, renormalise). For COCO the book uses the
# 63 ViLD templates with CLIPSelf's "This is …" prefix; for the micro world it uses the frames of the micro
# world's thing captions with the class name in place of the noun phrase (listed below).

# %%
if P["profile"] == "paper":
    ds = CocoPanoptic(P["data_root"], "val2017")
    templates, this_is = VILD_TEMPLATES[:EV.templates or None], True
else:
    root = ensure_microworld(P["data_root"], "val2017", n=P["eval_images"], size=EV.export_size, seed=P["seed"])
    ds = CocoPanoptic(root, "val2017")
    templates, this_is = MICRO_TEMPLATES, False
categories = ds.categories
class_ids = [c["id"] for c in categories]
is_thing = {c["id"]: bool(c.get("isthing", 1)) for c in categories}
name_sets = {mode: class_name_sets(categories, mode, seed=P["seed"])
             for mode in ("main", "first_synonym", "heldout_synonym", "synonym_ensemble")}
_text_of = {}  # name lists -> embeddings, each computed once (COCO has no synonyms: its protocols share one list)
for names in name_sets.values():
    if str(names) not in _text_of:
        _text_of[str(names)] = text_embeddings(clip_model, tokenizer, names, templates, this_is_prefix=this_is,
                                               device=DEV).cpu()
text = {mode: _text_of[str(names)] for mode, names in name_sets.items()}
md(f"{len(ds)} evaluation images, {len(class_ids)} classes. Templates ({len(templates)}): " +
   ", ".join(f"`{t}`" for t in templates[:8]) + (" …" if len(templates) > 8 else ""))

# %% [markdown]
# ## 1.4 Region features for every dense mode
#
# For each panoptic segment (§1.7 of the reference notes; CLIPSelf's `zero_shot.py`): a **box** RoI (thing:
# GT box; stuff: tight box of the mask) pooled by RoIAlign from the dense map of the whole 160-px image, the
# **mask** average of that map over the segment, and the **crop** CLS embedding of the region cut from the
# image (things expanded 1.5×) resized to 64 px — the upper reference: what CLIP knows about the region when it
# sees it alone. Two conventions of CLIPSelf's protocol matter for numbers set beside its table: tokens are
# L2-normalised *before* pooling (DeCLIP and SynCLIP pool first and normalise after, chapter 4), and the mask
# at the 20×20 grid is the segment mask resized to the grid (bicubic) and thresholded `> 0`, which keeps a
# cell the segment only grazes (our stricter alternative, "cells covered at least half", is the
# `mask_grid="coverage"` option of `RegionClsConfig`). The protocol of this run is printed under the table.
#
# The last block of the image tower is modified per **method**, each with the switches of its released code
# (`ovlib.models.PRESETS`; the table is generated from that data): which attention replaces the last one, whether
# its logits are scaled by $d^{-1/2}$, whether the residual and the FFN are kept, and how the position
# embedding is interpolated off the CLIP's native grid (`size`: CLIPSelf's `F.interpolate(size=…)`;
# `scale-factor`: SCLIP/ClearCLIP/NACLIP's `scale_factor=(h + 0.1)/h₀`, a small resampling shift). The bare
# mode of a row (e.g. `csa` with the default scale and neither residual nor FFN) is none of the methods:
# SCLIP keeps residual and FFN, DeCLIP and SynCLIP drop the scale.

# %%
from ovlib.models import PRESET_SOURCES, PRESETS, dense_facts, dense_spec


def _yn(v):
    return "—" if v is None else ("yes" if v else "no")


md(table(["preset", "row here", "mode", "last-block attention", "scale d^-½", "residual", "FFN", "RoPE (EVA)",
          "pos-emb interpolation", "released code"],
         [[f"`{n}`", "✔" if n in EV.modes else "", f"`{dense_spec(n)['mode']}`", f["attention"], _yn(f["scale"]),
           _yn(f["residual"]), _yn(f["ffn"]), _yn(f["rope"]), f"`{f['pos_interp']}`", PRESET_SOURCES.get(n, "")]
          for n in PRESETS for f in [dense_facts(dense_spec(n))]])
   + "\n\n`vanilla` is CLIP's own last block. `clipself` is MaskCLIP's block (the dense map of CLIPSelf's "
   "distillation, chapter 2); `declip-csa` and `synclip` share their switches (chapter 4); `denserc-base` is "
   "chapter 3's.")

# %%
t_eval = time.perf_counter()
rf = extract_region_features(clip_model, ds, EV.region, modes=EV.modes, n_images=P["eval_images"], device=DEV)
t_region = time.perf_counter() - t_eval
PROTOCOL = {k: v for k, v in rf.protocol.items() if k != "dense"}
md(f"{len(rf.category_id)} regions ({int(rf.isthing.sum())} things, {int((~rf.isthing).sum())} stuff) from "
   f"{rf.n_images} images in {t_region:.0f} s; {rf.skipped_size} segments skipped by the size filter "
   f"(box area < {EV.region.min_size:g}² px); {rf.mask_fallbacks} masks too small for the grid fell back to "
   "their most covered cell. Protocol: " + ", ".join(f"{k} `{v}`" for k, v in PROTOCOL.items()) + ".")

# %% [markdown]
# ## 1.5 Global zero-shot: main names vs synonyms
#
# The crop predictor is CLIP used as it was trained: one embedding per image. Top-1 mean per-class accuracy
# on GT things (crops with 1.5× context), with the class embedding built from the main name, the first caption
# synonym, the first *held-out* synonym (never in a caption), or the ensemble of all synonyms. Two label
# spaces: **all classes** (things and stuff — the region-classification protocol of the papers, where a
# thing crop full of grass may be called "grass") and **thing names only** (the single-object zero-shot
# task: which of the 26 objects is this?).
#
# A third set, **isolated objects**, is the single-object task the micro CLIP's target is stated for (and the
# prototype measured): every thing class rendered alone, centred, on every stuff background at four rotations
# (`ovlib.eval.zeroshot.isolated_objects`) — no neighbours, no clutter. Scene crops are the harder, realistic
# case: the same objects at 10–25 px with other things and stuff in the window.

# %%
zs = {mode: summarize({"crops": score_regions(rf, text[mode], class_ids)["crops"]}, n_boot=EV.n_boot,
                      seed=P["seed"])["crops"] for mode in text}
thing_ids = [c for c in class_ids if is_thing[c]]
thing_rows = torch.tensor([is_thing[c] for c in class_ids])
rf_things = rf.subset(rf.isthing)
zs_obj = {mode: summarize({"crops": score_regions(rf_things, text[mode][thing_rows], thing_ids)["crops"]},
                          n_boot=EV.n_boot, seed=P["seed"])["crops"] for mode in text}
if P["profile"] != "paper":  # isolated objects exist only in the micro world
    iso_imgs, iso_labels, iso_ctx = isolated_objects(world, size=clip_cfg.image_size,
                                                     rotations=1 if P["profile"] == "smoke" else 4)
    iso_hits = {space: zero_shot_hits(clip_model, iso_imgs, iso_labels, t.to(DEV), ids, input_size=clip_cfg.image_size)
                for space, t, ids in (("thing names", text["main"][thing_rows], thing_ids),
                                      ("all classes", text["main"], class_ids))}
    iso_sets = {"its preferred background": iso_ctx, "other backgrounds": ~iso_ctx,
                "every background": np.ones_like(iso_ctx)}
    iso = {(space, bg): zero_shot_summary({k: h[sel] for k, h in hits.items()}, iso_labels[sel], n_boot=EV.n_boot,
                                          seed=P["seed"])
           for space, hits in iso_hits.items() for bg, sel in iso_sets.items() if sel.any()}
    md(f"**Isolated objects** ({len(iso_labels)} images: {len(thing_ids)} things × {len(world.stuff_ids)} "
       f"backgrounds × {len(iso_labels) // (len(thing_ids) * len(world.stuff_ids))} rotation(s), main names). "
       "A thing's *preferred background* is the stuff the world's context bias puts it on in scenes:\n\n"
       + table(["label space", "background", "images", "Top-1", "Top-5"],
               [[sp, bg, int(iso_sets[bg].sum()), ci(v[1]), ci(v[5])] for (sp, bg), v in iso.items()]))
labels = {"main": "main name", "first_synonym": "first synonym", "heldout_synonym": "held-out synonym",
          "synonym_ensemble": "synonym ensemble"}
md(table(["class names", "things Top-1 (all classes)", "things Top-5 (all)", "things Top-1 (thing names)",
          "stuff Top-1 (all)", "stuff Top-5 (all)"],
         [[labels[m], ci(zs[m]["thing.macc1"]), ci(zs[m]["thing.macc5"]), ci(zs_obj[m]["thing.macc1"]),
           ci(zs[m]["stuff.macc1"]), ci(zs[m]["stuff.macc5"])] for m in text]))
zs_obj_main = zs_obj["main"]["thing.macc1"][0]
zs_main = zs["main"]["thing.macc1"][0]
zs_held = zs["heldout_synonym"]["thing.macc1"][0]
drop = zs_main - zs_held
md(f"The {CLIP_NAME} classifies GT-thing crops with **{zs_obj_main:.1f} %** Top-1 mean accuracy among the "
   f"{len(thing_ids)} thing names (chance {100 / len(thing_ids):.1f} %) and **{zs_main:.1f} %** among all "
   f"{len(class_ids)} classes (chance {100 / len(class_ids):.1f} %), using main names; with held-out synonyms "
   f"**{zs_held:.1f} %** (all classes), "
   + (f"a drop of {drop:.1f} points: the synonym brittleness SynCLIP targets." if drop > 0 else
      "no drop at this budget (the model has not yet learned the main names well enough for synonyms to "
      "matter).")
   + ("" if P["profile"] != "micro" else
      (" On **isolated objects** on their preferred background it reaches "
       f"**{iso[('thing names', 'its preferred background')][1][0]:.1f} %** among thing names, on other "
       f"backgrounds **{iso[('thing names', 'other backgrounds')][1][0]:.1f} %**: the book's target for the micro "
       "CLIP (≥ 80 % Top-1 on single-object images with main names) is "
       + ("met in context" if iso[('thing names', 'its preferred background')][1][0] >= 80 else
          "**NOT met** even in context")
       + (" and " + ("met" if iso[('thing names', 'other backgrounds')][1][0] >= 80 else "**NOT met**")
          + " out of context"
          + (" — the CLIP leans on the background: the world's context bias became a shortcut, the micro "
             "analogue of real CLIP's context reliance (95 % intervals disjoint)."
             if iso[('thing names', 'other backgrounds')][1][2] < iso[('thing names', 'its preferred background')][1][1]
             else ".")
          if ('thing names', 'other backgrounds') in iso else ".")
       + f" Crops of the same things inside scenes (neighbours and stuff in the window): {zs_obj_main:.1f} % "
         f"among thing names, {zs_main:.1f} % among all classes.")))

# %% [markdown]
# ## 1.6 The dense gap
#
# Region classification with main names. *Boxes* = RoIAlign on thing boxes, *Thing / Stuff masks* = mask
# pooling (the columns of CLIPSelf's Table 1); the last row is the crop CLS reference.

# %%
scores = score_regions(rf, text["main"], class_ids)
summ = summarize(scores, n_boot=EV.n_boot, seed=P["seed"])
rows = []
for m in EV.modes:
    r, k = summ[f"rois/{m}"], summ[f"maskpool/{m}"]
    rows.append([f"`{m}`", ci(r["thing.macc1"]), ci(r["thing.macc5"]), ci(k["thing.macc1"]), ci(k["thing.macc5"]),
                 ci(k["stuff.macc1"]), ci(k["stuff.macc5"])])
c = summ["crops"]
rows.append(["crop CLS (reference)", ci(c["thing.macc1"]), ci(c["thing.macc5"]), "", "", ci(c["stuff.macc1"]),
             ci(c["stuff.macc5"])])
md(table(["dense map", "Boxes Top-1", "Boxes Top-5", "Thing masks Top-1", "Thing masks Top-5", "Stuff masks Top-1",
          "Stuff masks Top-5"], rows)
   + f"\n\nPooling `{PROTOCOL['pooling']}`, grid masks `{PROTOCOL['mask_grid']}` (CLIPSelf's conventions).")

# %%
# The papers' own numbers (COCO panoptic val2017, ViT-B/16, Top-1 / Top-5 mean accuracy), from
# book/paper_numbers.yaml (Qiu et al. 2025, Refining CLIP's Spatial Awareness, ICLR'25, Table 1).
study = Study(P, "01", device=DEV)
PAPER_T1 = study.paper_value("rsc.table.t1")
gap = c["thing.macc1"][0] - summ["rois/vanilla"]["thing.macc1"][0]
best = max(EV.modes, key=lambda m: summ[f"rois/{m}"]["thing.macc1"][0])
lo_crop, hi_van = c["thing.macc1"][1], summ["rois/vanilla"]["thing.macc1"][2]
clear = lo_crop > hi_van
md(table(["paper row (EVA-CLIP ViT-B/16)", "Boxes T1", "Boxes T5", "Thing T1", "Thing T5", "Stuff T1", "Stuff T5"],
         [[k] + [f"{x:.1f}" for x in PAPER_T1[k]] for k in ("CLIP", "CLIPSelf")]) +
   f"\n\n**The gap.** Crop CLS reaches {c['thing.macc1'][0]:.1f} % Top-1 on things, RoIAlign of the vanilla "
   f"dense map {summ['rois/vanilla']['thing.macc1'][0]:.1f} %: a gap of **{gap:.1f} points** "
   + ("(the intervals do not overlap: the papers' premise holds in the micro world). " if clear else
      "(**the intervals overlap: the gap is NOT clear at this budget** — the method chapters depend on it). ")
   + f"The best training-free mode on boxes is `{best}` with {summ[f'rois/{best}']['thing.macc1'][0]:.1f} %. "
   f"In the paper, EVA-CLIP's boxes reach {PAPER_T1['CLIP'][0]:.1f} % and CLIPSelf's distillation lifts them to "
   f"{PAPER_T1['CLIPSelf'][0]:.1f} %.")

# the premise as a claim of the book's ledger (book/claims/01.json): the frozen CLIP is deterministic, so the
# paired bootstrap over the evaluation images is the whole uncertainty (ovlib.stats)


def thing_top1(key):
    """Per-image ``[regions, Top-1 hits]`` per class of a predictor, and the mean-accuracy statistic."""
    return Sample((np.asarray(scores[key]["thing"][:, [0, 1]], dtype=np.float64),),
                  lambda s: macc_from_counts(s[1], s[0]), fixed=True)


gap_claim = study.claim("1.6-dense-gap", "the crop CLS classifies things better than RoIAlign of the vanilla dense "
                        "map (the dense gap)", thing_top1("rois/vanilla"), thing_top1("crops"), "thing.top1",
                        headline=True, paper_ref="clip.rc.boxes", section="1.6")
study.ledger()
md(f"Crop CLS − vanilla RoIAlign, things Top-1: {gap_claim.describe()}.")

# %% [markdown]
# ## 1.7 Open-vocabulary segmentation and k-means grouping
#
# **OVSS** (MaskCLIP-style, training-free): 64-px windows slide over the 160-px image with stride 32; each
# window's dense map gives cosine logits against the class embeddings, bilinearly upsampled and averaged over
# overlaps; `softmax(40 · cos)`, argmax; mIoU over the summed confusion matrix (a class absent from both the
# ground truth and the prediction is excluded, as in mmseg). The micro world labels every pixel, so no
# background threshold is used.
#
# **k-means**: per image, k-means on the unit-norm dense map of the whole image with K = number of GT
# segments, clusters matched one-to-one to segments by the Hungarian algorithm, mean IoU over segments — how
# well the tokens group, independent of text. Two references keep it honest (`ovlib.eval.unsupervised`):
#
# * **colour, no model**: the mean RGB of each 8×8 patch as the token. In the micro world things and stuff
#   differ in colour, so this alone groups well; a representation is worth its k-means number only above it.
# * **colours equalised**, a measure colour cannot solve: every ground-truth segment's mean colour is moved to
#   the image's mean colour (texture, shading and shape kept), then the same k-means. The colour baseline falls
#   to what boundary patches give; what remains is grouping by texture and shape.
#
# The micro VFM must group better than every CLIP mode (DINOv2 does, and chapters 2–4 distil its spatial
# correlations for that reason).
#
# **ProxyCLIP** (Lan et al. 2024; training-free, VFM-assisted; dense mode `proxy`): the last block's attention
# is replaced by the VFM's patch affinities — `A = softmax(γ (S − β·mean S))` with `S` the cosine similarities
# of the VFM's patch features, entries below zero masked (β = 1.2, γ = 3) — applied to CLIP's own values
# (resized to the VFM's grid), then CLIP's output projection, final norm and projection; no residual, no FFN
# (`mc-lan/ProxyCLIP`, checked against a brute-force statement of its code in `tests/test_proxyclip.py`). The
# VFM sees the same window: the micro VFM here, DINOv2 in the paper profile.

# %%
t_seg = time.perf_counter()
from ovlib.models import vit_adapter

clip_patch = int(vit_adapter(clip_model).patch_size[0])  # open_clip ViT and EVA (timm) towers alike
vp = vfm.patch_embed.patch_size
vfm_patch = int(vp[0] if isinstance(vp, (tuple, list)) else vp)
seg_rows = []
km, km_eq, ovss = {}, {}, {}


def kmeans_both(fn, patch):
    """k-means mIoU on the scenes as they are and with segment colours equalised."""
    return [evaluate_kmeans(fn, ds, image_size=EV.region.image_size, n_images=EV.ovss_images, seed=P["seed"],
                            n_boot=EV.n_boot, patch=patch, colour=c) for c in ("as_is", "equalized")]


for m in EV.modes:
    fn = dense_fn_for_clip(clip_model, m)
    ovss[m] = ov = evaluate_ovss(fn, ds, text["main"], class_ids, EV.ovss, n_images=EV.ovss_images,
                                 n_boot=EV.n_boot, seed=P["seed"])
    km[m], km_eq[m] = kmeans_both(fn, clip_patch)
    seg_rows.append([f"`{m}`", ci(ov["miou"]), ci(ov["macc"]), ci(km[m]["miou"]), ci(km_eq[m]["miou"])])
vfm_name = VFM_NAME
fn = dense_fn_for_proxyclip(clip_model, vfm)  # ProxyCLIP: CLIP's values, the VFM's affinities (beta 1.2, gamma 3)
ovss["proxyclip"] = ov = evaluate_ovss(fn, ds, text["main"], class_ids, EV.ovss, n_images=EV.ovss_images,
                                       n_boot=EV.n_boot, seed=P["seed"])
km["proxyclip"], km_eq["proxyclip"] = kmeans_both(fn, math.lcm(clip_patch, vfm_patch))
seg_rows.append([f"ProxyCLIP (`proxy`, {vfm_name})", ci(ov["miou"]), ci(ov["macc"]), ci(km["proxyclip"]["miou"]),
                 ci(km_eq["proxyclip"]["miou"])])
km["vfm"], km_eq["vfm"] = kmeans_both(dense_fn_for_vfm(vfm), vfm_patch)
seg_rows.append([VFM_NAME, "", "", ci(km["vfm"]["miou"]), ci(km_eq["vfm"]["miou"])])
km["colour"], km_eq["colour"] = kmeans_both(lambda x: mean_colour_dense(x, clip_patch), clip_patch)
seg_rows.append(["colour: mean RGB per patch (no model)", "", "", ci(km["colour"]["miou"]),
                 ci(km_eq["colour"]["miou"])])
best_km = max(EV.modes, key=lambda m: km[m]["miou"][0])
best_eq = max(EV.modes, key=lambda m: km_eq[m]["miou"][0])


# the premise of chapters 2-4, as claims of the ledger (paired bootstrap over the same images)
prem = [study.claim(f"1.7-vfm-groups-{name}", f"the {vfm_name} groups better than {what} (k-means mIoU"
                    f"{', colours equalised' if d is km_eq else ''})", fixed_mean(d[ref]["per_image"]), fixed_mean(d["vfm"]["per_image"]),
                    "kmeans.miou", headline=True, section="1.7")
        for d, ref, name, what in ((km, best_km, "clip", f"the best CLIP mode (`{best_km}`)"),
                                   (km, "colour", "colour", "the colour baseline (mean RGB per patch)"),
                                   (km_eq, best_eq, "clip-eq", f"the best CLIP mode (`{best_eq}`)"))]
study.ledger()
md(f"{EV.ovss_images} images, {time.perf_counter() - t_seg:.0f} s.\n\n" +
   table(["dense features", "OVSS mIoU", "OVSS mAcc", "k-means mIoU", "k-means mIoU, colours equalised"],
         seg_rows) +
   "\n\n**The VFM premise** (VFM − reference, k-means mIoU; ledger verdicts):\n\n" +
   "\n".join(f"* {c.text}: {c.describe()}" for c in prem))
AFF = {name: evaluate_object_affinity(fn, ds, image_size=EV.region.image_size, n_images=EV.ovss_images,
                                      seed=P["seed"], n_boot=EV.n_boot, patch=p_)
       for name, fn, p_ in ((f"CLIP `{best_km}` (best k-means mode)", dense_fn_for_clip(clip_model, best_km), clip_patch),
                            ("micro VFM", dense_fn_for_vfm(vfm), vfm_patch),
                            ("colour (no model)", lambda x: mean_colour_dense(x, clip_patch), clip_patch))}
md("**Point affinity inside vs outside the query's object** (`ovlib.models.affinity.object_affinity`: per thing, "
   "the token nearest its centre queries every token; mean cosine to the other tokens of the thing and to "
   "tokens of other segments, averaged per image):\n\n" +
   table(["features", "inside the object", "outside", "inside − outside"],
         [[k, ci(v["inside"], 3), ci(v["outside"], 3), f"{v['inside'][0] - v['outside'][0]:.3f}"]
          for k, v in AFF.items()]))

# %% [markdown]
# ### What we tried for the micro VFM
#
# The micro VFM's objective was chosen by measurement: each trial trains a VFM self-supervised on micro-world
# scenes and scores it with the k-means protocol above (`benchmarks/vfm_grouping.py`; its record,
# `benchmarks/results/vfm_trials.json`, is rendered here; rerun the script to refresh it). Minutes are the
# training wall time of the run that trained each model, *on the machine and load of that run* (the CPU minutes,
# the torch threads and the load average of that run are in the record: on a loaded machine wall time says
# little). A row appears once the script has run that trial; ★ marks the trial whose config is the micro VFM of
# this run, its precision aside (the trials train in `auto` precision, fp32 on a CPU without bf16; none at the
# `smoke` profile, whose budgets are cut).

# %%
import json
from dataclasses import asdict
from pathlib import Path

TRIALS = Path("benchmarks/results/vfm_trials.json")
if TRIALS.is_file():
    rec = json.loads(TRIALS.read_text())
    tr = rec["trials"]
    def same_vfm(cfg):  # the record's configs went through JSON (tuples -> lists); the precision aside
        mine = json.loads(json.dumps(asdict(vfm_cfg)))
        return cfg is not None and {k: v for k, v in cfg.items() if k != "precision"} == \
            {k: v for k, v in mine.items() if k != "precision"}

    cb = rec["colour_baseline"]
    md(f"Trials at the `{rec['profile']}` profile, {rec['n_images']} evaluation scenes (k-means mIoU, 95 % "
       "intervals over scenes):\n\n" + table(
           ["trial", "objective", "steps", "batch", "train min (wall)", "CPU min", "load avg", "k-means mIoU",
            "colours equalised", "affinity inside − outside"],
           [[f"`{k}`" + (" ★" if same_vfm(t.get("config")) else ""), t["objective"], t["steps"], t["batch"],
             f"{t['train_seconds'] / 60:.1f}",
             f"{t['cpu_seconds'] / 60:.1f}" if t.get("cpu_seconds") else "—",
             f"{t['loadavg']:.1f}" if t.get("loadavg") is not None else "—", ci(t["as_is"]), ci(t["equalized"]),
             f"{t['affinity_inside'][0] - t['affinity_outside'][0]:.3f}" if "affinity_inside" in t else "—"]
            for k, t in tr.items()]
           + [["colour", "mean RGB per patch (no model, no training)", "", "", "", "", "", ci(cb["as_is"]),
               ci(cb["equalized"]), ""]]))
    best = max(tr, key=lambda k: tr[k]["as_is"][0])
    above = tr[best]["as_is"][1] > cb["as_is"][2]  # the two 95 % intervals do not overlap
    md(f"Best trial by k-means mIoU: `{best}`, {tr[best]['as_is'][0] - cb['as_is'][0]:+.1f} points against the "
       f"colour baseline ({tr[best]['equalized'][0] - cb['equalized'][0]:+.1f} with colours equalised): "
       + ("its interval lies above the baseline's." if above else
          "its interval overlaps the baseline's. These intervals are unpaired (each over the scenes on its own); "
          "the paired comparison of this run's VFM with the baseline on the same scenes is the VFM premise claim "
          "above."))
else:
    md(f"(no trials record at `{TRIALS}`: run `python benchmarks/vfm_grouping.py --profile micro`)")

# %% [markdown]
# ### A micro CLIPSeg
#
# SynSeg (chapter 5) starts its decoder from **CLIPSeg's** weights (Lüddecke & Ecker 2022): a small decoder on a
# frozen CLIP, trained with text prompts → binary masks on PhraseCut, which never showed it the evaluation
# vocabulary. The micro CLIPSeg (`ovlib.train.proxies.pretrain_clipseg`, cached like the CLIP and the VFM) is
# CLIPSeg's decoder on the frozen micro CLIP — activations after blocks 1, 2, 3 (CLIPSeg: 3, 6, 9 of 12), each
# reduced to 64 channels, visited deepest first, FiLM on the text embedding at the deepest level, one ReLU
# transformer layer per level, a transposed convolution (kernel = stride = patch) to per-pixel logits — trained
# with binary cross-entropy on 64-px scenes, prompts of **base** classes only (20 % negative prompts: a base
# class absent from the scene, empty mask); every scene with a novel thing is skipped, so novel classes appear
# neither as prompts nor as pixels. The prompt is the class name's template ensemble (SynSeg's text anchor).
# Its weights are stored under CLIPSeg's own key names (`ovlib.models.clipseg`), so the same loader reads a real
# CLIPSeg checkpoint in the `paper` profile.
#
# Below: OVSS mIoU (argmax over all classes, SynSeg's five-view inference for CLIPSeg, chapter 1's sliding
# windows for the training-free modes, the same images) on the **base** classes (the ones the CLIPSeg saw:
# base things and stuff), the **novel** things and the stuff alone. CLIPSeg should localise base classes well
# and transfer partially to novel ones; the two comparisons with the best training-free mode of each group are
# claims of the ledger (deterministic models: paired bootstrap over the images).

# %%
if P["profile"] != "paper":
    from ovlib.eval.synseg import ProtocolEval, class_groups, evaluate_protocols, synseg_score_fn
    from ovlib.methods.synseg import SynSeg
    from ovlib.train.proxies import clipseg_config, pretrain_clipseg

    cs_cfg = clipseg_config(P, P["steps_scale"], P["seed"])
    cs_state, cs_info = pretrain_clipseg(cs_cfg, clip_model, tokenizer, P["cache_dir"], device=DEV)
    torch.manual_seed(P["seed"])
    clipseg = SynSeg(clip_model, {}, tokenizer=tokenizer, categories=categories, input_size=clip_cfg.image_size,
                     clipseg="micro-clipseg", clipseg_state=cs_state).to(DEV).eval()
    groups = class_groups(categories)  # base: the classes the CLIPSeg saw (things and stuff); novel: never shown
    cs_res = evaluate_protocols(synseg_score_fn(clipseg, text["main"], 5), ds, class_ids, thing_ids, (0.5,),
                                image_size=EV.ovss.image_size, resize=EV.ovss.resize, n_images=EV.ovss_images,
                                n_boot=EV.n_boot, seed=P["seed"])
    CS = {"micro CLIPSeg": ProtocolEval(cs_res, groups),  # the training-free rows: section 1.7's OVSS, same images
          **{f"training-free `{m}`": ProtocolEval({"all": ovss[m], "bg": {}}, groups) for m in EV.modes}}
    for row, ev in CS.items():
        study.record(row, ev, fixed=True)
    cs_claims = []
    for g in ("base", "novel"):
        best_g = max(EV.modes, key=lambda m: CS[f"training-free `{m}`"].point(f"mIoU {g}"))
        cs_claims.append(study.claim(f"1.7-clipseg-{g}", f"the micro CLIPSeg segments {g} classes better than the "
                                     f"best training-free mode (`{best_g}`)", f"training-free `{best_g}`",
                                     "micro CLIPSeg", f"mIoU {g}", section="1.7"))
    study.ledger()
    hcs = cs_info["history"]
    md(f"micro CLIPSeg: {cs_cfg.steps} steps × {cs_cfg.batch_size} scenes × {cs_cfg.prompts_per_image} prompts "
       f"({cs_cfg.prompt} templates" + (f", visual prompts mixed in with text weight U{tuple(cs_cfg.mix_text)}, "
                                        f"{cs_cfg.text_only_prob:.0%} text alone" if cs_cfg.with_visual else "")
       + "), "
       f"{int(groups['base'].sum())} base classes of {len(class_ids)}; BCE {hcs[0]['loss']:.3f} → "
       f"{hcs[-1]['loss']:.3f}; trained in {cs_info['train_seconds']:.0f} s "
       f"({'cache' if cs_info.get('loaded') else 'this run'}).\n\n" +
       table(["model", "all classes mIoU", "base classes", "novel things", "stuff"],
             [[k, *(ci(ev.interval(m, EV.n_boot, P["seed"])) for m in ("mIoU", "mIoU base", "mIoU novel",
                                                                        "mIoU stuff"))] for k, ev in CS.items()])
       + "\n\n" + study.claims_table([c.id for c in cs_claims]))

# %% [markdown]
# ### What we tried for the micro CLIPSeg's transfer
#
# CLIPSeg itself is not trained on one fixed vector per class: its `rd64-uni` weights (`timojl/clipseg`,
# `experiments/phrasecut.yaml`, `training.py`) draw one template per prompt and mix the text embedding with the
# CLIP image embedding of a *visual prompt* — another sample of the same phrase, the object cut out with its
# background blurred and darkened — as $c = w\,t + (1-w)\,v$, $w \sim U(0, 0.5)$ (text alone where a phrase
# has no second sample). Both make the conditional space wider than the training names, the ingredient a
# transfer to novel names would need. `benchmarks/clipseg_transfer.py` trains the micro CLIPSeg each way
# (`ovlib.train.proxies.ClipSegPretrainConfig`: `prompt`, `with_visual`) and scores it as above, adding how
# strongly the decoder responds to a novel name: the mean probability of a novel thing's class inside vs outside
# that thing. Its record, `benchmarks/results/clipseg_trials.json`, is rendered here (rerun the script to
# refresh it); ★ marks the conditioning of this run's micro CLIPSeg. Minutes are the wall time of the run that
# trained each model, on that run's machine and load.

# %%
CS_TRIALS = Path("benchmarks/results/clipseg_trials.json")
if P["profile"] != "paper" and CS_TRIALS.is_file():
    rec = json.loads(CS_TRIALS.read_text())
    tr = rec["trials"]
    mine = {k: v for k, v in json.loads(json.dumps(asdict(cs_cfg))).items() if k != "precision"}
    def same_cs(cfg):  # the conditioning and budget of this run's micro CLIPSeg (the precision aside)
        return cfg is not None and {k: v for k, v in cfg.items() if k != "precision"} == mine

    md(f"Trials at the `{rec['profile']}` profile, {rec['n_images']} evaluation scenes (OVSS mIoU, 95 % "
       "intervals over scenes; novel response over the novel things of the first scenes):\n\n" + table(
           ["trial", "conditioning", "steps", "train min (wall)", "load avg", "mIoU base", "mIoU novel",
            "mIoU stuff", "novel class p inside / outside its object"],
           [[f"`{k}`" + (" ★" if same_cs(t.get("config")) else ""), t["description"], t["steps"],
             f"{t['train_seconds'] / 60:.1f}", f"{t['loadavg']:.1f}" if t.get("loadavg") is not None else "—",
             ci(t["mIoU base"]), ci(t["mIoU novel"]), ci(t["mIoU stuff"]),
             f"{t['novel_response']['inside']:.3f} / {t['novel_response']['outside']:.3f} "
             f"({t['novel_response']['objects']} objects)"] for k, t in tr.items()]))
    best = max(tr, key=lambda k: tr[k]["mIoU novel"][0])
    md(f"Best trial on novel things: `{best}`, {tr[best]['mIoU novel'][0]:.1f} mIoU "
       + ("— the upper end of its interval is below 1 point: no conditioning tried so far makes the micro "
          "CLIPSeg transfer to novel names." if tr[best]["mIoU novel"][2] < 1.0 else "."))
elif P["profile"] != "paper":
    md(f"(no trials record at `{CS_TRIALS}`: run `python benchmarks/clipseg_transfer.py --profile micro`)")

# %% [markdown]
# ## 1.8 Point affinity maps
#
# The cosine similarity of one token (red dot, on a thing) to every token of the same image, per mode, and for
# the micro VFM. A well-localised representation lights up the query's object and little else.

# %%
item = ds[0]
thing_segs = [s for s in item["segments"] if s["isthing"]] or item["segments"]
seg = max(thing_segs, key=lambda s: s["mask"].sum())
ys, xs = np.nonzero(seg["mask"])
k = len(xs) // 2
x_img, _ = student_image(item["image"], EV.region.image_size)
_, scale = student_image(item["image"], EV.region.image_size)
px = torch.tensor([[xs[k] * scale, ys[k] * scale]], dtype=torch.float32)
show = list(EV.modes) + ["micro VFM"]
fig, axes = plt.subplots(1, len(show) + 1, figsize=(2.0 * (len(show) + 1), 2.3))
axes[0].imshow(x_img.permute(1, 2, 0).numpy())
axes[0].plot(px[0, 0], px[0, 1], "r.", ms=8)
axes[0].set_title("image", fontsize=8)
for ax, m in zip(axes[1:], show):
    fn = dense_fn_for_vfm(vfm) if m == "micro VFM" else dense_fn_for_clip(clip_model, m)
    with torch.no_grad():
        dense = fn(x_img[None].to(DEV)).cpu()
    h, w = dense.shape[-2:]
    cell = torch.tensor([[min(h - 1, int(px[0, 1] * h / x_img.shape[1])), min(w - 1, int(px[0, 0] * w / x_img.shape[2]))]])
    a = affinity_map(dense, cell)[0]
    ax.imshow(a.numpy(), cmap="viridis", vmin=-0.2, vmax=1.0)
    ax.plot(cell[0, 1], cell[0, 0], "r.", ms=6)
    ax.set_title(m, fontsize=8)
for ax in axes:
    ax.axis("off")
plt.tight_layout()
plt.show()

# %% [markdown]
# ### Explore: affinity, text-to-patch maps, regions
#
# Three explorers (`ovlib.viz`) on the first evaluation images. In JupyterLab they are live: pick an image and
# a token (sliders or its index) and compare the affinity maps of the dense modes and the micro VFM; pick a
# class, one of its synonyms, or type any text and see where each mode "looks" (cosine of the text embedding
# with every token); move a box, or pick a ground-truth one, and read each mode's Top-5 classes (RoIAlign of
# the dense map; *crop CLS* = the box cut out and embedded as a whole image, without the 1.5x context of the
# protocol). The rendered book shows each explorer's initial view; the static figure under each one shows a
# few more selections for readers without a kernel.

# %% tags=["hide-input"]
import torch.nn.functional as F

from ovlib.eval._common import normalize_images
from ovlib.train.pretrain import image_mean_std
from ovlib.viz import AffinityExplorer, AttentionExplorer, RegionExplorer, images_from_dataset

ex_images, ex_meta = images_from_dataset(ds, range(min(2 if P["profile"] == "smoke" else 6, len(ds))),
                                         EV.region.image_size)
ex_modes = [m for m in ("vanilla", "maskclip", "sclip", "naclip") if m in EV.modes]
cat_by_id = {c["id"]: c for c in categories}
first = max(range(len(ex_meta[0]["boxes"])), key=lambda j: (ex_meta[0]["isthing"][j], float(
    (ex_meta[0]["boxes"][j, 2:] - ex_meta[0]["boxes"][j, :2]).prod())))  # the largest thing of image 0
fx0, fy0, fx1, fy1 = ex_meta[0]["boxes"][first].tolist()
aff = AffinityExplorer(ex_images, {**{m: dense_fn_for_clip(clip_model, m) for m in ex_modes},
                                   "micro VFM": dense_fn_for_vfm(vfm)}, device=DEV)
aff.select(point=((fx0 + fx1) / 2, (fy0 + fy1) / 2)).show()

# %% tags=["hide-input"]
att = AttentionExplorer(
    ex_images, {m: dense_fn_for_clip(clip_model, m) for m in ex_modes},
    embed_text=lambda t: text_embeddings(clip_model, tokenizer, t, templates, this_is_prefix=this_is, device=DEV).cpu(),
    embed_free=lambda t: text_embeddings(clip_model, tokenizer, t, ("{}",), device=DEV).cpu(),
    classes=categories, class_name=cat_by_id[ex_meta[0]["category_id"][first]]["name"], device=DEV)
att.show()

# %% tags=["hide-input"]
MEAN_, STD_ = image_mean_std(clip_model)
reg = RegionExplorer(
    ex_images, {m: dense_fn_for_clip(clip_model, m) for m in ex_modes}, text["main"],
    [cat_by_id[c]["name"] for c in class_ids],
    crop_encode=lambda x: F.normalize(clip_model.encode_image(normalize_images(x, MEAN_, STD_)).float(), dim=-1),
    crop_size=EV.region.crop_size, boxes=[m_["boxes"] for m_ in ex_meta],
    box_labels=[[cat_by_id[c]["name"] for c in m_["category_id"]] for m_ in ex_meta], device=DEV)
reg.select(gt=first).show()

# %% [markdown]
# ## 1.9 What the micro world does and does not capture
#
# **Captures**: a caption-supervised CLIP that must bind names to shape/colour/texture; things on stuff with a
# context bias (so dense tokens can absorb context); occlusion and scale; rare and held-out synonyms; a
# COCO-format panoptic evaluation with the protocol of the papers (thing boxes, thing/stuff masks, mean
# per-class accuracy); the same last-block modifications as the published code.
#
# **Does not capture**: the scale of real CLIP (400M+ pairs, ViT-B/16 at 224 px with 196 tokens; here 64 px
# and 64 tokens, a few minutes of training), so emergent properties of large models — e.g. the attention
# "sinks" and global tokens that make vanilla dense features of real CLIP so noisy — may be weaker or absent;
# real language (captions come from a handful of templates); real visual variety (textures are procedural,
# objects are rigid 2-D shapes). Conclusions here are about mechanisms; the `paper` profile measures the real
# numbers.
#
# **Image-level use of distilled students.** CLIPSelf-style distillation supervises only dense tokens;
# nothing supervises the CLS token of the student, so its global zero-shot accuracy can fall sharply. The
# papers therefore keep the frozen teacher for image-level use; later chapters report the student's global
# zero-shot beside its dense gains.

# %%
md(f"Chapter executed in {time.perf_counter() - T0:.0f} s (profile {P['profile']}).")
