"""Chapter 05 additions to SynSeg: text-free synergy features (x_source), the mask-free prior term (our
substitute for the CLIPSeg initialisation), and the one-pass evaluation of both OVSS protocols."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovlib.eval.synseg import SynSegEvalConfig, dense_score_fn, evaluate_protocols, evaluate_synseg, synseg_score_fn
from ovlib.methods.synseg import (
    X_SOURCES,
    SynSeg,
    SynSegConfig,
    total_loss,
)
from ovlib.models.film_decoder import CLIPSegDecoder
from tests.helpers.synseg import synseg_model as _model


def _batch(B=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"images": torch.randn(B, 3, size, size, generator=g),
            "category_ids": [torch.tensor([1, 5, 29]), torch.tensor([2, 3])][:B]}


# ------------------------------------------------------------------------------------------------ decoder
def test_decoder_image_features_equal_the_conditional_path_at_identity_film():
    """At initialisation FiLM is the identity, so the text-free features equal the projector over the
    conditioned map for any text; once FiLM moves they differ (and do not depend on the text)."""
    torch.manual_seed(0)
    dec = CLIPSegDecoder(width=16, text_dim=8, n_levels=2, patch_size=(4, 4), reduce_dim=8, heads=2, film_hidden=0)
    acts = [torch.randn(2, 1 + 9, 16) for _ in range(2)]
    text = F.normalize(torch.randn(2, 8), dim=-1)
    _, X = dec(acts, text, (3, 3))
    Xi = dec.image_features(acts, (3, 3))
    assert Xi.shape == X.shape == (2, 8, 3, 3)
    torch.testing.assert_close(Xi, X)
    torch.nn.init.normal_(dec.film.mlp[-1].weight)
    _, X2 = dec(acts, text, (3, 3))
    assert not torch.allclose(X2, Xi)
    torch.testing.assert_close(dec.image_features(acts, (3, 3)), Xi)


# ------------------------------------------------------------------------------------------------ x_source
@pytest.mark.parametrize("source", X_SOURCES)
def test_x_sources_train_and_route_gradients(clip_and_cats, source):
    m = _model(clip_and_cats, x_source=source, clamp_grad="straight")
    m.train()
    out = m(_batch())
    assert set(out) == set(SynSeg.loss_names) and all(torch.isfinite(v) for v in out.values())
    total_loss(out).backward()
    proj = m.decoder.projector.weight.grad
    if source == "clip":  # frozen CLIP features: the projector is unused
        assert proj is None or proj.abs().sum() == 0
    else:
        assert proj is not None and proj.abs().sum() > 0
    assert all(p.grad is None for p in m.student.parameters())


def test_clip_source_features_are_the_unit_norm_dense_map(clip_and_cats):
    from ovlib.models import dense_features

    m = _model(clip_and_cats, x_source="clip", x_mode="csa")
    imgs = torch.randn(2, 3, 64, 64)
    from ovlib.models.film_decoder import clip_block_activations

    acts, grid = clip_block_activations(m.adapter, imgs, m.layers)
    X = m.image_features(imgs, acts, grid)
    torch.testing.assert_close(X, dense_features(m.adapter, imgs, "csa", normalize=True).float())
    torch.testing.assert_close(X.norm(dim=1), torch.ones(2, *grid))


# ------------------------------------------------------------------------------------------------ prior
def test_prior_target_is_the_softmax_of_the_training_free_map(clip_and_cats):
    from ovlib.models import dense_features

    m = _model(clip_and_cats, prior="x+v", prior_tau=10.0)
    imgs = torch.randn(2, 3, 64, 64)
    q = m.prior_target(imgs)
    D = dense_features(m.adapter, imgs, "x+v", normalize=True)
    want = torch.softmax(10.0 * torch.einsum("bdhw,kd->bkhw", D, m.text_bank), dim=1)
    torch.testing.assert_close(q, want)
    torch.testing.assert_close(q.sum(1), torch.ones(2, 8, 8))


def test_prior_loss_is_bce_against_the_target_and_reaches_absent_classes(clip_and_cats):
    m = _model(clip_and_cats, prior="csa")
    imgs = torch.randn(2, 3, 64, 64)
    from ovlib.methods.synseg import pool_to_grid
    from ovlib.models.film_decoder import clip_block_activations

    acts, grid = clip_block_activations(m.adapter, imgs, m.layers)
    loss = m.prior_loss(imgs, acts, grid)
    K = m.text_bank.shape[0]
    logits = m.activation_logits(imgs, m.text_bank)  # (2, K, 64, 64)
    A = pool_to_grid(torch.sigmoid(logits).reshape(2 * K, 64, 64), grid).clamp(1e-6, 1 - 1e-6)
    want = F.binary_cross_entropy(A, m.prior_target(imgs).reshape(2 * K, *grid))
    assert loss.item() == pytest.approx(want.item(), rel=1e-4)
    # in the trainer's dict, weighted by loss_weights["prior"]; its gradient reaches FiLM (every category)
    m.train()
    out = m(_batch())
    assert set(out) == {*SynSeg.loss_names, "prior"}
    out["prior"].backward()
    assert m.decoder.upsample.weight.grad.abs().sum() > 0


def test_prior_hard_targets_and_top_n_classes(clip_and_cats):
    m = _model(clip_and_cats, prior="csa", prior_target="hard", prior_classes=3)
    imgs = torch.randn(2, 3, 64, 64)
    from ovlib.models.film_decoder import clip_block_activations

    acts, grid = clip_block_activations(m.adapter, imgs, m.layers)
    seen = {}
    orig = m.decode

    def spy(a, g, owner, text, project=True):
        seen["owner"], seen["text"] = owner, text
        return orig(a, g, owner, text, project)

    m.decode = spy
    loss = m.prior_loss(imgs, acts, grid)
    assert torch.isfinite(loss)
    assert seen["owner"].tolist() == [0, 0, 0, 1, 1, 1]
    top = m.prior_target(imgs).mean((2, 3)).topk(3, dim=1).indices.reshape(-1)
    torch.testing.assert_close(seen["text"], m.text_bank[top])
    with pytest.raises(ValueError, match="prior_target"):
        SynSegConfig(prior="csa", prior_target="medium")
    with pytest.raises(ValueError, match="prior must be"):
        SynSegConfig(prior="clipseg")
    with pytest.raises(ValueError, match="x_source"):
        SynSegConfig(x_source="text")


def test_empty_batch_with_prior_still_returns_every_term(clip_and_cats):
    m = _model(clip_and_cats, prior="csa", prior_classes=2)
    out = m({"images": torch.randn(2, 3, 64, 64), "category_ids": [torch.tensor([]), torch.tensor([])]})
    assert set(out) == {*SynSeg.loss_names, "prior"} and out["prior"].item() > 0


# ------------------------------------------------------------------------------------------------ evaluation
@pytest.fixture(scope="module")
def tiny_val(tmp_path_factory):
    from ovlib.data import CocoPanoptic, ensure_microworld

    root = tmp_path_factory.mktemp("ch05-val") / "mw"
    ensure_microworld(root, "val2017", n=3, size=64, seed=0, progress=False)
    return CocoPanoptic(root, "val2017")


def test_evaluate_protocols_matches_evaluate_synseg(clip_and_cats, tiny_val):
    m = _model(clip_and_cats).eval()
    cats = clip_and_cats[2]
    ids = [c["id"] for c in cats]
    things = [c["id"] for c in cats if c["isthing"]]
    rows = [i for i, c in enumerate(cats) if c["isthing"]]
    out = evaluate_protocols(synseg_score_fn(m, m.text_bank, 1), tiny_val, ids, things, [0.2, 0.5], image_size=64,
                             n_boot=10, present_only=True)
    ref = evaluate_synseg(m, tiny_val, m.text_bank, ids, SynSegEvalConfig(image_size=64, views=1), n_boot=10,
                          progress=False)
    np.testing.assert_array_equal(out["all"]["confusion"], ref["confusion"])
    ref_bg = evaluate_synseg(m, tiny_val, m.text_bank[rows], things,
                             SynSegEvalConfig(image_size=64, views=1, background=True), thresholds=[0.2, 0.5],
                             n_boot=10, progress=False)
    for t in (0.2, 0.5):
        np.testing.assert_array_equal(out["bg"][t]["confusion"], ref_bg[t]["confusion"])
    ora = evaluate_synseg(m, tiny_val, m.text_bank, ids, SynSegEvalConfig(image_size=64, views=1, present_only=True),
                          n_boot=10, progress=False)
    np.testing.assert_array_equal(out["oracle"]["confusion"], ora["confusion"])


def test_evaluate_protocols_for_a_training_free_baseline(clip_and_cats, tiny_val):
    """The things+stuff protocol of a dense CLIP equals chapter 01's evaluate_ovss; the background protocol
    takes softmax(scale * cos) over the thing rows only."""
    from ovlib.eval._common import dense_fn_for_clip
    from ovlib.eval.segmentation import OVSSConfig, evaluate_ovss

    clip, _, cats = clip_and_cats
    m = _model(clip_and_cats)
    ids = [c["id"] for c in cats]
    things = [c["id"] for c in cats if c["isthing"]]
    fn = dense_fn_for_clip(clip, "x+v")
    out = evaluate_protocols(dense_score_fn(fn, m.text_bank, 64, 32), tiny_val, ids, things, [0.0, 0.99],
                             image_size=64, n_boot=10, bg_scores="cosine")
    ref = evaluate_ovss(fn, tiny_val, m.text_bank, ids, OVSSConfig(image_size=64, crop=64, stride=32), n_boot=10,
                        progress=False)
    np.testing.assert_array_equal(out["all"]["confusion"], ref["confusion"])
    # threshold 0: nothing is background; 0.99: (almost) everything is
    assert out["bg"][0.0]["confusion"][:, :, -1].sum() == 0
    assert out["bg"][0.99]["confusion"][:, :, -1].sum() > out["bg"][0.0]["confusion"][:, :, -1].sum()
    with pytest.raises(ValueError, match="bg_scores"):
        evaluate_protocols(dense_score_fn(fn, m.text_bank, 64, 32), tiny_val, ids, things, [0.1], bg_scores="x")
    with pytest.raises(ValueError, match="foreground ids"):
        evaluate_protocols(dense_score_fn(fn, m.text_bank, 64, 32), tiny_val, ids[:3], things, [0.1])


# ------------------------------------------------------------------------------------------------ skip path
def test_skip_logprobs_and_argmax_at_init(clip_and_cats):
    """The skip path is log softmax(tau cos) of the frozen dense map over the vocabulary; with the identity FiLM
    the decoder adds the same map to every class, so the class argmax is the skip path's (the training-free
    segmentation) at step 0."""
    from ovlib.models import dense_features

    m = _model(clip_and_cats, skip="csa", skip_tau=20.0).eval()
    imgs = torch.randn(2, 3, 64, 64)
    text = m.text_bank[:6]
    lp = m.skip_logprobs(imgs, text)
    D = dense_features(m.adapter, imgs, "csa", normalize=True)
    torch.testing.assert_close(lp, torch.log_softmax(20.0 * torch.einsum("bdhw,kd->bkhw", D, text), dim=1))
    L = m.activation_logits(imgs, text)  # (2, 6, 64, 64)
    base = _model(clip_and_cats).eval().activation_logits(imgs, text)  # same decoder weights, no skip
    up = F.interpolate(lp, size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(L, base + up, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(base - base[:, :1], torch.zeros_like(base), atol=1e-5, rtol=0)  # class-agnostic
    assert torch.equal(L.argmax(1), up.argmax(1))
    # training: the MCCL terms see the skip-shifted maps; gradients still reach only the decoder
    m.train()
    out = m(_batch())
    total_loss(out).backward()
    assert all(p.grad is None for p in m.student.parameters())
    assert m.decoder.upsample.weight.grad.abs().sum() > 0
    assert _model(clip_and_cats).skip_logprobs(imgs, text) is None
    with pytest.raises(ValueError, match="skip must be"):
        SynSegConfig(skip="clipseg")


# ------------------------------------------------------------------------------------------------ study rows
def test_protocol_eval_metrics_by_hand():
    """ProtocolEval's metrics on hand-made confusion matrices: the group mIoU, the things+bg curve and the
    spread rule; class_groups from the categories' split."""
    from ovlib.eval.synseg import ProtocolEval, class_groups

    cats = [{"id": 1, "split": "base"}, {"id": 2, "split": "novel"}, {"id": 3, "split": "stuff"}]
    groups = class_groups(cats)
    assert groups["base"].tolist() == [True, False, True] and groups["novel"].tolist() == [False, True, False]
    assert class_groups([{"id": 1}])["base"].tolist() == [True]
    # one image, 3 classes (rows: ground truth): class 0 perfect (IoU 1); half of class 1 predicted as 2: IoU 2/4
    # for both
    conf = np.array([[[4, 0, 0], [0, 2, 2], [0, 0, 2]]], dtype=float)
    bg = {0.1: {"confusion": np.array([[[3, 1], [0, 4]]], dtype=float)},  # IoU 3/4, 4/5
          0.5: {"confusion": np.array([[[2, 2], [0, 4]]], dtype=float)}}  # IoU 2/4, 4/6
    ev = ProtocolEval({"all": {"confusion": conf}, "bg": bg}, groups)
    assert ev.point("mIoU") == pytest.approx(100 * (1 + 0.5 + 0.5) / 3)
    assert ev.point("mIoU base") == pytest.approx(100 * (1 + 0.5) / 2)
    assert ev.point("mIoU novel") == pytest.approx(50.0)
    lo_t, hi_t = 100 * (2 / 4 + 4 / 6) / 2, 100 * (3 / 4 + 4 / 5) / 2
    assert ev.point("bg mIoU @ 0.1") == pytest.approx(hi_t) and ev.point("bg mIoU @ 0.5") == pytest.approx(lo_t)
    assert ev.point("bg spread") == pytest.approx(hi_t - lo_t)
    assert ev.point("bg spread rule") == pytest.approx(hi_t - lo_t - 0.1 * (hi_t + lo_t) / 2)
    assert ev.interval("mIoU", n_boot=10)[0] == pytest.approx(ev.point("mIoU"))
    with pytest.raises(KeyError, match="mIoU stuf"):
        ev.point("mIoU stuf")
