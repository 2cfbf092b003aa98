"""The Refiner (R-SC-CLIPSelf Eqs. 8-14): exact clone at init, heads wired, losses, crops, checkpoints."""

import math

import pytest
import torch

from ovlib.io import atomic_save
from ovlib.methods.refiner import (
    Refiner,
    cosine_tokens,
    crop_images,
    infonce_tokens,
    local_box_generator,
    sample_local_boxes,
)
from ovlib.methods.rsc import load_refiner
from ovlib.models import dense_features, load_clip, vit_adapter


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    m, _, _ = load_clip("micro-clip")
    return m.eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("K", [1, 2, 4])
def test_cloned_blocks_reproduce_the_last_k_blocks_exactly(clip, images, K):
    ad = vit_adapter(clip)
    ref = Refiner(clip, K, None, False)
    x, _ = ad.embed(images)
    x = ad.run_blocks(x, 0, ad.num_blocks - K)
    assert torch.equal(ref.run_blocks(x), ad.run_blocks(x, ad.num_blocks - K, ad.num_blocks))
    # copies, not shared modules
    assert all(a is not b for a, b in zip(ref.blocks, ad.blocks[-K:]))


@pytest.mark.parametrize("late", [False, True])
def test_untrained_refiner_with_heads_reproduces_the_model(clip, images, late):
    ref = Refiner(clip, 2, (1, 2), True, hidden=32, late=late)
    want = dense_features(clip, images, "vanilla", normalize=False)  # (B, C, h, w)
    got = ref.dense(images, normalize=False)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5)


def test_heads_enter_where_the_paper_says(clip, images):
    torch.manual_seed(3)
    base = Refiner(clip, 2, (1, 2), True, hidden=32)
    boxes = [torch.tensor([[0.0, 0.0, 40.0, 48.0]]), torch.tensor([[8.0, 8.0, 64.0, 56.0]])]
    z0 = base(images, boxes, 4)
    assert z0.shape == (2, 16, vit_adapter(clip).out_dim)
    for head in ("inter", "cls_gen"):
        ref = Refiner(clip, 2, (1, 2), True, hidden=32)
        ref.load_state_dict(base.state_dict())
        torch.nn.init.normal_(getattr(ref, head)[2].weight, std=0.5)
        assert not torch.allclose(ref(images, boxes, 4), z0, atol=1e-4), head
    # the Refiner's own parameters get gradients; the early blocks f_I^A run without autograd
    base(images, boxes, 4).sum().backward()
    assert base.blocks[0].attn.in_proj_weight.grad is not None
    assert base.inter[0].weight.grad is not None and base.cls_gen[0].weight.grad is not None
    assert all(p.grad is None for p in vit_adapter(clip).blocks[0].parameters())
    clip.zero_grad(set_to_none=True)


def test_refiner_rejects_bad_configs(clip):
    with pytest.raises(ValueError, match="num_blocks"):
        Refiner(clip, 5)
    with pytest.raises(ValueError, match="inter_layers"):
        Refiner(clip, 2, (1, 3))  # block 3 belongs to the cloned part


def test_refiner_checkpoint_round_trip(clip, images, tmp_path):
    torch.manual_seed(4)
    ref = Refiner(clip, 3, (1, 1), True, hidden=16)
    torch.nn.init.normal_(ref.cls_gen[2].weight, std=0.1)
    boxes = [torch.tensor([[0.0, 0.0, 30.0, 30.0]]), torch.tensor([[10.0, 5.0, 60.0, 40.0]])]
    atomic_save({"model": {f"refiner.{k}": v for k, v in ref.state_dict().items()}, "step": 3}, tmp_path / "a.pt")
    atomic_save(ref.state_dict(), tmp_path / "b.pt")
    for name in ("a.pt", "b.pt"):
        back = load_refiner(tmp_path / name, clip)
        assert len(back.blocks) == 3
        assert not any(p.requires_grad for p in back.parameters())
        assert torch.allclose(back(images, boxes, 4), ref(images, boxes, 4), atol=1e-5)
    with pytest.raises(FileNotFoundError, match="refiner"):
        load_refiner(tmp_path / "missing.pt", clip)
    with pytest.raises(ValueError, match="no Refiner"):
        atomic_save({"x": torch.zeros(1)}, tmp_path / "c.pt")
        load_refiner(tmp_path / "c.pt", clip)


