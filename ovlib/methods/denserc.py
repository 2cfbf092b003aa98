"""DenseRC: dense representations constructed from multi-layer values (CVPR'26, ``papers/001_…``).

The paper text we hold (a structured summary of the CVPR paper, ``reference/implementations.md`` §5) numbers no
equations; we number them in order of appearance and cite those numbers everywhere:

=====  ==============================================================================================
(1)    ``c^(l) = c^(l-1) + Proj(Attn^(l) v^(l))`` -- the cls update of one block (MLP read as intra-token)
(2)    ``c^(L) = c^(0) + sum_l A^(l) v^(l)`` -- (1) unrolled over all L blocks ("yields:"); checked
       numerically, with the MLP terms kept, in :mod:`ovlib.methods.derivation`
(3)    ``X_dense = sum_l A_p^(l) v_p^(l)`` -- the student's dense map has the form of (2)
(4)    ``c_r = sum_l M^(l) v_r^(l) + eps_r`` -- the teacher target of region r (ΔL analysis)
(5)    ``v~_r^(S) = sum_j S_rj P v_j`` (spatial-head fusion), ``v~_r^(H) = W v_r`` (head-only)
(6)    ``ΔL = L^(S) - L^(H) = sum_{j in U_r} S_rj^2 E||P v_j||^2 > 0``
(7)    HSG: ``v = W_v(LN(x)) in R^{H x N x D/H}``, ``A_p = sigmoid(W_H(LN(x))) in R^{N x H}``, one ``W_H``
       shared across the used layers; no spatial aggregation
(8)    ``L_total = L_semantics + lambda * L_coherence``, ``lambda = 0.025``
=====  ==============================================================================================

What is built here (one construction, every Table-5 ablation selectable through :class:`DenseRCConfig`):

* ``base`` (``v_p``): ``"multi-v"`` (ours, default) -- the values of the last ``n_layers`` blocks (3; ``"all"``
  = every block), each from its own block input ``x^(l)``: ``v^(l) = W_v^(l) LN1^(l)(x^(l))``;
  ``"v"`` -- the last block's value only (= ``multi-v`` with one layer); ``"x+v"`` -- CLIPSelf's last-block
  spatial output (value path + residual + FFN; ``construct`` must be ``"none"``).
* ``construct`` (``A_p``): ``"none"`` (plain sum); ``"hsg"`` (7); ``"qk"`` -- each layer's own self-attention
  ``softmax(q k^T / sqrt(d)) v`` (vanilla CLIP: scaled, RoPE on EVA as the model does); ``"qq"`` -- DeCLIP's
  self-self attention ``softmax(q q^T) v`` (no scale, no RoPE, as ``xiaomoguhz/DeCLIP`` ``main``,
  ``reference/implementations.md`` §3.2); ``attn_scale`` overrides the scale of either.
* ``n_layers`` in ``{1, 2, 3, 4, …, "all"}``; ``lambda`` is the ``coherence`` entry of the recipe's
  ``loss_weights`` (the trainer weights the terms; :class:`DenseRC` returns them unweighted).

Choices where the paper is silent (``reference/implementations.md`` §5 "Not available"), each selectable:

* **How each layer's values reach the joint space** (``projection``). ``"own"`` (default): layer ``l``'s
  (gated / aggregated) values go through *that layer's* output projection and layer scale,
  ``y^(l) = ls1^(l)(O^(l)(A_p^(l) v^(l)))`` -- exactly the term the layer adds to the cls token in (1)/(2) --
  the ``y^(l)`` are summed in the residual-stream basis and the sum goes once through the tower's final norm and
  projection (as :func:`~ovlib.models.dense.dense_features` ``multi-v``). ``"final_each"``: every ``y^(l)``
  goes through the final norm and projection separately and the results are summed in the joint space (each
  layer normalised on its own, so layers weigh alike whatever their norms).
* **How gates combine** (``gate_source``, ``shared_gate``). ``"own"`` (default): every used layer gets its own
  gates ``A_p^(l) = sigmoid(W_H LN1^(l)(x^(l)))`` -- the same ``LN(x)`` its values are computed from, through the
  one shared ``W_H`` -- which multiply that layer's heads token by token before ``O^(l)``; the gated layers are then
  summed as in (3). ``"last"``: one gate map from the last used layer's ``LN(x)``, applied to every layer's
  heads (gates tied across layers). ``shared_gate=False``: one ``W_H`` per layer (ablates the sharing).
* **W_H initialisation**: weight 0, bias ``gate_bias_init`` (0), so every gate starts at ``sigmoid(b) = 0.5``
  (the steepest point of the sigmoid): all values are scaled alike, the output-projection biases are not, so the
  starting map is close to, not equal to, ``multi-v`` (a large ``b`` gives exactly ``multi-v`` but saturated gates).
* **L_semantics** (8): CLIPSelf's RLA ``1 - mean_r cos`` on RoIAlign 1x1 of the L2-normalised map
  (normalise-then-pool, ``pool="normalize_first"``, ``wusize/CLIPSelf`` convention, the grid recipe DenseRC
  trains with) or pool-then-normalise (``"pool_first"``, DeCLIP's).
* **L_coherence** (8): ``mean_{b,m,n} (S_s - S_t)^2`` of the cosine patch-correlation matrices of ``X_dense``
  (the projected map, the same stream as ``L_semantics``) and of the frozen VFM on its own grid (the student's
  tokens bilinearly resized to it when the grids differ, as :mod:`ovlib.methods.declip`).

Prefix (cls) tokens take part in ``qk``/``qq`` aggregation and are dropped afterwards. Parameters: ``hsg`` adds
exactly ``W_H`` (``D*H + H``; ``(D*H + H) * n`` with ``shared_gate=False``); the other constructions add none.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ovlib.io import safe_load
from ovlib.methods.base import Distiller
from ovlib.methods.clipself import rla_loss
from ovlib.methods.declip import resize_tokens, vfm_grid
from ovlib.models import dense_features, patch_correlation, roi_features, vfm_patch_features
from ovlib.models.adapter import ViTAdapter, vit_adapter
from ovlib.models.images import image_mean_std, normalize_images, to_model

__all__ = [
    "gate_statistics",
    "BASES",
    "CONSTRUCTS",
    "GATE_SOURCES",
    "HSG",
    "POOLS",
    "PROJECTIONS",
    "TABLE5",
    "DenseConstructor",
    "DenseRC",
    "DenseRCConfig",
    "ValueStack",
    "coherence_loss",
    "denserc_dense_fn",
    "load_constructor",
    "semantics_loss",
    "spatial_aggregate",
    "table5_rows",
    "vfm_similarity",
]

BASES = ("x+v", "v", "multi-v")
CONSTRUCTS = ("none", "qk", "qq", "hsg")
PROJECTIONS = ("own", "final_each")
GATE_SOURCES = ("own", "last")
POOLS = ("normalize_first", "pool_first")


# ------------------------------------------------------------------------------------------------ Table 5
#: The paper's Table 5 (base ``v_p`` x construction ``A_p``) as ``method_args``. Every row trains at one
#: learning rate -- the paper gives a single one -- so every row pins ``gate_lr_mult = 1`` (it acts on HSG's
#: ``W_H`` only) whatever the recipe says (a recipe's method_args are merged under a row's).
TABLE5: dict[str, dict[str, Any]] = {
    "x+v": {"base": "x+v", "construct": "none", "n_layers": 1, "gate_lr_mult": 1.0},
    "v": {"base": "v", "construct": "none", "n_layers": 1, "gate_lr_mult": 1.0},
    "multi-v": {"base": "multi-v", "construct": "none", "n_layers": 3, "gate_lr_mult": 1.0},
    "qk": {"base": "multi-v", "construct": "qk", "n_layers": 3, "gate_lr_mult": 1.0},
    "qq": {"base": "multi-v", "construct": "qq", "n_layers": 3, "gate_lr_mult": 1.0},
    "HSG": {"base": "multi-v", "construct": "hsg", "n_layers": 3, "gate_lr_mult": 1.0},
}


def table5_rows(gate_lr_mult: float = 1.0) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """``(parity rows, extra rows)``: the :data:`TABLE5` rows, every one at the recipe's learning rate, and --
    when a recipe trains ``W_H`` faster (``gate_lr_mult != 1``, the micro recipe) -- that setting as its own,
    labelled row ``"HSG, W_H lr × m"``, kept out of the comparison between constructions."""
    if not gate_lr_mult > 0:
        raise ValueError(f"gate_lr_mult must be > 0, got {gate_lr_mult!r}")
    rows = {k: dict(v) for k, v in TABLE5.items()}
    extra = {}
    if gate_lr_mult != 1.0:
        extra[f"HSG, W_H lr × {gate_lr_mult:g}"] = {**TABLE5["HSG"], "gate_lr_mult": float(gate_lr_mult)}
    return rows, extra


# ------------------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class DenseRCConfig:
    """The dense construction (see the module docstring). ``n_layers``: ``None`` = 3 for ``multi-v`` (the
    paper's), 1 for ``v``/``x+v``; an int; or ``"all"`` / ``-1`` = every block. ``attn_scale``: ``None`` =
    ``qk`` scaled by ``d^-1/2``, ``qq`` unscaled (DeCLIP ``main``)."""

    base: str = "multi-v"
    construct: str = "hsg"
    n_layers: int | str | None = None
    projection: str = "own"
    gate_source: str = "own"
    shared_gate: bool = True
    gate_bias_init: float = 0.0
    attn_scale: bool | None = None
    pool: str = "normalize_first"
    gate_lr_mult: float = 1.0   # learning-rate multiplier of W_H (the paper trains it at the tower's lr: 1.0);
    #                             the micro recipe raises it because its runs are ~1000x shorter than the paper's

    def __post_init__(self):
        for name, allowed in (("base", BASES), ("construct", CONSTRUCTS), ("projection", PROJECTIONS),
                              ("gate_source", GATE_SOURCES), ("pool", POOLS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"denserc {name} must be one of {allowed}, got {getattr(self, name)!r}")
        n = self.n_layers
        if n is not None and n != "all" and not (isinstance(n, int) and (n >= 1 or n == -1)):
            raise ValueError(f"denserc n_layers must be a positive int, 'all' or -1; got {n!r}")
        if self.base in ("v", "x+v") and n not in (None, 1):
            raise ValueError(f"denserc base {self.base!r} uses the last block only; n_layers must be 1, got {n!r}")
        if not self.gate_lr_mult > 0:
            raise ValueError(f"denserc gate_lr_mult must be > 0, got {self.gate_lr_mult!r}")
        if self.base == "x+v" and self.construct != "none":
            raise ValueError("denserc base 'x+v' (residual + FFN kept, no heads left) needs construct='none'; "
                             f"got {self.construct!r}")

    def layers(self, num_blocks: int) -> list[int]:
        """Indices of the used blocks (the last ``n``)."""
        n = self.n_layers
        if n is None:
            n = 3 if self.base == "multi-v" else 1
        if n in ("all", -1):
            n = num_blocks
        if n > num_blocks:
            raise ValueError(f"denserc n_layers={n} exceeds the tower's {num_blocks} blocks")
        return list(range(num_blocks - n, num_blocks))

    @classmethod
    def take(cls, options: dict[str, Any]) -> DenseRCConfig:
        """Pop this config's fields out of ``options`` (``DistillConfig.method_args``) and build it."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: options.pop(k) for k in list(options) if k in names})


# ------------------------------------------------------------------------------------------------ modules
class HSG(nn.Module):
    """Head Selection Gating, Eq. (7): ``A_p = sigmoid(W_H LN(x))``, ``(B, T, D) -> (B, T, H)``.

    ``slots`` linear maps ``W_H: D -> H`` (1 = shared across layers, the paper's). Weight initialised to 0 and
    bias to ``bias_init``, so every gate starts at ``sigmoid(bias_init)``."""

    def __init__(self, width: int, heads: int, slots: int = 1, bias_init: float = 0.0):
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(width, heads) for _ in range(slots))
        with torch.no_grad():
            for lin in self.proj:
                lin.weight.zero_()
                lin.bias.fill_(bias_init)

    def forward(self, z: torch.Tensor, slot: int = 0) -> torch.Tensor:
        return torch.sigmoid(self.proj[slot](z))  # (B, T, H)


