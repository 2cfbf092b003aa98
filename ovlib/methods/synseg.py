"""SynSeg: Feature Synergy Structure + Multi-Category Contrastive Learning (Zhang et al., ICME'26; paper 002).

Weakly supervised OVSS: a frozen CLIP (image and text towers), a FiLM-conditioned CLIPSeg-style decoder
(:mod:`ovlib.models.film_decoder`) giving one semantic-activation map per (image, category), trained only from
the categories named by the image's caption (:mod:`ovlib.data.nouns`) -- no mask, no box. Only FiLM, the
decoder and the FSS projector train (§III-A).

**Feature Synergy Structure** (§III-A; the paper gives no equation, this is our reading, stated once): for a
category ``c`` of image ``I`` with activation map ``A_c = sigmoid(decoder logits) (H, W)`` and projected
conditional features ``X_c (D, h, w)`` (the post-decoder map conditioned on ``t_c``, through the convolutional
projector to the text dimension ``D``)::

    f_c    = (A_c X_c) / (hw)          foreground synergy vector   (D,)
    fbar_c = ((1 - A_c) X_c) / (hw)    background synergy vector   (D,)

with ``A_c`` average-pooled to the feature grid ``(h, w)`` (identical to the pixel-level product with ``X_c``
nearest-upsampled to ``(H, W)``); ``/ hw`` and ``1 - A`` follow C2AM [32], which the paper cites
(``CVI-SZU/CCAM:CUSTOM/core/model.py``, convention only). ``A = 1`` gives ``f = mean(X)``, ``fbar = 0``.

**MCCL** (Eqs. 3-9 of our copy; ``reference/implementations.md`` §7.1-7.2), with the bounded cosine
``sim(a, b) = clamp(cos(a, b), eps, 1 - eps)``, ``eps = 0.005`` (``sim_map="clamp"``; ``"affine"`` maps
``(1 + cos) / 2`` first -- one reading of our copy's garbled Eq. 4, kept for the ablation)::

    L_align = -(1/N) sum_c log sim(f_c, t_c)                                   (Eq. 5)
    L_cont  = -(1/N) sum_c [cos(f_c, fbar_c) > 0.1] log(1 - sim(f_c, fbar_c))  (Eq. 6; App. D3 threshold)
    L_back  = -(1/N_pair) sum_{j,k} log sim(fbar_j, fbar_k)                     (Eq. 7)
    L_sep   = -(1/N_pair) sum_{j,k} log(1 - sim(f_j, f_k))                      (Eq. 8)
    L       = l1 L_align + l2 L_cont + l3 L_back + l4 L_sep                      (Eq. 9)

**j = k** (``diagonal``): our copy defines ``N_pair`` as "the number of ordered category pairs with [j != k]"
(the condition was lost in extraction), the reference reading is ``N_pair = N^2``. Default ``"exclude"``: the
sums run over ordered pairs ``j != k`` and ``N_pair = N(N-1)``; an image with one category has no pair and
does not enter ``L_back``/``L_sep``. ``"include"``: all ``N^2`` pairs; the diagonal then adds the constants
``-log(1 - eps) / N`` (``L_back``) and ``-log(eps) / N`` (``L_sep``, 5.30 / N) with zero gradient (the clamp
saturates). ``L_cont``'s threshold masks pairs but keeps the ``1/N`` normaliser. Batch loss: the mean over
images where a term is defined.

**Clamp gradient** (``clamp_grad``): ``"zero"`` (default) is ``torch.clamp``, literal: a pair outside
``[eps, 1 - eps]`` contributes its bounded value and **no gradient** (``cos(f, t) <= 0.005`` stops ``L_align``,
``cos >= 0.995`` stops ``L_cont``/``L_sep``). The paper starts its decoder from CLIPSeg's weights (option
``clipseg``; the profiles do); a decoder from scratch has an identity FiLM, so every category's ``f`` is the same
vector and all four terms can sit on a bound at step 0 (they do with a random micro CLIP). ``"straight"``
keeps the clamped values and passes the gradient of the unclamped cosine (straight-through), for the ablation.

**Loss weights and learning rate** were lost from our copy's appendix (App. D3 prints "the loss weights are set
to , , , and ; the learning rate is with a weight decay of"): :data:`DEFAULT_LOSS_WEIGHTS` (all 1, the
neutral choice) and :data:`DEFAULT_LR` / :data:`DEFAULT_WEIGHT_DECAY` are ours; the trainer's
``loss_weights`` / ``lr`` override them for ablations.

**Inference** (§III-A, App. B): activation maps ``sigmoid`` per category; the five-view strategy (four
non-overlapping quadrants + the whole image, each resized to the CLIP input size, one batch; maps resized back
and averaged where views overlap); labels = argmax over categories, and with a background class the pixels
whose best activation is below the threshold (0.1-0.6 in Fig. 3) become background.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ovlib.data.nouns import DEFAULT_EXCLUSIONS, CaptionLabelDataset, collate_caption_labels
from ovlib.io import model_state, safe_load
from ovlib.methods.base import Distiller
from ovlib.models import dense_features
from ovlib.models.adapter import vit_adapter
from ovlib.models.dense import DENSE_MODES
from ovlib.models.film_decoder import CLIPSegDecoder, clip_block_activations, default_extract_layers, gather_rows
from ovlib.models.images import image_mean_std, normalize_images
from ovlib.models.text import MICRO_TEMPLATES, VILD_TEMPLATES, text_embeddings

__all__ = [
    "CLAMP_GRADS",
    "CONT_THRESHOLD",
    "DEFAULT_LOSS_WEIGHTS",
    "DEFAULT_LR",
    "DEFAULT_WEIGHT_DECAY",
    "DIAGONAL_MODES",
    "SIM_EPS",
    "SIM_MAPS",
    "X_SOURCES",
    "SynSeg",
    "SynSegConfig",
    "align_loss",
    "back_loss",
    "bound",
    "bounded_cosine",
    "cont_loss",
    "five_views",
    "label_map",
    "load_synseg",
    "mccl_losses",
    "merge_views",
    "pool_to_grid",
    "predict_probs",
    "sep_loss",
    "synergy_vectors",
    "total_loss",
    "train_step",
]

#: lambda_1..4 of Eq. 9 (align, cont, back, sep). The paper's values were lost from our copy: ours, all 1.
DEFAULT_LOSS_WEIGHTS: dict[str, float] = {"align": 1.0, "cont": 1.0, "back": 1.0, "sep": 1.0}
#: AdamW learning rate / weight decay of the trainable decoder (lost from our copy; ours).
DEFAULT_LR = 1e-3
DEFAULT_WEIGHT_DECAY = 1e-4
SIM_EPS = 0.005  # §4.2: cosine clipped into [0.005, 0.995]
CONT_THRESHOLD = 0.1  # App. D3: L_cont only for fg/bg pairs with cosine > 0.1
SIM_MAPS = ("clamp", "affine")
CLAMP_GRADS = ("zero", "straight")
DIAGONAL_MODES = ("exclude", "include")
#: Where the features ``X`` of the synergy vectors come from (:class:`SynSegConfig.x_source`).
X_SOURCES = ("conditional", "image", "clip")
TEMPLATE_SETS = ("micro", "vild", "bare")


# --------------------------------------------------------------------------------------------- MCCL
def bound(cos: torch.Tensor, eps: float = SIM_EPS, sim_map: str = "clamp", clamp_grad: str = "zero"
          ) -> torch.Tensor:
    """The bounded similarity of Eqs. 3-4: ``clamp(cos, eps, 1 - eps)`` (``"clamp"``) or
    ``clamp((1 + cos) / 2, eps, 1 - eps)`` (``"affine"``).

    ``clamp_grad``: ``"zero"`` -- ``torch.clamp``'s gradient, 0 outside the bounds (the literal clamp: a
    saturated pair gives no gradient); ``"straight"`` -- the same values with the gradient of the unclamped
    similarity (straight-through), so a saturated pair still pushes (gradient ``-1/sim`` of ``-log sim`` at the
    clamped value, finite)."""
    if sim_map not in SIM_MAPS:
        raise ValueError(f"sim_map must be one of {SIM_MAPS}, got {sim_map!r}")
    if clamp_grad not in CLAMP_GRADS:
        raise ValueError(f"clamp_grad must be one of {CLAMP_GRADS}, got {clamp_grad!r}")
    if sim_map == "affine":
        cos = (1.0 + cos) / 2.0
    out = cos.clamp(eps, 1.0 - eps)
    return out if clamp_grad == "zero" else cos + (out - cos).detach()


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (F.normalize(a.float(), dim=-1, eps=1e-8) * F.normalize(b.float(), dim=-1, eps=1e-8)).sum(-1)


def _cos_matrix(x: torch.Tensor) -> torch.Tensor:
    x = F.normalize(x.float(), dim=-1, eps=1e-8)
    return x @ x.T  # (N, N)


def bounded_cosine(a: torch.Tensor, b: torch.Tensor, *, eps: float = SIM_EPS, sim_map: str = "clamp",
                   clamp_grad: str = "zero") -> torch.Tensor:
    """``sim(a, b)`` over the last dimension (broadcasting): ``(..., D), (..., D) -> (...)``."""
    return bound(_cos(a, b), eps, sim_map, clamp_grad)


def _check(x: torch.Tensor, name: str) -> None:
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be (N, D) with N >= 1, got {tuple(x.shape)}")


def align_loss(f: torch.Tensor, t: torch.Tensor, **sim: Any) -> torch.Tensor:
    """Eq. 5: ``-(1/N) sum_c log sim(f_c, t_c)`` for ``f, t (N, D)`` of one image (``sim``: the keyword
    arguments of :func:`bound`: ``eps``, ``sim_map``, ``clamp_grad``)."""
    _check(f, "f")
    if t.shape != f.shape:
        raise ValueError(f"f {tuple(f.shape)} and t {tuple(t.shape)} must have the same shape")
    return -torch.log(bound(_cos(f, t), **sim)).mean()


def cont_loss(f: torch.Tensor, fbar: torch.Tensor, threshold: float | None = CONT_THRESHOLD, **sim: Any
              ) -> torch.Tensor:
    """Eq. 6: ``-(1/N) sum_c m_c log(1 - sim(f_c, fbar_c))``, ``m_c = [cos(f_c, fbar_c) > threshold]``
    (App. D3; ``threshold=None``: every pair)."""
    _check(f, "f")
    if fbar.shape != f.shape:
        raise ValueError(f"f {tuple(f.shape)} and fbar {tuple(fbar.shape)} must have the same shape")
    cos = _cos(f, fbar)  # (N,)
    terms = -torch.log(1.0 - bound(cos, **sim))
    if threshold is not None:
        terms = torch.where(cos.detach() > threshold, terms, torch.zeros_like(terms))
    return terms.sum() / f.shape[0]


def _pair_loss(x: torch.Tensor, positive: bool, diagonal: str, **sim: Any) -> torch.Tensor | None:
    _check(x, "features")
    if diagonal not in DIAGONAL_MODES:
        raise ValueError(f"diagonal must be one of {DIAGONAL_MODES}, got {diagonal!r}")
    n = x.shape[0]
    s = bound(_cos_matrix(x), **sim)  # (N, N)
    terms = -torch.log(s) if positive else -torch.log(1.0 - s)
    if diagonal == "include":
        return terms.sum() / (n * n)
    if n < 2:
        return None  # no ordered pair j != k
    off = ~torch.eye(n, dtype=torch.bool, device=x.device)
    return terms[off].sum() / (n * (n - 1))


def back_loss(fbar: torch.Tensor, diagonal: str = "exclude", **sim: Any) -> torch.Tensor | None:
    """Eq. 7: ``-(1/N_pair) sum_{j,k} log sim(fbar_j, fbar_k)``; ``None`` when there is no pair."""
    return _pair_loss(fbar, True, diagonal, **sim)


def sep_loss(f: torch.Tensor, diagonal: str = "exclude", **sim: Any) -> torch.Tensor | None:
    """Eq. 8: ``-(1/N_pair) sum_{j,k} log(1 - sim(f_j, f_k))``; ``None`` when there is no pair."""
    return _pair_loss(f, False, diagonal, **sim)


def mccl_losses(f: torch.Tensor, fbar: torch.Tensor, t: torch.Tensor, owner: torch.Tensor,
                cont_threshold: float | None = CONT_THRESHOLD, diagonal: str = "exclude", **sim: Any
                ) -> dict[str, torch.Tensor]:
    """The four unweighted MCCL terms of a batch: ``f, fbar, t (P, D)`` over (image, category) pairs,
    ``owner (P,)`` the image of each pair. Each term is the mean over the images where it is defined
    (a graph-connected zero when it is defined nowhere)."""
    if not (f.shape == fbar.shape == t.shape) or owner.shape != f.shape[:1]:
        raise ValueError(f"f {tuple(f.shape)}, fbar {tuple(fbar.shape)}, t {tuple(t.shape)} must match and owner "
                         f"{tuple(owner.shape)} must be (P,)")
    per: dict[str, list[torch.Tensor]] = {k: [] for k in DEFAULT_LOSS_WEIGHTS}
    for b in torch.unique(owner).tolist():
        m = owner == b
        fi, fbi, ti = f[m], fbar[m], t[m]  # (N_b, D)
        per["align"].append(align_loss(fi, ti, **sim))
        per["cont"].append(cont_loss(fi, fbi, cont_threshold, **sim))
        for name, val in (("back", back_loss(fbi, diagonal, **sim)), ("sep", sep_loss(fi, diagonal, **sim))):
            if val is not None:
                per[name].append(val)
    zero = (f.sum() + fbar.sum()) * 0.0
    return {k: torch.stack(v).mean() if v else zero for k, v in per.items()}


def total_loss(terms: dict[str, torch.Tensor], weights: dict[str, float] | None = None) -> torch.Tensor:
    """Eq. 9: ``sum_k lambda_k L_k`` (missing weights are :data:`DEFAULT_LOSS_WEIGHTS`'s, unknown names an
    error) -- what the trainer computes from ``DistillConfig.loss_weights``."""
    w = {**DEFAULT_LOSS_WEIGHTS, **(weights or {})}
    unknown = sorted(set(w) - set(terms))
    if unknown:
        raise ValueError(f"loss weights name unknown term(s) {unknown}; terms: {sorted(terms)}")
    return sum(float(w[k]) * v.float() for k, v in terms.items())


# --------------------------------------------------------------------------------------------- FSS
def pool_to_grid(A: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``A (P, H, W) -> (P, h, w)`` by area averaging (exact patch means when ``H = h * ph``)."""
    if A.ndim != 3:
        raise ValueError(f"activation maps must be (P, H, W), got {tuple(A.shape)}")
    if tuple(A.shape[-2:]) == tuple(grid):
        return A
    return F.adaptive_avg_pool2d(A[:, None], tuple(grid))[:, 0]