def test_infonce_hand_computed_case():
    pred = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # (1, 2, 2); normalised: e1, e2
    target = torch.tensor([[[3.0, 0.0], [1.0, 1.0]]])  # normalised: e1, (e1+e2)/sqrt2
    s = 1 / math.sqrt(2)
    row0 = -math.log(math.exp(1.0) / (math.exp(1.0) + math.exp(s)))  # positive k=0: cos 1, negative cos s
    row1 = -math.log(math.exp(s) / (math.exp(0.0) + math.exp(s)))  # positive k=1: cos s, negative cos 0
    assert float(infonce_tokens(pred, target, tau=1.0)) == pytest.approx((row0 + row1) / 2, rel=1e-6)
    row0t = -math.log(1 / (1 + math.exp((s - 1) / 0.5)))
    row1t = -math.log(math.exp(s / 0.5) / (1 + math.exp(s / 0.5)))
    assert float(infonce_tokens(pred, target, tau=0.5)) == pytest.approx((row0t + row1t) / 2, rel=1e-6)
    assert float(cosine_tokens(pred, target)) == pytest.approx(1 - (1 + s) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="alike"):
        infonce_tokens(pred, target[:, :1])


def test_infonce_prefers_matching_positions():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 6, 8, generator=g)
    perm = t[:, torch.randperm(6, generator=g)]
    assert float(infonce_tokens(t, t, 0.1)) < float(infonce_tokens(perm, t, 0.1))


def test_local_boxes_seeded_in_range_and_at_scale():
    b1 = sample_local_boxes(160, 96, 4, (0.3, 0.7), local_box_generator(7, torch.ones(2, 4)))
    b2 = sample_local_boxes(160, 96, 4, (0.3, 0.7), local_box_generator(7, torch.ones(2, 4)))
    b3 = sample_local_boxes(160, 96, 4, (0.3, 0.7), local_box_generator(8, torch.ones(2, 4)))
    assert torch.equal(b1, b2) and not torch.equal(b1, b3)
    w, h = b1[:, 2] - b1[:, 0], b1[:, 3] - b1[:, 1]
    assert ((w >= 0.3 * 160 - 1e-3) & (w <= 0.7 * 160 + 1e-3)).all()
    assert ((h >= 0.3 * 96 - 1e-3) & (h <= 0.7 * 96 + 1e-3)).all()
    assert (b1[:, :2] >= 0).all() and (b1[:, 2] <= 160 + 1e-4).all() and (b1[:, 3] <= 96 + 1e-4).all()
    with pytest.raises(ValueError, match="scale"):
        sample_local_boxes(10, 10, 1, (0.0, 0.5), torch.Generator())


def test_crop_images_resamples_the_box_pixels():
    H = W = 32
    ramp = torch.arange(W, dtype=torch.float32).expand(H, W)  # value = column index
    img = torch.stack([ramp, ramp.t(), torch.ones(H, W)])[None]  # (1, 3, H, W)
    box = torch.tensor([[4.0, 6.0, 20.0, 26.0]])
    out = crop_images(img, [box], 8)  # (1, 3, 8, 8)
    c = torch.arange(8, dtype=torch.float32)
    want_x = 4.0 - 0.5 + (c + 0.5) * 16 / 8  # pixel centres at integer + 0.5 (aligned=True)
    want_y = 6.0 - 0.5 + (c + 0.5) * 20 / 8
    assert torch.allclose(out[0, 0], want_x.expand(8, 8), atol=1e-4)
    assert torch.allclose(out[0, 1], want_y[:, None].expand(8, 8), atol=1e-4)
    assert torch.allclose(out[0, 2], torch.ones(8, 8))
