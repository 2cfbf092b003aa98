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
# # 3. DenseRC: reconstructing CLIP's dense features from multi-layer values
#
# Self-distillation (CLIPSelf, DeCLIP) pulls a student's dense features of a region towards the frozen
# teacher's CLS embedding of the region's crop. DenseRC (CVPR'26, *Reconstructing CLIP for Open-Vocabulary
# Dense Perception*) asks **which dense features** should be pulled, and **how they should be built**:
#
# 1. **What to extract.** Unrolling the CLS update `c^(l) = c^(l-1) + Proj(Attn^(l) v^(l))` over all blocks
#    (Eqs. 1–2; equation numbers as in `ovlib.methods.denserc`), with the MLPs read as intra-token, the paper
#    finds the final CLS token to be a sum of multi-layer *value* embeddings. The student's dense map is given
#    the same form,
#    `X_dense = Σ_l A_p^(l) v_p^(l)` (Eq. 3), with the values of the last three blocks.
# 2. **How to construct it.** The paper argues that mixing tokens spatially (`qk` self-attention, DeCLIP's
#    `qq` self-self attention) adds off-target values to each region: with an MSE surrogate the expected loss
#    grows by `ΔL = Σ_{j∈U_r} S_rj² E‖P v_j‖² > 0` (Eq. 6) over a head-only model. DenseRC's **Head Selection
#    Gating** re-weights heads token by token, `A_p = σ(W_H LN(x))` (Eq. 7), with no spatial mixing.
# 3. **Coherence.** The same stream also matches the patch correlations of a frozen VFM (DINOv2; here the
#    micro VFM): `L = L_semantics + λ L_coherence`, λ = 0.025 (Eq. 8).
#
# This chapter checks the two derivations numerically (§3.2–3.4), trains the paper's Table-5 ablation on the
# micro world with several seeds (§3.5–3.6), sweeps the number of layers, λ, and the two choices the paper
# leaves open (§3.7), measures whether HSG gates depend on the image (§3.8) and what an HSG step costs against
# a CLIPSelf step (§3.9). Every number is computed when the notebook runs; every "holds / does not hold" is
# computed from those numbers (§3.10). The paper's own numbers are quoted constants.

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
recipes = []  # distillation recipes: injected from params/PROFILE.yaml (denserc)
budgets = {}  # the chapters' budgets: injected from params/PROFILE.yaml (read through ovlib.study.Study)
models = {}  # named models of the paper profile (role -> {name, pretrained})
weights_dir = ""  # local named weights (offline clusters)
precision = "fp32"  # numerics of every training: fp32 | bf16 | auto (injected from params/PROFILE.yaml)
dry_run = False  # the profile at dry-run sizes: random weights, at most 2 steps
dry_run_settings = {}

# %%
import json
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image
from scipy.stats import friedmanchisquare, norm

from ovlib.config import dry_run_cap, dry_run_depth, dry_run_eval
from ovlib.data.coco import dry_run_data
from ovlib.data.regions import thing_crops
from ovlib.eval._common import category_index, normalize_images, student_image
from ovlib.eval.profiles import dense_eval_settings
from ovlib.eval.students import load_student
from ovlib.methods.denserc import (
    DenseConstructor,
    DenseRCConfig,
    denserc_dense_fn,
    gate_statistics,
    load_constructor,
    table5_rows,
)
from ovlib.methods.derivation import (
    TermGroup,
    cls_decomposition,
    contribution_stats,
    delta_l_closed_form,
    gradient_stats,
    grid_region_batch,
    head_attention_distance,
    head_contributions,
    joint_terms,
    optimal_spatial_p,
    patch_gradient_magnitudes,
    per_head_decomposable,
    random_delta_l_setup,
    random_vision_tower,
    simulate_delta_l,
    standard_groups,
)
from ovlib.models import vit_adapter
from ovlib.nb import ci, md, ms, setup, table
from ovlib.stats import (
    Comparison,
    bootstrap_ci,
    eta_squared,
    eta_squared_units,
    fixed_mean,
    mean_units,
    ratio_stat,
)
from ovlib.study import Study, load_benchmark
from ovlib.train.pretrain import image_mean_std
from ovlib.train.recipes import distill_config
from ovlib.viz.figures import heatmap_row

# every contract key comes from the parameters cell above
P, DEV = setup(globals())  # validates the contract, seeds torch, resolves the device
T0 = time.perf_counter()
P, DRY = dry_run_data(P)  # a dry run reads the shared COCO subset (instances derived, captions synthesised)
EV = dense_eval_settings(P["profile"], P["eval_images"], **dry_run_eval(P))
cap = dry_run_cap(P)  # a dry run caps the paper budget's counts
study = Study(P, "03", device=DEV)  # budgets, the shared run cache, claims and the ledger (book/claims/03.json)
B = study.budget  # params/PROFILE.yaml: budgets["03"]
SEEDS = study.seeds


claim = study.claim_in  # (section, claim, a, b, metric, expected sign): one ledger entry


CFG = distill_config(P, "denserc")  # the recipe (params/PROFILE.yaml): multi-v, HSG, 3 layers, λ = 0.025
LAMBDA = float(CFG.loss_weights.get("coherence", 0.025))

# ---- the chapter's budget: params/PROFILE.yaml (budgets.train.denserc; budgets["03"]); §3.11 prints what it cost --
# micro: <= 25 min on 2 CPU cores. Pieces timed on this machine (OMP_NUM_THREADS=1, load average 4-5 from other
# jobs): one 30-step DenseRC run (HSG, batch 4, <= 6 regions) trained and its student evaluated (200 images for
# boxes / thing / stuff, 50 for OVSS and k-means) in 40 s (a 40-step run: 28 s + 24 s). Grid: 6 Table-5 rows x 3
# seeds = 18 runs + 7 one-seed sweep runs (n in {1, 2, 4}, lambda in {0, 0.1}, final_each, last-layer gates) = 25
# runs x ~42 s ~ 1050 s. Fixed parts: imports 10 s, models + two frozen evaluations 40 s, derivation (200 crops) +
# random ViT-B/16 at 48 px 7 s, ΔL Monte Carlo (12 x 40,000 draws) 8 s, gradients (16 images) 6 s, HSG gates of
# 2,000 images at 96 px 27 s (at 160 px they cost ~75 ms an image, 150 s: too much), step-time benchmark 14 s:
# ~110 s; the W_H-lr row (3.5) adds 3 runs, ~130 s. Total ~1290 s ~ 21.5 min (the 25-min budget leaves ~20 % for slower moments). The CLIPSelf baseline
# (§3.6) is chapter 02's run from the shared cache (trained here only when chapter 02 has not run); DenseRC at that
# main budget (3 seeds, for the comparison at equal budget) adds 3 runs of the main budget's steps.
TRAIN = study.train_budget("denserc")
STEPS = TRAIN.get("max_steps")  # None: the recipe as it is (paper)
REGION_N, SEG_N = study.region_images, B["seg_images"] or EV.ovss_images  # 0: all
N_DECOMP, N_GRAD, N_GATE = cap(B["n_decomp"]), cap(B["n_grad"]), cap(B["n_gate"])
GATE_SIZE = B["gate_size"] or EV.region.image_size
VITB_SIZE = B["vitb_size"]  # random ViT-B/16 (the bookkeeping, not the weights)
# the one-seed sweeps of §3.7 beyond the headline claims: run only with `extended` (micro: off, to fit the book's
# budget; smoke and paper: on)
EXTENDED = bool(B["extended"])
LAYERS = B["layers"] if EXTENDED else [3]  # the micro CLIP has 4 blocks: n = 4 is "all"
LAMBDAS = sorted(set(B["lambdas"] if EXTENDED else []) | {LAMBDA})
EXTRAS = tuple(B["extras"]) if EXTENDED else ()
DL_DRAWS = cap(B["dl_draws"])
# step-time benchmark (§3.9, on the CPU): image size, crop size, batch, boxes per image, alternating pairs
BENCH = tuple(B["bench"])


