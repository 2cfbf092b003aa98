"""DenseRC's two derivations checked numerically, and the analyses chapter 03 runs on them.

Equation numbers are those of :mod:`ovlib.methods.denserc` (ours, in order of appearance in the paper text).

**1. What the cls token is made of** (Eqs. 1-2). A pre-LN ViT block adds two terms to every token of the
residual stream: ``x^(l) = x^(l-1) + a^(l) + m^(l)`` with ``a^(l) = ls1(O(softmax(q k^T / sqrt(d)) v))`` (the
attention path) and ``m^(l) = ls2(MLP(LN2(x^(l-1) + a^(l))))``. At the cls position this unrolls *exactly* to

    ``c^(L) = c^(0) + sum_l a_cls^(l) + sum_l m_cls^(l)``                                        (bookkeeping)

with ``c^(0)`` the (data-independent) cls embedding after the pre-norm. :func:`cls_decomposition` computes every
term from the tower's pieces (:class:`~ovlib.models.adapter.ViTAdapter`) and, independently, the stream with the
model's own block code, so :meth:`ClsDecomposition.error` measures the bookkeeping. Where the attention output
map is affine (no inner LayerNorm: open_clip ViTs, not EVA02's sub-LN), ``a_cls^(l)`` splits further into heads and
source tokens, ``a_cls^(l) = sum_h sum_j A^h_{cls,j} ls1(W_O^h v^h_j) + ls1(b_O)`` -- the paper's "A^(l) absorbs
attention weights and projection" (Eq. 2).

The joint-space embedding is ``e = g(LN(c^(L)))`` (``g`` the affine head: ``@ proj``). With the LN's standard
deviation ``sigma`` of the actual ``c^(L)`` held fixed, LN is affine, so ``e = sum_terms G(gamma * center(t) /
sigma) + g(beta)`` exactly (:func:`joint_terms`; the linearisation of Gandelsman et al.'s "direct effects").
:func:`contribution_stats` then says how much of ``e`` a group of terms carries: its share of ``e``
(``<e_S, e> / ||e||^2``, additive over a partition), norm ratio, cosine to ``e``, and cosine / zero-shot accuracy
against text embeddings.

**2. Spatial aggregation costs alignment** (Eqs. 4-6). Teacher ``c_r = M v_r + eps``; head-only ``W v_r``;
spatial-head ``sum_j S_rj P v_j``. For zero-mean off-target values ``v_j, j in U_r``, uncorrelated with each other,
with ``v_r`` and with ``eps``, the expected squared error difference is

    ``ΔL(P) = E||(M - S_rr P) v_r||^2 + sum_{j in U_r} S_rj^2 E||P v_j||^2``   (best head-only ``W = M``)

whose first (mismatch) term vanishes for ``P = M / S_rr`` and leaves the paper's Eq. (6); ``ΔL > 0`` for any ``P``
as soon as one off-target weight and ``P v_j`` are non-zero. :func:`delta_l_closed_form` and the Monte-Carlo
:func:`simulate_delta_l` check it. :func:`patch_gradient_magnitudes` / :func:`gradient_stats` give the empirical
side (paper Fig. 3): how the semantic loss's gradient spreads over the patches' values under ``qq`` aggregation vs
HSG.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ovlib.data.regions import crop_regions, sample_grid_boxes
from ovlib.methods.denserc import semantics_loss
from ovlib.models import roi_features
from ovlib.models.adapter import ViTAdapter, vit_adapter
from ovlib.models.images import normalize_images

__all__ = [
    "grid_region_batch",
    "random_vision_tower",
    "ClsDecomposition",
    "JointTerms",
    "TermGroup",
    "cls_decomposition",
    "contribution_stats",
    "delta_l_closed_form",
    "final_linearization",
    "gradient_stats",
    "head_attention_distance",
    "per_head_decomposable",
    "head_contributions",
    "joint_terms",
    "optimal_spatial_p",
    "patch_gradient_magnitudes",
    "random_delta_l_setup",
    "simulate_delta_l",
    "standard_groups",
]


# ================================================================================== 1. cls decomposition
@dataclass
class ClsDecomposition:
    """Residual-stream terms of the final cls token (``D`` = tower width, ``L`` blocks, ``H`` heads, ``T`` tokens).

    ``c0 (B, D)``; ``attn``, ``mlp (B, L, D)``; ``stream (B, D)``: the cls token after the last block computed
    with the model's own code; ``embedding (B, C)``: the model's image embedding from those tokens.
    Optional (affine attention output only): ``heads (B, L, H, D)`` and ``sources (B, L, T, D)`` (the attention
    term without its bias, split by head / by source token), ``attn_bias (L, D)`` = ``ls1(b_O)``.
    """

    c0: torch.Tensor
    attn: torch.Tensor
    mlp: torch.Tensor
    stream: torch.Tensor
    embedding: torch.Tensor
    heads: torch.Tensor | None = None
    sources: torch.Tensor | None = None
    attn_bias: torch.Tensor | None = None

    def reconstruction(self) -> torch.Tensor:
        """``c^(0) + sum_l a^(l) + sum_l m^(l)`` ``(B, D)``."""
        return self.c0 + self.attn.sum(1) + self.mlp.sum(1)

    def error(self) -> float:
        """Max abs difference between the reconstruction and the model's own cls stream."""
        return float((self.reconstruction() - self.stream).abs().max())

    def relative_error(self) -> float:
        return self.error() / max(float(self.stream.abs().max()), 1e-30)


