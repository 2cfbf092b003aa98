"""Dense feature maps of a CLIP image tower: one function, one ``mode`` argument.

``dense_features(model, images, mode) -> (B, C, h, w)``: blocks ``0 .. L-2`` run unchanged with the model's
own code, the **last block** is replaced according to ``mode``, the prefix (cls/register) tokens are dropped,
the remaining tokens go through the tower's final norm and projection (:meth:`ViTAdapter.final`) and are
optionally L2-normalised over channels. ``multi-v`` also reads the values of earlier blocks.

Notation for the last block (input ``x``, ``z = LN1(x)``; per head ``q, k, v = W_q z, W_k z, W_v z``,
``s = d ** -0.5``; ``O(.)`` = merge heads, EVA inner LN, output projection; ``ls1/ls2`` layer scale):

=============  ==================================================================
mode           last block output
=============  ==================================================================
``vanilla``    the unmodified block (the model's own code)
``x+v``        ``y = x + ls1(O(v))``, then ``y + ls2(MLP(LN2 y))``
``v``          ``ls1(O(v))``: value path only, no residual, no FFN
``qq``         ``ls1(O(A v))``, ``A = softmax(q q^T [* s])``
``kk``         ``A = softmax(k k^T [* s])``
``csa``        ``A = softmax(q q^T [* s]) + softmax(k k^T [* s])`` (a sum: rows sum to 2)
``naclip``     ``A = softmax(k k^T [* s] + omega)``, ``omega`` = Gaussian of the patch distance
               (std ``gaussian_std`` patches), 0 on prefix rows/columns
``multi-v``    ``sum over the last n blocks l of ls1_l(O_l(v_l))``, each ``v_l`` from block l's own
               input, through block l's own ``O_l``; no residual, no FFN
``proxy``      ProxyCLIP: ``ls1(O(A v'))`` on the VFM's grid, ``v'`` = the patch values bilinearly
               resized to that grid, ``A`` from the VFM's patch features (:func:`proxy_attention`)
=============  ==================================================================

Where each comes from (``reference/implementations.md`` §1, §2, §3, §8, §9):

* ``x+v`` -- MaskCLIP (``chongzhou96/MaskCLIP:mmseg/models/backbones/vit.py``, residual and FFN kept) and
  CLIPSelf ``forward_without_attn`` (``wusize/CLIPSelf:src/open_clip/eva_clip/eva_vit_model.py``).
* ``v`` -- the value-only ablation of DenseRC; ClearCLIP's ``MaskCLIP`` option with ``ignore_residual``.
* ``qq``/``kk``/``csa`` -- DeCLIP ``ss_attn`` + ``forward_without_rcffn``
  (``xiaomoguhz/DeCLIP:src/open_clip/eva_clip/eva_vit_model.py``), SynCLIP (same file in
  ``Justlovesmile/SynCLIP``), SCLIP ``custom_attn`` (``wangf3014/SCLIP:clip/model.py``), ClearCLIP
  (``mc-lan/ClearCLIP:open_clip/transformer.py``).
* ``naclip`` -- NACLIP ``gaussian_window``/``custom_attn`` (``sinahmr/NACLIP:clip/model.py``).
* ``multi-v`` -- DenseRC's "multi-layer value embeddings" (no public code; our reading, see below).
* ``proxy`` -- ProxyCLIP ``VisionTransformer.custom_attn`` (``mc-lan/ProxyCLIP:open_clip/transformer.py``) with
  the VFM features of ``proxyclip_segmentor.py`` ``forward_feature`` (see :func:`proxy_attention`).

Attention modes (``qq, kk, csa, naclip``) output ``O(A v)`` and take explicit switches (defaults in brackets):
``scale`` [True] multiply logits by ``d ** -0.5``; ``residual`` [False] ``y = x + ls1(O(A v))`` instead of
``ls1(O(A v))``; ``ffn`` [False] ``y = y + ls2(MLP(LN2 y))``; ``rope`` [False] (EVA) apply RoPE to q, k first.
The prefix tokens take part in the attention and are dropped afterwards. Published settings
(:data:`PRESETS`, use ``dense_features(model, x, **PRESETS["sclip"])``):

================  ========  =====  ========  ====  ====  ===================================================
preset            mode      scale  residual  FFN   RoPE  source (``reference/implementations.md`` §9)
================  ========  =====  ========  ====  ====  ===================================================
``maskclip``      x+v       --     kept      kept  --    MaskCLIP official
``clipself``      x+v       --     kept      kept  --    CLIPSelf ``forward_without_attn``
``declip-qq``     qq        no     no        no    no    DeCLIP ``main`` ``forward_without_rcffn``
``declip-csa``    csa       no     no        no    no    DeCLIP released ``csa`` checkpoints
``synclip``       csa       no     no        no    no    SynCLIP ``csa_vfm_distill`` / eval ``csa``
``sclip``         csa       yes    kept      kept  n/a   SCLIP
``clearclip``     qq        yes    no        no    n/a   ClearCLIP (``model_type='ClearCLIP'``)
``naclip``        naclip    yes    no        no    n/a   NACLIP (``arch='reduced'``, Gaussian std 5)
``denserc-base``  multi-v   --     --        --    --    DenseRC base, last 3 layers (our reading, below)
================  ========  =====  ========  ====  ====  ===================================================

Each preset also names the position-embedding interpolation of its code off the native grid (``pos_interp``,
:mod:`ovlib.models.adapter`): ``"scale-factor"`` (the ``+0.1`` trick) for ``sclip``, ``clearclip``,
``naclip``; ``"size"`` for the others. :func:`dense_spec` resolves a preset name or a bare mode into the
complete keyword set (what results record), :data:`PRESET_SOURCES` names the code behind each preset.

``multi-v`` choice (DenseRC has no code): each of the last ``n_layers`` blocks (default 3) contributes the
value path of its own input, through its own output projection (and layer scale), like ``v`` for one block;
the sum goes through the final norm and projection once.

Pooling order (``normalize``): CLIPSelf L2-normalises dense tokens before RoIAlign/mask pooling
(``normalize=True`` here, then :func:`~ovlib.models.pool.roi_features`); DeCLIP/SynCLIP pool the
unnormalised projected tokens and normalise afterwards (``normalize=False``, then normalise the pooled rows).
Region classification takes the convention as ``ovlib.eval.region_cls.RegionClsConfig.pooling``.

Cost: blocks ``0 .. L-2`` are run once by the model's own code; a last-block mode costs about one block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import POS_INTERPOLATIONS, ViTAdapter, vit_adapter

__all__ = ["DENSE_MODES", "ATTENTION_MODES", "PRESETS", "PRESET_SOURCES", "dense_features", "dense_spec", "dense_facts",
           "naclip_bias", "custom_attention", "proxy_attention", "VFM_MODES"]

DENSE_MODES = ("vanilla", "x+v", "v", "qq", "kk", "csa", "naclip", "multi-v")
#: Modes that also need a VFM's patch features of the same images (``vfm_features=``).
VFM_MODES = ("proxy",)
ATTENTION_MODES = ("qq", "kk", "csa", "naclip")

PRESETS: dict[str, dict] = {
    "maskclip": dict(mode="x+v", pos_interp="size"),
    "clipself": dict(mode="x+v", pos_interp="size"),
    "declip-qq": dict(mode="qq", scale=False, residual=False, ffn=False, rope=False, pos_interp="size"),
    "declip-csa": dict(mode="csa", scale=False, residual=False, ffn=False, rope=False, pos_interp="size"),
    "synclip": dict(mode="csa", scale=False, residual=False, ffn=False, rope=False, pos_interp="size"),
    "sclip": dict(mode="csa", scale=True, residual=True, ffn=True, rope=False, pos_interp="scale-factor"),
    "clearclip": dict(mode="qq", scale=True, residual=False, ffn=False, rope=False, pos_interp="scale-factor"),
    "naclip": dict(mode="naclip", scale=True, residual=False, ffn=False, rope=False, gaussian_std=5.0,
                   pos_interp="scale-factor"),
    "denserc-base": dict(mode="multi-v", n_layers=3, pos_interp="size"),
}

#: Where each preset's switches come from (``reference/implementations.md`` §2, §3, §4, §5, §8, §9).
PRESET_SOURCES: dict[str, str] = {
    "maskclip": "chongzhou96/MaskCLIP: mmseg/models/backbones/vit.py (last layer, resize_pos_embed)",
    "clipself": "wusize/CLIPSelf: eva_vit_model.py forward_without_attn, rescale_positional_embedding",
    "declip-qq": "xiaomoguhz/DeCLIP main: eva_vit_model.py ss_attn (no scale) + forward_without_rcffn",
    "declip-csa": "xiaomoguhz/DeCLIP released csa checkpoints: ss_attn mode csa",
    "synclip": "Justlovesmile/SynCLIP: csa_vfm_distill / eval mode csa (DeCLIP's ss_attn)",
    "sclip": "wangf3014/SCLIP: clip/model.py custom_attn, interpolate_pos_encoding",
    "clearclip": "mc-lan/ClearCLIP: open_clip/transformer.py model_type='ClearCLIP', ignore_residual",
    "naclip": "sinahmr/NACLIP: clip/model.py arch='reduced', attn_strategy='naclip', gaussian_std=5",
    "denserc-base": "DenseRC (no public code): multi-layer values, last 3 blocks (our reading)",
}


def dense_spec(name: str, **overrides) -> dict:
    """The complete keyword set of :func:`dense_features` for a preset name (:data:`PRESETS`, taking precedence)
    or a bare mode (:data:`DENSE_MODES`), with every default filled in, ``overrides`` applied: what a result
    records about its dense map. Value modes (``x+v``, ``v``, ``vanilla``, ``multi-v``) carry their fixed
    residual / FFN facts (``residual``, ``ffn``; ``scale``/``rope`` ``None`` = not applicable)."""
    if name in PRESETS:
        spec = dict(PRESETS[name])
    elif name in DENSE_MODES:
        spec = {"mode": name}
    else:
        raise ValueError(f"unknown dense mode or preset {name!r}; modes {DENSE_MODES}, presets {tuple(PRESETS)}")
    spec.update(overrides)
    mode = spec["mode"]
    if mode not in DENSE_MODES:
        raise ValueError(f"unknown dense mode {mode!r}; expected one of {DENSE_MODES}")
    spec.setdefault("pos_interp", "size")
    if spec["pos_interp"] not in POS_INTERPOLATIONS:
        raise ValueError(f"pos_interp must be one of {POS_INTERPOLATIONS}, got {spec['pos_interp']!r}")
    if mode in ATTENTION_MODES:
        for k, v in (("scale", True), ("residual", False), ("ffn", False), ("rope", False)):
            if spec.get(k) is None:
                spec[k] = v
        if mode == "naclip":
            spec.setdefault("gaussian_std", 5.0)
    else:
        bad = sorted(k for k in ("scale", "residual", "ffn", "rope") if spec.get(k) is not None)
        if bad:
            raise TypeError(f"mode {mode!r} has no switches (got {bad}); they apply to {ATTENTION_MODES}")
        if mode == "multi-v":
            spec.setdefault("n_layers", 3)
    return spec


def dense_facts(spec: dict) -> dict:
    """What the last block of a :func:`dense_spec` does, for tables: ``attention`` (text), ``scale``,
    ``residual``, ``ffn``, ``rope`` (True / False / ``None`` = not applicable), ``pos_interp``."""
    mode = spec["mode"]
    att = {"vanilla": "softmax(q kᵀ)", "x+v": "none (value path)", "v": "none (value path)",
           "qq": "softmax(q qᵀ)", "kk": "softmax(k kᵀ)", "csa": "softmax(q qᵀ) + softmax(k kᵀ)",
           "naclip": f"softmax(k kᵀ + Gaussian, std {spec.get('gaussian_std', 5.0):g})",
           "multi-v": f"none (values of the last {spec.get('n_layers', 3)} blocks)"}[mode]
    fixed = {"vanilla": (True, True), "x+v": (True, True), "v": (False, False), "multi-v": (False, False)}
    if mode in ATTENTION_MODES:
        res, ffn, scale, rope = spec["residual"], spec["ffn"], spec["scale"], spec["rope"]
    else:
        (res, ffn), scale, rope = fixed[mode], (True if mode == "vanilla" else None), None
    return {"attention": att, "scale": scale, "residual": res, "ffn": ffn, "rope": rope,
            "pos_interp": spec.get("pos_interp", "size")}


def naclip_bias(grid: tuple[int, int], num_prefix: int, std: float, device=None, dtype=None) -> torch.Tensor:
    """NACLIP's neighbourhood bias ``omega (P+N, P+N)``: ``exp(-|p_i - p_j|^2 / (2 std^2))`` for patch
    positions ``p`` (row, col) in patch units, 0 on prefix rows/columns
    (``sinahmr/NACLIP:clip/model.py`` ``gaussian_window``/``get_attention_addition``)."""
    h, w = grid
    if std <= 0:
        raise ValueError(f"gaussian_std must be > 0, got {std}")
    r = torch.arange(h, device=device, dtype=torch.float64)
    c = torch.arange(w, device=device, dtype=torch.float64)
    pos = torch.stack(torch.meshgrid(r, c, indexing="ij"), dim=-1).reshape(-1, 2)  # (N, 2)
    d2 = ((pos[:, None, :] - pos[None, :, :]) ** 2).sum(-1)  # (N, N)
    g = torch.exp(-d2 / (2 * std**2))
    out = torch.zeros(num_prefix + h * w, num_prefix + h * w, device=device, dtype=torch.float64)
    out[num_prefix:, num_prefix:] = g
    return out.to(dtype or torch.get_default_dtype())


def custom_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str, scale: float | None,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """``A v`` for a replaced attention ``mode`` on per-head ``q, k, v (B, H, N, d)`` -> ``(B, H, N, d)``.

    ``scale`` multiplies the logits (``None`` = no scale); ``bias (N, N)`` is added to the kk logits
    (``naclip``).
    """
    s = 1.0 if scale is None else scale

    def sm(a, b):
        logits = (a @ b.transpose(-1, -2)) * s  # (B, H, N, N)
        return logits

    if mode == "qq":
        attn = sm(q, q).softmax(-1)
    elif mode == "kk":
        attn = sm(k, k).softmax(-1)
    elif mode == "csa":
        attn = sm(q, q).softmax(-1) + sm(k, k).softmax(-1)
    elif mode == "naclip":
        if bias is None:
            raise ValueError("naclip needs the Gaussian bias")
        attn = (sm(k, k) + bias.to(k.dtype)).softmax(-1)
    else:
        raise ValueError(f"not an attention mode: {mode!r}; expected one of {ATTENTION_MODES}")
    return attn @ v  # (B, H, N, d)


def proxy_attention(v: torch.Tensor, grid: tuple[int, int], vfm_features: torch.Tensor, beta: float = 1.2,
                    gamma: float = 3.0) -> torch.Tensor:
    """ProxyCLIP's proxy attention: CLIP's patch values aggregated with the VFM's patch affinities.

    ``v (B, H, N, d)``: per-head values of the CLIP's ``N = h * w`` patch tokens (prefix tokens dropped),
    ``grid = (h, w)``; ``vfm_features (B, C, h', w')``: the VFM's patch features (ProxyCLIP: the last block's
    normalised output, ``get_intermediate_layers(...)[0]``, prefix tokens dropped). Returns ``(B, H, M, d)`` on
    the VFM grid, ``M = h' * w'``:

    ``S = f f^T`` with ``f`` the L2-normalised VFM features ``(B, M, M)``; ``L = gamma * (S - beta * mean(S))``;
    entries ``L < 0`` masked (``-inf``); ``A = softmax(L)`` (the same for every head); ``v'`` = the values as an
    ``(h, w)`` map bilinearly resized to ``(h', w')`` (``align_corners=False``); output ``A v'``
    (``mc-lan/ProxyCLIP:open_clip/transformer.py`` ``custom_attn``; defaults ``beta=1.2, gamma=3.0`` of
    ``proxyclip_segmentor.py``).

    Differences, both invisible in ProxyCLIP's own setting (one square window per batch): ``mean(S)`` is taken
    per image (the public code takes it over the whole batch, which holds one window there); the values are
    laid out as ``(h, w)`` (the public code reshapes them as ``(w, h)``, the same on square windows). Guard of
    ours: a row with every entry masked (only when ``beta * mean(S) >= 1``; the public code gives NaN there)
    attends to its own token alone.
    """
    B, Hh, N, d = v.shape
    h, w = grid
    if N != h * w:
        raise ValueError(f"proxy_attention: {N} value tokens for a {h}x{w} grid")
    if vfm_features.ndim != 4 or vfm_features.shape[0] != B:
        raise ValueError(f"vfm_features must be (B={B}, C, h', w'), got {tuple(vfm_features.shape)}")
    hp, wp = vfm_features.shape[-2:]
    dt = torch.promote_types(torch.promote_types(vfm_features.dtype, v.dtype), torch.float32)  # fp32 or fp64
    f = F.normalize(vfm_features.flatten(2).to(dt), dim=1)  # (B, C, M)
    sim = torch.einsum("bcm,bcn->bmn", f, f)  # (B, M, M)
    logits = (sim - sim.mean(dim=(1, 2), keepdim=True) * beta) * gamma
    logits = logits.masked_fill(logits < 0, float("-inf"))
    dead = torch.isneginf(logits).all(-1)  # (B, M) rows with nothing left
    if bool(dead.any()):
        eye = torch.eye(logits.shape[-1], dtype=torch.bool, device=logits.device)
        logits = torch.where(dead[..., None] & eye, torch.zeros_like(logits), logits)
    attn = logits.softmax(-1).to(v.dtype)  # (B, M, M)
    vmap = v.reshape(B * Hh, h, w, d).permute(0, 3, 1, 2)  # (B*H, d, h, w)
    if (hp, wp) != (h, w):
        vmap = F.interpolate(vmap, size=(hp, wp), mode="bilinear", align_corners=False)
    vv = vmap.permute(0, 2, 3, 1).reshape(B, Hh, hp * wp, d)  # (B, H, M, d)
    return attn[:, None] @ vv  # (B, H, M, d)


def _finish(ad: ViTAdapter, tokens: torch.Tensor, grid: tuple[int, int], normalize: bool) -> torch.Tensor:
    x = ad.final(tokens[:, ad.num_prefix:])  # (B, N, C)
    if normalize:
        x = F.normalize(x, dim=-1)
    B, N, C = x.shape
    return x.transpose(1, 2).reshape(B, C, grid[0], grid[1])  # (B, C, h, w)


def dense_features(
    model: nn.Module | ViTAdapter,
    images: torch.Tensor,
    mode: str = "x+v",
    normalize: bool = True,
    *,
    scale: bool | None = None,
    residual: bool | None = None,
    ffn: bool | None = None,
    rope: bool | None = None,
    gaussian_std: float = 5.0,
    n_layers: int = 3,
    pos_interp: str | None = None,
    vfm_features: torch.Tensor | None = None,
    beta: float = 1.2,
    gamma: float = 3.0,
    return_qkv: bool = False,
):
    """Dense projected features ``(B, C, h, w)`` of ``images (B, 3, H, W)`` (see the module table).

    Args:
        model: an open_clip model, its ``.visual``, or a :class:`ViTAdapter`.
        images: normalised images; H and W multiples of the patch size (any size: pos-emb interpolated).
        mode: one of :data:`DENSE_MODES`.
        normalize: L2-normalise every token over channels.
        scale, residual, ffn, rope: switches of the attention modes (defaults True, False, False, False).
        gaussian_std: NACLIP's Gaussian std in patch units.
        n_layers: number of last blocks whose values ``multi-v`` sums.
        pos_interp: position-embedding interpolation off the native grid (``ovlib.models.adapter``
            ``POS_INTERPOLATIONS``; ``None`` = the adapter's own, ``"size"`` for a model).
        vfm_features, beta, gamma: ``proxy`` only: the VFM's patch features ``(B, C', h', w')`` of the same
            images and ProxyCLIP's similarity shift/scale (:func:`proxy_attention`); the output is on the
            VFM's grid ``(h', w')``. The values come from the last block's input; no residual, no FFN.
        return_qkv: also return the last block's per-head ``{"q", "k", "v"}`` of the patch tokens
            ``(B, H, N, d)``, prefix tokens dropped, e.g. DeCLIP's context features. RoPE (EVA) is applied to
            them in ``vanilla`` (as the model does) and in attention modes with ``rope=True``, else not.

    Returns:
        ``(B, C, h, w)`` or, with ``return_qkv``, ``((B, C, h, w), dict)``.
    """
    if mode not in DENSE_MODES + VFM_MODES:
        raise ValueError(f"unknown dense mode {mode!r}; expected one of {DENSE_MODES + VFM_MODES}")
    if vfm_features is not None and mode not in VFM_MODES:
        raise TypeError(f"vfm_features applies to the modes {VFM_MODES}, not {mode!r}")
    switches = dict(scale=scale, residual=residual, ffn=ffn, rope=rope)
    if mode not in ATTENTION_MODES and any(v is not None for v in switches.values()):
        given = {k: v for k, v in switches.items() if v is not None}
        raise TypeError(f"mode {mode!r} has no switches (got {given}); they apply to {ATTENTION_MODES}")
    ad = model if isinstance(model, ViTAdapter) else vit_adapter(model)
    if pos_interp is not None:
        ad = ad.with_pos_interp(pos_interp)
    L = ad.num_blocks
    x, grid = ad.embed(images)  # (B, P+N, D)
    rope_table = ad.rope(grid)  # EVA: (N, 2d) or None
    P = ad.num_prefix

    if mode == "multi-v":
        if not 1 <= n_layers <= L:
            raise ValueError(f"n_layers must be in [1, {L}], got {n_layers}")
        first = L - n_layers
        x = ad.run_blocks(x, 0, first, rope_table)
        acc = None
        last_qkv = None
        for i in range(first, L):
            z = ad.ln1(i, x)
            parts = ad.qkv(i, z, which="qkv" if (return_qkv and i == L - 1) else "v")
            y = ad.ls1(i, ad.attn_out(i, parts["v"]))  # (B, P+N, D)
            acc = y if acc is None else acc + y
            if i < L - 1:
                x = ad.block_forward(i, x, rope_table)
            else:
                last_qkv = parts
        out = _finish(ad, acc, grid, normalize)
        return (out, _strip(last_qkv, P)) if return_qkv else out

    x = ad.run_blocks(x, 0, L - 1, rope_table)
    i = L - 1
    if mode == "proxy":
        if vfm_features is None:
            raise ValueError("mode 'proxy' needs vfm_features (the VFM's patch features of the same images)")
        parts = ad.qkv(i, ad.ln1(i, x), which="qkv" if return_qkv else "v")
        o = proxy_attention(parts["v"][:, :, P:], grid, vfm_features, beta, gamma)  # (B, H, M, d)
        y = ad.final(ad.ls1(i, ad.attn_out(i, o)))  # (B, M, C)
        if normalize:
            y = F.normalize(y, dim=-1)
        out = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], *vfm_features.shape[-2:])  # (B, C, h', w')
        return (out, _strip(parts, P)) if return_qkv else out
    if mode == "vanilla":
        y = ad.block_forward(i, x, rope_table)
        if return_qkv:
            qkv = ad.qkv(i, ad.ln1(i, x), rope=rope_table)
        out = _finish(ad, y, grid, normalize)
        return (out, _strip(qkv, P)) if return_qkv else out

    z = ad.ln1(i, x)  # (B, P+N, D)
    if mode in ("x+v", "v"):
        parts = ad.qkv(i, z, which="qkv" if return_qkv else "v")
        a = ad.ls1(i, ad.attn_out(i, parts["v"]))  # (B, P+N, D)
        if mode == "x+v":
            y = x + a
            y = y + ad.ls2(i, ad.mlp(i, ad.ln2(i, y)))
        else:
            y = a
        out = _finish(ad, y, grid, normalize)
        return (out, _strip(parts, P)) if return_qkv else out

    # attention modes
    scale = True if scale is None else scale
    residual = False if residual is None else residual
    ffn = False if ffn is None else ffn
    rope = False if rope is None else rope
    if rope and rope_table is None:
        raise ValueError("rope=True needs a tower with RoPE (EVA02)")
    parts = ad.qkv(i, z, rope=rope_table if rope else None)
    bias = naclip_bias(grid, P, gaussian_std, device=z.device, dtype=z.dtype) if mode == "naclip" else None
    o = custom_attention(parts["q"], parts["k"], parts["v"], mode, ad.attn_scale if scale else None, bias)
    a = ad.ls1(i, ad.attn_out(i, o))
    y = x + a if residual else a
    if ffn:
        y = y + ad.ls2(i, ad.mlp(i, ad.ln2(i, y)))
    out = _finish(ad, y, grid, normalize)
    return (out, _strip(parts, P)) if return_qkv else out


def _strip(parts: dict[str, torch.Tensor], P: int) -> dict[str, torch.Tensor]:
    return {k: v[:, :, P:] for k, v in parts.items()}
