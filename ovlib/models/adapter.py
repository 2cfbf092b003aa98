"""One interface over the image towers of open_clip's native ViT and of EVA02 (timm ``Eva`` in open_clip).

Every dense method needs the same pieces of a CLIP image tower: tokens at any resolution, the blocks one by
one, per-block per-head q/k/v, the attention output projection, layer scale, MLP, the final norm and the
projection to the joint space. :class:`ViTAdapter` exposes exactly these, reading the real modules of the
installed open_clip / timm (no model is edited or forked); open_clip name first, timm ``Eva`` second:

* patch embedding -- open_clip ``conv1``; EVA ``trunk.patch_embed.proj`` (+ ``.norm``).
* cls / position embedding -- ``class_embedding``, ``positional_embedding``; ``trunk.cls_token``
  (+ ``reg_token``), ``trunk.pos_embed``. Pre-norm: ``ln_pre``; ``trunk.norm_pre``.
* RoPE -- EVA only: ``trunk.rope`` (timm ``RotaryEmbeddingCat``), rebuilt for the actual grid.
* block i -- ``transformer.resblocks[i]``; ``trunk.blocks[i]``. Norms before attention / MLP: ``ln_1``/``ln_2``;
  ``norm1``/``norm2``.
* q, k, v -- rows ``[0:D]``, ``[D:2D]``, ``[2D:3D]`` of ``attn.in_proj_weight``/``in_proj_bias``
  (``nn.MultiheadAttention`` or open_clip's custom ``Attention`` with ``ln_q``/``ln_k``); EVA
  ``q_proj``/``k_proj``/``v_proj`` (or fused ``qkv`` with ``q_bias``/``k_bias``/``v_bias``), ``q_norm``/``k_norm``.
* attention output -- ``attn.out_proj`` (custom block: ``head_scale`` and ``ln_inner`` before it, ``ln_attn``
  after it); EVA ``attn.norm`` (the "subln" inner LayerNorm) then ``attn.proj``.
* layer scale -- ``ls_1``/``ls_2``; ``gamma_1``/``gamma_2`` (``None`` = none).
* final norm + projection -- ``ln_post`` then ``@ proj``; ``trunk.norm``, ``trunk.fc_norm``, ``trunk.head`` and
  open_clip's ``head`` (``TimmModel``).

Conventions: tokens are batch first ``(B, P + N, D)`` with ``P`` prefix tokens (cls, then registers) followed
by ``N = h * w`` patch tokens in row-major order; per-head tensors are ``(B, H, P + N, d)``.
The absolute position embedding is bicubically interpolated to the actual grid with the prefix positions kept,
and is the identity at the native grid. Two published variants (:data:`POS_INTERPOLATIONS`, the adapter's
``pos_interp`` option, :func:`interpolate_pos_embed`):

* ``"size"`` (default) -- ``F.interpolate(size=(h, w), mode="bicubic", align_corners=False)``, as
  ``wusize/CLIPSelf:src/open_clip/transformer.py`` ``rescale_positional_embedding`` (and its EVA copy in
  ``.../eva_clip/eva_vit_model.py``), DeCLIP/SynCLIP (forks of it) and MaskCLIP
  (``chongzhou96/MaskCLIP:mmseg/models/backbones/vit.py`` ``resize_pos_embed``);
* ``"scale-factor"`` -- ``F.interpolate(scale_factor=((h + 0.1) / h0, (w + 0.1) / w0), mode="bicubic",
  align_corners=False)`` without recomputing the scale (the output is still ``h x w``, but source coordinates
  are ``(i + 0.5) h0 / (h + 0.1) - 0.5`` instead of ``(i + 0.5) h0 / h - 0.5``): DINO's ``+0.1`` trick as
  used by ``wangf3014/SCLIP:clip/model.py``, ``mc-lan/ClearCLIP:open_clip/transformer.py`` and
  ``sinahmr/NACLIP:clip/model.py`` (``interpolate_pos_encoding``; identity at the native grid in all three).
  Off the native grid the two differ slightly (a fraction of the embedding's scale), which matters only to
  reproduce those repositories' numbers. EVA's RoPE is recomputed for the
actual grid with the tower's own ``RotaryEmbeddingCat`` (positions rescaled to ``ref_feat_shape``, the
timm analogue of CLIPSelf's ``rope.py`` ``recalculate``); it applies to the patch tokens only.
Patch dropout is never applied by the adapter (a dense map needs every token); run the tower in eval mode.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ViTAdapter", "vit_adapter", "UnsupportedTower", "interpolate_pos_embed", "POS_INTERPOLATIONS"]

#: Position-embedding interpolations of the adapter (``pos_interp``); see the module docstring.
POS_INTERPOLATIONS = ("size", "scale-factor")


class UnsupportedTower(TypeError):
    """The image tower is not one the adapter knows how to take apart."""


def interpolate_pos_embed(pos: torch.Tensor, num_prefix: int, old_grid: tuple[int, int],
                          new_grid: tuple[int, int], method: str = "size") -> torch.Tensor:
    """Bicubic interpolation of an absolute position embedding ``(P + h0*w0, D)`` to ``(P + h*w, D)``.

    ``method`` (:data:`POS_INTERPOLATIONS`): ``"size"`` (CLIPSelf, MaskCLIP) or ``"scale-factor"`` (SCLIP,
    ClearCLIP, NACLIP: ``scale_factor = (h + 0.1) / h0``, not recomputed). Prefix rows (cls / registers) are
    kept unchanged; the identity (same tensor) at the native grid for both.
    """
    if method not in POS_INTERPOLATIONS:
        raise ValueError(f"pos_interp must be one of {POS_INTERPOLATIONS}, got {method!r}")
    if tuple(old_grid) == tuple(new_grid):
        return pos
    prefix, grid = pos[:num_prefix], pos[num_prefix:]
    D = pos.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], D).permute(0, 3, 1, 2)  # (1, D, h0, w0)
    if method == "size":
        grid = F.interpolate(grid.float(), size=tuple(new_grid), mode="bicubic", align_corners=False)
    else:
        sf = ((new_grid[0] + 0.1) / old_grid[0], (new_grid[1] + 0.1) / old_grid[1])
        grid = F.interpolate(grid.float(), scale_factor=sf, mode="bicubic", align_corners=False,
                             recompute_scale_factor=False)
        if tuple(grid.shape[-2:]) != tuple(new_grid):  # floor(h0 * (h + 0.1) / h0) = h, as the repos assert
            raise RuntimeError(f"scale-factor interpolation gave {tuple(grid.shape[-2:])}, not {tuple(new_grid)}")
    grid = grid.permute(0, 2, 3, 1).reshape(-1, D).to(pos.dtype)  # (h*w, D)
    return torch.cat([prefix, grid], dim=0)


def _merge_heads(o: torch.Tensor) -> torch.Tensor:
    B, H, N, d = o.shape
    return o.transpose(1, 2).reshape(B, N, H * d)  # (B, N, D)


def _split_heads(x: torch.Tensor, H: int) -> torch.Tensor:
    B, N, D = x.shape
    return x.reshape(B, N, H, D // H).transpose(1, 2)  # (B, H, N, d)


class ViTAdapter:
    """Pieces of a CLIP ViT image tower (open_clip native or EVA02 via timm) behind one interface.

    Build it with :func:`vit_adapter` from an open_clip model or its ``.visual``. All methods are plain
    differentiable torch code over the tower's own parameters (gradients reach the model). ``pos_interp``:
    how :meth:`embed` resamples the absolute position embedding off the native grid (:data:`POS_INTERPOLATIONS`).
    """

    def __init__(self, visual: nn.Module, pos_interp: str = "size"):
        from open_clip.timm_model import TimmModel
        from open_clip.transformer import VisionTransformer

        if pos_interp not in POS_INTERPOLATIONS:
            raise ValueError(f"pos_interp must be one of {POS_INTERPOLATIONS}, got {pos_interp!r}")
        self.pos_interp = pos_interp
        self.visual = visual
        if isinstance(visual, VisionTransformer):
            self.family = "open_clip"
            self._init_open_clip(visual)
        elif isinstance(visual, TimmModel):
            self.family = "eva"
            self._init_eva(visual)
        else:
            raise UnsupportedTower(
                f"unsupported visual tower {type(visual).__name__}: the adapter supports open_clip's "
                f"VisionTransformer and open_clip's TimmModel with a timm Eva (EVA02) trunk"
            )

    # ------------------------------------------------------------------------------------------- setup
    def _init_open_clip(self, v) -> None:
        from open_clip.transformer import Attention, CustomResidualAttentionBlock, ResidualAttentionBlock

        if v.attn_pool is not None:
            raise UnsupportedTower("open_clip VisionTransformer with an attentional pooler (CoCa) is not supported")
        if v.pool_type not in ("tok", "avg"):
            raise UnsupportedTower(f"open_clip VisionTransformer with pool_type={v.pool_type!r} is not supported")
        self.blocks = list(v.transformer.resblocks)
        for i, blk in enumerate(self.blocks):
            if isinstance(blk, ResidualAttentionBlock):
                if not isinstance(blk.attn, nn.MultiheadAttention) or hasattr(blk, "ln_1_kv"):
                    raise UnsupportedTower(f"block {i}: unexpected attention {type(blk.attn).__name__}")
                if blk.attn.in_proj_weight is None:
                    raise UnsupportedTower(f"block {i}: MultiheadAttention with separate q/k/v weights")
            elif isinstance(blk, CustomResidualAttentionBlock):
                assert isinstance(blk.attn, Attention)
                if blk.attn.logit_scale is not None:
                    raise UnsupportedTower(f"block {i}: scaled-cosine attention is not supported")
            else:
                raise UnsupportedTower(f"block {i}: unsupported block type {type(blk).__name__}")
        a0 = self.blocks[0].attn
        self.num_heads = a0.num_heads
        self.width = v.conv1.out_channels
        self.head_dim = self.width // self.num_heads
        self.patch_size = tuple(v.patch_size)
        self.native_grid = tuple(v.grid_size)
        self.num_prefix = 1
        self.batch_first = getattr(v.transformer, "batch_first", True)
        self.out_dim = v.proj.shape[1] if v.proj is not None else self.width

    def _init_eva(self, v) -> None:
        from timm.models.eva import Eva, EvaAttention, EvaBlock

        t = v.trunk
        if not isinstance(t, Eva):
            raise UnsupportedTower(f"TimmModel trunk {type(t).__name__} is not a timm Eva; not supported")
        if getattr(t, "rope_mixed", False):
            raise UnsupportedTower("timm Eva with mixed RoPE is not supported")
        if t.attn_pool is not None:
            raise UnsupportedTower("timm Eva with attention pooling ('map') is not supported")
        if t.rope is not None and type(t.rope).__name__ != "RotaryEmbeddingCat":
            raise UnsupportedTower(f"timm Eva with RoPE {type(t.rope).__name__} is not supported (needs 'cat')")
        self.blocks = list(t.blocks)
        for i, blk in enumerate(self.blocks):
            if type(blk) is not EvaBlock or type(blk.attn) is not EvaAttention:
                raise UnsupportedTower(f"block {i}: {type(blk).__name__}/{type(blk.attn).__name__} is not supported")
            if blk.attn.gate is not None:
                raise UnsupportedTower(f"block {i}: gated attention is not supported")
        a0 = self.blocks[0].attn
        self.num_heads = a0.num_heads
        self.head_dim = a0.head_dim
        self.width = t.embed_dim
        self.patch_size = tuple(t.patch_embed.patch_size)
        self.native_grid = tuple(t.patch_embed.grid_size)
        self.num_prefix = t.num_prefix_tokens
        self.batch_first = True
        head = t.head
        self.out_dim = head.out_features if isinstance(head, nn.Linear) else self.width
        for m in v.head:
            if isinstance(m, nn.Linear):
                self.out_dim = m.out_features

    def with_pos_interp(self, pos_interp: str) -> ViTAdapter:
        """This adapter (same tower, no copy of weights) with another position-embedding interpolation."""
        if pos_interp == self.pos_interp:
            return self
        if pos_interp not in POS_INTERPOLATIONS:
            raise ValueError(f"pos_interp must be one of {POS_INTERPOLATIONS}, got {pos_interp!r}")
        other = copy.copy(self)
        other.pos_interp = pos_interp
        return other

    # ------------------------------------------------------------------------------------------- info
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def block(self, i: int) -> nn.Module:
        return self.blocks[i]

    def grid(self, images: torch.Tensor) -> tuple[int, int]:
        """Token grid ``(h, w)`` of ``images (B, 3, H, W)``; H and W must be multiples of the patch size."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        H, W = images.shape[-2:]
        ph, pw = self.patch_size
        if H % ph or W % pw:
            raise ValueError(f"image size {(H, W)} is not a multiple of the patch size {self.patch_size}")
        return H // ph, W // pw

    # ------------------------------------------------------------------------------------------- embed
    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Tokens entering block 0: ``(B, P + h*w, D)`` (pre-norm applied) and the grid ``(h, w)``."""
        h, w = self.grid(images)
        v = self.visual
        if self.family == "open_clip":
            x = v.conv1(images)  # (B, D, h, w)
            x = x.flatten(2).transpose(1, 2)  # (B, N, D)
            cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
            x = torch.cat([cls, x], dim=1)  # (B, 1+N, D)
            pos = interpolate_pos_embed(v.positional_embedding, 1, self.native_grid, (h, w),
                                        self.pos_interp)
            x = x + pos.to(x.dtype)
            x = v.ln_pre(x)
        else:
            t = v.trunk
            x = t.patch_embed.proj(images)  # (B, D, h, w)
            x = x.flatten(2).transpose(1, 2)  # (B, N, D)
            x = t.patch_embed.norm(x)
            prefix = []
            if t.cls_token is not None:
                prefix.append(t.cls_token.expand(x.shape[0], -1, -1))
            if t.reg_token is not None:
                prefix.append(t.reg_token.expand(x.shape[0], -1, -1))
            if t.pos_embed is not None:
                if t.no_embed_class:
                    pos = interpolate_pos_embed(t.pos_embed[0], 0, self.native_grid, (h, w), self.pos_interp)
                    x = torch.cat(prefix + [x + pos.to(x.dtype)], dim=1)
                else:
                    pos = interpolate_pos_embed(t.pos_embed[0], self.num_prefix, self.native_grid, (h, w),
                                                self.pos_interp)
                    x = torch.cat(prefix + [x], dim=1) + pos.to(x.dtype)
            else:
                x = torch.cat(prefix + [x], dim=1)
            x = t.norm_pre(x)
        return x, (h, w)

    def rope(self, grid: tuple[int, int]) -> torch.Tensor | None:
        """EVA: the concatenated sin/cos RoPE table ``(h*w, 2*d)`` for ``grid``; ``None`` without RoPE."""
        if self.family != "eva" or self.visual.trunk.rope is None:
            return None
        r = self.visual.trunk.rope
        grid = (int(grid[0]), int(grid[1]))
        if not r._use_cached_embed:
            return r.get_embed(shape=list(grid))
        if r.feat_shape is not None and tuple(r.feat_shape) == grid:
            return r.get_embed()
        # cached for the native grid only: rebuild from the module's own frequency bands (timm's own builder)
        return r._build_embed_cat(list(grid), r.bands)

    # ------------------------------------------------------------------------------------------- blocks
    def block_forward(self, i: int, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        """Block ``i`` run by the model's own code: ``(B, P+N, D) -> (B, P+N, D)``."""
        blk = self.blocks[i]
        if self.family == "open_clip":
            if not self.batch_first:
                return blk(x.transpose(0, 1)).transpose(0, 1)
            return blk(x)
        return blk(x, rope=rope)

    def run_blocks(self, x: torch.Tensor, start: int, stop: int, rope: torch.Tensor | None = None,
                   ) -> torch.Tensor:
        """Blocks ``start .. stop-1`` with the model's own code."""
        if self.family == "open_clip" and not self.batch_first:
            x = x.transpose(0, 1)
            for blk in self.blocks[start:stop]:
                x = blk(x)
            return x.transpose(0, 1)
        for i in range(start, stop):
            x = self.block_forward(i, x, rope)
        return x

    def ln1(self, i: int, x: torch.Tensor) -> torch.Tensor:
        blk = self.blocks[i]
        return blk.ln_1(x) if self.family == "open_clip" else blk.norm1(x)

    def ln2(self, i: int, x: torch.Tensor) -> torch.Tensor:
        blk = self.blocks[i]
        return blk.ln_2(x) if self.family == "open_clip" else blk.norm2(x)

    def qkv(self, i: int, x_normed: torch.Tensor, rope: torch.Tensor | None = None,
            which: str = "qkv") -> dict[str, torch.Tensor]:
        """Per-head projections of ``x_normed = ln1(x)`` ``(B, P+N, D)`` -> ``{name: (B, H, P+N, d)}``.

        ``which`` selects among ``"q"``, ``"k"``, ``"v"`` (only those are computed). q/k norms of the tower
        (open_clip ``ln_q``/``ln_k``, timm ``q_norm``/``k_norm``) are applied. ``rope`` (EVA only): the table
        from :meth:`rope`, applied to the patch tokens of q and k (prefix tokens untouched), as in timm's
        ``EvaAttention.forward``; ``None`` = no RoPE.
        """
        blk = self.blocks[i]
        H, D = self.num_heads, self.width
        out: dict[str, torch.Tensor] = {}
        if self.family == "open_clip":
            a = blk.attn
            W, b = a.in_proj_weight, a.in_proj_bias  # (3D, D), (3D,)
            for j, name in enumerate("qkv"):
                if name in which:
                    y = F.linear(x_normed, W[j * D:(j + 1) * D], None if b is None else b[j * D:(j + 1) * D])
                    out[name] = _split_heads(y, H)  # (B, H, N, d)
            if hasattr(a, "ln_q"):  # open_clip custom Attention
                if "q" in out:
                    out["q"] = a.ln_q(out["q"])
                if "k" in out:
                    out["k"] = a.ln_k(out["k"])
            if rope is not None:
                raise ValueError("rope is only defined for EVA towers")
            return out
        a = blk.attn
        HD = a.num_heads * a.head_dim
        if a.qkv is not None:
            Wf = a.qkv.weight  # (3*HD, D)
            biases = (a.q_bias, a.k_bias, a.v_bias)
            for j, name in enumerate("qkv"):
                if name in which:
                    y = F.linear(x_normed, Wf[j * HD:(j + 1) * HD], biases[j])
                    out[name] = _split_heads(y, H)
        else:
            projs = {"q": a.q_proj, "k": a.k_proj, "v": a.v_proj}
            for name in "qkv":
                if name in which:
                    out[name] = _split_heads(projs[name](x_normed), H)
        if "q" in out:
            out["q"] = a.q_norm(out["q"])
        if "k" in out:
            out["k"] = a.k_norm(out["k"])
        if rope is not None:
            from timm.layers import apply_rot_embed_cat

            P = self.num_prefix
            half = getattr(a, "rotate_half", False)
            for name in ("q", "k"):
                if name in out:
                    t = out[name]
                    out[name] = torch.cat([t[:, :, :P], apply_rot_embed_cat(t[:, :, P:], rope, half=half)],
                                          dim=2).type_as(t)
        return out

    @property
    def attn_scale(self) -> float:
        """The standard attention scale ``d ** -0.5``."""
        return self.head_dim ** -0.5

    def attn_out(self, i: int, o: torch.Tensor) -> torch.Tensor:
        """Attention output ``o (B, H, N, d)`` -> ``(B, N, D)``: merge heads, inner LN (EVA subln / open_clip
        ``ln_inner``, with ``head_scale``), output projection (and open_clip's ``ln_attn``). No layer scale."""
        blk = self.blocks[i]
        a = blk.attn
        if self.family == "open_clip":
            if getattr(a, "head_scale", None) is not None:
                o = o * a.head_scale
            y = _merge_heads(o)
            if hasattr(a, "ln_inner"):
                y = a.ln_inner(y)
            y = a.out_proj(y)
            if hasattr(blk, "ln_attn"):
                y = blk.ln_attn(y)
            return y
        y = a.norm(_merge_heads(o))
        return a.proj(y)

    def ls1(self, i: int, x: torch.Tensor) -> torch.Tensor:
        blk = self.blocks[i]
        if self.family == "open_clip":
            return blk.ls_1(x)
        return x if blk.gamma_1 is None else blk.gamma_1 * x

    def ls2(self, i: int, x: torch.Tensor) -> torch.Tensor:
        blk = self.blocks[i]
        if self.family == "open_clip":
            return blk.ls_2(x)
        return x if blk.gamma_2 is None else blk.gamma_2 * x

    def mlp(self, i: int, x_normed: torch.Tensor) -> torch.Tensor:
        return self.blocks[i].mlp(x_normed)

    # ------------------------------------------------------------------------------------------- head
    def final(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final norm + projection of every token: ``(B, N, D) -> (B, N, C)``.

        open_clip: ``ln_post`` then ``@ proj``. EVA: ``trunk.norm``, ``trunk.fc_norm`` (identity for token
        pooling), ``trunk.head`` and open_clip's ``head`` (projection, if any).
        """
        v = self.visual
        if self.family == "open_clip":
            x = v.ln_post(tokens)
            return x @ v.proj if v.proj is not None else x
        t = v.trunk
        x = t.fc_norm(t.norm(tokens))
        return v.head(t.head(x))

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """The image embedding from the last block's tokens ``(B, P+N, D) -> (B, C)``, exactly as
        ``model.encode_image`` computes it (pooling of the tower)."""
        v = self.visual
        if self.family == "open_clip":
            if v.final_ln_after_pool:
                pooled = tokens[:, 0] if v.pool_type == "tok" else tokens[:, 1:].mean(dim=1)
                pooled = v.ln_post(pooled)
            else:
                x = v.ln_post(tokens)
                pooled = x[:, 0] if v.pool_type == "tok" else x[:, 1:].mean(dim=1)
            return pooled @ v.proj if v.proj is not None else pooled
        t = v.trunk
        return v.head(t.forward_head(t.norm(tokens)))

    def forward_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """All blocks with the model's own code: last-block tokens ``(B, P+N, D)`` and the grid."""
        x, grid = self.embed(images)
        x = self.run_blocks(x, 0, self.num_blocks, self.rope(grid))
        return x, grid


def vit_adapter(model_or_visual: nn.Module, pos_interp: str = "size") -> ViTAdapter:
    """A :class:`ViTAdapter` for an open_clip model (its ``.visual`` is used) or an image tower."""
    visual = getattr(model_or_visual, "visual", model_or_visual)
    return ViTAdapter(visual, pos_interp)