def _check_cls_pooling(ad: ViTAdapter) -> None:
    v = ad.visual
    if ad.family == "open_clip":
        if v.pool_type != "tok":
            raise ValueError(f"the cls decomposition needs cls-token pooling; this tower pools {v.pool_type!r}")
    else:
        t = v.trunk
        if t.cls_token is None or t.global_pool != "token":
            raise ValueError("the cls decomposition needs an EVA tower with a cls token and global_pool='token'")


def _attn_out_is_affine(ad: ViTAdapter, i: int) -> bool:
    """Whether ``attn_out`` of block ``i`` is affine in the per-head outputs (no LayerNorm inside it)."""
    blk = ad.block(i)
    if ad.family == "open_clip":
        return (isinstance(getattr(blk.attn, "ln_inner", nn.Identity()), nn.Identity)
                and isinstance(getattr(blk, "ln_attn", nn.Identity()), nn.Identity))
    return isinstance(blk.attn.norm, nn.Identity)


@torch.no_grad()
def per_head_decomposable(model: nn.Module | ViTAdapter) -> bool:
    """Whether :func:`cls_decomposition` can split the attention terms per head (``per_head=True``): every
    block's attention output is affine in the heads' outputs (open_clip's OpenAI-style ViT: yes; EVA02's sub-LN
    inside the attention: no)."""
    ad = model if isinstance(model, ViTAdapter) else vit_adapter(model)
    return all(_attn_out_is_affine(ad, i) for i in range(ad.num_blocks))


