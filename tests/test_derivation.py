"""DenseRC's derivations: the cls-token bookkeeping (Eq. 2) on the micro CLIP and random ViT-B/16 / EVA02-B/16
towers at a tiny size, the joint-space contributions, ΔL (Eq. 6) closed form vs Monte Carlo, and the gradient
distribution analysis (Fig. 3)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ovlib.methods.denserc import DenseConstructor, DenseRCConfig, semantics_loss
from ovlib.methods.derivation import (
    TermGroup,
    cls_decomposition,
    contribution_stats,
    delta_l_closed_form,
    gradient_stats,
    head_attention_distance,
    head_contributions,
    joint_terms,
    optimal_spatial_p,
    patch_gradient_magnitudes,
    random_delta_l_setup,
    simulate_delta_l,
    standard_groups,
)
from ovlib.models import load_clip, roi_features
from tests.helpers.towers import perturb, shared_tower, vision_tower

TOL = 1e-4  # the bound on the bookkeeping error


@pytest.fixture(scope="module")
def micro():
    return perturb(load_clip("micro-clip", seed=0)[0], 1)


@pytest.fixture(scope="module")
def vitb16():
    return vision_tower("ViT-B-16", 32)  # random ViT-B/16 at 32 px: a 2x2 grid


def _x(b=2, size=64, seed=0):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ Eq. (2)
@pytest.mark.parametrize("size", [64, 40])  # native grid and an interpolated 5x5 grid
def test_cls_decomposition_is_exact_on_micro_clip(micro, size):
    x = _x(size=size)
    dec = cls_decomposition(micro, x, per_head=True, per_source=True)
    assert dec.c0.shape == (2, 128) and dec.attn.shape == dec.mlp.shape == (2, 4, 128)
    assert dec.error() <= TOL
    # c^(0) is data independent (cls embedding + its position, pre-norm)
    torch.testing.assert_close(dec.c0[0], dec.c0[1])
    # heads and source tokens add up to the attention term (with the output-projection bias)
    torch.testing.assert_close(dec.heads.sum(2) + dec.attn_bias, dec.attn, rtol=0, atol=1e-5)
    torch.testing.assert_close(dec.sources.sum(2) + dec.attn_bias, dec.attn, rtol=0, atol=1e-5)
    assert dec.sources.shape[2] == 1 + (size // 8) ** 2
    # the joint-space terms add up to the model's own image embedding
    jt = joint_terms(micro, dec)
    assert jt.error() <= TOL
    if size == 64:
        assert (dec.embedding - micro.encode_image(x)).abs().max() <= TOL


def test_cls_decomposition_is_exact_on_random_vit_b16(vitb16):
    x = _x(size=32)
    dec = cls_decomposition(vitb16, x, per_head=True)
    assert dec.attn.shape == (2, 12, 768) and dec.heads.shape == (2, 12, 12, 768)
    assert dec.error() <= TOL
    torch.testing.assert_close(dec.heads.sum(2) + dec.attn_bias, dec.attn, rtol=0, atol=1e-4)
    jt = joint_terms(vitb16, dec)
    assert jt.error() <= TOL
    assert (dec.embedding - vitb16(x)).abs().max() <= TOL  # visual(x) == encode_image(x)


def test_cls_decomposition_on_eva02_per_layer_only():
    eva = shared_tower("EVA02-B-16", 32, 4)
    x = _x(b=1, size=32)
    dec = cls_decomposition(eva, x)
    assert dec.error() <= TOL
    jt = joint_terms(eva, dec)
    assert jt.error() <= TOL and (dec.embedding - eva(x)).abs().max() <= TOL
    with pytest.raises(ValueError, match="affine attention output"):  # EVA02's sub-LN mixes the heads
        cls_decomposition(eva, x, per_head=True)
    from ovlib.methods.derivation import per_head_decomposable

    assert not per_head_decomposable(eva)  # what chapter 03 checks before its per-head analysis


def test_per_head_decomposable_towers(micro, vitb16):
    from ovlib.methods.derivation import per_head_decomposable

    assert per_head_decomposable(micro) and per_head_decomposable(vitb16)


def test_contribution_stats(micro):
    x = _x()
    jt = joint_terms(micro, cls_decomposition(micro, x, per_head=True))
    groups = standard_groups(4, n_last=3)
    g = torch.Generator().manual_seed(0)
    text = torch.randn(5, 128, generator=g)
    labels = torch.tensor([1, 4])
    st = contribution_stats(jt, groups, text, labels)
    full = st["embedding (all terms)"]
    for k in ("share", "norm_ratio", "cos_cls"):
        assert full[k] == pytest.approx([1.0, 1.0], abs=1e-6)
    parts = ["attention, last 3 blocks", "attention, first 1 blocks", "MLP, all blocks", "c0 + final-LN offset"]
    assert sum(st[p]["share"] for p in parts) == pytest.approx([1.0, 1.0], abs=1e-6)  # a partition
    assert st["attention, all blocks"]["share"] == pytest.approx(
        st["attention, last 3 blocks"]["share"] + st["attention, first 1 blocks"]["share"], abs=1e-6)
    # brute force for one group
    v = jt.attn[:, 1:].sum(1)
    e = jt.embedding
    assert st["attention, last 3 blocks"]["cos_cls"] == pytest.approx(F.cosine_similarity(v, e).numpy(), abs=1e-5)
    cos = F.normalize(v, dim=-1) @ F.normalize(text, dim=-1).T
    assert st["attention, last 3 blocks"]["cos_text"] == pytest.approx(cos[[0, 1], [1, 4]].numpy(), abs=1e-5)
    assert list(st["attention, last 3 blocks"]["top1"]) == [float(cos[i].argmax() == labels[i]) for i in range(2)]
    # value-only attention terms (output-projection bias removed)
    val = TermGroup(attn=(1, 2, 3), attn_value=True).vector(jt)
    torch.testing.assert_close(val, v - jt.attn_bias[:, 1:].sum(1))
    with pytest.raises(ValueError):
        contribution_stats(jt, groups, text, None)


def test_head_contributions_sum_to_the_attention_share(micro):
    x = _x()
    jt = joint_terms(micro, cls_decomposition(micro, x, per_head=True))
    text = torch.randn(3, 128, generator=torch.Generator().manual_seed(0))
    hc = head_contributions(jt, text, torch.tensor([0, 2]))
    assert hc["share"].shape == hc["cos_text"].shape == (2, 4, 4)
    value = contribution_stats(jt, {"v": TermGroup(attn=(0, 1, 2, 3), attn_value=True)})["v"]["share"]
    assert hc["share"].sum((1, 2)) == pytest.approx(value, abs=1e-6)
    e = F.cosine_similarity(jt.heads[1, 2, 3], text[2], dim=0)
    assert hc["cos_text"][1, 2, 3] == pytest.approx(float(e), abs=1e-6)


def test_head_attention_distance_brute_force(micro):
    x = _x(b=1, size=24)  # 3x3 grid
    d = head_attention_distance(micro, x)
    assert d.shape == (1, 4, 4) and (d >= 0).all()
    from ovlib.models import vit_adapter

    ad = vit_adapter(micro)
    tok, _ = ad.embed(x)
    blk = micro.visual.transformer.resblocks[0]
    z = blk.ln_1(tok)
    with torch.no_grad():
        _, A = blk.attn(z, z, z, need_weights=True, average_attn_weights=False)  # (1, H, T, T)
    pos = [(i // 3, i % 3) for i in range(9)]
    ref = sum(float(A[0, 1, 1 + i, 1 + j]) * math.dist(pos[i], pos[j]) for i in range(9) for j in range(9)) / 9
    assert float(d[0, 0, 1]) == pytest.approx(ref, rel=1e-5)


# ------------------------------------------------------------------------------------------------ Eq. (6)
def test_delta_l_closed_form_brute_force_and_special_cases():
    g = torch.Generator().manual_seed(0)
    s = random_delta_l_setup(6, 4, 3, g)
    cf = delta_l_closed_form(s["S_row"], s["P"], s["M"], s["cov"])
    brute = sum(float(s["S_row"][j]) ** 2 * float(torch.trace(s["P"] @ s["cov"][j] @ s["P"].T)) for j in range(1, 6))
    assert cf["interference"] == pytest.approx(brute, rel=1e-10)
    assert cf["mismatch"] == pytest.approx(0.0, abs=1e-12)  # P = M / S_rr: the paper's Eq. (6)
    assert cf["delta"] > 0
    # no off-target weight: spatial == head-only
    one_hot = torch.zeros(6, dtype=torch.float64)
    one_hot[0] = 1.0
    assert delta_l_closed_form(one_hot, s["M"], s["M"], s["cov"])["delta"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("matched", [True, False])
def test_delta_l_closed_form_matches_simulation(matched):
    g = torch.Generator().manual_seed(1)
    s = random_delta_l_setup(8, 6, 5, g, matched=matched)
    cf = delta_l_closed_form(s["S_row"], s["P"], s["M"], s["cov"])
    sim = simulate_delta_l(s["S_row"], s["P"], s["M"], s["cov"], noise_std=0.3, n=60_000, generator=g)
    assert abs(sim["delta"] - cf["delta"]) <= 4 * sim["se"], (sim, cf)
    assert sim["L_S"] > sim["L_H"]
    assert sim["L_H"] == pytest.approx(5 * 0.3 ** 2, rel=0.03)  # E||eps||^2 = C sigma^2


def test_optimal_spatial_p_still_loses():
    g = torch.Generator().manual_seed(2)
    s = random_delta_l_setup(8, 6, 5, g)
    P = optimal_spatial_p(s["S_row"], s["M"], s["cov"])
    best = delta_l_closed_form(s["S_row"], P, s["M"], s["cov"])["delta"]
    assert best > 0
    assert best < delta_l_closed_form(s["S_row"], s["P"], s["M"], s["cov"])["delta"]
    for _ in range(5):  # a minimum: every perturbation raises ΔL
        dP = 1e-3 * torch.randn(P.shape, generator=g, dtype=torch.float64)
        assert delta_l_closed_form(s["S_row"], P + dP, s["M"], s["cov"])["delta"] > best


# ------------------------------------------------------------------------------------------------ Fig. 3
def test_gradient_stats_extremes():
    u = gradient_stats(torch.ones(100))
    assert u["gini"] == pytest.approx(0.0, abs=1e-12) and u["peak_over_mean"] == 1.0
    assert u["top_share"] == pytest.approx(0.05) and u["starved"] == 0.0
    one = torch.zeros(100)
    one[7] = 3.0
    o = gradient_stats(one)
    assert o["gini"] == pytest.approx(0.99) and o["top_share"] == 1.0 and o["peak"] == 3.0
    assert o["peak_over_mean"] == pytest.approx(100.0) and o["starved"] == pytest.approx(0.99)


def test_patch_gradient_magnitudes(micro):
    x = _x(b=1, size=32)  # 4x4 grid
    boxes = [torch.tensor([[0.0, 0.0, 16.0, 16.0]])]  # the top-left 2x2 patches
    teacher = torch.randn(1, 128, generator=torch.Generator().manual_seed(0))
    for construct in ("none", "hsg"):
        cons = DenseConstructor.for_model(DenseRCConfig(construct=construct), micro)
        mags = patch_gradient_magnitudes(micro, cons, x, boxes, teacher)
        assert mags.shape == (1, 4, 4)
        assert (mags[0, :2, :2] > 0).all()
        outside = torch.ones(4, 4, dtype=torch.bool)
        outside[:2, :2] = False
        assert (mags[0][outside] == 0).all()  # no spatial aggregation: no gradient outside the region
    qq = DenseConstructor.for_model(DenseRCConfig(construct="qq", attn_scale=True), micro)
    mags = patch_gradient_magnitudes(micro, qq, x, boxes, teacher)
    assert (mags[0][outside] > 0).any()  # aggregation routes the region's gradient to outside patches
    # brute force: the gradient of the last block's values of one patch, by autograd on a fresh graph
    cons = DenseConstructor.for_model(DenseRCConfig(construct="none", n_layers=1), micro)
    stack = cons.values(micro, x)
    v = stack.v[0].detach().requires_grad_(True)
    stack.v = [v]
    dense = F.normalize(cons.construct(micro, stack).transpose(1, 2).reshape(1, 128, 4, 4), dim=1)
    semantics_loss(roi_features(dense, boxes, (32, 32)), teacher).backward()
    ref = v.grad[:, :, 1:].pow(2).sum(dim=(1, 3)).sqrt().reshape(1, 4, 4)
    torch.testing.assert_close(patch_gradient_magnitudes(micro, cons, x, boxes, teacher), ref)


def test_gate_maps(micro):
    cons = DenseConstructor.for_model(DenseRCConfig(construct="hsg", gate_bias_init=1.0), micro)
    g = cons.gate_maps(micro, _x(size=32))
    assert g.shape == (2, 3, 16, 4)
    torch.testing.assert_close(g, torch.full_like(g, float(torch.sigmoid(torch.tensor(1.0)))))
    with pytest.raises(ValueError, match="no gates"):
        DenseConstructor.for_model(DenseRCConfig(construct="qq"), micro).gate_maps(micro, _x(size=32))


def test_random_vision_tower_is_seeded_perturbed_and_leaves_the_rng():
    from ovlib.methods.derivation import random_vision_tower

    state = torch.random.get_rng_state()
    a = random_vision_tower("ViT-B-16", 32, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    b = random_vision_tower("ViT-B-16", 32, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not any(p.requires_grad for p in a.parameters()) and not a.training
    ln = next(m for m in a.modules() if isinstance(m, torch.nn.LayerNorm))
    assert not torch.allclose(ln.weight, torch.ones_like(ln.weight))  # perturbed away from open_clip's init
    x = _x(1, 32)
    assert cls_decomposition(a, x, per_head=True).error() <= TOL
    with pytest.raises(ValueError, match="unknown open_clip config"):
        random_vision_tower("ViT-nope", 32)


def test_grid_region_batch_is_the_semantic_loss_input(micro):
    from ovlib.data.regions import crop_regions, sample_grid_boxes
    from ovlib.methods.derivation import grid_region_batch
    from ovlib.models.images import normalize_images

    x = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    imgs, boxes, teach = grid_region_batch(micro, x, mean, std, seed=2)
    torch.testing.assert_close(imgs, normalize_images(x, mean, std))
    b1 = sample_grid_boxes(96, 96, generator=2 * 1000 + 1, max_split=6, max_boxes=20)
    torch.testing.assert_close(boxes[1], b1)
    assert teach.shape[0] == sum(len(b) for b in boxes)
    with torch.no_grad():
        want = micro.encode_image(normalize_images(crop_regions(x[1], b1, 64), mean, std))
    torch.testing.assert_close(teach[len(boxes[0]):], want)
