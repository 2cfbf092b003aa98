"""load_vfm / vfm_patch_features / patch_correlation."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ovlib.io import atomic_save
from ovlib.models import WeightsUnavailable, load_vfm, patch_correlation, renormalize, vfm_patch_features


@pytest.fixture(scope="module")
def micro_vfm():
    return load_vfm("micro-vfm")


def test_micro_vfm_config(micro_vfm):
    m = micro_vfm
    assert m.patch_embed.patch_size == (8, 8) and m.embed_dim == 128 and len(m.blocks) == 4
    assert m.blocks[0].attn.num_heads == 4 and m.num_prefix_tokens == 1 and not m.training


def test_patch_features_match_forward_features(micro_vfm):
    x = torch.randn(2, 3, 48, 80, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        f = vfm_patch_features(micro_vfm, x, (6, 10))
        ref = micro_vfm.forward_features(x)[:, 1:]  # (B, 60, C)
    assert f.shape == (2, 128, 6, 10)
    torch.testing.assert_close(f.flatten(2).transpose(1, 2), ref)


def test_patch_features_resize_to_the_clip_grid(micro_vfm):
    x = torch.randn(1, 3, 100, 70, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        f = vfm_patch_features(micro_vfm, x, (5, 4))
        ref = micro_vfm.forward_features(F.interpolate(x, size=(40, 32), mode="bilinear", align_corners=False))
    assert f.shape == (1, 128, 5, 4)
    torch.testing.assert_close(f.flatten(2).transpose(1, 2), ref[:, 1:])


def test_dinov2_registers_are_stripped():
    m = load_vfm("vit_small_patch14_reg4_dinov2.lvd142m")  # random init, no download
    assert m.num_prefix_tokens == 5
    x = torch.randn(1, 3, 50, 50)
    with torch.no_grad():
        f = vfm_patch_features(m, x, (3, 4))  # resized to 42 x 56 px
        ref = m.forward_features(F.interpolate(x, size=(42, 56), mode="bilinear", align_corners=False))
    assert f.shape == (1, 384, 3, 4)
    torch.testing.assert_close(f.flatten(2).transpose(1, 2), ref[:, 5:])


def test_vfm_checkpoint_round_trip(micro_vfm, tmp_path):
    sd = {k: v + 1 for k, v in micro_vfm.state_dict().items()}
    atomic_save(sd, tmp_path / "vfm.pt")
    m = load_vfm("micro-vfm", pretrained=str(tmp_path / "vfm.pt"))
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k])


def test_vfm_hub_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache("timm/vit_small_patch14_reg4_dinov2.lvd142m", "model.safetensors"), str):
        pytest.skip("cached here")
    t = time.perf_counter()
    with pytest.raises(WeightsUnavailable, match="not available offline.*pretrained='/path/to/"):
        load_vfm("vit_small_patch14_reg4_dinov2.lvd142m", pretrained="hub")
    assert time.perf_counter() - t < 10
    with pytest.raises(ValueError, match="unknown VFM"):
        load_vfm("nope")


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 4), w=st.integers(1, 4), c=st.integers(1, 6), seed=st.integers(0, 99))
def test_patch_correlation_is_the_cosine_matrix(b, h, w, c, seed):
    x = torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    s = patch_correlation(x)
    assert s.shape == (b, h * w, h * w)
    tok = x.flatten(2).transpose(1, 2)
    for bi in range(b):
        for i in range(h * w):
            for j in range(h * w):
                ref = F.cosine_similarity(tok[bi, i], tok[bi, j], dim=0)
                torch.testing.assert_close(s[bi, i, j], ref)
    torch.testing.assert_close(patch_correlation(tok), s)


def test_renormalize_round_trip():
    from ovlib.models.clip import OPENAI_MEAN, OPENAI_STD

    raw = torch.rand(2, 3, 4, 5, dtype=torch.float64)
    inet_m, inet_s = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    clip_x = (raw - torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    want = (raw - torch.tensor(inet_m).view(1, 3, 1, 1)) / torch.tensor(inet_s).view(1, 3, 1, 1)
    torch.testing.assert_close(renormalize(clip_x, OPENAI_MEAN, OPENAI_STD, inet_m, inet_s), want)