@torch.no_grad()
def cls_decomposition(model: nn.Module | ViTAdapter, images: torch.Tensor, per_head: bool = False,
                      per_source: bool = False) -> ClsDecomposition:
    """Decompose the final cls token of ``images (B, 3, H, W)`` into ``c^(0)`` and per-block attention / MLP terms
    (module docstring, Eq. 2). ``per_head`` / ``per_source`` also split each attention term by head / by source
    token (towers whose attention output is affine; an error otherwise). Run the model in eval mode."""
    ad = model if isinstance(model, ViTAdapter) else vit_adapter(model)
    _check_cls_pooling(ad)
    if (per_head or per_source) and not all(_attn_out_is_affine(ad, i) for i in range(ad.num_blocks)):
        raise ValueError("per-head / per-source terms need an affine attention output (no inner LayerNorm, e.g. "
                         "EVA02's sub-LN); use per_head=per_source=False for this tower")
    x, grid = ad.embed(images)  # (B, P+N, D)
    rope = ad.rope(grid)
    H = ad.num_heads
    c0 = x[:, 0].clone()
    attn, mlp, heads, sources, biases = [], [], [], [], []
    for i in range(ad.num_blocks):
        parts = ad.qkv(i, ad.ln1(i, x), rope=rope)  # (B, H, T, d)
        q, k, v = parts["q"], parts["k"], parts["v"]
        A = ((q[:, :, :1] @ k.transpose(-1, -2)) * ad.attn_scale).softmax(-1)  # (B, H, 1, T): the cls row
        o = A @ v  # (B, H, 1, d)
        a = ad.ls1(i, ad.attn_out(i, o))[:, 0]  # (B, D)
        m = ad.ls2(i, ad.mlp(i, ad.ln2(i, x[:, :1] + a[:, None])))[:, 0]  # (B, D)
        attn.append(a)
        mlp.append(m)
        if per_head or per_source:
            bias = ad.ls1(i, ad.attn_out(i, torch.zeros_like(o[:1])))[0, 0]  # (D,)
            biases.append(bias)
            if per_head:
                hs = []
                for h in range(H):
                    mask = torch.zeros(1, H, 1, 1, dtype=o.dtype, device=o.device)
                    mask[:, h] = 1
                    hs.append(ad.ls1(i, ad.attn_out(i, o * mask))[:, 0] - bias)  # (B, D)
                heads.append(torch.stack(hs, 1))  # (B, H, D)
            if per_source:
                weighted = A.transpose(-1, -2) * v  # (B, H, T, d): A_{cls,j} v_j
                sources.append(ad.ls1(i, ad.attn_out(i, weighted)) - bias)  # (B, T, D)
        x = ad.block_forward(i, x, rope)  # the model's own code advances the stream
    return ClsDecomposition(
        c0=c0, attn=torch.stack(attn, 1), mlp=torch.stack(mlp, 1), stream=x[:, 0].clone(), embedding=ad.pooled(x),
        heads=torch.stack(heads, 1) if per_head else None,
        sources=torch.stack(sources, 1) if per_source else None,
        attn_bias=torch.stack(biases, 0) if biases else None)


def final_linearization(model: nn.Module | ViTAdapter, stream: torch.Tensor
                        ) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """The final LayerNorm + head at the fixed ``sigma`` of ``stream (B, D)`` as ``(lin, offset)``:
    ``lin(t (B, ..., D)) -> (B, ..., C)`` is linear and ``embedding = lin(sum of terms) + offset (B, C)`` exactly,
    ``offset = g(beta)`` (LN bias through the head, head bias included)."""
    ad = model if isinstance(model, ViTAdapter) else vit_adapter(model)
    v = ad.visual
    if ad.family == "open_clip":
        ln = v.ln_post
        proj = v.proj

        def g(y):
            return y @ proj if proj is not None else y
    else:
        t = v.trunk
        ln = t.norm
        if not isinstance(t.fc_norm, nn.Identity):
            raise ValueError("EVA tower with an fc_norm: the final map is not LN + affine")

        def g(y):
            return v.head(t.head(y))
    if not isinstance(ln, nn.LayerNorm):
        raise ValueError(f"final norm {type(ln).__name__} is not a LayerNorm")
    B, D = stream.shape
    sigma = (stream.var(-1, unbiased=False) + ln.eps).sqrt()  # (B,)
    gamma = ln.weight if ln.weight is not None else torch.ones(D, dtype=stream.dtype, device=stream.device)
    beta = ln.bias if ln.bias is not None else torch.zeros(D, dtype=stream.dtype, device=stream.device)
    g0 = g(torch.zeros(1, D, dtype=stream.dtype, device=stream.device))[0]  # (C,)

    def lin(t: torch.Tensor) -> torch.Tensor:
        if t.shape[0] != B or t.shape[-1] != D:
            raise ValueError(f"terms must be (B={B}, ..., D={D}), got {tuple(t.shape)}")
        s = sigma.view(B, *([1] * (t.ndim - 1)))
        y = gamma * (t - t.mean(-1, keepdim=True)) / s
        return g(y) - g0

    offset = g(beta[None])[0].expand(B, -1)  # (B, C)
    return lin, offset