md(f"Profile **{P['profile']}** on `{DEV}` with {torch.get_num_threads()} threads. DenseRC runs: "
   f"{STEPS or 'recipe'} steps ({'batch ' + str(TRAIN.get('batch_size', CFG.batch_size))}), Table-5 rows × "
   f"{len(SEEDS)} seed(s), sweeps × 1 seed" + ("" if EXTENDED else " (not run: `extended: false`)") + "; students evaluated on {REGION_N or 'all'} images (regions) and "
   f"{SEG_N} images (OVSS, k-means)." + (f"\n\n{DRY}" if DRY else ""))

# %% [markdown]
# ## 3.1 The frozen CLIP, the evaluation data and the protocols
#
# The teacher is the micro CLIP of chapter 1 (4 pre-LN blocks, width 128, 4 heads, patch 8, 64-px native
# input), the VFM the micro VFM; both are loaded from the cache (or trained if missing), built exactly as the
# trainer builds them. Every student is evaluated with the chapter-1 protocols on the same images:
# **region classification** (Boxes = RoIAlign of GT thing boxes, Thing / Stuff masks = mask pooling, Top-1
# mean per-class accuracy; the micro stand-in for the paper's OV-COCO detection), **OVSS** mIoU (sliding
# windows; the stand-in for the paper's ADE / Pascal-Context segmentation) and **k-means** mIoU (text-free
# feature coherence). A DenseRC student is evaluated on its own `X_dense` — the constructor it was trained
# with, HSG gates included (`ovlib.eval.students.student_dense_fn`).

# %%
BB = study.backbones("denserc", vfm=True)  # frozen CLIP + VFM, evaluation split, class embeddings (once)
clip_model, vfm, tokenizer = BB.clip, BB.vfm, BB.tokenizer
AD = vit_adapter(clip_model)
MEAN, STD = image_mean_std(clip_model)
L_BLOCKS, HEADS = AD.num_blocks, AD.num_heads
ds, categories, class_ids, text = BB.dataset, BB.categories, BB.class_ids, BB.text
CAT_ROW = category_index(class_ids)
evals, runs = {}, {}


frozen_multi_v = DenseConstructor.for_model(DenseRCConfig(construct="none", n_layers=3), clip_model).eval()
for name, fn in (("CLIP x+v", None), ("CLIP multi-v", denserc_dense_fn(clip_model, frozen_multi_v, MEAN, STD))):
    # region classification, OVSS and k-means (no crop CLS: DenseRC changes the dense map)
    evals[name] = study.evaluate(name, clip_model, fixed=True, dense_fn=fn, crops=False)
md(f"{len(ds)} evaluation images, {len(class_ids)} classes; {evals['CLIP x+v'].n_regions} regions in the first "
   f"{REGION_N or len(ds)} images. The frozen CLIP before any training: " + "; ".join(
       f"`{n[5:]}` Boxes Top-1 {ci(evals[n].ci['boxes.top1'])}, OVSS {ci(evals[n].ci['ovss.miou'])}"
       for n in ("CLIP x+v", "CLIP multi-v")) + " (`multi-v` = the sum of the last three blocks' value terms, "
   "no gates, §3.2).")

# %% [markdown]
# ## 3.2 What the CLS token is made of (Eqs. 1–2)
#
# A pre-LN block adds two terms to every token of the residual stream, `x^(l) = x^(l-1) + a^(l) + m^(l)`:
# the attention path `a^(l) = O^(l)(softmax(q kᵀ/√d) v)` and the MLP `m^(l)`. At the CLS position this unrolls
# **exactly** to `c^(L) = c^(0) + Σ_l a_cls^(l) + Σ_l m_cls^(l)`; the paper drops the MLP terms ("mainly
# intra-token") and reads `a_cls^(l) = A^(l) v^(l)` as a weighted sum of value embeddings (Eq. 2).
# `ovlib.methods.derivation.cls_decomposition` computes every term from the tower's pieces and, independently,
# runs the model's own block code; the bookkeeping error must be ≤ 1e-4. With the final LayerNorm's σ of the
# actual `c^(L)` held fixed the head is affine, so each term also has an exact image in the joint (text) space
# (`joint_terms`), and the terms' *share* of the embedding `e`, `⟨e_S, e⟩/‖e‖²`, adds up to 1 over a
# partition.
#
# Checked on the micro CLIP (GT thing crops of the evaluation images at the CLIP's native size) and on a
# **random ViT-B/16** (open_clip config, random weights perturbed so every bias and LayerNorm is non-trivial)
# at a tiny input — the bookkeeping does not depend on the weights or the size.

# %%
t = time.perf_counter()
# the per-head split needs attention outputs affine in the heads; EVA02's sub-LN is not: such a backbone (the paper
# profile's EVA02-B-16) is analysed through the profile's `models.clip` (OpenAI-style ViT-B/16, no sub-LN)
if per_head_decomposable(clip_model):
    DEC_CLIP, DEC_TEXT, DEC_NAME = clip_model, text, P["backbone"]
else:
    DEC_CLIP, _, DEC_TEXT, DEC_NAME = study.named_clip("clip")
    md(f"{P['backbone']}'s attention output is not affine in its heads (sub-LN): §3.2 decomposes **{DEC_NAME}**.")
