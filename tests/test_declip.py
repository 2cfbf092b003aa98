"""DeCLIP: content/context losses against brute force, and the Distiller on a fixed synthetic batch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ovlib.methods.declip import (
    DeCLIP,
    content_loss,
    context_loss,
    merge_heads,
    resize_tokens,
    student_context_similarity,
)
from ovlib.models import dense_features, roi_features
from tests.helpers.method_batches import micro_nets, synthetic_method_batch


# ------------------------------------------------------------------------------------------------ pure functions
def test_merge_heads_matches_declip_view_order():
    B, H, N, d = 2, 3, 5, 4
    x = torch.randn(B, H, N, d)
    m = merge_heads(x)
    assert m.shape == (B, N, H * d)
    for b in range(B):
        for n in range(N):
            assert torch.equal(m[b, n], torch.cat([x[b, h, n] for h in range(H)]))
    # DeCLIP: (B*H, N, d) -> transpose(0, 1) -> view(N, B, H*d) -> transpose(0, 1)
    ref = x.reshape(B * H, N, d).transpose(0, 1).reshape(N, B, H * d).transpose(0, 1)
    assert torch.equal(m, ref)


def _brute_context(S_s, S_t):
    B, M, _ = S_s.shape
    tot = 0.0
    for b in range(B):
        for m in range(M):
            tot += math.sqrt(sum((float(S_t[b, m, j]) - float(S_s[b, m, j])) ** 2 for j in range(M)))
    return tot / (B * M)


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 3), M=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_context_loss_is_mean_row_norm(B, M, seed):
    g = torch.Generator().manual_seed(seed)
    S_s, S_t = torch.randn(B, M, M, generator=g), torch.randn(B, M, M, generator=g)
    assert context_loss(S_s, S_t).item() == pytest.approx(_brute_context(S_s, S_t), rel=1e-5, abs=1e-6)
    assert context_loss(S_s, S_s.clone()).item() == 0.0


def test_context_loss_gradient_finite_at_zero_and_shape_errors():
    S = torch.randn(2, 4, 4, requires_grad=True)
    context_loss(S, S.detach().clone()).backward()
    assert torch.isfinite(S.grad).all()
    with pytest.raises(ValueError, match="B, M, M"):
        context_loss(torch.zeros(1, 3, 3), torch.zeros(1, 4, 4))


def test_content_loss_hand_case():
    s = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # cosines 1 and 0 -> 1 - 0.5
    assert content_loss(s, t).item() == pytest.approx(0.5)
    assert content_loss(s, s * 7).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="R = 0"):
        content_loss(torch.zeros(0, 2), torch.zeros(0, 2))


def test_student_context_similarity_brute_force():
    B, H, N, d = 2, 2, 4, 3
    q, k = torch.randn(B, H, N, d), torch.randn(B, H, N, d)

    def cos_mat(x):  # x (B, H, N, d): per token, concatenate heads, cosine over all pairs
        out = torch.zeros(B, N, N)
        for b in range(B):
            for i in range(N):
                for j in range(N):
                    a = torch.cat([x[b, h, i] for h in range(H)])
                    c = torch.cat([x[b, h, j] for h in range(H)])
                    out[b, i, j] = F.cosine_similarity(a, c, dim=0)
        return out

    torch.testing.assert_close(student_context_similarity({"q": q}, "qq"), cos_mat(q), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(student_context_similarity({"k": k}, "kk"), cos_mat(k), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(student_context_similarity({"q": q, "k": k}, "csa"), (cos_mat(q) + cos_mat(k)) / 2,
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs 'k'"):
        student_context_similarity({"q": q}, "csa")
    with pytest.raises(ValueError, match="context mode"):
        student_context_similarity({"q": q}, "vv")


def test_resize_tokens_identity_and_bilinear():
    x = torch.randn(2, 6, 5)  # 2x3 grid
    assert resize_tokens(x, (2, 3), (2, 3)) is x
    y = resize_tokens(x, (2, 3), (4, 6))
    ref = F.interpolate(x.transpose(1, 2).reshape(2, 5, 2, 3), size=(4, 6), mode="bilinear", align_corners=False)
    torch.testing.assert_close(y, ref.flatten(2).transpose(1, 2))
    # a constant map stays constant
    c = torch.ones(1, 4, 3)
    torch.testing.assert_close(resize_tokens(c, (2, 2), (3, 3)), torch.ones(1, 9, 3))
    with pytest.raises(ValueError, match="grid"):
        resize_tokens(x, (3, 3), (2, 2))


# ------------------------------------------------------------------------------------------------ the Distiller
def synthetic_batch(B=2, size=32, vfm_size=32, K=2, seed=0):
    """Fixed batch: CLIP-normalised-like images, K boxes per image, 64-px crops, VFM images, labels."""
    return synthetic_method_batch(B, size, K, seed, vfm_size=vfm_size)


@pytest.fixture(scope="module")
def nets():
    return micro_nets()


def _fresh(nets):
    import copy

    student, teacher, vfm, tok = nets
    return copy.deepcopy(student), teacher, vfm, tok


def test_declip_needs_vfm_and_valid_mode(nets):
    student, teacher, vfm, _ = _fresh(nets)
    with pytest.raises(ValueError, match="vfm"):
        DeCLIP(student, {"teacher": teacher})
    with pytest.raises(ValueError, match="mode"):
        DeCLIP(student, {"teacher": teacher, "vfm": vfm}, mode="vv")
    m = DeCLIP(student, {"teacher": teacher, "vfm": vfm})
    b = synthetic_batch()
    del b["vfm_images"]
    with pytest.raises(KeyError, match="vfm_images"):
        m(b)


def test_declip_losses_match_manual_pipeline(nets):
    student, teacher, vfm, _ = _fresh(nets)
    m = DeCLIP(student, {"teacher": teacher, "vfm": vfm}, mode="qq")
    b = synthetic_batch()
    out = m(b)
    assert set(out) == {"content", "context"}
    # content: RoIAlign of the UNnormalised qq map, then normalise
    dense = dense_features(student, b["images"], "qq", normalize=False, scale=False, residual=False, ffn=False,
                           rope=False)
    rois = F.normalize(roi_features(dense, b["boxes"], (32, 32)), dim=-1)
    t = F.normalize(teacher.encode_image(b["crops"]), dim=-1)
    assert out["content"].item() == pytest.approx(1 - (rois * t).sum(-1).mean().item(), abs=1e-5)
    # pool-then-normalise differs from CLIPSelf's normalise-then-pool on this batch
    rois_n = F.normalize(roi_features(F.normalize(dense, dim=1), b["boxes"], (32, 32)), dim=-1)
    assert not torch.allclose(rois, rois_n, atol=1e-4)
    # context: against the VFM cosine matrix on the same 4x4 grid
    from ovlib.models import patch_correlation, vfm_patch_features

    _, qkv = dense_features(student, b["images"], "qq", normalize=False, scale=False, residual=False, ffn=False,
                            rope=False, return_qkv=True)
    S_t = patch_correlation(vfm_patch_features(vfm, b["vfm_images"], (4, 4)))
    ref = _brute_context(student_context_similarity(qkv, "qq").detach(), S_t)
    assert out["context"].item() == pytest.approx(ref, rel=1e-4)


def test_declip_resizes_student_to_vfm_grid(nets):
    student, teacher, vfm, _ = _fresh(nets)
    m = DeCLIP(student, {"teacher": teacher, "vfm": vfm}, mode="csa")
    b = synthetic_batch(vfm_size=48)  # VFM grid 6x6, student grid 4x4
    out = m(b)
    assert torch.isfinite(out["context"])
    _, qkv = m.student_dense(b["images"])
    S_s = student_context_similarity(qkv, "csa", (4, 4), (6, 6))
    assert S_s.shape == (2, 36, 36)


@pytest.mark.parametrize("mode", ["qq", "csa"])
def test_declip_three_steps_decrease_on_fixed_batch(nets, mode):
    student, teacher, vfm, _ = _fresh(nets)
    m = DeCLIP(student, {"teacher": teacher, "vfm": vfm}, mode=mode)
    m.train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    b = synthetic_batch()
    totals = []
    for _ in range(3):
        out = m(b)
        assert all(torch.isfinite(v) for v in out.values())
        total = out["content"] + 0.1 * out["context"]
        opt.zero_grad()
        total.backward()
        opt.step()
        totals.append(total.item())
    with torch.no_grad():
        out = m(b)
    totals.append((out["content"] + 0.1 * out["context"]).item())
    assert totals[-1] < totals[0], totals
    # frozen networks untouched and gradient-free
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in vfm.parameters())


def test_declip_scale_option_reaches_last_block(nets):
    student, teacher, vfm, _ = _fresh(nets)
    b = synthetic_batch()
    plain = DeCLIP(student, {"teacher": teacher, "vfm": vfm}, mode="qq")
    scaled = DeCLIP(student, {"teacher": teacher, "vfm": vfm}, mode="qq", scale=True)
    d0, _ = plain.student_dense(b["images"])
    d1, _ = scaled.student_dense(b["images"])
    ref = dense_features(student, b["images"], "qq", normalize=False, scale=True, residual=False, ffn=False,
                         rope=False)
    torch.testing.assert_close(d1, ref)
    assert not torch.allclose(d0, d1, atol=1e-4)
