"""ViT adapter and dense feature modes, pinned against open_clip's own forward and brute-force formulas.

Backbones: the micro CLIP (plus a layer-scale variant), open_clip ViT-B-16 and EVA02-B-16 (timm Eva trunk
with RoPE), randomly initialised at 64 px and then perturbed (seeded) so every bias, LayerNorm and gate is
non-trivial. The brute-force references below use raw weights and plain torch ops, never the adapter.
"""

from __future__ import annotations

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ovlib.models import (
    DENSE_MODES,
    PRESETS,
    UnsupportedTower,
    ViTAdapter,
    dense_features,
    interpolate_pos_embed,
    load_clip,
    naclip_bias,
    vit_adapter,
)
from ovlib.models.clip import MicroClipConfig


def _perturb(model: nn.Module, seed: int, std: float = 0.05) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model.eval()


@pytest.fixture(scope="module")
def micro():
    m, _, _ = load_clip("micro-clip", seed=0)
    return _perturb(m, 1)


@pytest.fixture(scope="module")
def micro_ls():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        m = MicroClipConfig(vision_layers=3, extra_vision=dict(ls_init_value=0.5)).build()
    return _perturb(m, 2)


@pytest.fixture(scope="module")
def vitb16():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        m = open_clip.create_model("ViT-B-16", force_image_size=64, pretrained_text=False)
    return _perturb(m, 3, 0.02)


@pytest.fixture(scope="module")
def eva02():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        m = open_clip.create_model("EVA02-B-16", force_image_size=64, pretrained_text=False)
    return _perturb(m, 4, 0.02)