DEC_AD = vit_adapter(DEC_CLIP)
DEC_MEAN, DEC_STD = image_mean_std(DEC_CLIP)
crops, labels = thing_crops(ds, CAT_ROW, DEC_AD.native_grid[0] * DEC_AD.patch_size[0], N_DECOMP)  # native size
crops = normalize_images(crops, DEC_MEAN, DEC_STD).to(DEV)
dec = cls_decomposition(DEC_CLIP, crops, per_head=True)
jt = joint_terms(DEC_CLIP, dec)
stats = contribution_stats(jt, {**standard_groups(DEC_AD.num_blocks, 3),
                                "attention values (no O-bias), all blocks": TermGroup(
                                    attn=tuple(range(DEC_AD.num_blocks)), attn_value=True)},
                           text=DEC_TEXT.to(jt.embedding), labels=labels)

# a random ViT-B/16 (open_clip's "ViT-B-16" config, image tower only) at a tiny input: the same bookkeeping
vitb = random_vision_tower("ViT-B-16", VITB_SIZE, seed=P["seed"])  # biases and LayerNorms perturbed
xb = torch.randn(2, 3, VITB_SIZE, VITB_SIZE, generator=torch.Generator().manual_seed(P["seed"] + 1))
dec_b = cls_decomposition(vitb, xb, per_head=True)
jt_b = joint_terms(vitb, dec_b)
with torch.no_grad():
    own_err_b = float((dec_b.embedding - vitb(xb)).abs().max())
head_err_b = float((dec_b.heads.sum(2) + dec_b.attn_bias - dec_b.attn).abs().max())
head_err = float((dec.heads.sum(2) + dec.attn_bias - dec.attn).abs().max())
own_err = float((dec.embedding - DEC_CLIP.encode_image(crops)).abs().max())
TOL = 1e-4
rows = [[DEC_NAME, f"{DEC_AD.num_blocks} × {DEC_AD.num_heads}", f"{crops.shape[-1]} px, {len(crops)} crops", f"{dec.error():.1e}",
         f"{head_err:.1e}", f"{jt.error():.1e}", f"{own_err:.1e}"],
        ["random ViT-B/16", f"{dec_b.attn.shape[1]} × {dec_b.heads.shape[2]}", f"{VITB_SIZE} px, 2 images",
         f"{dec_b.error():.1e}", f"{head_err_b:.1e}", f"{jt_b.error():.1e}",
         f"{own_err_b:.1e}"]]
exact = max(dec.error(), dec_b.error(), jt.error(), jt_b.error(), head_err, head_err_b) <= TOL
md("**Bookkeeping errors** (max abs): `c^(0) + Σ a + Σ m` vs the model's own CLS stream; heads + O-bias vs the "
   "attention term; joint-space terms vs the model's embedding; the decomposition's embedding vs "
   "`encode_image`.\n\n" +
   table(["tower", "blocks × heads", "input", "stream", "per-head split", "joint space", "vs encode_image"], rows) +
   f"\n\nAll ≤ {TOL:g}: **{'yes' if exact else 'no'}** ({time.perf_counter() - t:.1f} s).")


# %%
def stat_ci(name, key, digits=2):
    """Mean over crops of one per-crop statistic with a 95 % bootstrap interval over crops."""
    t_ = bootstrap_ci(mean_units(stats[name][key]), ratio_stat, n_boot=EV.n_boot, seed=P["seed"])
    return ci(t_, digits) if key != "top1" else ci(tuple(100 * x for x in t_), 1)


rows = [[name] + [stat_ci(name, k) for k in ("share", "norm_ratio", "cos_cls", "cos_text", "top1")]
        for name in stats]
md(f"**How much of the CLS embedding each group of terms carries** ({len(crops)} GT thing crops, micro CLIP; "
   "mean [95 % bootstrap interval over crops]). *share* = ⟨e_S, e⟩/‖e‖² (the four rows *attention, last 3*, "
   "*attention, first*, *MLP* and *c0 + offset* add up to 1); *norm ratio* = ‖e_S‖/‖e‖; *cos cls* = cos(e_S, e); "
   "*cos text* = cosine to the crop's class text embedding; *Top-1* = zero-shot accuracy of e_S alone.\n\n" +
   table(["terms", "share", "norm ratio", "cos cls", "cos text", "Top-1 (%)"], rows))

def per_crop_claim(section, text_, a, b, key, expected=+1):
    """b − a of a per-crop statistic of the frozen CLIP's term groups (deterministic: paired bootstrap over crops)."""
    sa, sb = (fixed_mean(stats[n][key]) for n in (a, b))
    return claim(section, text_, sa, sb, key, expected)


n_first = DEC_AD.num_blocks - min(3, DEC_AD.num_blocks)
per_crop_claim("3.2", "the attention (value) terms carry more of the CLS embedding than the MLP terms (share)",
               "MLP, all blocks", "attention, all blocks", "share")
per_crop_claim("3.2", "the attention terms are closer to the class text than the MLP terms (cos text)",
               "MLP, all blocks", "attention, all blocks", "cos_text")
if n_first > 0:
    per_crop_claim("3.2", "the last 3 blocks' attention terms carry more than the earlier blocks' (share)",
                   f"attention, first {n_first} blocks", "attention, last 3 blocks", "share")

# %% [markdown]
# **Are the heads alike?** The paper motivates HSG by the heads' heterogeneity in their "cross-modal semantic
# contribution to cls" and their locality. Here each head's attention term, mapped to the joint space, has a
# share of the embedding and a cosine to the class text; each head also has a locality (mean attention distance
# between patch tokens, in patches). Whether the heads' mean shares differ is tested with Friedman's rank test
# (every crop ranks its heads).

# %%
hc = head_contributions(jt, DEC_TEXT.to(jt.embedding), labels)
with torch.no_grad():
    x_loc = torch.stack([student_image(ds[i]["image"], EV.region.image_size)[0] for i in range(min(4, len(ds)))])
    dist = head_attention_distance(DEC_CLIP, normalize_images(x_loc, DEC_MEAN, DEC_STD).to(DEV)).mean(0).cpu().numpy()
heatmap_row([(hc["share"].mean(0), "share of the embedding", "RdBu_r"),
             (hc["cos_text"].mean(0), "cos to the class text", "RdBu_r"),
             (dist, "mean attention distance (patches)", "viridis")],
            suptitle=f"per-head attention terms of the {DEC_NAME}'s CLS token (means over crops / images)")
plt.show()
sh = hc["share"].mean(0)
hs = hc["share"].reshape(len(labels), -1).astype(np.float64)  # (crops, L*H)
# equal mean shares for every head? Friedman's test (crops as blocks; needs >= 2 crops and >= 3 heads)
p_heads = float(friedmanchisquare(*hs.T).pvalue) if hs.shape[0] >= 2 and hs.shape[1] >= 3 else float("nan")
study.add_claim("3.2-heads-unequal", "the heads carry unequal shares of the CLS embedding",
                Comparison(float(np.ptp(sh)), float("nan"), float("nan"), p_heads, "claim",
                           f"Friedman test over {len(hs)} crops (range of the head means)", 1),
                metric="head share range", section="3.2")