@dataclass
class JointTerms:
    """The cls decomposition in the joint (text) space: ``c0``, ``offset (B, C)``, ``attn``, ``mlp (B, L, C)``;
    optional ``heads (B, L, H, C)``, ``attn_bias (B, L, C)``; ``embedding (B, C)`` the model's own."""

    c0: torch.Tensor
    attn: torch.Tensor
    mlp: torch.Tensor
    offset: torch.Tensor
    embedding: torch.Tensor
    heads: torch.Tensor | None = None
    attn_bias: torch.Tensor | None = None

    @property
    def num_blocks(self) -> int:
        return self.attn.shape[1]

    def reconstruction(self) -> torch.Tensor:
        return self.c0 + self.attn.sum(1) + self.mlp.sum(1) + self.offset

    def error(self) -> float:
        """Max abs difference between the summed joint-space terms and the model's embedding."""
        return float((self.reconstruction() - self.embedding).abs().max())


@torch.no_grad()
def joint_terms(model: nn.Module | ViTAdapter, dec: ClsDecomposition) -> JointTerms:
    """Map every term of ``dec`` to the joint space through :func:`final_linearization`."""
    lin, offset = final_linearization(model, dec.stream)
    B, L, _ = dec.attn.shape
    return JointTerms(
        c0=lin(dec.c0), attn=lin(dec.attn), mlp=lin(dec.mlp), offset=offset, embedding=dec.embedding,
        heads=lin(dec.heads) if dec.heads is not None else None,
        attn_bias=lin(dec.attn_bias[None].expand(B, -1, -1)) if dec.attn_bias is not None else None)


@dataclass(frozen=True)
class TermGroup:
    """A sum of joint-space terms: attention terms of blocks ``attn``, MLP terms of blocks ``mlp``, ``c0``,
    ``offset``; ``attn_value`` uses the attention terms without their output-projection bias (needs
    ``JointTerms.attn_bias``)."""

    attn: tuple[int, ...] = ()
    mlp: tuple[int, ...] = ()
    c0: bool = False
    offset: bool = False
    attn_value: bool = False

    def vector(self, jt: JointTerms) -> torch.Tensor:
        """``(B, C)``: the group's contribution to the embedding."""
        out = torch.zeros_like(jt.embedding)
        if self.attn:
            a = jt.attn[:, list(self.attn)]
            if self.attn_value:
                if jt.attn_bias is None:
                    raise ValueError("attn_value needs per-head terms (cls_decomposition(per_head=True))")
                a = a - jt.attn_bias[:, list(self.attn)]
            out = out + a.sum(1)
        if self.mlp:
            out = out + jt.mlp[:, list(self.mlp)].sum(1)
        if self.c0:
            out = out + jt.c0
        if self.offset:
            out = out + jt.offset
        return out


def standard_groups(num_blocks: int, n_last: int = 3) -> dict[str, TermGroup]:
    """The groups chapter 03 reports: the whole embedding, attention of the last ``n_last`` blocks / of the others /
    of all, MLP of all, and the data-independent rest (``c0`` + final-LN offset). The four of ``attention, last``,
    ``attention, first``, ``MLP`` and ``c0 + offset`` partition the embedding (their shares sum to 1)."""
    L = num_blocks
    n = min(n_last, L)
    every = tuple(range(L))
    return {
        "embedding (all terms)": TermGroup(attn=every, mlp=every, c0=True, offset=True),
        f"attention, last {n} blocks": TermGroup(attn=tuple(range(L - n, L))),
        f"attention, first {L - n} blocks": TermGroup(attn=tuple(range(L - n))),
        "attention, all blocks": TermGroup(attn=every),
        "MLP, all blocks": TermGroup(mlp=every),
        "c0 + final-LN offset": TermGroup(c0=True, offset=True),
    }


