"""MAE pre-training of the micro VFM (ovlib.train.mae): patchify, masking, loss, encoder, training and resume."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ovlib.io import safe_load
from ovlib.models import load_vfm
from ovlib.train.mae import (
    MaeDecoder,
    MaeVfmPretrainConfig,
    mae_encode,
    mae_loss,
    patchify,
    pretrain_vfm_mae,
    random_keep,
)
from ovlib.train.pretrain import vfm_tokens


def test_patchify_hand_case():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)
    p = patchify(x, 2)  # (2, 2*3, 12)
    assert p.shape == (2, 6, 12)
    # token (row 1, column 2) of image 1 is the 2x2 window at rows 2-3, columns 4-5, flattened (row, col, channel)
    want = x[1, :, 2:4, 4:6].permute(1, 2, 0).reshape(-1)
    torch.testing.assert_close(p[1, 1 * 3 + 2], want)
    with pytest.raises(ValueError, match="multiple of the patch"):
        patchify(torch.zeros(1, 3, 5, 6), 2)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 4), tokens=st.integers(1, 50), ratio=st.floats(0.0, 0.95), seed=st.integers(0, 100))
def test_random_keep_partitions_the_tokens(n, tokens, ratio, seed):
    keep, masked = random_keep(n, tokens, ratio, torch.Generator().manual_seed(seed))
    k = max(1, tokens - int(round(tokens * ratio)))
    assert keep.shape == (n, k) and masked.shape == (n, tokens)
    assert (keep.diff(dim=1) > 0).all()  # distinct, ascending
    for i in range(n):  # the visible tokens are exactly the unmasked ones
        assert set(keep[i].tolist()) == set(torch.nonzero(~masked[i]).flatten().tolist())


def test_random_keep_rejects_a_full_mask():
    with pytest.raises(ValueError, match="mask_ratio"):
        random_keep(1, 10, 1.0, torch.Generator())


def test_mae_loss_hand_case():
    pred = torch.zeros(1, 2, 4)
    target = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 9.0]]])
    masked = torch.tensor([[True, False]])
    # raw pixels: only token 0 counts, mean of squares (1 + 4 + 9 + 16) / 4
    assert mae_loss(pred, target, masked, norm_pix=False).item() == pytest.approx(7.5)
    # normalised per token: (t - mean) / sqrt(var + eps), var unbiased; the mean square is (n - 1) / n (eps -> 0)
    assert mae_loss(pred, target, masked, norm_pix=True, eps=0.0).item() == pytest.approx(3 / 4)
    masked2 = torch.tensor([[True, True]])
    both = mae_loss(pred, target, masked2, norm_pix=False).item()
    assert both == pytest.approx((7.5 + (25 * 3 + 81) / 4) / 2)


def test_mae_encode_with_every_token_is_the_vit_forward():
    vfm = load_vfm("micro-vfm").eval()
    x = torch.randn(2, 3, 32, 32)
    full = mae_encode(vfm, x)  # (2, 16, C)
    torch.testing.assert_close(full.transpose(1, 2).reshape(2, -1, 4, 4), vfm_tokens(vfm, x))
    keep = torch.tensor([[0, 5, 9], [1, 2, 15]])
    vis = mae_encode(vfm, x, keep)
    assert vis.shape == (2, 3, vfm.embed_dim)
    # a visible token sees only the visible ones: changing a dropped patch does not change it
    x2 = x.clone()
    x2[0, :, 8:16, 8:16] += 1.0  # token (1, 1) = index 5 of image 0 is visible; token (2, 2) = 10 is not
    x3 = x.clone()
    x3[0, :, 16:24, 16:24] += 1.0
    assert not torch.allclose(mae_encode(vfm, x2, keep)[0], vis[0])
    torch.testing.assert_close(mae_encode(vfm, x3, keep)[0], vis[0])


def test_decoder_places_the_visible_tokens_and_grads_reach_the_encoder():
    torch.manual_seed(0)
    vfm = load_vfm("micro-vfm")
    dec = MaeDecoder(vfm.embed_dim, 16, 1, 2, patch=8, grid=4)
    x = torch.randn(2, 3, 32, 32)
    keep, masked = random_keep(2, 16, 0.75, torch.Generator().manual_seed(0))
    pred = dec(mae_encode(vfm, x, keep), keep)
    assert pred.shape == (2, 16, 8 * 8 * 3)
    loss = mae_loss(pred, patchify(x, 8), masked)
    loss.backward()
    assert vfm.patch_embed.proj.weight.grad.abs().sum() > 0 and dec.mask_token.grad.abs().sum() > 0


_MAE = MaeVfmPretrainConfig(scene_size=64, batch_size=8, steps=20, warmup=2, decoder_dim=32, decoder_depth=1,
                            ckpt_every=1000, precision="fp32", data_pipeline="inline")


def test_mae_vfm_trains_caches_and_resumes_exactly(tmp_path):
    vfm, info = pretrain_vfm_mae(_MAE, tmp_path / "a", progress=False)
    losses = [h["loss"] for h in info["history"]]
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) < sum(losses[:5])  # fresh scenes every step: compare means of 5 steps
    ck = safe_load(info["path"])  # weights_only=True
    assert set(ck["model"]) == set(vfm.state_dict())
    again, info2 = pretrain_vfm_mae(_MAE, tmp_path / "a", progress=False)
    assert info2["loaded"]
    _, part = pretrain_vfm_mae(_MAE, tmp_path / "b", progress=False, max_steps=3)
    assert part["path"].endswith(".state.pt")
    resumed, info3 = pretrain_vfm_mae(_MAE, tmp_path / "b", progress=False)
    assert [h["step"] for h in info3["history"]] == list(range(1, 21))
    for (n, p), (_, q) in zip(vfm.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(p, q, msg=n)