@pytest.fixture(scope="module")
def micro_custom():
    """open_clip's custom block: qk-norm, head scale, inner LN, post-attention LN, MLP LN."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        m = MicroClipConfig(vision_layers=2, extra_vision=dict(
            qk_norm=True, scale_heads=True, scale_attn_inner=True, scale_attn=True, scale_fc=True)).build()
    return _perturb(m, 5)


BACKBONES = ["micro", "micro_ls", "micro_custom", "vitb16", "eva02"]


@pytest.fixture(params=BACKBONES)
def model(request):
    return request.getfixturevalue(request.param)


def _images(model, b=2, seed=0, size=None):
    s = size or (64, 64)
    return torch.randn(b, 3, *s, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ brute force
def _ln(x, mod):
    return F.layer_norm(x, mod.normalized_shape, mod.weight, mod.bias, mod.eps)


def _heads(t, H):
    B, T, D = t.shape
    return t.reshape(B, T, H, D // H).permute(0, 2, 1, 3)  # (B, H, T, d)


def _merge(o):
    B, H, T, d = o.shape
    return o.permute(0, 2, 1, 3).reshape(B, T, H * d)


def _rot_pairs(x):
    # RoPE, interleaved pairs: (x0, x1) -> (-x1, x0)
    return torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).reshape(x.shape)


class Ref:
    """Raw-weight re-implementation of one backbone (open_clip ViT or EVA02 via timm)."""

    def __init__(self, model):
        from open_clip.transformer import CustomResidualAttentionBlock

        self.v = getattr(model, "visual", model)
        self.eva = not hasattr(self.v, "transformer")
        self.blocks = list(self.v.trunk.blocks) if self.eva else list(self.v.transformer.resblocks)
        assert not isinstance(self.blocks[0], CustomResidualAttentionBlock), "reference covers standard blocks"
        self.L = len(self.blocks)
        a = self.blocks[0].attn
        self.H = a.num_heads
        self.P = 1

    def qkv(self, i, x, rope_table=None):
        blk = self.blocks[i]
        if self.eva:
            z = _ln(x, blk.norm1)
            a = blk.attn
            q = z @ a.q_proj.weight.T + a.q_proj.bias
            k = z @ a.k_proj.weight.T
            v = z @ a.v_proj.weight.T + a.v_proj.bias
        else:
            z = _ln(x, blk.ln_1)
            D = z.shape[-1]
            W, b = blk.attn.in_proj_weight, blk.attn.in_proj_bias
            q, k, v = (z @ W[j * D:(j + 1) * D].T + b[j * D:(j + 1) * D] for j in range(3))
        q, k, v = (_heads(t, self.H) for t in (q, k, v))
        if rope_table is not None:
            sin, cos = rope_table.to(q.dtype).chunk(2, dim=-1)
            P = self.P
            q = torch.cat([q[:, :, :P], q[:, :, P:] * cos + _rot_pairs(q[:, :, P:]) * sin], dim=2)
            k = torch.cat([k[:, :, :P], k[:, :, P:] * cos + _rot_pairs(k[:, :, P:]) * sin], dim=2)
        return q, k, v

    def out(self, i, o):
        blk = self.blocks[i]
        if self.eva:
            y = _ln(_merge(o), blk.attn.norm)
            return y @ blk.attn.proj.weight.T + blk.attn.proj.bias
        y = _merge(o) @ blk.attn.out_proj.weight.T + blk.attn.out_proj.bias
        return y

    def ls1(self, i, y):
        blk = self.blocks[i]
        if self.eva:
            return y if blk.gamma_1 is None else blk.gamma_1 * y
        return blk.ls_1.gamma * y if hasattr(blk.ls_1, "gamma") else y

    def ls2(self, i, y):
        blk = self.blocks[i]
        if self.eva:
            return y if blk.gamma_2 is None else blk.gamma_2 * y
        return blk.ls_2.gamma * y if hasattr(blk.ls_2, "gamma") else y

    def ffn(self, i, y):
        blk = self.blocks[i]
        if self.eva:
            m = blk.mlp
            z = _ln(y, blk.norm2)
            g = F.silu(z @ m.fc1_g.weight.T + m.fc1_g.bias) * (z @ m.fc1_x.weight.T + m.fc1_x.bias)
            return _ln(g, m.norm) @ m.fc2.weight.T + m.fc2.bias
        m = blk.mlp
        assert type(m.gelu) is nn.GELU
        z = _ln(y, blk.ln_2)
        return F.gelu(z @ m.c_fc.weight.T + m.c_fc.bias) @ m.c_proj.weight.T + m.c_proj.bias

    def final(self, tokens):
        if self.eva:
            t = self.v.trunk
            assert isinstance(t.fc_norm, nn.Identity) and len(self.v.head) == 0
            return _ln(tokens, t.norm) @ t.head.weight.T + t.head.bias
        return _ln(tokens, self.v.ln_post) @ self.v.proj

    def rope(self):
        return self.v.trunk.rope.get_embed() if self.eva else None

    def block_input(self, images, i):
        """Tokens entering block i, from the model's own forward_intermediates (native grid)."""
        if i == 0:
            assert not self.eva
            v = self.v
            x = v.conv1(images).flatten(2).transpose(1, 2)
            cls = v.class_embedding.expand(x.shape[0], 1, -1)
            return _ln(torch.cat([cls, x], dim=1) + v.positional_embedding, v.ln_pre)
        out = self.v.forward_intermediates(images, indices=[i - 1], output_fmt="NLC", intermediates_only=True,
                                           output_extra_tokens=True)
        return torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)

    def to_map(self, tokens, grid, normalize=True):
        x = self.final(tokens[:, self.P:])
        if normalize:
            x = x / x.norm(dim=-1, keepdim=True)
        B, N, C = x.shape
        return x.permute(0, 2, 1).reshape(B, C, *grid)

    def last_block(self, x, mode, scale=True, residual=False, ffn=False, rope=False, std=5.0, grid=None):
        i = self.L - 1
        table = self.rope()
        if mode == "vanilla":
            q, k, v = self.qkv(i, x, table)
            d = q.shape[-1]
            A = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
            y = x + self.ls1(i, self.out(i, A @ v))
            return y + self.ls2(i, self.ffn(i, y))
        q, k, v = self.qkv(i, x, table if rope else None)
        if mode in ("x+v", "v"):
            a = self.ls1(i, self.out(i, v))
            if mode == "v":
                return a
            y = x + a
            return y + self.ls2(i, self.ffn(i, y))
        s = 1 / math.sqrt(q.shape[-1]) if scale else 1.0
        if mode == "qq":
            A = torch.softmax(s * q @ q.transpose(-1, -2), -1)
        elif mode == "kk":
            A = torch.softmax(s * k @ k.transpose(-1, -2), -1)
        elif mode == "csa":
            A = torch.softmax(s * q @ q.transpose(-1, -2), -1) + torch.softmax(s * k @ k.transpose(-1, -2), -1)
        elif mode == "naclip":
            h, w = grid
            T = x.shape[1]
            omega = torch.zeros(T, T, dtype=x.dtype)
            for a_ in range(h * w):
                for b_ in range(h * w):
                    dy, dx = a_ // w - b_ // w, a_ % w - b_ % w
                    omega[1 + a_, 1 + b_] = math.exp(-(dy * dy + dx * dx) / (2 * std * std))
            A = torch.softmax(s * k @ k.transpose(-1, -2) + omega, -1)
        y = self.ls1(i, self.out(i, A @ v))
        if residual:
            y = x + y
        if ffn:
            y = y + self.ls2(i, self.ffn(i, y))
        return y