md(f"Per-head shares range from {sh.min():+.3f} to {sh.max():+.3f} (the {sh.size} heads' shares sum to the "
   f"attention rows' share minus the O-bias term); cosines to the class text from {hc['cos_text'].mean(0).min():+.3f} "
   f"to {hc['cos_text'].mean(0).max():+.3f}.")

# %% [markdown]
# ## 3.3 Spatial aggregation costs alignment: ΔL > 0 (Eqs. 4–6)
#
# Teacher target of region r: `c_r = M v_r + ε` (Eq. 4). Head-only model `W v_r`; spatial-head model
# `Σ_j S_rj P v_j` (Eq. 5). For zero-mean off-target values `v_j` (j ∈ U_r) uncorrelated with each other, with
# `v_r` and with ε, the expected squared-error gap is
#
# `ΔL(P) = E‖(M − S_rr P) v_r‖² + Σ_{j∈U_r} S_rj² E‖P v_j‖²`   (best head-only `W = M`),
#
# whose first (mismatch) term vanishes for `P = M/S_rr`, leaving the paper's Eq. (6). Below, random instances
# (token counts, softmax temperatures, matched `P = M/S_rr` or a random `P`, and the best spatial `P*` for the
# given weights, `optimal_spatial_p`): closed form (`delta_l_closed_form`) against a Monte-Carlo estimate with
# Gaussian values (`simulate_delta_l`); *z* = (MC − closed form) / MC standard error. With `P = M/S_rr` and a
# small on-target weight `S_rr` the interference term is large (P amplifies every off-target value by 1/S_rr).

# %%
t = time.perf_counter()
gen = torch.Generator().manual_seed(P["seed"])
rows, zs, deltas = [], [], []
for J, d_, C_, temp in ((4, 8, 8, 1.0), (16, 8, 8, 0.5), (16, 16, 8, 2.0), (64, 8, 16, 1.0)):
    for kind in ("P = M / S_rr", "random P", "best P*"):
        s_ = random_delta_l_setup(J, d_, C_, gen, temperature=temp, matched=(kind == "P = M / S_rr"))
        if kind == "best P*":
            s_["P"] = optimal_spatial_p(s_["S_row"], s_["M"], s_["cov"])
        # ΔL = E‖(M − S_rr P) v_r‖² + Σ_{j∈U_r} S_rj² E‖P v_j‖²  (Eq. 6 plus the mismatch term)
        cf = delta_l_closed_form(s_["S_row"], s_["P"], s_["M"], s_["cov"])
        mc = simulate_delta_l(s_["S_row"], s_["P"], s_["M"], s_["cov"], noise_std=0.1, n=DL_DRAWS, generator=gen)
        z = (mc["delta"] - cf["delta"]) / mc["se"]
        zs.append(z)
        deltas.append(cf["delta"])
        off = float((s_["S_row"][1:] ** 2).sum())
        rows.append([J, d_, temp, kind, f"{off:.3f}", f"{cf['interference']:.4f}", f"{cf['mismatch']:.4f}",
                     f"{cf['delta']:.4f}", f"{mc['delta']:.4f} ± {mc['se']:.4f}", f"{z:+.2f}"])
z_max = float(np.max(np.abs(zs)))
md(table(["tokens J", "d", "temperature", "P", "Σ_U S²", "interference (Eq. 6)", "mismatch", "ΔL closed form",
          f"ΔL Monte Carlo ({DL_DRAWS:,} draws)", "z"], rows) +
   f"\n\nLargest |z| = {z_max:.2f} over {len(zs)} instances; smallest closed-form ΔL = {min(deltas):.4f} "
   f"({time.perf_counter() - t:.1f} s).")
# abs(z) < Z_OK for every instance: two-sided, family-wise 0.1 % over the instances (Bonferroni) if the formula is right
Z_OK = float(norm.isf(0.001 / 2 / len(zs)))
study.check("3.3-dl-closed-form", f"the closed form of ΔL matches the Monte-Carlo estimate (every |z| ≤ {Z_OK:.2f}, "
            f"{len(zs)} random instances, family-wise 0.1 %)", z_max, Z_OK, tol=0.0, relation="<=", section="3.3")
study.check("3.3-dl-positive", "ΔL ≥ 0 for every spatial model, even the best P* for its weights (closed form)",
            float(min(deltas)), 0.0, tol=0.0, relation=">=", section="3.3", paper_ref="denserc.eq.dl")

# %% [markdown]
# ## 3.4 Where the semantic loss's gradient goes (paper Fig. 3)
#
# The paper reports that under spatial aggregation a few patches take most of the gradient (a high peak over a
# low mean) while without it the gradient spreads (a higher mean); its numbers are printed with the table below
# (`denserc.fig3` of `book/paper_numbers.yaml`). Here: `patch_gradient_magnitudes` — the
# semantic loss (Eq. 8) of CLIPSelf-style grid regions (crops encoded by the frozen CLIP) on the micro CLIP's
# `multi-v` map (3 blocks), back-propagated to the values of the used blocks with the attention maps / gates
# held fixed; patch j gets `‖∂L/∂v_j‖` over layers and heads. Constructions: `qq` (DeCLIP), `qk`, none and HSG
# at its initial gates (0.5 everywhere), i.e. at the start of training — where HSG scales every value alike, so
# its distribution has the shape of "none" (half its scale): the comparison is aggregation vs no aggregation. Absolute magnitudes depend on the loss
# normalisation (they are not comparable to the paper's); the shape of the distribution is: *peak / mean*, the
# share of the gradient taken by the top 5 % of patches, the Gini coefficient (0 = uniform), and the fraction
# of *starved* patches (< 0.1 × the mean). Statistics per image, intervals over images.

# %%
t = time.perf_counter()
GRAD_CONS = {c: DenseConstructor.for_model(DenseRCConfig(construct=c, n_layers=3), clip_model).eval()
             for c in ("qq", "qk", "none", "hsg")}
size = EV.region.image_size
# the semantic loss's inputs: CLIPSelf grid regions of each image and the frozen CLIP's embeddings of their crops
imgs, boxes_l, teach = grid_region_batch(clip_model, torch.stack([student_image(ds[i]["image"], size)[0]
                                                                  for i in range(N_GRAD)]), MEAN, STD, P["seed"],
                                         device=DEV)
GRADS = {c: patch_gradient_magnitudes(clip_model, cons, imgs, boxes_l, teach).cpu() for c, cons in GRAD_CONS.items()}
GSTAT = {c: [gradient_stats(g_[b]) for b in range(len(g_))] for c, g_ in GRADS.items()}
GKEYS = ("peak_over_mean", "top_share", "gini", "starved")
FIG3 = study.paper_value("denserc.fig3")  # the paper's {construction: [peak, mean]}


