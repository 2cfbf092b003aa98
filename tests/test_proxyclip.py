"""Dense mode ``proxy`` (ProxyCLIP): a hand case, equivalence with a brute-force statement of the public code,
batch independence, the all-masked guard, and the evaluation wrapper."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ovlib.eval._common import dense_fn_for_proxyclip
from ovlib.models import dense_features, load_clip, load_vfm
from ovlib.models.dense import proxy_attention
from tests.test_models_dense import _perturb  # the same perturbed micro CLIP as the dense-mode tests


@pytest.fixture(scope="module")
def micro():
    m, _, _ = load_clip("micro-clip", seed=0)
    return _perturb(m, 1).double()


def test_hand_case():
    v = torch.tensor([[1.0, 2.0], [3.0, 5.0]]).view(1, 1, 2, 2)  # (B, H, N=2, d=2) on a 2x1 grid
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 2, 1)  # (B, C=2, 2, 1): orthogonal tokens
    # S = I, mean 0.5: L = 3 (S - 0.6) -> off-diagonal < 0 masked -> A = I
    torch.testing.assert_close(proxy_attention(v, (2, 1), f), v)
    # beta = 0: L = 3 S, nothing masked (0 is not < 0): rows softmax([3, 0])
    a = math.exp(3) / (math.exp(3) + 1)
    exp = torch.tensor([[a * 1 + (1 - a) * 3, a * 2 + (1 - a) * 5], [(1 - a) * 1 + a * 3, (1 - a) * 2 + a * 5]])
    torch.testing.assert_close(proxy_attention(v, (2, 1), f, beta=0.0), exp.view(1, 1, 2, 2))


def _proxyclip_brute_force(model, images, ex_feats, beta, gamma):
    """ProxyCLIP's image path as its public code states it (``mc-lan/ProxyCLIP:open_clip/transformer.py``
    ``VisionTransformer.forward`` + ``custom_attn``), written out on open_clip's modules, batch-first."""
    vis = model.visual
    x = vis.conv1(images)  # (B, D, h, w)
    B, D, h, w = x.shape
    x = x.reshape(B, D, -1).permute(0, 2, 1)
    x = torch.cat([vis.class_embedding.view(1, 1, -1).expand(B, 1, D).to(x.dtype), x], dim=1)
    x = x + vis.positional_embedding.to(x.dtype)  # native size: no interpolation
    x = vis.ln_pre(x)
    for blk in vis.transformer.resblocks[:-1]:
        x = blk(x)
    blk = vis.transformer.resblocks[-1]
    attn = blk.attn
    nh = attn.num_heads
    hd = D // nh
    y = blk.ln_1(x)
    _q, _k, v = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    v = v.transpose(0, 1).contiguous().view(-1, B * nh, hd).transpose(0, 1)  # (B*nh, 1+N, hd), as LND there
    _, _, Hf, Wf = ex_feats.shape
    qk = F.normalize(ex_feats.flatten(2, 3), dim=1)
    sim = torch.einsum("bcm,bcn->bmn", qk, qk)
    sim = (sim - torch.mean(sim) * beta) * gamma
    sim[sim < 0.0] = float("-inf")
    mask = sim.unsqueeze(1).repeat(1, nh, 1, 1).reshape(B * nh, sim.shape[1], sim.shape[2])
    a = F.softmax(mask, dim=-1)
    v = v[:, 1:, :].reshape(B * nh, h, w, hd).permute(0, 3, 1, 2)
    v = F.interpolate(v, size=(Hf, Wf), mode="bilinear", align_corners=False)
    v = v.permute(0, 2, 3, 1).reshape(B * nh, Hf * Wf, hd)
    o = torch.bmm(a, v)  # (B*nh, M, hd)
    o = o.transpose(0, 1).contiguous().view(-1, B, D)  # (M, B, D)
    o = attn.out_proj(o).transpose(0, 1)  # (B, M, D)
    out = vis.ln_post(o) @ vis.proj  # (B, M, C)
    return out