def synergy_vectors(A: torch.Tensor, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FSS: ``f = (A X) / hw``, ``fbar = ((1 - A) X) / hw`` for ``A (P, h, w)`` in [0, 1] and
    ``X (P, D, h, w)`` -> ``(P, D), (P, D)``."""
    if A.ndim != 3 or X.ndim != 4 or A.shape[0] != X.shape[0] or A.shape[-2:] != X.shape[-2:]:
        raise ValueError(f"A must be (P, h, w) and X (P, D, h, w) on the same grid; got {tuple(A.shape)}, "
                         f"{tuple(X.shape)}")
    hw = A.shape[-1] * A.shape[-2]
    X = X.float()
    A = A.float()
    f = torch.einsum("phw,pdhw->pd", A, X) / hw
    fbar = torch.einsum("phw,pdhw->pd", 1.0 - A, X) / hw
    return f, fbar


# --------------------------------------------------------------------------------------------- model
@dataclass
class SynSegConfig:
    """Options of :class:`SynSeg` (``DistillConfig.method_args``); model, loss and data fields."""

    input_size: int | None = None  # px of the CLIP input; None = the tower's native size (paper: 224)
    extract_layers: tuple[int, ...] | None = None  # 0-based blocks; None = default_extract_layers (3,6,9 of 12)
    reduce_dim: int = 64  # CLIPSeg's reduce_dim
    heads: int = 4
    film_hidden: int = 256  # 0 = linear FiLM (CLIPSeg)
    proj_kernel: int = 3  # the FSS projector's convolution
    # features X of the synergy vectors: "conditional" (the paper: projector(text-conditioned decoder map)) |
    # "image" (projector(the same decoder run unconditioned) -- text-free, trainable) | "clip" (the frozen
    # CLIP's dense map of mode ``x_mode``, unit norm, no projector -- text-free, fixed); see X_SOURCES
    x_source: str = "conditional"
    x_mode: str = "x+v"
    # our substitute for the CLIPSeg initialisation (not in the paper; None = off): an extra loss term "prior",
    # BCE between the activation maps of EVERY category and the training-free map of the frozen CLIP of dense
    # mode ``prior`` (softmax over the categories of prior_tau * cos, chapter 01's MaskCLIP-style OVSS); no mask
    prior: str | None = None
    prior_tau: float = 40.0
    prior_target: str = "soft"  # "soft": the softmax probabilities | "hard": one-hot of their argmax (pseudo-mask)
    prior_classes: int = 0  # categories per image in the prior term: 0 = all; n = the n with the largest mean prior
    # our second stand-in for the CLIPSeg initialisation (not in the paper; None = off): a fixed skip path adding
    # the frozen CLIP's training-free log-probability log softmax_k(skip_tau * cos(D_p, t_k)) of dense mode
    # ``skip`` (over the vocabulary: the text bank in training, the queried classes at inference) to the
    # decoder's logits, so the maps start at the training-free segmentation and the decoder learns a correction
    skip: str | None = None
    skip_tau: float = 40.0
    # CLIPSeg initialisation (the paper's): None = decoder from scratch; a local CLIPSeg checkpoint file (CLIPSeg's
    # key names: loaded here); or a named CLIPSeg (ovlib.models.clipseg CLIPSEG_ARCHS: "micro-clipseg", trained /
    # loaded from the cache, or "rd64-uni", read from weights_dir/rd64-uni.pth): its weights come from the launcher
    # as ``clipseg_state`` (ovlib.train.proxies.clipseg_weights; without them the decoder is random). Set, the
    # decoder takes CLIPSeg's form (linear FiLM, ReLU layers, the checkpoint's sizes); reduce_dim/heads/film_hidden
    # are then ignored. The FSS projector is new (random, seeded) as in the paper.
    clipseg: str | None = None
    eps: float = SIM_EPS
    sim_map: str = "clamp"
    clamp_grad: str = "zero"  # "zero": torch.clamp's gradient | "straight": straight-through (see bound)
    cont_threshold: float | None = CONT_THRESHOLD
    diagonal: str = "exclude"
    templates: str = "micro"  # text anchors t_c: "micro" (MICRO_TEMPLATES), "vild" (63), "bare" (Eq. 2: the name)
    chunk: int = 512  # (image, category) pairs per decoder call at inference
    # data (CaptionLabelDataset, through SynSeg.build_dataset)
    extractor: str = "template"  # "template" | "spacy"
    caption_pick: str = "one"  # "one" caption per image and epoch | "all" (union)
    exclusions: tuple[str, ...] | None = None  # None = ovlib.data.nouns.DEFAULT_EXCLUSIONS
    exclusion_match: str = "word"  # "word" | "substring" (the paper's partial matching)

    def __post_init__(self):
        if self.sim_map not in SIM_MAPS:
            raise ValueError(f"sim_map must be one of {SIM_MAPS}, got {self.sim_map!r}")
        if self.clamp_grad not in CLAMP_GRADS:
            raise ValueError(f"clamp_grad must be one of {CLAMP_GRADS}, got {self.clamp_grad!r}")
        if self.diagonal not in DIAGONAL_MODES:
            raise ValueError(f"diagonal must be one of {DIAGONAL_MODES}, got {self.diagonal!r}")
        if self.x_source not in X_SOURCES:
            raise ValueError(f"x_source must be one of {X_SOURCES}, got {self.x_source!r}")
        if self.skip is not None:

            if self.skip not in DENSE_MODES:
                raise ValueError(f"skip must be None or a dense mode {DENSE_MODES}, got {self.skip!r}")
        if self.prior is not None:

            if self.prior not in DENSE_MODES:
                raise ValueError(f"prior must be None or a dense mode {DENSE_MODES}, got {self.prior!r}")
        if self.prior_target not in ("soft", "hard"):
            raise ValueError(f"prior_target must be 'soft' or 'hard', got {self.prior_target!r}")
        if self.prior_classes < 0:
            raise ValueError(f"prior_classes must be >= 0, got {self.prior_classes}")
        if self.templates not in TEMPLATE_SETS:
            raise ValueError(f"templates must be one of {TEMPLATE_SETS}, got {self.templates!r}")
        if not 0.0 < self.eps < 0.5:
            raise ValueError(f"eps must be in (0, 0.5), got {self.eps}")
        if self.extract_layers is not None:
            self.extract_layers = tuple(int(i) for i in self.extract_layers)
        if self.exclusions is not None:
            self.exclusions = tuple(self.exclusions)

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> SynSegConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ValueError(f"synseg: unknown option(s) {unknown}; known: {sorted(names)}")
        return cls(**options)


def _templates(kind: str) -> tuple[str, ...]:
    return {"micro": MICRO_TEMPLATES, "vild": VILD_TEMPLATES, "bare": ("{}",)}[kind]


class SynSeg(Distiller):
    """SynSeg through the shared trainer: ``forward(batch)`` returns the unweighted MCCL terms
    ``align``, ``cont``, ``back``, ``sep``.

    ``student`` is the CLIP; it is frozen here whatever ``unlocked_blocks`` says (only ``decoder`` -- FiLM,
    reduces, transformer layers, upsampling, projector -- trains). Batch keys: ``images (B, 3, S, S)``
    (normalised; resized to ``input_size`` if needed) and ``category_ids`` (list of ``(N_b,)`` ids named by the
    captions, :class:`~ovlib.data.nouns.CaptionLabelDataset`); ``image_labels`` (GT image-level tags, a
    stronger supervision) is accepted when ``category_ids`` is absent. Text anchors ``t_c`` of ``categories``
    are embedded once by the frozen text tower (buffer ``text_bank (K, D)``, unit norm).
    """

    name = "synseg"
    option_types = (SynSegConfig,)
    loss_names = ("align", "cont", "back", "sep")
    needs = frozenset()

    def __init__(self, student: nn.Module, frozen: dict[str, nn.Module] | None = None, tokenizer: Any = None,
                 categories: list[dict] | None = None, clipseg_state: dict[str, torch.Tensor] | None = None,
                 **options: Any):
        super().__init__(student, frozen or {}, tokenizer=tokenizer, categories=categories)
        self.cfg = SynSegConfig.from_options(options)
        self.options = dataclasses.asdict(self.cfg)
        student.requires_grad_(False)
        student.eval()

        self.adapter = vit_adapter(student)
        ad = self.adapter
        self.layers = self.cfg.extract_layers or default_extract_layers(ad.num_blocks)
        self.input_size = int(self.cfg.input_size or ad.native_grid[0] * ad.patch_size[0])
        if self.input_size % ad.patch_size[0]:
            raise ValueError(f"input_size {self.input_size} is not a multiple of the patch size {ad.patch_size}")
        self.clipseg_loaded = False  # True once CLIPSeg weights initialised the decoder
        if self.cfg.clipseg is None:
            if clipseg_state is not None:
                raise ValueError("synseg: clipseg_state given but the clipseg option is None")
            self.decoder = CLIPSegDecoder(ad.width, ad.out_dim, len(self.layers), ad.patch_size,
                                          self.cfg.reduce_dim, self.cfg.heads, film_hidden=self.cfg.film_hidden,
                                          proj_dim=ad.out_dim, proj_kernel=self.cfg.proj_kernel,
                                          n_prefix=ad.num_prefix)
        else:  # where the paper loads CLIPSeg's weights
            from ovlib.models.clipseg import (
                CLIPSEG_ARCHS,
                build_clipseg_decoder,
                clipseg_arch,
                load_clipseg_decoder,
                read_clipseg_checkpoint,
            )

            if clipseg_state is None and self.cfg.clipseg not in CLIPSEG_ARCHS:
                clipseg_state = read_clipseg_checkpoint(self.cfg.clipseg)
            arch = clipseg_arch(clipseg_state if clipseg_state is not None else self.cfg.clipseg)
            self.decoder = build_clipseg_decoder(ad.width, ad.out_dim, len(self.layers), ad.patch_size, arch,
                                                 proj_dim=ad.out_dim, proj_kernel=self.cfg.proj_kernel,
                                                 n_prefix=ad.num_prefix)
            if clipseg_state is not None:
                load_clipseg_decoder(self.decoder, clipseg_state)
                self.clipseg_loaded = True
        ids = [int(c["id"]) for c in self.categories]
        self.cat_row = {c: i for i, c in enumerate(ids)}
        dev = next(student.parameters()).device
        self.register_buffer("text_bank", torch.zeros(len(ids), ad.out_dim, device=dev))  # (K, D) anchors t_c
        if tokenizer is not None and ids:
            self.text_bank.copy_(self.embed_text([c["name"] for c in self.categories]))

    # ------------------------------------------------------------------------------------------- pieces
    @classmethod
    def build_dataset(cls, cfg, mean, std):
        """The launcher's hook: images + caption-derived category ids (no regions, no crops)."""
        a = SynSegConfig.from_options(dict(cfg.method_args))
        data = CaptionLabelDataset(cfg.data_root, cfg.split, size=a.input_size or cfg.student_size, mean=mean,
                                   std=std, caption_pick=a.caption_pick, seed=cfg.seed, max_images=cfg.max_images,
                                   extractor=a.extractor, exclusions=a.exclusions or DEFAULT_EXCLUSIONS,
                                   match=a.exclusion_match)
        return data, collate_caption_labels

    def train(self, mode: bool = True):
        super().train(mode)
        self.student.eval()  # frozen: no dropout / patch dropout
        return self

    @torch.no_grad()
    def embed_text(self, names: Sequence[str | Sequence[str]]) -> torch.Tensor:
        """``(C, D)`` unit-norm anchors ``t_c`` of class names (template set ``cfg.templates``)."""
        if self.tokenizer is None:
            raise ValueError("synseg: embedding text needs the tokenizer of the CLIP")
        dev = next(self.student.parameters()).device
        return text_embeddings(self.student, self.tokenizer, names, _templates(self.cfg.templates), device=dev)

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S) -> (B, 3, s, s)`` with ``s = input_size`` (bilinear, antialiased)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        if tuple(images.shape[-2:]) == (self.input_size, self.input_size):
            return images
        return F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear",
                             align_corners=False, antialias=True)

    def pairs(self, labels: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``owner (P,)`` image index and ``rows (P,)`` text-bank row of every (image, category) pair."""
        owner, rows = [], []
        for b, ids in enumerate(labels):
            for c in sorted({int(x) for x in torch.as_tensor(ids).reshape(-1).tolist()}):
                if c not in self.cat_row:
                    raise ValueError(f"synseg: category id {c} of image {b} is not among the method's categories "
                                     f"({sorted(self.cat_row)[:10]}...)")
                owner.append(b)
                rows.append(self.cat_row[c])
        dev = self.text_bank.device
        return torch.tensor(owner, dtype=torch.long, device=dev), torch.tensor(rows, dtype=torch.long, device=dev)

    def decode(self, acts: list[torch.Tensor], grid: tuple[int, int], owner: torch.Tensor, text: torch.Tensor,
               project: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decoder over pairs: CLIP tokens of image ``owner[p]`` conditioned on ``text[p]`` -> logits
        ``(P, s, s)`` and projected conditional features ``X (P, D, h, w)`` (None without ``project``)."""
        return self.decoder(acts, text.to(acts[0].dtype), grid, owner=owner, project=project)

    def image_features(self, images: torch.Tensor, acts: list[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        """The text-free ``X (B, D, h, w)`` of ``x_source`` ``"image"`` (the projector over the decoder run with the
        identity FiLM, once per image) or ``"clip"`` (the frozen CLIP's unit-norm dense map, mode ``x_mode``)."""
        if self.cfg.x_source == "image":
            return self.decoder.image_features(acts, grid)
        if self.cfg.x_source == "clip":

            with torch.no_grad():
                X = dense_features(self.adapter, images, self.cfg.x_mode, normalize=True)  # (B, D, h, w)
            if tuple(X.shape[-2:]) != tuple(grid):
                raise ValueError(f"CLIP dense map {tuple(X.shape[-2:])} is not on the decoder grid {grid}")
            return X.float()
        raise ValueError(f"image_features: x_source {self.cfg.x_source!r} is the text-conditioned projector")

    # ------------------------------------------------------------------------------------------- training
    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        labels = batch.get("category_ids", batch.get("image_labels"))
        if labels is None:
            raise KeyError("synseg needs batch['category_ids'] (caption-derived, CaptionLabelDataset) or "
                           "batch['image_labels']")
        images = self.resize(batch["images"])  # (B, 3, s, s)
        if len(labels) != images.shape[0]:
            raise ValueError(f"{len(labels)} label sets for {images.shape[0]} images")
        owner, rows = self.pairs(labels)  # (P,), (P,)
        if owner.numel() == 0:  # no image of the batch has a category: nothing to learn
            zero = sum(p.sum() for p in self.decoder.parameters()) * 0.0
            out = {k: zero for k in self.loss_names}
            if self.cfg.prior is not None:
                out["prior"] = self.prior_loss(images, *clip_block_activations(self.adapter, images, self.layers))
            return out
        acts, grid = clip_block_activations(self.adapter, images, self.layers)  # [(B, L, W)]
        text = self.text_bank[rows]  # (P, D)
        c = self.cfg
        logits, X = self.decode(acts, grid, owner, text, project=c.x_source == "conditional")  # (P, s, s)
        logits = self.add_skip(logits, images, self.text_bank, owner, rows)
        X = X if X is not None else gather_rows(self.image_features(images, acts, grid), owner)  # (P, D, h, w)
        A = pool_to_grid(torch.sigmoid(logits.float()), grid)  # (P, h, w)
        f, fbar = synergy_vectors(A, X)  # (P, D), (P, D)
        terms = mccl_losses(f, fbar, text.float(), owner, c.cont_threshold, c.diagonal, eps=c.eps,
                            sim_map=c.sim_map, clamp_grad=c.clamp_grad)
        if c.prior is not None:
            terms["prior"] = self.prior_loss(images, acts, grid)
        return terms

    def prior_target(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, K, h, w)`` training-free class probabilities of every category (text bank row) per token:
        ``softmax_k(prior_tau * cos(D_p, t_k))`` over the frozen CLIP's unit-norm dense map ``D`` of mode
        ``prior`` (the MaskCLIP-style OVSS of chapter 01, here on the training image)."""
        with torch.no_grad():
            D = dense_features(self.adapter, images, self.cfg.prior, normalize=True).float()  # (B, D, h, w)
            cos = torch.einsum("bdhw,kd->bkhw", D, self.text_bank.float())
            return torch.softmax(self.cfg.prior_tau * cos, dim=1)

    def prior_loss(self, images: torch.Tensor, acts: list[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        """Our CLIPSeg-initialisation substitute (``cfg.prior``): mean BCE between ``sigmoid`` of the decoder's
        logits of every (image, category) pair, average-pooled to the token grid, and :meth:`prior_target`.
        Unlike MCCL it also sees the categories absent from the caption (their target is low)."""
        B, K = images.shape[0], self.text_bank.shape[0]
        soft = self.prior_target(images)  # (B, K, h, w)
        if tuple(soft.shape[-2:]) != tuple(grid):
            raise ValueError(f"prior map {tuple(soft.shape[-2:])} is not on the decoder grid {grid}")
        q = F.one_hot(soft.argmax(1), K).permute(0, 3, 1, 2).float() if self.cfg.prior_target == "hard" else soft
        n = K if self.cfg.prior_classes in (0, None) else min(K, int(self.cfg.prior_classes))
        if n < K:  # the n categories with the largest mean prior (present ones and the hardest negatives)
            keep = soft.mean((2, 3)).topk(n, dim=1).indices  # (B, n)
        else:
            keep = torch.arange(K, device=images.device).expand(B, K)
        owner = torch.arange(B, device=images.device).repeat_interleave(n)  # (B*n,)
        rows = keep.reshape(-1)
        logits, _ = self.decode(acts, grid, owner, self.text_bank[rows], project=False)  # (B*n, s, s)
        logits = self.add_skip(logits, images, self.text_bank, owner, rows)
        A = pool_to_grid(torch.sigmoid(logits.float()), grid).clamp(1e-6, 1 - 1e-6)  # (B*n, h, w)
        return F.binary_cross_entropy(A, q[owner, rows])

    # ------------------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def activation_logits(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``images (B, 3, S, S)`` normalised, ``text (C, D)`` unit-norm anchors -> ``(B, C, s, s)`` logits of
        every (image, class) pair; the CLIP runs once per image, the decoder in chunks of ``cfg.chunk`` pairs."""
        images = self.resize(images)
        B, C = images.shape[0], text.shape[0]
        acts, grid = clip_block_activations(self.adapter, images, self.layers)
        text = text.to(images.device)
        owner = torch.arange(B, device=images.device).repeat_interleave(C)  # (B*C,)
        rows = torch.arange(C, device=images.device).repeat(B)
        lp = self.skip_logprobs(images, text)  # (B, C, h, w) or None
        out = []
        for s in range(0, B * C, self.cfg.chunk):
            o, r = owner[s:s + self.cfg.chunk], rows[s:s + self.cfg.chunk]
            lg = self.decode(acts, grid, o, text[r], project=False)[0].float()
            out.append(lg if lp is None else lg + self._skip_map(lp, o, r))
        return torch.cat(out).reshape(B, C, self.input_size, self.input_size)

    # ------------------------------------------------------------------------------------------- skip path
    def skip_logprobs(self, images: torch.Tensor, vocab: torch.Tensor) -> torch.Tensor | None:
        """``(B, V, h, w)`` ``log softmax_k(skip_tau * cos(D_p, vocab_k))`` of the frozen CLIP's unit-norm dense
        map ``D`` (mode ``cfg.skip``) against the ``vocab (V, D)`` anchors; ``None`` when ``cfg.skip`` is off."""
        if self.cfg.skip is None:
            return None

        with torch.no_grad():
            D = dense_features(self.adapter, images, self.cfg.skip, normalize=True).float()  # (B, D, h, w)
            cos = torch.einsum("bdhw,kd->bkhw", D, vocab.float().to(D.device))
            return torch.log_softmax(self.cfg.skip_tau * cos, dim=1)

    def _skip_map(self, lp: torch.Tensor, owner: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The skip log-probabilities of pairs ``(owner, rows)``, bilinearly upsampled to ``(P, s, s)``."""
        return F.interpolate(lp[owner, rows][:, None], size=(self.input_size, self.input_size), mode="bilinear",
                             align_corners=False)[:, 0]

    def add_skip(self, logits: torch.Tensor, images: torch.Tensor, vocab: torch.Tensor, owner: torch.Tensor,
                 rows: torch.Tensor) -> torch.Tensor:
        """``logits (P, s, s)`` + the skip path of pairs ``(owner, rows)`` (rows index ``vocab``); unchanged when
        ``cfg.skip`` is off."""
        lp = self.skip_logprobs(images, vocab)
        return logits if lp is None else logits.float() + self._skip_map(lp, owner, rows)


def train_step(model: SynSeg, batch: dict[str, Any], opt: torch.optim.Optimizer,
               weights: dict[str, float] | None = None) -> dict[str, float]:
    """One optimiser step outside the trainer (a chapter's demo cell): MCCL terms, Eq. 9, backward, step.
    Returns the terms and ``loss`` as floats."""
    model.train()
    terms = model(batch)
    loss = total_loss(terms, weights)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {**{k: float(v.detach()) for k, v in terms.items()}, "loss": float(loss.detach())}


def load_synseg(weights: str, clip: nn.Module, tokenizer: Any = None, categories: list[dict] | None = None,
                **options: Any) -> SynSeg:
    """A trained SynSeg from a trainer checkpoint (``ensemble-final.pt`` / ``last.pt``, weights_only) over
    ``clip`` (its architecture; its weights are replaced by the checkpoint's ``student.*``). ``categories`` and
    ``options`` must be the run's (``method_args``): the text bank's shape depends on them."""

    model = SynSeg(clip, {}, tokenizer=None, categories=categories, **options)
    # a checkpoint="final" run leaves out the frozen CLIP's weights: ``clip`` (the run's base) supplies them
    sd = model_state(safe_load(weights, map_location="cpu"), model.state_dict(), where=str(weights))
    model.load_state_dict(sd, strict=True)
    model.tokenizer = tokenizer
    return model.eval()


# --------------------------------------------------------------------------------------------- multi-view
def five_views(image: torch.Tensor, size: int) -> tuple[torch.Tensor, list[tuple[int, int, int, int]]]:
    """App. B: ``image (3, H, W)`` -> ``views (5, 3, size, size)``: the four non-overlapping quadrants
    (split at ``H // 2``, ``W // 2``; row-major) then the whole image, each resized to ``size x size``
    (bilinear, antialiased), and their boxes ``(y0, y1, x0, x1)`` in the image."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
    H, W = image.shape[-2:]
    if H < 2 or W < 2:
        raise ValueError(f"image of {H}x{W} px cannot be split into quadrants")
    hy, hx = H // 2, W // 2
    boxes = [(0, hy, 0, hx), (0, hy, hx, W), (hy, H, 0, hx), (hy, H, hx, W), (0, H, 0, W)]
    views = [F.interpolate(image[None, :, y0:y1, x0:x1].float(), size=(size, size), mode="bilinear",
                           align_corners=False, antialias=True)[0] for y0, y1, x0, x1 in boxes]
    return torch.stack(views), boxes


def merge_views(maps: torch.Tensor, boxes: Sequence[tuple[int, int, int, int]], H: int, W: int) -> torch.Tensor:
    """``maps (V, C, s, s)`` of the views in ``boxes`` -> ``(C, H, W)``: each map resized (bilinear) to its box
    and the maps averaged per pixel over the views covering it (a pixel no view covers is an error)."""
    if maps.ndim != 4 or maps.shape[0] != len(boxes):
        raise ValueError(f"maps must be (V, C, s, s) with V = {len(boxes)}, got {tuple(maps.shape)}")
    acc = maps.new_zeros(maps.shape[1], H, W, dtype=torch.float32)
    cnt = maps.new_zeros(1, H, W, dtype=torch.float32)
    for m, (y0, y1, x0, x1) in zip(maps, boxes):
        acc[:, y0:y1, x0:x1] += F.interpolate(m[None].float(), size=(y1 - y0, x1 - x0), mode="bilinear",
                                              align_corners=False)[0]
        cnt[:, y0:y1, x0:x1] += 1
    if (cnt == 0).any():
        raise ValueError("merge_views: the views do not cover the image")
    return acc / cnt


@torch.no_grad()
def predict_probs(model: SynSeg, image: torch.Tensor, text: torch.Tensor, views: int = 5,
                  mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> torch.Tensor:
    """``image (3, H, W)`` in [0, 1] -> ``(C, H, W)`` activation probabilities (sigmoid) of the ``text (C, D)``
    classes: ``views=5`` the five-view strategy (one batch of 5), ``views=1`` the whole image only."""

    if views not in (1, 5):
        raise ValueError(f"views must be 1 or 5, got {views}")
    if mean is None or std is None:
        mean, std = image_mean_std(model.student)
    H, W = image.shape[-2:]
    dev = model.text_bank.device
    if views == 5:
        x, boxes = five_views(image, model.input_size)
    else:
        x, boxes = five_views(image, model.input_size)[0][4:], [(0, H, 0, W)]
    probs = torch.sigmoid(model.activation_logits(normalize_images(x.to(dev), mean, std), text.to(dev)))
    return merge_views(probs, boxes, H, W)


def label_map(probs: torch.Tensor, threshold: float | None = None, background_index: int | None = None
              ) -> torch.Tensor:
    """``probs (C, H, W)`` -> ``(H, W)`` labels: argmax over classes; with ``background_index``, pixels whose
    best activation is below ``threshold`` get it (datasets with a background class)."""
    if probs.ndim != 3:
        raise ValueError(f"probs must be (C, H, W), got {tuple(probs.shape)}")
    conf, lab = probs.max(0)
    if background_index is not None:
        if threshold is None:
            raise ValueError("label_map: a background class needs a threshold")
        lab = torch.where(conf < threshold, torch.full_like(lab, background_index), lab)
    return lab