def gstat_arr(c, k):  # per image [value, 1]
    return mean_units([s_[k] for s_ in GSTAT[c]])


rows = []
for c, g_all in GRADS.items():
    pooled = gradient_stats(g_all)
    rows.append([c, f"{pooled['peak']:.3g}", f"{pooled['mean']:.3g}"] +
                [ci(bootstrap_ci(gstat_arr(c, k), ratio_stat, n_boot=EV.n_boot, seed=P["seed"]), 2) for k in GKEYS])
md(f"**Per-patch gradient magnitude** on {N_GRAD} images ({size} px, {GRADS['qq'].shape[-1]}² patches), "
   f"{len(teach)} grid regions. Paper (Fig. 3, ViT-B/16): spatial aggregation peak ≈ {FIG3['spatial aggregation'][0]:g}, "
   f"mean {FIG3['spatial aggregation'][1]:g}; HSG mean {FIG3['HSG (no aggregation)'][1]:g}.\n\n"
   + table(["construction", "peak (pooled)", "mean (pooled)", "peak / mean", "top-5 % share", "Gini",
             "starved"], rows))
for k, txt in (("gini", "Gini"), ("top_share", "top-5 % share"), ("peak_over_mean", "peak / mean")):
    claim("3.4", f"without spatial aggregation the gradient is spread more evenly: HSG − qq {txt} < 0",
          fixed_mean([s_[k] for s_ in GSTAT["qq"]]), fixed_mean([s_[k] for s_ in GSTAT["hsg"]]), k, -1)

fig, axes = plt.subplots(1, 4, figsize=(12, 2.8))
for c in ("qq", "qk", "none", "hsg"):
    v = GRADS[c].flatten().numpy()
    axes[0].hist(v / v.mean(), bins=60, histtype="step", label=c, log=True)
axes[0].set(title="per-patch |grad| / mean (all images)", xlabel="magnitude / mean", ylabel="patches")
axes[0].legend(fontsize=7)
for ax, c in zip(axes[1:], ("qq", "none", "hsg")):
    g0 = GRADS[c][0].numpy()
    im = ax.imshow(g0 / g0.mean(), cmap="magma")
    ax.set_title(f"{c}: image 0, |grad| / mean", fontsize=8)
    ax.axis("off")
    plt.colorbar(im, ax=ax, fraction=0.046)
plt.tight_layout()
plt.show()
md(f"({time.perf_counter() - t:.1f} s)")

# %% [markdown]
# ## 3.5 Training the Table-5 grid
#
# Every row is a DenseRC run (`ovlib.methods.denserc`, the recipe of `params/PROFILE.yaml`: semantic loss on
# CLIPSelf grid regions, coherence to the micro VFM with λ = 0.025, AdamW, the trainer's α-ensemble), changing
# only the base `v_p` and the construction `A_p` (the paper's Table 5):
#
# | row | `v_p` | `A_p` | what it is |
# |---|---|---|---|
# | x+v | last block's spatial output (value path + residual + FFN) | none | CLIPSelf's dense map |
# | v | last block's values | none | the paper's "DeCLIP-style" base |
# | multi-v | values of the last 3 blocks, each through its own output projection, summed | none | Eq. (3) |
# | qk | multi-v | each block's own self-attention | vanilla CLIP mixing |
# | qq | multi-v | self-self attention `softmax(q qᵀ)` (no scale) | DeCLIP's mixing |
# | HSG | multi-v | `σ(W_H LN(x))` per token and head, one `W_H` shared by the 3 blocks | DenseRC |
#
# **Choices where the paper is silent** (stated here, ablated in §3.7): each layer's gated values go through
# *that layer's* output projection (exactly the term the layer adds to the CLS stream in Eq. 2), the three
# terms are summed in the residual basis and the sum goes **once** through the final LayerNorm and projection
# (alternative `final_each`: each layer normalised and projected on its own, then summed); every layer's
# gates come from **its own** `LN(x)` through the shared `W_H` (alternative: the last layer's gates applied to
# all three). `W_H` starts at 0 with bias 0, so every gate starts at 0.5.
#
# **Learning rate.** Every row of the table trains at the same learning rate, `W_H` included (`gate_lr_mult`
# = 1, the paper's single learning rate), so the comparison between constructions is at parity. The recipe of
# `micro` raises `W_H`'s rate (`gate_lr_mult`, printed below) because its runs are about a thousand times
# shorter than the paper's and the gates barely leave 0.5 otherwise; that setting is its own row,
# **HSG, W_H lr × m** (ours, not the paper's), compared with HSG at parity and used in 3.8, where the gates
# must have moved to say anything.
#
# Budget: the grid is run with a few dozen steps per run (see the budget comment of the first code cell;
# `paper` runs the recipe) — these are short fine-tunings that show the direction each construction takes at
# the start of training, not its converged effect.

# %%
GATE_LR_MULT = float(CFG.method_args.get("gate_lr_mult", 1.0))  # the recipe's W_H multiplier
md(f"Every Table-5 row: learning rate {CFG.lr:g} for every trained parameter (`W_H` included). The recipe's "
   f"`W_H` multiplier: {GATE_LR_MULT:g}" + (f" (its own row, HSG, W_H lr × {GATE_LR_MULT:g})." if GATE_LR_MULT != 1.0
                                         else " (no extra row)."))
# row -> method_args (merged over the recipe's): the six rows at one learning rate (HSG's gate_lr_mult = 1),
# and the recipe's W_H multiplier as its own row (ours, outside the parity comparison)
T5, LR_ROWS = table5_rows(GATE_LR_MULT)


def train_denserc(name, seed, method_args, loss_weights=None, kmeans=True):
    """Train (or load, from the shared run cache) one DenseRC run and evaluate its student on its own X_dense."""
    ov = {"method_args": method_args} | ({"loss_weights": loss_weights} if loss_weights else {})
    r = study.run("denserc", seed=seed, budget="denserc", row=name, eval_kw={"crops": False, "kmeans": kmeans}, **ov)
    evals[f"{name}-s{seed}"] = r.eval
    runs[f"{name}-s{seed}"] = r
    return r.res


t_grid = time.perf_counter()
# the runs not in the cache train first, side by side in `workers` one-thread processes on the CPU
# (Study.train_missing); the loops below load and evaluate them
study.train_missing([{"method": "denserc", "seed": s, "budget": "denserc", "overrides": {"method_args": args}}
                     for args in {**T5, **LR_ROWS}.values() for s in SEEDS]
                    + [{"method": m, "seed": s, "budget": "main"} for s in SEEDS for m in ("clipself", "denserc")])
for row, args in {**T5, **LR_ROWS}.items():
    for s in SEEDS:
        train_denserc(row, s, args)  # X_dense = Σ_l A_p^(l) v_p^(l) (Eq. 3); L = L_sem + λ L_coh (Eq. 8)
