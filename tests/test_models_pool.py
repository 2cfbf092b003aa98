"""roi_features / mask_pool: RoIAlign conventions (aligned=True, grid units) and mask averaging."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.ops import roi_align

from ovlib.models import mask_pool, roi_features
from ovlib.models.pool import boxes_to_grid


@settings(max_examples=40, deadline=None)
@given(
    c=st.floats(-5, 5, allow_nan=False),
    h=st.integers(1, 6), w=st.integers(1, 6), stride=st.sampled_from([8, 14, 16]),
    box=st.tuples(st.floats(0, 0.9), st.floats(0, 0.9), st.floats(0.05, 1), st.floats(0.05, 1)),
    k=st.integers(1, 3),
)
def test_roi_of_constant_map_is_constant(c, h, w, stride, box, k):
    H, W = h * stride, w * stride
    dense = torch.full((1, 4, h, w), c, dtype=torch.float64)
    x1, y1 = box[0] * W, box[1] * H
    x2, y2 = x1 + box[2] * (W - x1), y1 + box[3] * (H - y1)  # inside the image
    out = roi_features(dense, [torch.tensor([[x1, y1, x2, y2]], dtype=torch.float64)], (H, W), output_size=k)
    assert out.shape == ((1, 4) if k == 1 else (1, 4, k, k))
    torch.testing.assert_close(out, torch.full_like(out, c))


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 7), w=st.integers(1, 7), stride=st.sampled_from([8, 14, 16]), seed=st.integers(0, 999),
       data=st.data())
def test_one_token_box_is_that_token(h, w, stride, seed, data):
    i = data.draw(st.integers(0, h - 1))
    j = data.draw(st.integers(0, w - 1))
    dense = torch.randn(2, 5, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    box = torch.tensor([[j * stride, i * stride, (j + 1) * stride, (i + 1) * stride]], dtype=torch.float64)
    out = roi_features(dense, [box, box], (h * stride, w * stride))
    torch.testing.assert_close(out[0], dense[0, :, i, j])
    torch.testing.assert_close(out[1], dense[1, :, i, j])


def test_boxes_converted_to_grid_units_and_batch_order():
    dense = torch.randn(2, 3, 4, 6, generator=torch.Generator().manual_seed(0))
    b0 = torch.tensor([[0.0, 0.0, 48.0, 32.0], [10.0, 5.0, 90.0, 60.0]])
    b1 = torch.tensor([[16.0, 16.0, 32.0, 64.0]])
    out = roi_features(dense, [b0, b1], (64, 96), output_size=2)
    g0 = boxes_to_grid(b0, (64, 96), (4, 6))
    torch.testing.assert_close(g0[0], torch.tensor([0.0, 0.0, 3.0, 2.0]))
    rois = torch.cat([torch.cat([torch.zeros(2, 1), g0], 1),
                      torch.cat([torch.ones(1, 1), boxes_to_grid(b1, (64, 96), (4, 6))], 1)])
    ref = roi_align(dense, rois, (2, 2), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    assert out.shape == (3, 3, 2, 2)
    torch.testing.assert_close(out, ref)
    # the whole-image box averages the map (aligned, integer bins -> exact bilinear sample means)
    whole = roi_features(dense, [torch.tensor([[0.0, 0.0, 96.0, 64.0]]), torch.zeros(0, 4)], (64, 96))
    assert whole.shape == (1, 3)
    torch.testing.assert_close(whole[0], dense[0].mean(dim=(1, 2)))


def test_roi_gradients_flow():
    dense = torch.randn(1, 2, 3, 3, requires_grad=True)
    roi_features(dense, [torch.tensor([[0.0, 0.0, 24.0, 24.0]])], (48, 48)).sum().backward()
    assert dense.grad.abs().sum() > 0


@pytest.mark.parametrize("bad, msg", [
    (torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 5.0, 9.0]]), r"boxes\[0\]\[1\].*empty"),
    (torch.tensor([[0.0, 0.0, float("nan"), 10.0]]), r"boxes\[0\]\[0\] is not finite"),
    (torch.tensor([[0.0, 0.0, 10.0]]), r"boxes\[0\] must be \(K, 4\)"),
])
def test_bad_boxes_are_named(bad, msg):
    with pytest.raises(ValueError, match=msg):
        roi_features(torch.zeros(1, 2, 4, 4), [bad], (64, 64))


def test_boxes_batch_length_checked():
    with pytest.raises(ValueError, match="2 entries for a batch of 1"):
        roi_features(torch.zeros(1, 2, 4, 4), [torch.zeros(0, 4), torch.zeros(0, 4)], (64, 64))


@settings(max_examples=30, deadline=None)
@given(h=st.integers(1, 6), w=st.integers(1, 6), k=st.integers(1, 4), seed=st.integers(0, 999))
def test_mask_pool_is_the_masked_mean(h, w, k, seed):
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(1, 3, h, w, generator=g, dtype=torch.float64)
    masks = torch.rand(k, h, w, generator=g) > 0.5
    masks[:, 0, 0] = True  # never empty
    out = mask_pool(dense, [masks])
    for r in range(k):
        ref = dense[0][:, masks[r]].mean(dim=1)
        torch.testing.assert_close(out[r], ref)


def test_mask_pool_errors_and_empty():
    dense = torch.randn(2, 3, 4, 4)
    m = torch.zeros(1, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"masks\[1\]\[0\] is empty"):
        mask_pool(dense, [torch.ones(1, 4, 4), m])
    out = mask_pool(dense, [torch.ones(1, 4, 4), m], allow_empty=True)
    assert out.shape == (2, 3) and (out[1] == 0).all()
    with pytest.raises(ValueError, match=r"masks\[0\] must be \(K, 4, 4\)"):
        mask_pool(dense, [torch.ones(1, 8, 8), m])
