"""SynSeg: MCCL terms by hand (both clamp ends, the j = k diagonal), FiLM, FSS, five-view merge, the model,
training, inference/evaluation, and the launcher route."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from ovlib.eval.synseg import SynSegEvalConfig, evaluate_synseg
from ovlib.methods.synseg import (
    DEFAULT_LOSS_WEIGHTS,
    SynSeg,
    SynSegConfig,
    align_loss,
    back_loss,
    bound,
    bounded_cosine,
    cont_loss,
    five_views,
    label_map,
    load_synseg,
    mccl_losses,
    merge_views,
    pool_to_grid,
    predict_probs,
    sep_loss,
    synergy_vectors,
    total_loss,
    train_step,
)
from ovlib.models.film_decoder import CLIPSegDecoder, FiLM, default_extract_layers, gather_rows
from tests.helpers.synseg import synseg_model as _model

LO, HI = -math.log(0.005), -math.log(0.995)  # -log of the two clamp bounds: 5.2983, 0.0050
R2 = 1 / math.sqrt(2)


# ------------------------------------------------------------------------------------------------ bounded cosine
def test_bound_clamps_at_both_ends_and_affine_map():
    cos = torch.tensor([-1.0, -0.2, 0.0, 0.004, 0.3, 0.996, 1.0])
    torch.testing.assert_close(bound(cos), torch.tensor([0.005, 0.005, 0.005, 0.005, 0.3, 0.995, 0.995]))
    torch.testing.assert_close(bound(cos, sim_map="affine"),
                               torch.tensor([0.005, 0.4, 0.5, 0.502, 0.65, 0.995, 0.995]))
    a, b = torch.tensor([[3.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    assert bounded_cosine(a, b).item() == pytest.approx(R2, rel=1e-6)
    with pytest.raises(ValueError, match="sim_map"):
        bound(cos, sim_map="tanh")
    with pytest.raises(ValueError, match="clamp_grad"):
        bound(cos, clamp_grad="soft")


def test_clamp_gradient_zero_vs_straight_through():
    cos = torch.tensor([-0.5, 0.5, 0.999], requires_grad=True)
    (-torch.log(bound(cos))).sum().backward()
    torch.testing.assert_close(cos.grad, torch.tensor([0.0, -2.0, 0.0]))  # saturated ends: no gradient
    cos2 = cos.detach().clone().requires_grad_(True)
    s = bound(cos2, clamp_grad="straight")
    torch.testing.assert_close(s, bound(cos.detach()))  # same values
    (-torch.log(s)).sum().backward()
    torch.testing.assert_close(cos2.grad, torch.tensor([-1 / 0.005, -2.0, -1 / 0.995]))


# ------------------------------------------------------------------------------------------------ MCCL, by hand
F3 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # pairwise cosines: (0,1) 0, (0,2) and (1,2) 1/sqrt2


def test_align_loss_hand_case_with_both_clamp_ends():
    f = torch.tensor([[1.0, 0.0], [0.0, 2.0], [5.0, 0.0]])
    t = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 0.0]])  # cosines 1/sqrt2, 0 (-> 0.005), 1 (-> 0.995)
    want = (-math.log(R2) + LO + HI) / 3
    assert align_loss(f, t).item() == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        align_loss(f, t[:2])


def test_cont_loss_hand_case_threshold_and_normaliser():
    f = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    fbar = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])  # cos 1, 0, 1/sqrt2, -1
    # threshold 0.1 keeps rows 0 and 2; the normaliser stays N = 4
    want = (LO + (-math.log(1 - R2))) / 4
    assert cont_loss(f, fbar).item() == pytest.approx(want, rel=1e-6)
    # every pair: cos 0 and -1 clamp to 0.005 -> -log(0.995) each
    want_all = (LO + HI + (-math.log(1 - R2)) + HI) / 4
    assert cont_loss(f, fbar, threshold=None).item() == pytest.approx(want_all, rel=1e-6)


def test_back_loss_hand_case_diagonal_excluded_and_included():
    pairs = LO + 2 * (-math.log(R2))  # unordered pairs (0,1), (0,2), (1,2)
    assert back_loss(F3).item() == pytest.approx(2 * pairs / 6, rel=1e-6)  # N(N-1) = 6 ordered pairs
    assert back_loss(F3, diagonal="include").item() == pytest.approx((2 * pairs + 3 * HI) / 9, rel=1e-6)
    assert back_loss(F3[:1]) is None  # one category: no pair j != k
    assert back_loss(F3[:1], diagonal="include").item() == pytest.approx(HI, rel=1e-6)


def test_sep_loss_hand_case_diagonal_excluded_and_included():
    pairs = HI + 2 * (-math.log(1 - R2))  # cos 0 clamps to 0.005 -> -log(0.995)
    assert sep_loss(F3).item() == pytest.approx(2 * pairs / 6, rel=1e-6)
    # the diagonal: cos = 1 -> 0.995 -> -log(0.005) = 5.30 per category
    assert sep_loss(F3, diagonal="include").item() == pytest.approx((2 * pairs + 3 * LO) / 9, rel=1e-6)
    assert sep_loss(F3[:1], diagonal="include").item() == pytest.approx(LO, rel=1e-6)
    with pytest.raises(ValueError, match="diagonal"):
        sep_loss(F3, diagonal="half")


@pytest.mark.parametrize("clamp_grad", ["zero", "straight"])
@pytest.mark.parametrize("fn", [back_loss, sep_loss])
def test_diagonal_adds_only_a_constant(fn, clamp_grad):
    """Including j = k changes the value, never the gradient direction: grad_incl * N^2 == grad_excl * N(N-1)."""
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    grads = {}
    for mode in ("exclude", "include"):
        xx = x.clone().requires_grad_(True)
        fn(xx, mode, clamp_grad=clamp_grad).backward()
        grads[mode] = xx.grad
    torch.testing.assert_close(grads["include"] * 16, grads["exclude"] * 12, atol=1e-5, rtol=1e-4)


def test_mccl_batch_is_the_mean_of_per_image_terms():
    g = torch.Generator().manual_seed(1)
    f, fbar, t = (torch.randn(6, 5, generator=g) for _ in range(3))
    owner = torch.tensor([0, 0, 0, 1, 2, 2])
    out = mccl_losses(f, fbar, t, owner)
    imgs = [[0, 1, 2], [3], [4, 5]]
    want_align = sum(align_loss(f[i], t[i]) for i in imgs) / 3
    want_cont = sum(cont_loss(f[i], fbar[i]) for i in imgs) / 3
    want_sep = (sep_loss(f[imgs[0]]) + sep_loss(f[imgs[2]])) / 2  # image 1 has no pair
    want_back = (back_loss(fbar[imgs[0]]) + back_loss(fbar[imgs[2]])) / 2
    for k, w in (("align", want_align), ("cont", want_cont), ("sep", want_sep), ("back", want_back)):
        assert out[k].item() == pytest.approx(w.item(), rel=1e-6), k
    inc = mccl_losses(f, fbar, t, owner, diagonal="include")
    want = (sep_loss(f[imgs[0]], "include") + sep_loss(f[imgs[1]], "include") + sep_loss(f[imgs[2]], "include")) / 3
    assert inc["sep"].item() == pytest.approx(want.item(), rel=1e-6)
    single = mccl_losses(f[3:4], fbar[3:4], t[3:4], torch.tensor([0]))  # no pair anywhere: graph-connected zero
    assert single["sep"].item() == 0.0 and single["back"].item() == 0.0
    assert set(out) == set(DEFAULT_LOSS_WEIGHTS)
    assert total_loss(out).item() == pytest.approx(sum(v.item() for v in out.values()), rel=1e-6)
    assert total_loss(out, {"sep": 0.0}).item() == pytest.approx(total_loss(out).item() - out["sep"].item(), rel=1e-5)
    with pytest.raises(ValueError, match="unknown"):
        total_loss(out, {"contrast": 1.0})


# ------------------------------------------------------------------------------------------------ FiLM, FSS
def test_film_zero_output_is_identity_and_formula():
    film = FiLM(text_dim=8, channels=4, hidden=16)
    x, t = torch.randn(3, 5, 4), torch.randn(3, 8)
    torch.testing.assert_close(film(x, t), x)  # zero-initialised output layer
    lin = FiLM(text_dim=8, channels=4, hidden=0)
    with torch.no_grad():
        lin.mlp[-1].bias.copy_(torch.tensor([0.5, 0.0, -1.0, 1.0, 1.0, 2.0, 0.0, -3.0]))  # dgamma | beta
    want = x * torch.tensor([1.5, 1.0, 0.0, 2.0]) + torch.tensor([1.0, 2.0, 0.0, -3.0])
    torch.testing.assert_close(lin(x, t), want)
    with torch.no_grad():
        lin.mlp[-1].bias.zero_()
    torch.testing.assert_close(lin(x, t), x)
    with pytest.raises(ValueError, match="text"):
        film(x, torch.randn(3, 7))


def test_synergy_vectors_hand_cases():
    X = torch.randn(2, 3, 4, 5)
    f, fbar = synergy_vectors(torch.ones(2, 4, 5), X)
    torch.testing.assert_close(f, X.mean((2, 3)))  # A = 1: mean feature as foreground, zero background
    torch.testing.assert_close(fbar, torch.zeros(2, 3))
    f0, fb0 = synergy_vectors(torch.zeros(2, 4, 5), X)
    torch.testing.assert_close(f0, torch.zeros(2, 3))
    torch.testing.assert_close(fb0, X.mean((2, 3)))
    A = torch.tensor([[[1.0, 0.0], [0.0, 0.5]]])
    Xs = torch.arange(8.0).reshape(1, 2, 2, 2)
    f1, fb1 = synergy_vectors(A, Xs)
    torch.testing.assert_close(f1, torch.tensor([[(0 + 1.5) / 4, (4 + 3.5) / 4]]))
    torch.testing.assert_close(f1 + fb1, Xs.mean((2, 3)))
    with pytest.raises(ValueError, match="same grid"):
        synergy_vectors(torch.ones(2, 3, 5), X)


def test_pooling_equals_pixel_level_product_with_nearest_upsampled_features():
    A = torch.rand(2, 16, 24)
    X = torch.randn(2, 3, 2, 3)  # patch 8
    f, fbar = synergy_vectors(pool_to_grid(A, (2, 3)), X)
    Xup = X.repeat_interleave(8, 2).repeat_interleave(8, 3)  # (2, 3, 16, 24)
    f_px, fbar_px = synergy_vectors(A, Xup)
    torch.testing.assert_close(f, f_px, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fbar, fbar_px, atol=1e-6, rtol=1e-5)


def test_default_extract_layers_scale_clipseg():
    assert default_extract_layers(12) == (3, 6, 9)
    assert default_extract_layers(4) == (1, 2, 3)
    assert default_extract_layers(1) == (0,)


def test_decoder_shapes():
    dec = CLIPSegDecoder(width=16, text_dim=8, n_levels=2, patch_size=(4, 4), reduce_dim=12, heads=2,
                         film_hidden=0, proj_dim=8)
    acts = [torch.randn(5, 1 + 6, 16) for _ in range(2)]  # 2x3 grid
    logits, X = dec(acts, torch.randn(5, 8), (2, 3))
    assert logits.shape == (5, 8, 12) and X.shape == (5, 8, 2, 3)
    with pytest.raises(ValueError, match="levels"):
        dec(acts[:1], torch.randn(5, 8), (2, 3))
    # per-image reduce then gather == gather then reduce; no projector at inference
    imgs, owner, text = [torch.randn(2, 7, 16) for _ in range(2)], torch.tensor([0, 0, 1, 1, 1]), torch.randn(5, 8)
    with torch.no_grad():
        dec.film.mlp[-1].bias.normal_()
        l1, X1 = dec(imgs, text, (2, 3), owner=owner)
        l2, X2 = dec([a[owner] for a in imgs], text, (2, 3))
        l3, X3 = dec(imgs, text, (2, 3), owner=owner, project=False)
    torch.testing.assert_close(l1, l2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(X1, X2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l3, l1)
    assert X3 is None


def test_gather_rows_is_exact_and_its_gradient_is_indexings():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, generator=g, requires_grad=True)
    owner = torch.tensor([2, 0, 0, 1, 2, 2])
    w = torch.randn(6, 4, 5, generator=g)
    out = gather_rows(x, owner)
    assert torch.equal(out, x.detach()[owner])  # bit-exact forward
    (out * w).sum().backward()
    ref = torch.zeros(3, 4, 5).index_add_(0, owner, w)
    torch.testing.assert_close(x.grad, ref, atol=1e-6, rtol=1e-6)
    xb = x.detach().bfloat16().requires_grad_(True)  # dtype kept, still exact
    ob = gather_rows(xb, owner)
    assert ob.dtype == torch.bfloat16 and torch.equal(ob, xb.detach()[owner])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast must not round the fp32 rows
        assert torch.equal(gather_rows(x, owner), x.detach()[owner])
    with pytest.raises(ValueError, match="owner"):
        gather_rows(x, owner[None])


def test_decoder_gradient_is_bitwise_reproducible_with_threads():
    """Pairs of one image split across two threads: plain indexing (index_put_ with parallel atomic adds, the old
    code) gives a different gradient almost every time; the decoder's gradient must be identical every time
    (the 1e-7 drift between same-seed SynSeg runs)."""
    torch.manual_seed(0)
    dec = CLIPSegDecoder(width=16, text_dim=8, n_levels=1, patch_size=(8, 8), reduce_dim=64, heads=2,
                         film_hidden=0, proj_dim=8)
    torch.nn.init.normal_(dec.film.mlp[-1].weight, std=0.5)  # pairs of one image get different gradients
    acts = [torch.randn(3, 1 + 64, 16)]  # 8x8 grid: P * L * C = 8 * 65 * 64 >= 32768 (torch's parallel grain)
    owner = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])  # image 1's pairs straddle the two threads' halves
    text = torch.randn(8, 8)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = []
        for _ in range(30):
            dec.zero_grad(set_to_none=True)
            logits, X = dec(acts, text, (8, 8), owner=owner)
            (logits.square().mean() + X.square().mean()).backward()
            grads.append(dec.reduces[0].weight.grad.clone())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], gr) for gr in grads[1:])


# ------------------------------------------------------------------------------------------------ multi-view
def test_five_views_geometry_and_constant_merge():
    img = torch.rand(3, 21, 30)
    views, boxes = five_views(img, 16)
    assert views.shape == (5, 3, 16, 16)
    assert boxes == [(0, 10, 0, 15), (0, 10, 15, 30), (10, 21, 0, 15), (10, 21, 15, 30), (0, 21, 0, 30)]
    torch.testing.assert_close(views[0], torch.nn.functional.interpolate(
        img[None, :, :10, :15], size=(16, 16), mode="bilinear", align_corners=False, antialias=True)[0])
    const = torch.full((5, 4, 16, 16), 0.37)
    torch.testing.assert_close(merge_views(const, boxes, 21, 30), torch.full((4, 21, 30), 0.37))
    # placement: quadrant q holds value q, the whole view 10 -> a pixel of quadrant q gets (q + 10) / 2
    maps = torch.stack([torch.full((1, 16, 16), float(v)) for v in (0, 1, 2, 3, 10)])
    m = merge_views(maps, boxes, 21, 30)[0]
    assert m[0, 0] == 5.0 and m[0, 29] == 5.5 and m[20, 0] == 6.0 and m[20, 29] == 6.5
    with pytest.raises(ValueError, match="cover"):
        merge_views(const[:1], [(0, 5, 0, 5)], 21, 30)


def test_label_map_with_and_without_background():
    probs = torch.tensor([[[0.9, 0.2], [0.05, 0.4]], [[0.1, 0.3], [0.08, 0.6]]])  # (2, 2, 2)
    assert label_map(probs).tolist() == [[0, 1], [1, 1]]
    assert label_map(probs, 0.25, background_index=2).tolist() == [[0, 1], [2, 1]]
    assert label_map(probs, 0.65, background_index=2).tolist() == [[0, 2], [2, 2]]
    with pytest.raises(ValueError, match="threshold"):
        label_map(probs, None, background_index=2)


# ------------------------------------------------------------------------------------------------ the model
def _batch(B=3, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.tensor([1, 5, 29]), torch.tensor([2]), torch.tensor([3, 4, 30])][:B]
    return {"images": torch.randn(B, 3, size, size, generator=g), "category_ids": ids}


def test_model_shapes_options_and_text_bank(clip_and_cats):
    m = _model(clip_and_cats)
    assert m.layers == (1, 2, 3) and m.input_size == 64
    assert m.text_bank.shape == (34, 128)
    torch.testing.assert_close(m.text_bank.norm(dim=1), torch.ones(34))
    out = m(_batch(size=96))  # resized to the input size
    assert set(out) == set(SynSeg.loss_names) and all(v.ndim == 0 and torch.isfinite(v) for v in out.values())
    logits = m.activation_logits(torch.randn(2, 3, 64, 64), m.text_bank[:5])
    assert logits.shape == (2, 5, 64, 64)
    m.cfg.chunk = 3  # chunked decoding gives the same maps
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(m.activation_logits(x, m.text_bank[:5]),
                               _model(clip_and_cats).activation_logits(x.clone(), m.text_bank[:5]),
                               atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="unknown option"):
        _model(clip_and_cats, reduce=32)
    with pytest.raises(ValueError, match="not among"):
        m({"images": torch.randn(1, 3, 64, 64), "category_ids": [torch.tensor([999])]})
    with pytest.raises(KeyError, match="category_ids"):
        m({"images": torch.randn(1, 3, 64, 64)})
    # GT image-level tags are accepted when there are no caption labels (benchmarks, ablations)
    out = m({"images": torch.randn(1, 3, 64, 64), "image_labels": [torch.tensor([1, 2])]})
    assert set(out) == set(SynSeg.loss_names)
    empty = m({"images": torch.randn(2, 3, 64, 64), "category_ids": [torch.tensor([]), torch.tensor([])]})
    assert all(v.item() == 0.0 and v.requires_grad for v in empty.values())


def test_gradients_reach_only_film_projector_decoder(clip_and_cats):
    m = _model(clip_and_cats, clamp_grad="straight")
    m.student.requires_grad_(True)  # SynSeg freezes the CLIP whatever it is given ...
    m = SynSeg(m.student, {}, tokenizer=clip_and_cats[1], categories=clip_and_cats[2], clamp_grad="straight")
    assert not any(p.requires_grad for p in m.student.parameters())
    m.train()
    assert not m.student.training  # ... and keeps it in eval mode
    total_loss(m(_batch())).backward()
    assert all(p.grad is None for p in m.student.parameters())
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("decoder.") for n in trainable)
    with_grad = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    for part in ("decoder.film.", "decoder.projector.", "decoder.reduces.", "decoder.blocks.", "decoder.upsample."):
        assert any(n.startswith(part) for n in with_grad), part
    assert "text_bank" not in trainable


@pytest.mark.parametrize("opts", [{"clamp_grad": "straight"}, {"sim_map": "affine"}])
def test_a_few_steps_lower_the_loss(clip_and_cats, opts):
    m = _model(clip_and_cats, **opts)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    b = _batch()
    losses = [train_step(m, b, opt)["loss"] for _ in range(8)]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.05, losses


def test_literal_clamp_gives_no_gradient_when_every_pair_saturates():
    """All fg/bg and fg/fg pairs parallel, every fg orthogonal-or-opposite to its text: all four terms sit on a
    clamp bound, and the literal clamp passes no gradient (the straight-through one does)."""
    f = torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]], requires_grad=True)
    fbar = torch.tensor([[1.0, 0.0, 0.0], [3.0, 0.0, 0.0]], requires_grad=True)
    t = torch.tensor([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])
    out = mccl_losses(f, fbar, t, torch.tensor([0, 0]))
    assert out["align"].item() == pytest.approx(LO) and out["sep"].item() == pytest.approx(LO)
    total_loss(out).backward()
    assert f.grad.abs().max() == 0 and fbar.grad.abs().max() == 0
    f2 = f.detach().clone().requires_grad_(True)
    total_loss(mccl_losses(f2, fbar.detach(), t, torch.tensor([0, 0]), clamp_grad="straight")).backward()
    assert f2.grad.abs().max() > 0


# ------------------------------------------------------------------------------------------------ inference, eval
def test_predict_probs_views_and_checkpoint_roundtrip(clip_and_cats, tmp_path):
    m = _model(clip_and_cats).eval()
    img = torch.rand(3, 80, 72)
    p5 = predict_probs(m, img, m.text_bank[:4], views=5)
    p1 = predict_probs(m, img, m.text_bank[:4], views=1)
    assert p5.shape == p1.shape == (4, 80, 72) and 0 <= float(p5.min()) and float(p5.max()) <= 1
    with pytest.raises(ValueError, match="views"):
        predict_probs(m, img, m.text_bank[:4], views=3)
    torch.save({"model": m.state_dict()}, tmp_path / "w.pt")
    clip, tok, cats = clip_and_cats
    m2 = load_synseg(str(tmp_path / "w.pt"), copy.deepcopy(clip), tok, cats)
    torch.testing.assert_close(predict_probs(m2, img, m2.text_bank[:4]), p5)


@pytest.fixture(scope="module")
def tiny_val(tmp_path_factory):
    from ovlib.data import CocoPanoptic, ensure_microworld

    root = tmp_path_factory.mktemp("synseg-val") / "mw"
    ensure_microworld(root, "val2017", n=3, size=64, seed=0, progress=False)
    return CocoPanoptic(root, "val2017")


def test_evaluate_synseg_with_and_without_background(clip_and_cats, tiny_val):
    m = _model(clip_and_cats).eval()
    cats = clip_and_cats[2]
    all_ids = [c["id"] for c in cats]
    res = evaluate_synseg(m, tiny_val, m.text_bank, all_ids, SynSegEvalConfig(image_size=64, views=5), n_boot=20,
                          progress=False)
    assert res["confusion"].shape == (3, 34, 34) and len(res["miou"]) == 3
    assert res["confusion"].sum() == 3 * 64 * 64  # every pixel of the micro world has a segment
    things = [c["id"] for c in cats if c["isthing"]]
    rows = [i for i, c in enumerate(cats) if c["isthing"]]
    by_t = evaluate_synseg(m, tiny_val, m.text_bank[rows], things,
                           SynSegEvalConfig(image_size=64, views=1, background=True), thresholds=[0.1, 0.6],
                           n_boot=20, progress=False)
    assert set(by_t) == {0.1, 0.6}
    C = len(things) + 1
    assert by_t[0.1]["confusion"].shape == (3, C, C)
    # raising the threshold can only move predictions to the background column
    assert by_t[0.6]["confusion"][:, :, -1].sum() >= by_t[0.1]["confusion"][:, :, -1].sum()
    with pytest.raises(ValueError, match="background"):
        evaluate_synseg(m, tiny_val, m.text_bank, all_ids, SynSegEvalConfig(image_size=64), thresholds=[0.2])
    # the present-class oracle predicts only classes of the image's ground truth
    ora = evaluate_synseg(m, tiny_val, m.text_bank, all_ids,
                          SynSegEvalConfig(image_size=64, views=1, present_only=True), n_boot=20, progress=False)
    for i, conf in enumerate(ora["confusion"]):
        present = {all_ids.index(s["category_id"]) for s in tiny_val[i]["segments"]}
        assert set(conf.sum(0).nonzero()[0].tolist()) <= present


# ------------------------------------------------------------------------------------------------ the launcher
def test_trains_through_the_launcher_from_captions(tmp_path, repo_root, monkeypatch):
    """The shared trainer with SynSeg's own dataset (build_dataset hook): smoke recipe + overrides, 3 steps."""
    from ovlib import config
    from ovlib.methods import METHODS
    from ovlib.models import load_clip
    from ovlib.train.launch import train

    monkeypatch.setitem(METHODS, "synseg", SynSeg)
    torch.save(load_clip("micro-clip", seed=0)[0].state_dict(), tmp_path / "clip.pt")
    params = config.resolve("smoke", [f"data_root={tmp_path / 'mw'}", f"cache_dir={tmp_path / 'cache'}"],
                            root=repo_root)
    overrides = {"pretrained": str(tmp_path / "clip.pt"), "max_images": 6, "alpha": 1.0, "unlocked_blocks": 0,
                 "lr": 1e-3, "max_steps": 3, "loss_weights": dict(DEFAULT_LOSS_WEIGHTS),
                 "method_args": {"input_size": 64, "caption_pick": "all"}}
    res = train(params, "synseg", overrides)
    assert res["steps"] == 3
    rec = [json.loads(ln) for ln in (Path(res["out_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert set(SynSeg.loss_names) <= set(rec[-1]) and all(math.isfinite(rec[-1][k]) for k in SynSeg.loss_names)
    clip, tok, _ = load_clip("micro-clip", seed=0)
    from ovlib.data.nouns import _load_categories

    cats = _load_categories(tmp_path / "mw", "train2017")
    args = json.loads((Path(res["out_dir"]) / "results.json").read_text())["config"]["method_args"]
    assert args["clipseg"] == "micro-clipseg" and args["input_size"] == 64  # the smoke recipe's CLIPSeg init
    m = load_synseg(res["weights"], clip, tok, cats, **args)  # the run's options: the decoder's shape follows them
    assert m.text_bank.shape == (34, 128)
    ref = load_clip("micro-clip", seed=0)[0].state_dict()
    assert all(torch.equal(m.student.state_dict()[k], ref[k]) for k in ref)  # the CLIP did not move


def test_config_validation():
    with pytest.raises(ValueError, match="diagonal"):
        SynSegConfig(diagonal="half")
    with pytest.raises(ValueError, match="templates"):
        SynSegConfig(templates="coco")
    assert SynSegConfig.from_options({"extract_layers": [1, 3]}).extract_layers == (1, 3)


@pytest.mark.parametrize("resize, expect", [("long", (16, 32)), ("short", (32, 64))])
def test_evaluate_protocols_resizes_the_side_of_the_protocol(resize, expect):
    """A 2:1 image at image_size 32: the long side (micro) or the short side (paper, SCLIP-style) becomes 32."""
    import numpy as np

    from ovlib.eval.synseg import evaluate_protocols

    seen = []

    def score_fn(x):  # (3, h, w) -> (C, h, w)
        seen.append(tuple(x.shape[-2:]))
        return torch.zeros(2, *x.shape[-2:])

    mask = np.zeros((50, 100), dtype=bool)
    mask[:, :50] = True
    item = {"image": np.zeros((50, 100, 3), dtype=np.uint8),
            "segments": [{"category_id": 1, "mask": mask}, {"category_id": 2, "mask": ~mask}]}
    evaluate_protocols(score_fn, [item], [1, 2], [1], (0.5,), image_size=32, n_boot=2, resize=resize)
    assert seen == [expect]