# the CLIPSelf baseline (RLA distillation) with chapter 02's main budget: loaded from the shared run cache when
# chapter 02 trained it; DenseRC (the recipe as it is) at that same budget, so the book's comparison of the two
# shares learning rate, steps, batch and data (the Table-5 rows above compare DenseRC variants at their own budget)
MAIN_STEPS = study.train_budget("main").get("max_steps")
for s in SEEDS:
    evals[f"CLIPSelf-s{s}"] = study.run("clipself", seed=s, budget="main", row="CLIPSelf",
                                        eval_kw={"crops": False}).eval
    evals[f"DenseRC-main-s{s}"] = study.run("denserc", seed=s, budget="main", row="DenseRC-main",
                                            eval_kw={"crops": False}).eval
t_grid = time.perf_counter() - t_grid
md(f"{len(T5) + len(LR_ROWS)} rows × {len(SEEDS)} seed(s), the CLIPSelf baseline and DenseRC at its budget in "
   f"{t_grid:.0f} s.")

# %% [markdown]
# ## 3.6 Table 5: the dense base and the construction
#
# Ours: mean ± std over seeds. The paper's columns: mIoU on ADE-847, Pascal-Context-459, ADE-150 and OV-COCO
# AP50 (novel) — downstream detectors and segmenters we do not train; OVSS mIoU is our segmentation signal and
# Boxes Top-1 our detection stand-in. Differences between rows: Welch's t-test over seeds (p < 0.05 resolves
# a direction).

# %%
PAPER_T5 = study.paper_table("denserc.table.t5")  # A-847 / PC-459 / A-150 mIoU, OV-COCO AP50 novel (ViT-B/16)
PAPER_RC = study.paper_table("denserc.table.rc")  # zero-shot region classification: Boxes / Thing / Stuff Top-1
M5 = ("boxes.top1", "thing.top1", "stuff.top1", "ovss.miou", "kmeans.miou")


vals = study.values  # per-seed values of a row


rows = [[n, "", *[ms(vals(n, m)) for m in M5], ""] for n in ("CLIP x+v", "CLIP multi-v")]
rows += [[n, str(len(vals(n, "boxes.top1"))), *[ms(vals(n, m)) for m in M5],
          PAPER_T5[n]] for n in T5]
rows += [[n + " (ours: the recipe's extra W_H learning rate, not a paper row)", str(len(vals(n, "boxes.top1"))),
          *[ms(vals(n, m)) for m in M5], ""] for n in LR_ROWS]
rows += [[f"{lbl} ({MAIN_STEPS or 'recipe'} steps: chapter 02's budget)", str(len(vals(n, "boxes.top1"))),
          *[ms(vals(n, m)) for m in M5], ""] for n, lbl in (("CLIPSelf", "CLIPSelf (RLA)"),
                                                             ("DenseRC-main", "DenseRC (the recipe)"))]
md(f"**Table 5, micro analogue** ({STEPS or 'recipe'} steps; frozen rows: the CLIP before training, one "
   "deterministic evaluation)\n\n" +
   table(["row", "seeds", "Boxes T1", "Thing T1", "Stuff T1", "OVSS mIoU", "k-means mIoU",
          "paper A-847 / PC-459 / A-150 / OV-COCO"], rows) +
   "\n\nPaper, zero-shot region classification (Boxes / Thing / Stuff Top-1): DenseRC "
   + PAPER_RC["DenseRC"] + ", R-SC-CLIPSelf " + PAPER_RC["R-SC-CLIPSelf"]
   + " — compare with the HSG row's first three columns only as a direction.")

T5_CLAIMS = [("multi-layer values are a better base than CLIPSelf's x+v", "x+v", "multi-v", +1),
             ("multi-layer values are a better base than the last block's values", "v", "multi-v", +1),
             ("the last block's values are a better base than x+v", "x+v", "v", +1),
             ("qk self-attention on multi-v hurts (vs no aggregation)", "multi-v", "qk", -1),
             ("qq self-self attention on multi-v hurts (vs no aggregation)", "multi-v", "qq", -1),
             ("HSG improves on no construction", "multi-v", "HSG", +1),
             ("HSG beats qq (DeCLIP's aggregation)", "qq", "HSG", +1),
             ("HSG beats qk (self-attention)", "qk", "HSG", +1)]
rows = []
T5_REFS = {("x+v", "multi-v"): "denserc.t5.multiv_xv", ("multi-v", "HSG"): "denserc.t5.hsg_multiv",
           ("qq", "HSG"): "denserc.t5.hsg_qq", ("qk", "HSG"): "denserc.t5.hsg_qk"}  # book/paper_numbers.yaml
# (A-150 mIoU differences); these four are headline claims (on OVSS mIoU)
for txt, a, b, e in T5_CLAIMS:
    cs = [claim("3.6", txt, a, b, m, e, headline=(a, b) in T5_REFS and m == "ovss.miou",
                paper_ref=T5_REFS.get((a, b)) if m == "ovss.miou" else None) for m in ("ovss.miou", "boxes.top1")]
    rows.append([txt, f"{b} − {a}"] + [c.describe() for c in cs])
txt = "DenseRC beats CLIPSelf at equal budget (lr, steps, batch, data)"
rows.append([txt, "DenseRC − CLIPSelf"] + [claim("3.6", txt, "CLIPSelf", "DenseRC-main", m, headline=True).describe()
                                           for m in ("ovss.miou", "boxes.top1")])
for n in LR_ROWS:  # the multiplier alone, against HSG at parity (not a paper claim)
    txt = f"(ours) training W_H at {GATE_LR_MULT:g}× the learning rate improves HSG"
    rows.append([txt, f"{n} − HSG"] + [claim("3.6", txt, "HSG", n, m, +1).describe()
                                       for m in ("ovss.miou", "boxes.top1")])
md(table(["paper's claim", "difference", "OVSS mIoU", "Boxes Top-1"], rows))

# %% [markdown]
# ## 3.7 Sweeps: number of layers, λ, and the two unstated choices
#
# One seed each (seed 0), the same budget as Table 5, compared with the HSG run of seed 0 (n = 3, λ = 0.025,
# own projection, own gates) by a paired bootstrap over the evaluation images — evaluation noise only; set
# the intervals beside the seed standard deviations of Table 5. The paper: the last three layers are best
# (earlier layers have a low signal-to-noise ratio) and λ = 0.025 is stable; it gives no numbers for either in
# our copy. Our two choices (§3.5) have no paper direction: their rows say how much the choice matters here.

# %%
REF = "HSG"
SWEEP = {}
for n in LAYERS:
    if n != 3:
        SWEEP[f"n = {n}"] = ({**T5["HSG"], "n_layers": n}, None)