def contribution_stats(jt: JointTerms, groups: dict[str, TermGroup], text: torch.Tensor | None = None,
                       labels: torch.Tensor | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Per group and per image ``(B,)`` arrays: ``share = <e_S, e> / ||e||^2`` (additive over a partition of the
    terms; 1 for the whole embedding), ``norm_ratio = ||e_S|| / ||e||``, ``cos_cls = cos(e_S, e)``; with
    ``text (K, C)`` and ``labels (B,)`` (row indices into ``text``): ``cos_text = cos(e_S, text[label])`` and
    ``top1`` (1.0 where ``argmax_k cos(e_S, text_k) == label``)."""
    e = jt.embedding.double()  # (B, C)
    e2 = (e * e).sum(-1)
    out: dict[str, dict[str, np.ndarray]] = {}
    tn = F.normalize(text.double(), dim=-1) if text is not None else None
    if (text is None) != (labels is None):
        raise ValueError("text and labels go together")
    for name, grp in groups.items():
        s = grp.vector(jt).double()  # (B, C)
        st = {"share": (s * e).sum(-1) / e2,
              "norm_ratio": s.norm(dim=-1) / e.norm(dim=-1),
              "cos_cls": F.cosine_similarity(s, e, dim=-1)}
        if tn is not None:
            sims = F.normalize(s, dim=-1) @ tn.T  # (B, K)
            st["cos_text"] = sims.gather(1, labels.view(-1, 1).long()).squeeze(1)
            st["top1"] = (sims.argmax(-1) == labels.long()).double()
        out[name] = {k: v.cpu().numpy() for k, v in st.items()}
    return out


def head_contributions(jt: JointTerms, text: torch.Tensor | None = None, labels: torch.Tensor | None = None
                       ) -> dict[str, np.ndarray]:
    """Per head (needs ``cls_decomposition(per_head=True)``), arrays ``(B, L, H)``: ``share`` of the embedding
    (``<e_h, e> / ||e||^2``) and, with ``text (K, C)`` and ``labels (B,)``, ``cos_text = cos(e_h, text[label])``
    -- how unevenly the heads carry the cls token's cross-modal semantics (the observation behind HSG)."""
    if jt.heads is None:
        raise ValueError("head_contributions needs cls_decomposition(per_head=True)")
    e = jt.embedding.double()  # (B, C)
    h = jt.heads.double()  # (B, L, H, C)
    out = {"share": torch.einsum("blhc,bc->blh", h, e) / (e * e).sum(-1).view(-1, 1, 1)}
    if text is not None:
        t = F.normalize(text.double(), dim=-1)[labels.long()]  # (B, C)
        out["cos_text"] = torch.einsum("blhc,bc->blh", F.normalize(h, dim=-1), t)
    return {k: v.cpu().numpy() for k, v in out.items()}


@torch.no_grad()
def head_attention_distance(model: nn.Module | ViTAdapter, images: torch.Tensor) -> torch.Tensor:
    """Mean attention distance of every head, ``(B, L, H)`` in patch units: ``mean_i sum_j A_ij ||p_i - p_j||``
    over patch queries ``i`` and patch keys ``j`` (attention to prefix tokens counts as distance 0) -- the heads'
    locality preference, computed with each block's own attention on the model's own stream."""
    ad = model if isinstance(model, ViTAdapter) else vit_adapter(model)
    x, grid = ad.embed(images)
    rope = ad.rope(grid)
    P = ad.num_prefix
    h, w = grid
    r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([r.flatten(), c.flatten()], -1).to(x.dtype)  # (N, 2)
    dist = torch.cdist(pos, pos)  # (N, N)
    out = []
    for i in range(ad.num_blocks):
        parts = ad.qkv(i, ad.ln1(i, x), rope=rope, which="qk")
        A = ((parts["q"] @ parts["k"].transpose(-1, -2)) * ad.attn_scale).softmax(-1)  # (B, H, T, T)
        out.append((A[:, :, P:, P:] * dist).sum(-1).mean(-1))  # (B, H)
        x = ad.block_forward(i, x, rope)
    return torch.stack(out, 1)


# ================================================================================== 2. ΔL > 0
def delta_l_closed_form(S_row: torch.Tensor, P: torch.Tensor, M: torch.Tensor, cov: torch.Tensor,
                        target: int = 0) -> dict[str, float]:
    """``ΔL = L^(S) - L^(H)`` in closed form (module docstring; Eq. 6 when ``P = M / S_rr``).

    ``S_row (J,)`` spatial weights of region ``r`` over ``J`` tokens (``target`` = the on-target token ``r``,
    the others ``U_r``); ``P, M (C, d)``; ``cov (J, d, d)`` covariances of the zero-mean, mutually uncorrelated
    values ``v_j``. Returns ``interference = sum_{j in U_r} S_rj^2 tr(P cov_j P^T)`` (Eq. 6),
    ``mismatch = tr((M - S_rr P) cov_r (M - S_rr P)^T)`` and ``delta`` = their sum."""
    S = S_row.double()
    P, M, cov = P.double(), M.double(), cov.double()
    if cov.shape[0] != S.shape[0]:
        raise ValueError(f"cov has {cov.shape[0]} tokens, S_row {S.shape[0]}")
    tr = torch.einsum("cd,jde,ce->j", P, cov, P)  # (J,): E||P v_j||^2
    off = torch.ones_like(S, dtype=torch.bool)
    off[target] = False
    interference = float((S[off] ** 2 * tr[off]).sum())
    R = M - S[target] * P  # (C, d)
    mismatch = float(torch.einsum("cd,de,ce->", R, cov[target], R))
    return {"interference": interference, "mismatch": mismatch, "delta": interference + mismatch}


def optimal_spatial_p(S_row: torch.Tensor, M: torch.Tensor, cov: torch.Tensor, target: int = 0) -> torch.Tensor:
    """The ``P (C, d)`` minimising the closed-form ``ΔL(P)`` for fixed weights ``S_row``:
    ``P* = s M cov_r (s^2 cov_r + sum_{j in U_r} S_rj^2 cov_j)^-1`` (``s = S_rr``). Even this best spatial
    model keeps ``ΔL(P*) > 0`` whenever an off-target weight is non-zero (the interference cannot be projected
    away without also losing part of the target)."""
    S, M, cov = S_row.double(), M.double(), cov.double()
    off = torch.ones_like(S, dtype=torch.bool)
    off[target] = False
    s = S[target]
    sigma_u = (S[off, None, None] ** 2 * cov[off]).sum(0)  # (d, d)
    G = s ** 2 * cov[target] + sigma_u
    return torch.linalg.solve(G.T, (s * M @ cov[target]).T).T  # (C, d): X G = s M cov_r


def random_delta_l_setup(tokens: int, d: int, C: int, generator: torch.Generator, temperature: float = 1.0,
                         matched: bool = True) -> dict[str, torch.Tensor]:
    """A random instance of Eqs. (4)-(5): ``S_row (J,)`` = softmax of standard normal logits / ``temperature``
    (token 0 = the target), ``M (C, d)``, ``cov (J, d, d)`` random PSD (``A A^T / d``), ``P = M / S_rr``
    (``matched``) or a random ``(C, d)``."""
    S = torch.softmax(torch.randn(tokens, generator=generator, dtype=torch.float64) / temperature, 0)
    M = torch.randn(C, d, generator=generator, dtype=torch.float64) / math.sqrt(d)
    A = torch.randn(tokens, d, d, generator=generator, dtype=torch.float64)
    cov = A @ A.transpose(1, 2) / d
    P = M / S[0] if matched else torch.randn(C, d, generator=generator, dtype=torch.float64) / math.sqrt(d)
    return {"S_row": S, "M": M, "P": P, "cov": cov}


@torch.no_grad()
def simulate_delta_l(S_row: torch.Tensor, P: torch.Tensor, M: torch.Tensor, cov: torch.Tensor, noise_std: float,
                     n: int, generator: torch.Generator, target: int = 0, batch: int = 20_000) -> dict[str, float]:
    """Monte-Carlo ``ΔL``: draw ``v_j ~ N(0, cov_j)`` independently and ``eps ~ N(0, noise_std^2 I)``, set
    ``c = M v_r + eps`` (Eq. 4), and average ``||c - sum_j S_rj P v_j||^2 - ||c - M v_r||^2`` (Eq. 5, MSE) over
    ``n`` draws. Returns ``delta`` (mean), ``se`` (its standard error), ``L_S``, ``L_H``."""
    S, P, M = S_row.double(), P.double(), M.double()
    Lc = torch.linalg.cholesky(cov.double())  # (J, d, d)
    J, d = Lc.shape[0], Lc.shape[1]
    C = M.shape[0]
    diffs, ls, lh = [], [], []
    done = 0
    while done < n:
        b = min(batch, n - done)
        g = torch.randn(b, J, d, generator=generator, dtype=torch.float64)
        v = torch.einsum("jde,bje->bjd", Lc, g)  # (b, J, d)
        eps = noise_std * torch.randn(b, C, generator=generator, dtype=torch.float64)
        c = v[:, target] @ M.T + eps  # (b, C)
        spatial = torch.einsum("j,bjd,cd->bc", S, v, P)  # (b, C)
        l_s = ((c - spatial) ** 2).sum(-1)
        l_h = ((c - v[:, target] @ M.T) ** 2).sum(-1)
        diffs.append(l_s - l_h)
        ls.append(l_s)
        lh.append(l_h)
        done += b
    diff = torch.cat(diffs)
    return {"delta": float(diff.mean()), "se": float(diff.std(unbiased=True) / math.sqrt(n)),
            "L_S": float(torch.cat(ls).mean()), "L_H": float(torch.cat(lh).mean()), "n": n}


# ================================================================================== gradient distribution
def patch_gradient_magnitudes(model: nn.Module, constructor, images: torch.Tensor, boxes: Sequence[torch.Tensor],
                              teacher: torch.Tensor) -> torch.Tensor:
    """Per-patch magnitude of the semantic loss's gradient on the values (paper Fig. 3): ``(B, h, w)``.

    ``constructor``: a :class:`~ovlib.methods.denserc.DenseConstructor` (``multi-v``/``v`` base; any
    ``construct``). The values ``v^(l)`` of the used blocks are made leaves (gates and attention maps held
    fixed), ``L_semantics`` (Eq. 8) of the regions ``boxes`` (per image ``(K, 4)`` xyxy px) against ``teacher
    (R, C)`` is back-propagated, and patch ``j`` gets ``sqrt(sum_{l, h, c} (dL/dv^(l)_{h, j, c})^2)``."""

    ad = vit_adapter(model)
    with torch.no_grad():
        stack = constructor.values(ad, images)
    leaves = [v.detach().clone().requires_grad_(True) for v in stack.v]
    stack.v = leaves
    with torch.enable_grad():
        tokens = constructor.construct(ad, stack)  # (B, N, C)
        B, N, C = tokens.shape
        h, w = stack.grid
        dense = tokens.transpose(1, 2).reshape(B, C, h, w)
        if constructor.config.pool == "normalize_first":
            dense = F.normalize(dense, dim=1)
        rois = roi_features(dense, boxes, images.shape[-2:])
        loss = semantics_loss(rois, teacher)
        grads = torch.autograd.grad(loss, leaves)
    P = stack.num_prefix
    sq = sum(g[:, :, P:].pow(2).sum(dim=(1, 3)) for g in grads)  # (B, N)
    return sq.sqrt().reshape(B, h, w).detach()


def gradient_stats(mags: torch.Tensor, top: float = 0.05, starved: float = 0.1) -> dict[str, float]:
    """Summary of per-patch gradient magnitudes (any shape, pooled): ``peak``, ``mean``, ``median``,
    ``peak_over_mean``, ``top_share`` (share of the summed magnitude held by the top ``top`` fraction of patches),
    ``gini`` (0 = uniform, -> 1 = one patch takes all), ``starved`` (fraction of patches below ``starved`` x the
    mean)."""
    x = mags.detach().double().flatten()
    n = x.numel()
    if n == 0:
        raise ValueError("no patches")
    xs, _ = torch.sort(x)
    total = float(xs.sum())
    k = max(1, int(round(top * n)))
    idx = torch.arange(1, n + 1, dtype=torch.float64)
    gini = float(2 * (idx * xs).sum() / (n * xs.sum()) - (n + 1) / n) if total > 0 else 0.0
    mean = float(x.mean())
    median = float(xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2)
    return {"peak": float(xs[-1]), "mean": mean, "median": median,
            "peak_over_mean": float(xs[-1]) / mean if mean > 0 else float("nan"),
            "top_share": float(xs[-k:].sum()) / total if total > 0 else float("nan"),
            "gini": gini, "starved": float((x < starved * mean).double().mean())}


def random_vision_tower(name: str = "ViT-B-16", image_size: int = 224, seed: int = 0, std: float = 0.02) -> nn.Module:
    """open_clip's image tower of config ``name`` at ``image_size`` with random weights (seeded, the global RNG
    left untouched), every parameter perturbed by ``N(0, std²)`` so that biases and LayerNorms are non-trivial
    (open_clip initialises them to 0 / 1): the bookkeeping checks do not depend on trained weights."""
    import open_clip
    from open_clip.model import _build_vision_tower

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"random_vision_tower: unknown open_clip config {name!r}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tower = _build_vision_tower(cfg["embed_dim"], {**cfg["vision_cfg"], "image_size": image_size})
    if hasattr(tower, "trunk"):  # timm trunks are built at their default size (as create_model(force_image_size))
        tower.set_input_size(image_size)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tower.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return tower.eval().requires_grad_(False)



@torch.no_grad()
def grid_region_batch(model: nn.Module, images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                      seed: int = 0, max_split: int = 6, max_boxes: int = 20, device: str | torch.device = "cpu"
                      ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """What the semantic loss (Eq. 8) sees on ``images (B, 3, S, S)`` in [0, 1]: the images normalised with
    ``mean``/``std``, CLIPSelf grid regions per image ``(K_b, 4)`` xyxy px (seeded per image: ``seed * 1000 + b``)
    and the frozen ``model``'s embeddings of the regions' crops at its native size ``(sum K_b, D)``."""
    ad = vit_adapter(model)
    crop_px = ad.native_grid[0] * ad.patch_size[0]
    S = images.shape[-1]
    boxes = [sample_grid_boxes(S, S, generator=seed * 1000 + b, max_split=max_split, max_boxes=max_boxes)
             for b in range(len(images))]
    teach = torch.cat([model.encode_image(normalize_images(crop_regions(x, bx, crop_px), mean, std).to(device))
                       for x, bx in zip(images, boxes)])
    return normalize_images(images, mean, std).to(device), [b.to(device) for b in boxes], teach
