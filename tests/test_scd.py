"""Spatial Correlation Distillation (R-SC-CLIPSelf Eqs. 2-5): brute force, chunking, optimum, gradients."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ovlib.methods.scd import (
    correlation_entropy,
    image_tokens,
    region_tokens,
    scd_kl,
    scd_loss,
    scd_loss_naive,
)


def _tokens(R, L, D, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(R, L, D, generator=g, dtype=torch.float64), dim=-1)


def _brute(zs, zt, tau_s, tau_t):
    """Eq. 5 written out with python loops over regions, rows and columns."""
    R, L, _ = zs.shape
    total = 0.0
    for i in range(R):
        for j in range(L):
            cs = [float(zs[i, j] @ zs[i, k]) / tau_s for k in range(L)]
            ct = [float(zt[i, j] @ zt[i, k]) / tau_t for k in range(L)]
            ls = math.log(sum(math.exp(v) for v in cs))
            zt_norm = sum(math.exp(v) for v in ct)
            total += -sum(math.exp(ct[k]) / zt_norm * (cs[k] - ls) for k in range(L))
    return total / (R * L)


@pytest.mark.parametrize("tau_s,tau_t", [(0.2, 0.2), (0.5, 0.1), (1.0, 2.0)])
def test_scd_matches_brute_force(tau_s, tau_t):
    zs, zt = _tokens(2, 5, 3, 0), _tokens(2, 5, 3, 1)
    want = _brute(zs, zt, tau_s, tau_t)
    assert float(scd_loss_naive(zs, zt, tau_s, tau_t)) == pytest.approx(want, rel=1e-5)
    assert float(scd_loss(zs, zt, tau_s, tau_t, chunk=2)) == pytest.approx(want, rel=1e-5)


@settings(max_examples=25, deadline=None)
@given(R=st.integers(1, 3), L=st.integers(1, 12), D=st.integers(1, 6), chunk=st.integers(1, 13),
       tau_s=st.floats(0.05, 2.0), tau_t=st.floats(0.05, 2.0), seed=st.integers(0, 1000))
def test_chunked_equals_unchunked_values_and_gradients(R, L, D, chunk, tau_s, tau_t, seed):
    zs = _tokens(R, L, D, seed).float().requires_grad_(True)
    zt = _tokens(R, L, D, seed + 1).float()
    naive = scd_loss_naive(zs, zt, tau_s, tau_t)
    (g_naive,) = torch.autograd.grad(naive, zs)
    zs2 = zs.detach().clone().requires_grad_(True)
    chunked = scd_loss(zs2, zt, tau_s, tau_t, chunk=chunk)
    (g_chunk,) = torch.autograd.grad(chunked, zs2)
    assert torch.allclose(chunked, naive, rtol=1e-5, atol=1e-5)
    assert torch.allclose(g_chunk, g_naive, rtol=1e-4, atol=1e-6)


def test_chunked_gradient_passes_gradcheck():
    zs = _tokens(1, 5, 3, 3).requires_grad_(True)
    zt = _tokens(1, 5, 3, 4)
    assert torch.autograd.gradcheck(lambda z: scd_loss(z, zt, 0.3, 0.2, chunk=2), (zs,), fast_mode=True)


@pytest.mark.parametrize("chunk", [None, 3])
def test_student_equal_teacher_is_zero_gradient_minimum(chunk):
    zt = _tokens(3, 9, 5, 7).float()
    zs = zt.clone().requires_grad_(True)
    loss = scd_loss(zs, zt, 0.2, 0.2, chunk=chunk)
    (g,) = torch.autograd.grad(loss, zs)
    assert g.abs().max() < 1e-6  # optimum: 0 gradient
    # value there is the teacher's entropy (cross entropy >= entropy), the KL form is 0
    assert float(loss.detach()) == pytest.approx(float(correlation_entropy(zt, 0.2)), abs=1e-5)
    assert abs(float(scd_kl(zt.clone(), zt, 0.2, 0.2, chunk=chunk))) < 1e-5
    # any perturbation of the student increases the loss
    for s in range(5):
        pert = F.normalize(zt + 0.3 * _tokens(3, 9, 5, 100 + s).float(), dim=-1)
        assert float(scd_loss(pert, zt, 0.2, 0.2, chunk=chunk)) > float(loss.detach()) + 1e-6
        assert float(scd_kl(pert, zt, 0.2, 0.2, chunk=chunk)) > 0


def test_teacher_receives_no_gradient():
    zs = _tokens(1, 4, 3, 0).float().requires_grad_(True)
    zt = _tokens(1, 4, 3, 1).float().requires_grad_(True)
    for chunk in (None, 2):
        scd_loss(zs, zt, chunk=chunk).backward()
        assert zt.grad is None and zs.grad is not None
        zs.grad = None


def test_scd_rejects_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        scd_loss(torch.zeros(1, 4, 3), torch.zeros(1, 5, 3))
    with pytest.raises(ValueError, match="temperatures"):
        scd_loss(torch.zeros(1, 4, 3), torch.zeros(1, 4, 3), tau_s=0.0)
    with pytest.raises(ValueError, match="at least one region"):
        scd_loss(torch.zeros(0, 4, 3), torch.zeros(0, 4, 3))
    with pytest.raises(ValueError, match="chunk"):
        scd_loss(torch.zeros(1, 4, 3), torch.zeros(1, 4, 3), chunk=0)


def test_region_tokens_shapes_and_whole_image_identity():
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(2, 6, 4, 4, generator=g)
    boxes = [torch.tensor([[0.0, 0.0, 32.0, 32.0]]), torch.tensor([[0.0, 0.0, 16.0, 16.0], [4.0, 8.0, 30.0, 20.0]])]
    z = region_tokens(dense, boxes, (32, 32), grid=4)  # (R, L, C)
    assert z.shape == (3, 16, 6)
    assert torch.allclose(z.norm(dim=-1), torch.ones(3, 16), atol=1e-5)
    # a whole-image box at the native grid reproduces the (normalised) map, row-major
    assert torch.allclose(z[0], image_tokens(dense)[0], atol=1e-5)
    assert region_tokens(dense, boxes, (32, 32), grid=1).shape == (3, 1, 6)


@pytest.mark.parametrize("chunk", [None, 3])
def test_scd_is_computed_in_float32_under_autocast(chunk):
    zs = _tokens(2, 6, 4, 0).float().requires_grad_(True)
    zt = _tokens(2, 6, 4, 1).float()
    want = scd_loss_naive(zs, zt)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = scd_loss(zs, zt, chunk=chunk)
        got.backward()
    assert got.dtype == torch.float32 and zs.grad.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-6)