@dataclass
class ValueStack:
    """What the construction reads from the used blocks ``layers`` (lists aligned with ``layers``).

    ``z[i] (B, P+N, D)`` = ``LN1(x^(l))`` of block ``l``'s input; ``v[i] (B, H, P+N, d)`` its values;
    ``q[i]``, ``k[i]`` (``qk``/``qq`` only, else ``None``); ``grid = (h, w)``; ``num_prefix = P``.
    The ``v`` may be replaced by leaf tensors (gradient analyses) before :meth:`DenseConstructor.construct`."""

    layers: list[int]
    z: list[torch.Tensor]
    v: list[torch.Tensor]
    q: list[torch.Tensor | None]
    k: list[torch.Tensor | None]
    grid: tuple[int, int]
    num_prefix: int


def spatial_aggregate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """``softmax(q k^T [* scale]) v`` per head: ``q, k, v (B, H, T, d) -> (B, H, T, d)`` (``k = q`` for ``qq``)."""
    logits = q @ k.transpose(-1, -2)  # (B, H, T, T)
    if scale is not None:
        logits = logits * scale
    return logits.softmax(-1) @ v


class DenseConstructor(nn.Module):
    """``X_dense`` of Eq. (3) for a CLIP image tower: values of the used blocks, ``A_p``, projection.

    Holds the HSG gates (``construct="hsg"``) and nothing of the tower; the tower is passed to every call
    (an open_clip model, its ``.visual`` or a :class:`~ovlib.models.adapter.ViTAdapter`)."""

    def __init__(self, config: DenseRCConfig, width: int, heads: int, num_blocks: int):
        super().__init__()
        self.config = config
        self.num_blocks = num_blocks
        self.used = config.layers(num_blocks)
        self.hsg: HSG | None = None
        if config.construct == "hsg":
            slots = 1 if (config.shared_gate or config.gate_source == "last") else len(self.used)
            self.hsg = HSG(width, heads, slots, config.gate_bias_init)

    @classmethod
    def for_model(cls, config: DenseRCConfig, model: nn.Module | ViTAdapter) -> DenseConstructor:
        ad = model if isinstance(model, ViTAdapter) else vit_adapter(model)
        return cls(config, ad.width, ad.num_heads, ad.num_blocks)

    def _adapter(self, model) -> ViTAdapter:
        ad = model if isinstance(model, ViTAdapter) else vit_adapter(model)
        if ad.num_blocks != self.num_blocks:
            raise ValueError(f"constructor built for {self.num_blocks} blocks, tower has {ad.num_blocks}")
        return ad

    # ------------------------------------------------------------------------------------------ pieces
    def values(self, model, images: torch.Tensor) -> ValueStack:
        """Run the tower up to the last used block and collect ``z``, ``v`` (and ``q``, ``k``) of each used block.

        Blocks before the last one run with the model's own code; the last block contributes its values only."""
        cfg = self.config
        if cfg.base == "x+v":
            raise ValueError("base 'x+v' has no value stack (it is the last block's spatial output)")
        ad = self._adapter(model)
        x, grid = ad.embed(images)  # (B, P+N, D)
        rope = ad.rope(grid)
        first, L = self.used[0], ad.num_blocks
        x = ad.run_blocks(x, 0, first, rope)
        which = {"none": "v", "hsg": "v", "qk": "qkv", "qq": "qv"}[cfg.construct]
        zs, vs, qs, ks = [], [], [], []
        for i in self.used:
            z = ad.ln1(i, x)  # (B, P+N, D)
            parts = ad.qkv(i, z, rope=rope if cfg.construct == "qk" else None, which=which)  # (B, H, P+N, d)
            zs.append(z)
            vs.append(parts["v"])
            qs.append(parts.get("q"))
            ks.append(parts.get("k"))
            if i < L - 1:
                x = ad.block_forward(i, x, rope)
        return ValueStack(list(self.used), zs, vs, qs, ks, grid, ad.num_prefix)

    def gates(self, stack: ValueStack) -> list[torch.Tensor | None]:
        """Per used layer the gates ``(B, P+N, H)`` of Eq. (7) (``None`` without HSG)."""
        if self.hsg is None:
            return [None] * len(stack.layers)
        if self.config.gate_source == "last":
            g = self.hsg(stack.z[-1], 0)
            return [g] * len(stack.layers)
        return [self.hsg(z, 0 if len(self.hsg.proj) == 1 else s) for s, z in enumerate(stack.z)]

    def layer_values(self, stack: ValueStack, model=None) -> list[torch.Tensor]:
        """``A_p^(l) v^(l)`` per used layer, ``(B, H, P+N, d)``: gated (HSG), aggregated (qk/qq) or as is."""
        cfg = self.config
        out = []
        gates = self.gates(stack)
        for s, v in enumerate(stack.v):
            if cfg.construct == "hsg":
                v = v * gates[s].transpose(1, 2).unsqueeze(-1)  # (B, H, T, d) * (B, H, T, 1)
            elif cfg.construct in ("qk", "qq"):
                default = cfg.construct == "qk"
                use_scale = default if cfg.attn_scale is None else cfg.attn_scale
                d = v.shape[-1]
                q = stack.q[s]
                k = stack.k[s] if cfg.construct == "qk" else q
                v = spatial_aggregate(q, k, v, d ** -0.5 if use_scale else None)
            out.append(v)
        return out

    def construct(self, model, stack: ValueStack) -> torch.Tensor:
        """Projected, unnormalised patch tokens ``(B, N, C)`` of ``X_dense`` from a value stack."""
        ad = self._adapter(model)
        P = stack.num_prefix
        acc = None
        for blk, v in zip(stack.layers, self.layer_values(stack)):
            y = ad.ls1(blk, ad.attn_out(blk, v))  # (B, P+N, D): what block blk adds to the stream from these values
            if self.config.projection == "final_each":
                y = ad.final(y[:, P:])  # (B, N, C)
            acc = y if acc is None else acc + y
        return acc if self.config.projection == "final_each" else ad.final(acc[:, P:])

    def forward(self, model, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """``X_dense`` of ``images (B, 3, H, W)`` as a map ``(B, C, h, w)`` (L2-normalised per token if asked)."""
        if self.config.base == "x+v":
            return dense_features(self._adapter(model), images, "x+v", normalize=normalize)
        stack = self.values(model, images)
        tokens = self.construct(model, stack)  # (B, N, C)
        if normalize:
            tokens = F.normalize(tokens, dim=-1)
        B, N, C = tokens.shape
        h, w = stack.grid
        return tokens.transpose(1, 2).reshape(B, C, h, w)

    @torch.no_grad()
    def gate_maps(self, model, images: torch.Tensor) -> torch.Tensor:
        """HSG gates of the patch tokens of ``images``: ``(B, n_used, N, H)`` (layer order = :attr:`used`)."""
        if self.hsg is None:
            raise ValueError(f"construct={self.config.construct!r} has no gates")
        stack = self.values(model, images)
        P = stack.num_prefix
        return torch.stack([g[:, P:] for g in self.gates(stack)], 1)

    def unused_tower_parameters(self, model) -> list[nn.Parameter]:
        """Tower parameters that can never reach ``X_dense``: the last block's FFN branch (``ln_2``/``norm2``,
        ``mlp``, ``ls_2``/``gamma_2``) and its separate ``q``/``k`` projections, norms and biases (EVA, open_clip's
        custom attention) when ``construct`` reads no q/k there. Frozen by :class:`DenseRC` so that DDP, which
        needs every trainable parameter to receive a gradient, runs; a fused ``in_proj`` stays trainable."""
        if self.config.base == "x+v":
            return []
        ad = self._adapter(model)
        last = ad.block(ad.num_blocks - 1)
        mods = [getattr(last, n) for n in ("ln_2", "norm2", "mlp", "ls_2")
                if isinstance(getattr(last, n, None), nn.Module)]
        params = [p for m in mods for p in m.parameters()]
        if isinstance(getattr(last, "gamma_2", None), nn.Parameter):
            params.append(last.gamma_2)
        unused = {"none": "qk", "hsg": "qk", "qq": "k", "qk": ""}[self.config.construct]
        a = last.attn  # earlier used blocks also run whole (their output feeds the next block)
        for which in unused:  # separate q/k projections, their norms and biases (EVA, open_clip custom)
            for n in (f"{which}_proj", f"{which}_norm", f"ln_{which}", f"{which}_bias"):
                m = getattr(a, n, None)
                if isinstance(m, nn.Parameter):
                    params.append(m)
                elif isinstance(m, nn.Module):
                    params.extend(m.parameters())
        return params


# ------------------------------------------------------------------------------------------------ losses
def semantics_loss(student_rois: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``L_semantics`` of Eq. (8): ``1 - mean_r cos(s_r, t_r)`` for ``(R, C)`` region features of ``X_dense``
    and the frozen teacher's crop CLS embeddings (CLIPSelf's RLA, :func:`~ovlib.methods.clipself.rla_loss`)."""
    return rla_loss(student_rois, teacher)


def coherence_loss(student_sim: torch.Tensor, teacher_sim: torch.Tensor) -> torch.Tensor:
    """``L_coherence`` of Eq. (8): ``mean_{b,m,n} (S_s[b,m,n] - S_t[b,m,n])^2`` for ``(B, M, M)`` patch
    correlation matrices (an MSE over every entry). 0 iff the matrices are equal."""
    if student_sim.ndim != 3 or student_sim.shape != teacher_sim.shape:
        raise ValueError(f"student_sim and teacher_sim must both be (B, M, M); got {tuple(student_sim.shape)} and "
                         f"{tuple(teacher_sim.shape)}")
    return (student_sim.float() - teacher_sim.float()).pow(2).mean()


@torch.no_grad()
def vfm_similarity(vfm: nn.Module, vfm_images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """The VFM's cosine patch-correlation matrix ``(B, M, M)`` on its own grid of ``vfm_images``, and that grid."""
    grid = vfm_grid(vfm, vfm_images)
    return patch_correlation(vfm_patch_features(vfm, vfm_images, grid).float()), grid


# ------------------------------------------------------------------------------------------------ method
class DenseRC(Distiller):
    """DenseRC self-distillation: ``semantics`` and ``coherence`` terms (unweighted; ``lambda`` = the recipe's
    ``loss_weights["coherence"]``, 0.025 in the paper) on the same stream ``X_dense``.

    Options (``DistillConfig.method_args``): the fields of :class:`DenseRCConfig`. Batch keys: ``images``,
    ``boxes``, ``crops``, ``vfm_images``. Extra trainable module: ``constructor.hsg`` (``W_H``) with HSG.
    Tower parameters that cannot reach ``X_dense`` are frozen (:meth:`DenseConstructor.unused_tower_parameters`)."""

    name = "denserc"
    loss_names = ("semantics", "coherence")
    needs = frozenset({"teacher", "vfm"})

    option_types = (DenseRCConfig,)

    def __init__(self, student, frozen, **options: Any):
        cfg = DenseRCConfig.take(options)
        unknown = sorted(set(options) - {"tokenizer", "categories"})
        if unknown:
            raise TypeError(f"method 'denserc' got unknown option(s) {unknown}; options are the fields of "
                            f"DenseRCConfig {[f.name for f in dataclasses.fields(DenseRCConfig)]}")
        super().__init__(student, frozen, **options)
        self.config = cfg
        self.constructor = DenseConstructor.for_model(cfg, student)
        for p in self.constructor.unused_tower_parameters(student):
            p.requires_grad_(False)

    def lr_multipliers(self) -> dict[str, float]:
        """``W_H`` at ``gate_lr_mult`` times the recipe's lr (HSG only)."""
        if self.config.construct == "hsg" and self.config.gate_lr_mult != 1.0:
            return {"constructor.hsg": self.config.gate_lr_mult}
        return {}

    def student_dense(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalised ``X_dense`` ``(B, C, h, w)``."""
        return self.constructor(self.student, images, normalize=False)

    def losses(self, batch: dict[str, Any], dense: torch.Tensor) -> dict[str, torch.Tensor]:
        images = batch["images"]  # (B, 3, S, S)
        src = F.normalize(dense, dim=1) if self.config.pool == "normalize_first" else dense
        rois = roi_features(src, batch["boxes"], images.shape[-2:])  # (R, C)
        teacher = self.teacher_crop_cls(batch["crops"])  # (R, C) CLS of each crop, no grad
        vfm, vfm_images = self.frozen["vfm"], batch["vfm_images"]
        grid = vfm_grid(vfm, vfm_images)
        feats = self.frozen_call("vfm.patch_features", vfm, lambda x: vfm_patch_features(vfm, x, grid),
                                 vfm_images)  # (B, C_v, h', w'), cached per image (shared with DeCLIP/SynCLIP)
        vfm_sim = patch_correlation(feats.float())  # (B, M, M), as vfm_similarity
        tokens = dense.flatten(2).transpose(1, 2)  # (B, N, C)
        tokens = resize_tokens(tokens, tuple(dense.shape[-2:]), grid)  # (B, M, C)
        return {"semantics": semantics_loss(rois, teacher),
                "coherence": coherence_loss(patch_correlation(tokens.float()), vfm_sim)}

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if "vfm_images" not in batch:
            raise KeyError(f"{self.name} needs batch['vfm_images'] (set vfm=... in the recipe)")
        return self.losses(batch, self.student_dense(batch["images"]))


# ------------------------------------------------------------------------------------------------ evaluation
def load_constructor(source: str | os.PathLike | dict, model: nn.Module, **method_args: Any
                     ) -> DenseConstructor:
    """The :class:`DenseConstructor` of a trained run: built from ``method_args`` (the run's
    ``DistillConfig.method_args``) for ``model``, with the ``constructor.*`` weights of ``source`` (a checkpoint
    path such as ``ensemble-final.pt`` / ``last.pt``, or its loaded dict). Eval mode, no gradients."""

    cfg = DenseRCConfig.take(dict(method_args))
    cons = DenseConstructor.for_model(cfg, model)
    ck = source if isinstance(source, dict) else safe_load(source)
    sd = ck["model"] if isinstance(ck.get("model"), dict) else ck
    sub = {k[len("constructor."):]: v for k, v in sd.items() if k.startswith("constructor.")}
    cons.load_state_dict(sub, strict=True)
    return cons.eval().requires_grad_(False)


def denserc_dense_fn(model: nn.Module, constructor: DenseConstructor, mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``images (B, 3, H, W) in [0, 1] -> (B, C, h, w)`` unit-norm ``X_dense`` (for :mod:`ovlib.eval`)."""
    if mean is None or std is None:
        mean, std = image_mean_std(model)
    ad = vit_adapter(model)

    def fn(images: torch.Tensor) -> torch.Tensor:
        return constructor(ad, normalize_images(to_model(images, model), mean, std), normalize=True)

    return fn


@torch.no_grad()
def gate_statistics(constructor: DenseConstructor, model, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """HSG gates of every image of ``batches`` (an iterable of normalised ``(B, 3, H, W)`` images): per image,
    the mean over its patch tokens and the standard deviation over them, each ``(I, n_used, H)`` (float64; layer
    order = ``constructor.used``)."""
    means, stds = [], []
    for x in batches:
        g = constructor.gate_maps(model, x).cpu().double()  # (B, n_used, N, H)
        means.append(g.mean(2))
        stds.append(g.std(2))
    if not means:
        raise ValueError("gate_statistics: no images")
    return torch.cat(means), torch.cat(stds)
