"""Context aggregation (Eq. 7) and coupling ratio (Eq. 15) of R-SC-CLIPSelf on hand-made encoders."""

import pytest
import torch
import torch.nn.functional as F

from ovlib.methods.analysis import context_aggregation, coupling_ratio, embed_positions, mask_pooled_tsne

P = 4  # patch size of the toy encoders


class PerToken(torch.nn.Module):
    """Patchify + 2-layer MLP per token: every token ignores its context."""

    def __init__(self, seed=0, dim=8):
        super().__init__()
        torch.manual_seed(seed)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(3 * P * P, 16), torch.nn.GELU(), torch.nn.Linear(16, dim))

    def tokens(self, x):
        B, _, H, W = x.shape
        t = F.unfold(x, P, stride=P).transpose(1, 2)  # (B, N, 3PP)
        return self.mlp(t).transpose(1, 2).reshape(B, -1, H // P, W // P)  # (B, C, h, w)

    @torch.no_grad()
    def forward(self, x):
        return self.tokens(x)


class Mixing(PerToken):
    """Adds a multiple of the image-wide mean token to every token: context leaks into every token."""

    @torch.no_grad()
    def forward(self, x):
        z = self.tokens(x)
        return z + 3.0 * z.mean(dim=(2, 3), keepdim=True)


def _imgs(n, h, w, seed):
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_coupling_ratio_is_one_for_a_context_free_model():
    out = coupling_ratio(PerToken(), _imgs(3, 16, 12, 0), _imgs(3, 16, 12, 1), eps=-2.0)
    assert out["cr"] == pytest.approx(1.0, abs=1e-6)
    assert out["cr_ratio_of_means"] == pytest.approx(1.0, abs=1e-6)
    assert out["n_tokens"] == 3 * 4 * 3 and out["n_excluded"] == 0


def test_coupling_ratio_exceeds_one_when_context_leaks():
    out = coupling_ratio(Mixing(), _imgs(4, 16, 16, 2), _imgs(4, 16, 16, 3))
    assert out["cr"] > 1.0 and out["cr_ratio_of_means"] > 1.0


def test_coupling_ratio_matches_a_direct_computation():
    enc = Mixing(seed=1)
    a, b = _imgs(1, 8, 8, 4), _imgs(1, 8, 8, 5)
    zab = F.normalize(enc(torch.cat([a, b], -1))[0], dim=0).flatten(1)  # (C, 2*2*2)
    za, zb = (F.normalize(enc(x)[0], dim=0).flatten(1) for x in (a, b))
    # left half of a 2x4 grid = columns 0,1 of each row
    left = zab.reshape(-1, 2, 4)[:, :, :2].reshape(-1, 4)
    right = zab.reshape(-1, 2, 4)[:, :, 2:].reshape(-1, 4)
    ratios = []
    for i in range(4):
        sims = left[:, i] @ right
        j = int(sims.argmax())
        den = float(za[:, i] @ zb[:, j])
        if den > 1e-6:
            ratios.append(float(sims[j]) / den)
    out = coupling_ratio(enc, a, b)
    assert out["cr"] == pytest.approx(sum(ratios) / len(ratios), rel=1e-5)
    assert out["n_excluded"] == 4 - len(ratios)


def test_coupling_ratio_rejects_mismatched_pairs():
    with pytest.raises(ValueError, match="alike"):
        coupling_ratio(PerToken(), _imgs(1, 8, 8, 0), _imgs(1, 8, 12, 0))


def test_context_aggregation_of_a_context_free_model_is_its_own_map():
    enc = PerToken()
    target = _imgs(1, 8, 12, 0)[0]
    agg = context_aggregation(enc, target, _imgs(5, 24, 24, 1), P, torch.Generator().manual_seed(0), batch_size=2)
    assert agg.shape == (5, 8, 2, 3)
    own = enc(target[None])[0]
    for n in range(5):
        assert torch.allclose(agg[n], own, atol=1e-5)


def test_context_aggregation_is_the_running_mean_of_the_submaps():
    enc, target, ctx = Mixing(), _imgs(1, 8, 8, 0)[0], _imgs(3, 16, 16, 1)
    pos = torch.tensor([[0, 0], [8, 4], [4, 8]])
    agg = context_aggregation(enc, target, ctx, P, torch.Generator(), positions=pos)
    subs = []
    for i in range(3):
        img = ctx[i].clone()
        y, x = pos[i].tolist()
        img[:, y:y + 8, x:x + 8] = target
        subs.append(enc(img[None])[0, :, y // P:y // P + 2, x // P:x // P + 2])
    for n in range(3):
        assert torch.allclose(agg[n], torch.stack(subs[:n + 1]).mean(0), atol=1e-6)
    assert not torch.allclose(agg[0], agg[2])  # contexts change a coupled model's sub-maps


def test_embed_positions_are_patch_aligned_inside_and_seeded():
    p1 = embed_positions(50, (8, 12), (24, 32), P, torch.Generator().manual_seed(3))
    p2 = embed_positions(50, (8, 12), (24, 32), P, torch.Generator().manual_seed(3))
    assert torch.equal(p1, p2) and (p1 % P == 0).all()
    assert (p1[:, 0] + 8 <= 24).all() and (p1[:, 1] + 12 <= 32).all() and (p1 >= 0).all()
    with pytest.raises(ValueError, match="fit"):
        embed_positions(1, (32, 8), (24, 32), P, torch.Generator())


def test_mask_pooled_tsne_is_seeded():
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(2, 6, 4, 4, generator=g)
    masks = [torch.rand(5, 4, 4, generator=g) > 0.3, torch.rand(4, 4, 4, generator=g) > 0.3]
    for m in masks:
        m[:, 0, 0] = True
    a, b = (mask_pooled_tsne(dense, masks, seed=1, max_iter=250) for _ in range(2))
    assert a.shape == (9, 2) and (a == b).all()


def test_coupling_ratio_pairs_are_the_per_pair_ratios_with_a_valid_count():
    import numpy as np

    from ovlib.methods.analysis import coupling_ratio_pairs
    from ovlib.stats import ratio_stat

    a, b = _imgs(4, 16, 16, 2), _imgs(4, 16, 16, 3)
    arr = coupling_ratio_pairs(Mixing(), a, b)
    per = coupling_ratio(Mixing(), a, b)["cr_per_pair"]
    assert arr.shape == (4, 2) and (arr[:, 1] == 1.0).all()
    np.testing.assert_allclose(arr[:, 0], per)
    assert ratio_stat(arr.sum(0)) == pytest.approx(float(np.mean(per)))
    ones = coupling_ratio_pairs(PerToken(), _imgs(2, 16, 12, 0), _imgs(2, 16, 12, 1))
    np.testing.assert_allclose(ones[ones[:, 1] > 0, 0], 1.0, atol=1e-5)  # context-free: CR = 1 per pair