for lam in LAMBDAS:
    if lam != LAMBDA:
        SWEEP[f"λ = {lam:g}"] = (T5["HSG"], {"coherence": lam})
EXTRA_ARGS = {"final_each": {"projection": "final_each"}, "last-layer gates": {"gate_source": "last"},
              "one W_H per layer": {"shared_gate": False}}
for e_ in EXTRAS:
    SWEEP[e_] = ({**T5["HSG"], **EXTRA_ARGS[e_]}, None)
t_sw = time.perf_counter()
for name, (args, lw) in SWEEP.items():
    train_denserc(name, SEEDS[0], args, lw)
t_sw = time.perf_counter() - t_sw
MS = ("boxes.top1", "stuff.top1", "ovss.miou", "kmeans.miou")


def sweep_rows(names, labels_=None):
    out = []
    for name, lab in zip(names, labels_ or names):
        if name == REF:
            e = evals[f"{REF}-s0"]
            out.append([lab + " (reference)"] + [ci(e.ci[m]) for m in MS] + [""])
            continue
        e = evals[f"{name}-s0"]
        diffs = [study.compare(REF, name, m) for m in MS]
        out.append([lab] + [ci(e.ci[m]) for m in MS] + [" / ".join(c.describe() for c in diffs)])
    return out


hdr = ["variant", "Boxes T1", "Stuff T1", "OVSS mIoU", "k-means mIoU", "Δ vs reference (Boxes / Stuff / OVSS / k-means)"]
lay = [REF if n == 3 else f"n = {n}" for n in LAYERS]
lab = [f"n = {n}" + (" = all" if n == L_BLOCKS else "") for n in LAYERS]
lam_names = [REF if lam == LAMBDA else f"λ = {lam:g}" for lam in LAMBDAS]
if not SWEEP:
    md("Not run at this profile (`extended: false`); `-p budgets.03.extended=true` runs them.")
if len(LAYERS) > 1:
    md(f"**Number of layers n** (multi-v + HSG, the last n of {L_BLOCKS} blocks)\n\n"
       + table(hdr, sweep_rows(lay, lab)))
if len(LAMBDAS) > 1:
    md("**λ (coherence weight)**\n\n" + table(hdr, sweep_rows(lam_names, [f"λ = {lam:g}" for lam in LAMBDAS])))
if EXTRAS:
    md("**Unstated choices** (reference: own output projection, then one final norm + projection; gates from each "
       "layer's own LN(x), one shared W_H)\n\n" + table(hdr, sweep_rows([REF] + list(EXTRAS))))
for n in LAYERS:
    if n != 3:
        claim("3.7", f"three layers beat n = {n}", f"n = {n}", REF, "ovss.miou")
if 0.0 in LAMBDAS:
    for m in ("kmeans.miou", "ovss.miou"):
        claim("3.7", "the coherence loss (λ = 0.025 vs 0) helps", "λ = 0", REF, m)
for e_ in EXTRAS:
    claim("3.7", f"(book's choice, not a paper claim) the default beats {e_}", e_, REF, "ovss.miou")
md(f"{len(SWEEP)} sweep runs in {t_sw:.0f} s.")

# %% [markdown]
# ## 3.8 Are HSG gates image-independent?
#
# The paper: HSG weights are consistent across 2,000 samples — they capture the heads' roles, not the image.
# The gates `σ(W_H LN(x))` of the seed-0 HSG student (the row with the recipe's `W_H` learning rate where the
# profile has one, 3.5) on up to 2,000 training images (at 96 px in the micro
# profile, 12 × 12 tokens, to fit the budget; the students train at 160 px): per image, the
# mean gate of every (layer, head) over its patch tokens. **Image-independence** is measured by the share of
# the variance of these per-image means that the (layer, head) identity explains,
# `η² = Var_heads(mean over images) / (that + mean over heads of Var_images)`, with a bootstrap interval over
# images; the claim is taken to hold when the whole interval is ≥ 0.9 (a threshold of ours: heads differ far
# more than images do). Also shown: how far the gates moved from their initial 0.5 (a gate map that never
# moved is trivially image-independent), and the spread of the gates over the tokens of one image.

# %%
t = time.perf_counter()
GATE_ROW = next(iter(LR_ROWS), "HSG")  # the gates of the run whose W_H had a chance to move (3.5)
hsg_res = runs[f"{GATE_ROW}-s0"].res
hsg_student = load_student(P, hsg_res, DEV)
hsg_args = json.loads(Path(hsg_res["results"]).read_text())["config"]["method_args"]
hsg_cons = load_constructor(hsg_res["weights"], hsg_student, **hsg_args).to(DEV)
train_dir = Path(P["data_root"]) / CFG.split  # the images the recipe trains on
files = sorted([p_ for p_ in train_dir.iterdir() if p_.suffix.lower() in (".png", ".jpg", ".jpeg")])[:N_GATE]
batches = (normalize_images(torch.stack([student_image(np.asarray(Image.open(f_).convert("RGB")), GATE_SIZE)[0]
                                          for f_ in files[k0:k0 + 50]]), MEAN, STD).to(DEV)
           for k0 in range(0, len(files), 50))
G_MEAN, G_TOK = (g_.numpy() for g_ in gate_statistics(hsg_cons, hsg_student, batches))  # (I, n_used, H) each
I_, NL, NH = G_MEAN.shape
flat = G_MEAN.reshape(I_, -1)
# η² = Var_heads(mean over images) / (that + mean over heads of Var_images), bootstrapped over images
eta = bootstrap_ci(eta_squared_units(flat), eta_squared, n_boot=EV.n_boot, seed=P["seed"])
mu = flat.mean(0).reshape(NL, NH)
sd_img = flat.std(0).reshape(NL, NH)
tok = G_TOK.mean(0)
moved = float(np.abs(mu - 0.5).mean())
heatmap_row([(mu, "mean gate over images", "viridis"), (sd_img, "std of the per-image mean across images", "viridis"),
             (tok, "std over the tokens of an image (mean)", "viridis")], ylabel="layer",
            yticklabels=[str(l_ + 1) for l_ in hsg_cons.used], fmt="{:.4f}",
            suptitle=f"HSG gates of the seed-0 student ({GATE_ROW}) on {I_} training images at {GATE_SIZE} px "
                     "(layers = blocks used, 1-based)")
plt.show()
# one trained student (seed 0): its images' bootstrap is evaluation noise only -> indicative
c_eta = study.add_claim("3.8-gates-image-independent", "HSG gates are image-independent (η² of (layer, head) "
                        "identity ≥ 0.9)", Comparison(eta[0] - 0.9, eta[1] - 0.9, eta[2] - 0.9, float("nan"),
                                                      "indicative", f"1 seed: bootstrap over {I_} images", 1,
                                                      ours_a=0.9, ours_b=eta[0], seeds_b=1),
                        metric="η² − 0.9", section="3.8")