@pytest.mark.parametrize("vfm_grid", [(8, 8), (10, 10), (6, 6)])
def test_equivalent_to_public_code(micro, vfm_grid):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 64, 64, generator=g, dtype=torch.float64)  # one square window, as ProxyCLIP runs
    feats = torch.randn(1, 16, *vfm_grid, generator=g, dtype=torch.float64)
    feats[:, :, : vfm_grid[0] // 2] += 1.0  # two regions: some affinities survive the mask, some do not
    with torch.no_grad():
        ref = _proxyclip_brute_force(micro, x, feats, 1.2, 3.0)  # (1, M, C)
        ours = dense_features(micro, x, "proxy", normalize=False, vfm_features=feats)  # (1, C, h', w')
    assert ours.shape[-2:] == vfm_grid
    torch.testing.assert_close(ours.flatten(2).transpose(1, 2), ref)
    with torch.no_grad():  # beta, gamma are passed through
        ref2 = _proxyclip_brute_force(micro, x, feats, 0.5, 7.0)
        ours2 = dense_features(micro, x, "proxy", normalize=False, vfm_features=feats, beta=0.5, gamma=7.0)
    torch.testing.assert_close(ours2.flatten(2).transpose(1, 2), ref2)
    assert not torch.allclose(ref, ref2)


def test_batch_independent_and_guard(micro):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 64, 64, generator=g, dtype=torch.float64)
    feats = torch.randn(2, 16, 8, 8, generator=g, dtype=torch.float64)
    feats[1] *= 3.0
    feats[1, :, :4] += 2.0
    with torch.no_grad():
        both = dense_features(micro, x, "proxy", vfm_features=feats)
        one = dense_features(micro, x[1:], "proxy", vfm_features=feats[1:])
        torch.testing.assert_close(both[1:], one)
        # identical VFM tokens: S = 1 everywhere, every entry masked (1 - 1.2 < 0); the public code gives NaN,
        # the guard lets each token attend to itself: exactly the value path ``v`` on the same grid
        same = torch.ones(2, 16, 8, 8, dtype=torch.float64)
        torch.testing.assert_close(dense_features(micro, x, "proxy", vfm_features=same),
                                   dense_features(micro, x, "v"))


def test_errors(micro):
    x = torch.zeros(1, 3, 64, 64, dtype=torch.float64)
    with pytest.raises(ValueError, match="vfm_features"):
        dense_features(micro, x, "proxy")
    with pytest.raises(TypeError, match="vfm_features"):
        dense_features(micro, x, "csa", vfm_features=torch.zeros(1, 4, 8, 8))


def test_dense_fn_for_proxyclip_uses_the_vfm():
    clip, _, _ = load_clip("micro-clip", seed=0)
    vfm = load_vfm("micro-vfm", seed=0)
    fn = dense_fn_for_proxyclip(clip, vfm)
    img = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = fn(img)
    assert out.shape == (2, clip.visual.proj.shape[1], 8, 6)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2, 8, 6))
    vfm2 = load_vfm("micro-vfm", seed=1)
    with torch.no_grad():
        assert not torch.allclose(dense_fn_for_proxyclip(clip, vfm2)(img), out)


def test_mixed_patch_sizes_follow_the_vfm_grid():
    """As ViT-B/16 with DINOv2 (/14): the output lies on the VFM's grid, CLIP's values resized to it."""
    from ovlib.models.vfm import MicroVfmConfig

    clip, _, _ = load_clip("micro-clip", seed=0)  # patch 8
    with torch.random.fork_rng():
        torch.manual_seed(0)
        vfm = MicroVfmConfig(img_size=56, patch_size=14).build().eval()
    img = torch.rand(1, 3, 112, 112, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = dense_fn_for_proxyclip(clip, vfm)(img)
    assert out.shape[-2:] == (8, 8)  # 112 / 14; the CLIP grid is 14 x 14
    assert torch.isfinite(out).all()