_TOWERS64: dict = {}


def _tower64(request, name):
    """``name``'s image tower in float64 (brute-force comparisons far below float32 noise). ViT-B-16 and
    EVA02-B-16 keep their first 4 blocks here (same block classes and widths; the full depth is pinned by the
    float32 tests against ``encode_image`` and the intermediate tokens)."""
    import copy

    if name not in _TOWERS64:
        v = copy.deepcopy(request.getfixturevalue(name).visual).double().eval()
        if name == "vitb16":
            v.transformer.resblocks = v.transformer.resblocks[:4]
        elif name == "eva02":
            v.trunk.blocks = v.trunk.blocks[:4]
        _TOWERS64[name] = v
    return _TOWERS64[name]


BRUTE_BACKBONES = ["micro", "micro_ls", "vitb16", "eva02"]  # the raw-weight reference's block types


@pytest.fixture(scope="module", params=BRUTE_BACKBONES)
def model64(request):
    return _tower64(request, request.param)


@pytest.fixture(scope="module", params=BACKBONES)
def any64(request):
    return _tower64(request, request.param)


@pytest.fixture(scope="module")
def eva64(request):
    return _tower64(request, "eva02")


# ------------------------------------------------------------------------------------ adapter
def test_vanilla_reproduces_encode_image(model):
    x = _images(model)
    ad = vit_adapter(model)
    with torch.no_grad():
        ref = model.encode_image(x)
        tokens, grid = ad.forward_tokens(x)
        got = ad.pooled(tokens)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert grid == (64 // ad.patch_size[0], 64 // ad.patch_size[1])


def test_adapter_reproduces_intermediate_tokens(model):
    x = _images(model, seed=1)
    ad = vit_adapter(model)
    with torch.no_grad():
        out = model.visual.forward_intermediates(x, indices=None, output_fmt="NLC", intermediates_only=True,
                                                 output_extra_tokens=True)
        t, grid = ad.embed(x)
        rope = ad.rope(grid)
        for i in range(ad.num_blocks):
            t = ad.block_forward(i, t, rope)
            ref = torch.cat([out["image_intermediates_prefix"][i], out["image_intermediates"][i]], dim=1)
            torch.testing.assert_close(t, ref, atol=1e-5, rtol=0)


def test_adapter_pieces_rebuild_the_block(any64):
    """ln1 -> qkv -> attention -> attn_out -> ls1 -> residual -> ln2 -> mlp -> ls2 equals the model's block."""
    ad = vit_adapter(any64)
    x = _images(any64, seed=2).double()
    with torch.no_grad():
        t, grid = ad.embed(x)
        rope = ad.rope(grid)
        for i in range(ad.num_blocks):
            p = ad.qkv(i, ad.ln1(i, t), rope=rope)
            o = F.scaled_dot_product_attention(p["q"], p["k"], p["v"])
            y = t + ad.ls1(i, ad.attn_out(i, o))
            y = y + ad.ls2(i, ad.mlp(i, ad.ln2(i, y)))
            t_ref = ad.block_forward(i, t, rope)
            torch.testing.assert_close(y, t_ref, atol=1e-9, rtol=1e-9)
            t = t_ref


def test_qkv_matches_raw_weights(model64):
    ref = Ref(model64)
    ad = vit_adapter(model64)
    x = _images(model64, seed=3).double()
    with torch.no_grad():
        t = ref.block_input(x, ref.L - 1)
        p = ad.qkv(ref.L - 1, ad.ln1(ref.L - 1, t), rope=ad.rope(ad.grid(x)))
        q, k, v = ref.qkv(ref.L - 1, t, ref.rope())
    for a, b in ((p["q"], q), (p["k"], k), (p["v"], v)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_pos_interpolation_is_identity_at_native_grid():
    pos = torch.randn(1 + 16, 8)
    assert interpolate_pos_embed(pos, 1, (4, 4), (4, 4)) is pos
    # and bicubic resampling at scale 1 (no early exit) is the identity too
    grid = pos[1:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    same = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False)
    torch.testing.assert_close(same, grid)


def test_pos_interpolation_keeps_cls_and_is_bicubic():
    pos = torch.randn(1 + 12, 5)
    out = interpolate_pos_embed(pos, 1, (3, 4), (6, 5))
    assert out.shape == (1 + 30, 5)
    torch.testing.assert_close(out[0], pos[0])
    grid = pos[1:].reshape(1, 3, 4, 5).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(6, 5), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(30, 5)
    torch.testing.assert_close(out[1:], ref)


def test_embed_at_other_grid(vitb16):
    ad = vit_adapter(vitb16)
    v = vitb16.visual
    x = _images(vitb16, b=1, size=(96, 128))
    with torch.no_grad():
        t, grid = ad.embed(x)
        assert grid == (6, 8)
        patches = v.conv1(x).flatten(2).transpose(1, 2)
        pos = v.positional_embedding
        g = F.interpolate(pos[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2), size=(6, 8), mode="bicubic",
                          align_corners=False).permute(0, 2, 3, 1).reshape(48, -1)
        ref = torch.cat([(v.class_embedding + pos[0])[None, None], patches + g[None]], dim=1)
        ref = _ln(ref, v.ln_pre)
    torch.testing.assert_close(t, ref, atol=1e-5, rtol=1e-5)


def test_eva_rope_recomputed_for_the_grid(eva02):
    from timm.layers import RotaryEmbeddingCat

    ad = vit_adapter(eva02)
    r = eva02.visual.trunk.rope
    free = RotaryEmbeddingCat(dim=r.dim, max_res=r.max_res, temperature=r.temperature, in_pixels=r.in_pixels,
                              linear_bands=r.linear_bands, feat_shape=None, ref_feat_shape=r.ref_feat_shape,
                              grid_offset=r.grid_offset, grid_indexing=r.grid_indexing, rotate_half=r.rotate_half)
    torch.testing.assert_close(ad.rope((4, 4)), r.get_embed())  # native: the model's own table
    torch.testing.assert_close(ad.rope((4, 4)), free.get_embed(shape=[4, 4]))
    for grid in [(6, 8), (35, 35), (2, 3)]:
        tab = ad.rope(grid)
        assert tab.shape[0] == grid[0] * grid[1]
        torch.testing.assert_close(tab, free.get_embed(shape=list(grid)))
    assert not torch.allclose(ad.rope((6, 8))[:16], r.get_embed())


def test_unsupported_tower_is_a_clear_error():
    with pytest.raises(UnsupportedTower, match="unsupported visual tower"):
        ViTAdapter(nn.Linear(3, 3))


def test_image_size_must_be_multiple_of_patch(micro):
    with pytest.raises(ValueError, match="multiple of the patch size"):
        dense_features(micro, torch.randn(1, 3, 60, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        dense_features(micro, torch.randn(3, 64, 64))


# ------------------------------------------------------------------------------------ dense modes
ATTN_SWITCHES = [
    dict(scale=True, residual=False, ffn=False),
    dict(scale=False, residual=False, ffn=False),
    dict(scale=True, residual=True, ffn=True),
    dict(scale=False, residual=True, ffn=False),
    dict(scale=True, residual=False, ffn=True),
]


@pytest.mark.parametrize("mode", ["vanilla", "x+v", "v"])
def test_value_modes_against_brute_force(model64, mode):
    ref = Ref(model64)
    x = _images(model64, b=1, seed=4).double()
    with torch.no_grad():
        got = dense_features(model64, x, mode, normalize=True)
        t = ref.block_input(x, ref.L - 1)
        grid = vit_adapter(model64).grid(x)
        want = ref.to_map(ref.last_block(t, mode), grid)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-8, rtol=1e-7)


@pytest.mark.parametrize("mode", ["qq", "kk", "csa", "naclip"])
@pytest.mark.parametrize("sw", range(len(ATTN_SWITCHES)))
def test_attention_modes_against_brute_force(model64, mode, sw):
    switches = ATTN_SWITCHES[sw]
    if sw > 1 and model64.__class__.__name__ == "TimmModel" and mode != "csa":
        pytest.skip("EVA: every mode with the first two switch settings, all settings with csa")
    ref = Ref(model64)
    x = _images(model64, b=1, seed=5).double()
    grid = vit_adapter(model64).grid(x)
    with torch.no_grad():
        got = dense_features(model64, x, mode, normalize=False, **switches)
        t = ref.block_input(x, ref.L - 1)
        want = ref.to_map(ref.last_block(t, mode, grid=grid, **switches), grid, normalize=False)
    torch.testing.assert_close(got, want, atol=1e-8, rtol=1e-7)


@pytest.mark.parametrize("mode", ["qq", "csa"])
def test_eva_rope_switch(eva64, mode):
    m = eva64
    ref = Ref(m)
    x = _images(m, b=1, seed=6).double()
    with torch.no_grad():
        t = ref.block_input(x, ref.L - 1)
        for rope in (True, False):
            got = dense_features(m, x, mode, normalize=False, rope=rope, scale=True)
            want = ref.to_map(ref.last_block(t, mode, rope=rope, scale=True), (4, 4), normalize=False)
            torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-6)
        a = dense_features(m, x, mode, rope=True)
        b = dense_features(m, x, mode, rope=False)
    assert not torch.allclose(a, b)


def test_rope_switch_needs_eva(micro):
    with pytest.raises(ValueError, match="rope=True"):
        dense_features(micro, _images(micro), "qq", rope=True)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_multi_v_against_brute_force(model64, n):
    ref = Ref(model64)
    if n == 2 and vit_adapter(model64).width > 128:
        pytest.skip("n=2 on the micro towers only (n=1, 3 on every tower)")
    x = _images(model64, b=1, seed=7).double()
    grid = vit_adapter(model64).grid(x)
    with torch.no_grad():
        got = dense_features(model64, x, "multi-v", n_layers=n)
        acc = 0
        for i in range(ref.L - n, ref.L):
            t = ref.block_input(x, i)
            _, _, v = ref.qkv(i, t)
            acc = acc + ref.ls1(i, ref.out(i, v))
        want = ref.to_map(acc, grid)
    torch.testing.assert_close(got, want, atol=1e-8, rtol=1e-7)
    with torch.no_grad():
        one = dense_features(model64, x, "multi-v", n_layers=1)
        v_only = dense_features(model64, x, "v")
    torch.testing.assert_close(one, v_only)


def test_modes_normalise_and_shape(micro):
    x = _images(micro, b=3, size=(64, 96))
    with torch.no_grad():
        for mode in DENSE_MODES:
            f = dense_features(micro, x, mode)
            assert f.shape == (3, 128, 8, 12), mode
            torch.testing.assert_close(f.norm(dim=1), torch.ones(3, 8, 12))
            g = dense_features(micro, x, mode, normalize=False)
            torch.testing.assert_close(F.normalize(g, dim=1), f)


def test_batch_independence(micro):
    """Every mode treats images independently (no leakage across the batch)."""
    x = _images(micro, b=3, seed=8)
    with torch.no_grad():
        for mode in DENSE_MODES:
            torch.testing.assert_close(dense_features(micro, x, mode)[1:2], dense_features(micro, x[1:2], mode))


def test_return_qkv(eva64):
    x = _images(eva64, seed=9).double()
    ad = vit_adapter(eva64)
    with torch.no_grad():
        f, parts = dense_features(eva64, x, "csa", scale=False, return_qkv=True)
        t = Ref(eva64).block_input(x, ad.num_blocks - 1)
        p = ad.qkv(ad.num_blocks - 1, ad.ln1(ad.num_blocks - 1, t))
    assert f.shape == (2, 512, 4, 4)
    for k in "qkv":
        assert parts[k].shape == (2, ad.num_heads, 16, ad.head_dim)
        torch.testing.assert_close(parts[k], p[k][:, :, 1:])


def test_presets_match_explicit_switches(micro):
    x = _images(micro, seed=10)
    with torch.no_grad():
        torch.testing.assert_close(dense_features(micro, x, **PRESETS["synclip"]),
                                   dense_features(micro, x, "csa", scale=False, residual=False, ffn=False))
        torch.testing.assert_close(dense_features(micro, x, **PRESETS["clearclip"]),
                                   dense_features(micro, x, "qq"))
        torch.testing.assert_close(dense_features(micro, x, **PRESETS["sclip"]),
                                   dense_features(micro, x, "csa", residual=True, ffn=True))
    assert PRESETS["declip-qq"]["scale"] is False and PRESETS["naclip"]["gaussian_std"] == 5.0
    for p in PRESETS.values():
        assert p["mode"] in DENSE_MODES


def test_mode_errors(micro):
    x = _images(micro)
    with pytest.raises(ValueError, match="unknown dense mode"):
        dense_features(micro, x, "nope")
    with pytest.raises(TypeError, match="has no switches"):
        dense_features(micro, x, "x+v", residual=False)
    with pytest.raises(ValueError, match="n_layers"):
        dense_features(micro, x, "multi-v", n_layers=9)


def test_gradients_reach_the_tower(micro):
    import copy

    m = copy.deepcopy(micro).train(False)
    x = _images(m, seed=11)
    for mode in ("x+v", "csa", "multi-v"):
        m.zero_grad()
        dense_features(m, x, mode).sum().backward()
        blk = m.visual.transformer.resblocks[-1]
        assert blk.attn.in_proj_weight.grad is not None and blk.attn.in_proj_weight.grad.abs().sum() > 0
        assert m.visual.conv1.weight.grad.abs().sum() > 0


def test_naclip_bias():
    b = naclip_bias((3, 4), 1, std=5.0, dtype=torch.float64)
    assert b.shape == (13, 13)
    assert (b[0] == 0).all() and (b[:, 0] == 0).all()
    torch.testing.assert_close(torch.diagonal(b)[1:], torch.ones(12, dtype=torch.float64))
    torch.testing.assert_close(b, b.T)
    # patch (0,0) vs (2,3): distance^2 = 4 + 9
    torch.testing.assert_close(b[1, 1 + 2 * 4 + 3], torch.tensor(math.exp(-13 / 50), dtype=torch.float64))
    with pytest.raises(ValueError):
        naclip_bias((2, 2), 1, std=0.0)


def test_eva_at_another_grid_matches_timm_dynamic_path(eva64):
    """At a non-native grid the adapter's EVA forward (patch embed, RoPE rebuilt for the grid, blocks) equals
    timm's own dynamic-size forward. The absolute pos-emb is zeroed in both, since timm resamples it with
    antialiased bicubic (PIL kernel) while we follow CLIPSelf's plain bicubic (pinned separately above)."""
    import copy

    from timm.layers import Format, RotaryEmbeddingCat

    v = copy.deepcopy(eva64)
    t = v.trunk
    with torch.no_grad():
        t.pos_embed.zero_()
    r = t.rope
    ours = ViTAdapter(v)
    timm_t = copy.deepcopy(t)
    timm_t.rope = RotaryEmbeddingCat(dim=r.dim, max_res=r.max_res, temperature=r.temperature, in_pixels=r.in_pixels,
                                     linear_bands=r.linear_bands, feat_shape=None, ref_feat_shape=r.ref_feat_shape,
                                     grid_offset=r.grid_offset, grid_indexing=r.grid_indexing,
                                     rotate_half=r.rotate_half).double()
    timm_t.dynamic_img_size = True
    timm_t.patch_embed.strict_img_size = False
    timm_t.patch_embed.flatten = False
    timm_t.patch_embed.output_fmt = Format.NHWC
    x = _images(v, b=1, seed=12, size=(96, 128)).double()
    with torch.no_grad():
        tokens, grid = ours.forward_tokens(x)
        want = timm_t.forward_features(x)
    assert grid == (6, 8)
    torch.testing.assert_close(t.norm(tokens), want, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------ issue 18: published switches, pos-emb interpolation
#: the switches of each method's released code (reference/implementations.md §8, §9, §3.2, §4.2), written out
#: independently of ``PRESETS``: (mode, scale, residual, FFN, RoPE, pos-emb interpolation)
PUBLISHED = {
    "maskclip": ("x+v", None, True, True, None, "size"),        # chongzhou96/MaskCLIP vit.py; resize_pos_embed(size=)
    "clipself": ("x+v", None, True, True, None, "size"),        # wusize/CLIPSelf forward_without_attn
    "declip-qq": ("qq", False, False, False, False, "size"),    # xiaomoguhz/DeCLIP main ss_attn (scale commented out)
    "declip-csa": ("csa", False, False, False, False, "size"),
    "synclip": ("csa", False, False, False, False, "size"),     # Justlovesmile/SynCLIP csa_vfm_distill
    "sclip": ("csa", True, True, True, False, "scale-factor"),  # wangf3014/SCLIP custom_attn + residual + mlp
    "clearclip": ("qq", True, False, False, False, "scale-factor"),  # mc-lan/ClearCLIP ignore_residual=True
    "naclip": ("naclip", True, False, False, False, "scale-factor"),  # sinahmr/NACLIP arch='reduced'
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_each_preset_carries_its_published_switches(micro, name):
    from ovlib.models import dense_facts, dense_spec

    mode, scale, res, ffn, rope, interp = PUBLISHED[name]
    spec = dense_spec(name)
    f = dense_facts(spec)
    assert (spec["mode"], f["scale"], f["residual"], f["ffn"], f["rope"], f["pos_interp"]) == \
        (mode, scale, res, ffn, rope, interp)
    if name == "naclip":
        assert spec["gaussian_std"] == 5.0
    # and the preset computes what the explicit switches compute, off the native grid (8x8 -> 12x10)
    x = _images(micro, seed=13, size=(96, 80))
    explicit = {"pos_interp": interp}
    if mode in ("qq", "kk", "csa", "naclip"):
        explicit.update(scale=scale, residual=res, ffn=ffn, rope=rope)
    with torch.no_grad():
        torch.testing.assert_close(dense_features(micro, x, **PRESETS[name]),
                                   dense_features(micro, x, mode, **explicit))


def test_dense_spec_presets_win_and_errors():
    from ovlib.models import dense_spec

    assert dense_spec("csa") == {"mode": "csa", "scale": True, "residual": False, "ffn": False, "rope": False,
                                 "pos_interp": "size"}  # the bare mode is none of the methods
    assert dense_spec("naclip")["pos_interp"] == "scale-factor"  # the preset, not the bare mode
    assert dense_spec("sclip", pos_interp="size")["pos_interp"] == "size"
    with pytest.raises(ValueError, match="unknown dense mode or preset"):
        dense_spec("sclip2")
    with pytest.raises(TypeError, match="has no switches"):
        dense_spec("maskclip", scale=True)
    with pytest.raises(ValueError, match="pos_interp"):
        dense_spec("x+v", pos_interp="nearest")


def _keys_cubic_matrix(n_in: int, n_out: int, inv_scale: float, a: float = -0.75) -> torch.Tensor:
    """(n_out, n_in) weights of PyTorch's bicubic resampling (Keys kernel, a = -0.75, align_corners=False: source
    ``(i + 0.5) * inv_scale - 0.5``, taps floor-1 .. floor+2 clamped to the border), written out by hand."""
    def k(t):
        t = abs(t)
        if t <= 1:
            return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1
        if t < 2:
            return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a
        return 0.0

    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = (i + 0.5) * inv_scale - 0.5
        f = math.floor(src)
        for j in range(f - 1, f + 3):
            w[i, min(max(j, 0), n_in - 1)] += k(src - j)
    return w


def test_pos_interp_scale_factor_against_hand_kernel():
    """``scale-factor`` samples the native grid at ``(i + 0.5) h0 / (h + 0.1) - 0.5`` (SCLIP/ClearCLIP/NACLIP's
    ``+0.1`` trick, scale not recomputed), ``size`` at ``(i + 0.5) h0 / h - 0.5`` (CLIPSelf)."""
    g = torch.Generator().manual_seed(0)
    h0, w0, h, w, D = 4, 5, 9, 7, 3
    pos = torch.randn(1 + h0 * w0, D, generator=g, dtype=torch.float64)
    grid = pos[1:].reshape(h0, w0, D)
    for method, (ih, iw) in (("size", (h0 / h, w0 / w)), ("scale-factor", (h0 / (h + 0.1), w0 / (w + 0.1)))):
        Wr, Wc = _keys_cubic_matrix(h0, h, ih), _keys_cubic_matrix(w0, w, iw)
        want = torch.einsum("ia,abd,jb->ijd", Wr, grid, Wc).reshape(h * w, D)
        out = interpolate_pos_embed(pos, 1, (h0, w0), (h, w), method)
        torch.testing.assert_close(out[0], pos[0])
        torch.testing.assert_close(out[1:], want.to(out.dtype), atol=1e-5, rtol=1e-5)  # float32 inside
    with pytest.raises(ValueError, match="pos_interp"):
        interpolate_pos_embed(pos, 1, (h0, w0), (h, w), "bilinear")


def test_pos_interp_adapter_option(micro):
    """On the native grid the two interpolations give identical tokens; off it they differ slightly."""
    ad_size, ad_sf = vit_adapter(micro), vit_adapter(micro, pos_interp="scale-factor")
    assert ad_size.pos_interp == "size" and ad_sf.pos_interp == "scale-factor"
    assert ad_size.with_pos_interp("scale-factor").pos_interp == "scale-factor" and ad_size.pos_interp == "size"
    with pytest.raises(ValueError, match="pos_interp"):
        vit_adapter(micro, pos_interp="area")
    with torch.no_grad():
        x = _images(micro, seed=14)  # 64 px: the native 8x8 grid
        assert torch.equal(ad_size.embed(x)[0], ad_sf.embed(x)[0])
        assert torch.equal(dense_features(micro, x, "csa", pos_interp="size"),
                           dense_features(micro, x, "csa", pos_interp="scale-factor"))
        x = _images(micro, seed=14, size=(160, 160))  # 20x20 grid
        pos = micro.visual.positional_embedding
        d_pos = (interpolate_pos_embed(pos, 1, (8, 8), (20, 20), "size")
                 - interpolate_pos_embed(pos, 1, (8, 8), (20, 20), "scale-factor")).abs()
        assert 0 < d_pos.mean() < 0.1 * pos[1:].abs().mean()  # a small resampling shift, not another embedding
        a = dense_features(micro, x, "csa", pos_interp="size")
        b = dense_features(micro, x, "csa", pos_interp="scale-factor")
        c = dense_features(ad_sf, x, "csa")  # the adapter's own option
    torch.testing.assert_close(b, c)
    diff = (a - b).abs()
    assert diff.max() > 1e-5 and diff.mean() < 0.05