v_eta = c_eta.describe(3)
md(f"η² = **{ci(eta, 3)}** ({I_} images, {NL} layers × {NH} heads) → *{v_eta}*. Gates moved on average "
   f"{moved:.4f} from their initial 0.5 (head means from {mu.min():.4f} to {mu.max():.4f}); the mean std across "
   f"images {sd_img.mean():.4f}, within an image across tokens {tok.mean():.4f}. ({time.perf_counter() - t:.0f} s)" +
   ("\n\nThe gates have barely left their initial 0.5 at this budget (mean move < 0.01): η² describes the "
    "first steps of training, not trained gates." if moved < 0.01 else ""))

# %% [markdown]
# ## 3.9 What an HSG step costs (issue target: ≤ 1.05 × a CLIPSelf step)
#
# `benchmarks/bench_denserc.py` times a DenseRC step (multi-v, HSG, semantics + λ·coherence, backward, AdamW)
# and a CLIPSelf step on the same batch and the same random student, in alternating pairs; *semantics only*
# isolates the construction (no VFM), and the VFM's correlation target alone is shown as a fraction of a
# CLIPSelf step. The numbers below are measured now, on this machine's CPU (the benchmark builds its models on
# the CPU, fp32, with the kernel's torch threads, whatever the chapter's device); the verdict uses the CPU-time
# ratio, steadier than wall time when other jobs share the cores.

# %%
t = time.perf_counter()
bench_denserc = load_benchmark("bench_denserc")  # benchmarks/ beside ovlib (absent outside the repository)
if bench_denserc is None:
    md("`benchmarks/bench_denserc.py` is not available next to this `ovlib`: the step-time measurement is skipped.")
else:
    from _common import machine_info
    from _common import verdict as bench_verdict

    S_, CROP_, B_, K_, PAIRS_ = BENCH
    micro = P["backbone"] == "micro-clip"  # the paper's setting benchmarks ViT-B/16
    depth = dry_run_depth(P)  # a paper dry run benchmarks ViT-B/16's first blocks only
    bench_rows = bench_denserc.run("micro CLIP" if micro else "ViT-B/16" + (f" (first {depth} blocks)" if depth else ""),
                                   "micro-clip" if micro else "ViT-B-16", S_, CROP_, B_, K_, PAIRS_, depth=depth)
    mi = machine_info()
    md(f"Machine: {mi['cpu']} ({mi['cores']} cores), torch {mi['torch']} with {mi['torch_threads']} thread(s), "
       f"load {mi['loadavg_start']:.2f}; {PAIRS_} alternating pair(s) per case after a warm-up.\n\n" +
       table(["setting", "case", "wall ratio (median)", "min–max", "CPU-time ratio (median)", "min–max", "step ms",
              "CLIPSelf ms", "target (wall / CPU)"],
             [[r["setting"], r["case"], f"{r['ratio']['median']:.3f}",
               f"{r['ratio']['min']:.3f}–{r['ratio']['max']:.3f}", f"{r['cpu_ratio']['median']:.3f}",
               f"{r['cpu_ratio']['min']:.3f}–{r['cpu_ratio']['max']:.3f}", f"{r['case_ms']:.0f}",
               f"{r['clipself_ms']:.0f}",
               f"{r['verdict']} / {bench_verdict(r['cpu_ratio'], bench_denserc.TARGET)}" if r["verdict"] else ""]
              for r in bench_rows]) + f"\n\n({time.perf_counter() - t:.0f} s)")
    full = next(r for r in bench_rows if r["case"].startswith("denserc /"))
    # the benchmark runs on the CPU; with other jobs on the cores the process's CPU time is the steadier clock
    ratio_used = full["cpu_ratio"]
    # the benchmark's target verdict (whole min-max range / median on either side) in the chapter's words
    BENCH_VERDICT = {"met": "holds", "met at median": "not resolved (met at the median only)",
                     "missed": "does not hold", "missed at median": "not resolved (missed at the median)"}
    study.add_claim("3.9-hsg-step-cost", f"(issue target, not a paper claim) an HSG step costs ≤ "
                    f"{bench_denserc.TARGET} × a CLIPSelf step: "
                    f"{BENCH_VERDICT.get(bench_verdict(ratio_used, bench_denserc.TARGET), 'n/a')}",
                    Comparison(ratio_used["median"] - bench_denserc.TARGET, ratio_used["min"] - bench_denserc.TARGET,
                               ratio_used["max"] - bench_denserc.TARGET, float("nan"), "indicative",
                               f"timing: {PAIRS_} paired step(s), {mi['cpu']} (min-max)", -1),
                    metric="CPU-time ratio − target", section="3.9")

# %% [markdown]
# ## 3.10 Which of the paper's claims hold at micro scale
#
# The book's one rule (`ovlib.stats.compare`): with >= 2 seeds per row the seeds decide (paired t-test over
# shared seeds, the interval its t interval combined with a bootstrap over the images; the Table-5 headline claims are
# Holm–Bonferroni corrected); the frozen CLIP's analyses (crops, gradient maps) are judged by the paired
# bootstrap over their units; a one-seed comparison is *indicative* — shown, never counted. *holds*: resolved
# with the paper's sign; *reversed*: the other sign; *not resolved*: this budget cannot tell. The derivation
# checks (§3.2 exactness, §3.3) are *checks*: numerical identities that pass or fail, not statistical tests.

# %%
study.check("3.2-bookkeeping-exact", f"the CLS decomposition is exact on both towers (max abs error ≤ {TOL:g})",
            max(dec.error(), dec_b.error(), jt.error(), jt_b.error(), head_err, head_err_b), 0.0, tol=TOL,
            section="3.2", paper_ref="denserc.eq.decomp")
md(study.claims_table())
md(study.summary(f"{P['profile']} profile, {STEPS or 'recipe'} distillation steps, {len(SEEDS)} seed(s) for "
                 "Table 5"))
study.ledger()  # book/claims/03.json

# %% [markdown]
# **Reading the verdicts.** The derivations are exact identities and hold at any scale; what they say about
# *training* is an empirical matter. The micro CLIP has 4 blocks and 4 heads, the students are fine-tuned for
# a few dozen steps rather than 6 COCO epochs, and OVSS / box classification stand in for the paper's
# detectors: a *not resolved* verdict says this budget cannot separate the rows, not that the paper is wrong;
# a *reversed* one says the mechanism does not transfer to this scale as configured. The `paper` profile runs
# the same cells with ViT-B/16 and the paper's recipe.
#
# ## 3.11 Budget: what every run cost

# %%
md(study.cost_table() + f" Chapter executed in {time.perf_counter() - T0:.0f} s (profile {P['profile']}).")
