"""Region sampling and crop geometry: exact hand-made cases and properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ovlib.data.regions import (
    CenterPadCrop,
    ResizeLongestPad,
    boxes_to_grid,
    boxes_to_tensor,
    crop_regions,
    denormalize_boxes,
    expand_box,
    grid_boxes,
    grid_choices,
    mask_to_box,
    normalize_boxes,
    sample_box_regions,
    sample_grid_boxes,
)

# the CLIPSelf set for M = 6, enumerated by hand: rows m, cols n with ceil(m/2) <= n <= min(2m, 6)
CLIPSELF_M6 = {
    (1, 1),
    (1, 2),
    (2, 1),
    (2, 2),
    (2, 3),
    (2, 4),
    (3, 2),
    (3, 3),
    (3, 4),
    (3, 5),
    (3, 6),
    (4, 2),
    (4, 3),
    (4, 4),
    (4, 5),
    (4, 6),
    (5, 3),
    (5, 4),
    (5, 5),
    (5, 6),
    (6, 3),
    (6, 4),
    (6, 5),
    (6, 6),
}


def test_grid_choices_equal_clipself_set():
    ch = grid_choices(6)
    assert set(ch) == CLIPSELF_M6 and len(ch) == len(CLIPSELF_M6) == 24
    assert grid_choices(1) == [(1, 1)]
    with pytest.raises(ValueError):
        grid_choices(0)


def test_grid_boxes_hand_case():
    b = grid_boxes(2, 3, 90, 40)  # 2 rows, 3 cols of a 90 x 40 image: cells 30 x 20, row-major
    assert b.shape == (6, 4)
    assert (
        b[0].tolist() == [0, 0, 30, 20]
        and b[2].tolist() == [60, 0, 90, 20]
        and b[4].tolist() == [30, 20, 60, 40]
    )


def test_sample_grid_boxes_choices_and_tiling():
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(600):
        boxes, (m, n) = sample_grid_boxes(120, 90, g, return_choice=True)
        seen.add((m, n))
        assert boxes.shape == (min(m * n, 20), 4)
        ref = {tuple(r) for r in grid_boxes(m, n, 120, 90).tolist()}
        got = [tuple(r) for r in boxes.tolist()]
        assert len(set(got)) == len(got) and set(got) <= ref  # distinct cells of the chosen grid
        if m * n <= 20:
            area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sum()
            assert torch.isclose(area, torch.tensor(120.0 * 90.0))
    assert seen == CLIPSELF_M6


def test_sample_grid_boxes_seeded_and_shuffled():
    a = sample_grid_boxes(64, 64, 3)
    b = sample_grid_boxes(64, 64, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    orders = set()
    for s in range(40):
        boxes, (m, n) = sample_grid_boxes(64, 64, s, return_choice=True)
        if (m, n) == (2, 2):
            orders.add(tuple(map(tuple, boxes.tolist())))
    assert len(orders) >= 2  # cells are shuffled
    with pytest.raises(TypeError):
        sample_grid_boxes(64, 64, "seed")


def test_expand_box_hand_cases():
    b = torch.tensor([[10.0, 20.0, 30.0, 60.0]])
    assert expand_box(b, 1.5, 100, 100).tolist() == [[5.0, 10.0, 35.0, 70.0]]
    assert expand_box(b, 1.5, 32, 65).tolist() == [[5.0, 10.0, 32.0, 65.0]]  # clipped to the image
    assert expand_box(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), 2.0, 100, 100).tolist() == [
        [0.0, 0.0, 15.0, 15.0]
    ]
    out = expand_box(np.array([[10, 20, 30, 60]], np.float32), 1.0, 100, 100)
    assert isinstance(out, np.ndarray) and out.tolist() == [[10, 20, 30, 60]]
    with pytest.raises(ValueError, match=r"\(K, 4\)"):
        expand_box(torch.zeros(4), 1.5, 10, 10)


def test_mask_to_box_hand_cases():
    m = np.zeros((10, 12), bool)
    m[3, 5] = True
    assert mask_to_box(m).tolist() == [5, 3, 6, 4]
    m[7, 2] = True
    assert mask_to_box(m).tolist() == [2, 3, 6, 8]
    ms = torch.zeros(2, 4, 4, dtype=torch.bool)
    ms[0, 0, 0] = ms[1, 3, 3] = True
    assert mask_to_box(ms).tolist() == [[0, 0, 1, 1], [3, 3, 4, 4]]
    with pytest.raises(ValueError, match=r"mask\(s\) \[1\] are empty"):
        mask_to_box(np.stack([m, np.zeros_like(m)]))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.data())
def test_mask_to_box_rectangles(h, w, data):
    y0 = data.draw(st.integers(0, h - 1))
    y1 = data.draw(st.integers(y0 + 1, h))
    x0 = data.draw(st.integers(0, w - 1))
    x1 = data.draw(st.integers(x0 + 1, w))
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    assert mask_to_box(m).tolist() == [x0, y0, x1, y1]


def test_resize_longest_pad_hand_case():
    """100 x 50 (W x H) image -> 200: scale 2, content in rows 0..99, bottom padded; boxes * 2, grid / 16."""
    img = np.zeros((50, 100, 3), np.uint8)
    img[5:15, 10:20] = 255  # the box (10, 5, 20, 15)
    tf = ResizeLongestPad(200, interpolation="nearest")
    t, scale = tf(img)
    assert t.shape == (3, 200, 200) and scale == 2.0
    assert tf.geometry(50, 100) == (2.0, 100, 200)
    assert (t[:, 100:] == 0).all()  # bottom padding
    box = torch.tensor([[10.0, 5.0, 20.0, 15.0]])
    tb = boxes_to_tensor(box, scale)
    assert tb.tolist() == [[20.0, 10.0, 40.0, 30.0]]
    lit = torch.nonzero(t[0] > 0.5)
    assert (
        lit[:, 0].min() == 10
        and lit[:, 0].max() + 1 == 30
        and lit[:, 1].min() == 20
        and lit[:, 1].max() + 1 == 40
    )
    assert boxes_to_grid(tb, 16).tolist() == [[1.25, 0.625, 2.5, 1.875]]
    n = normalize_boxes(tb, 200, 200)
    assert torch.allclose(n, torch.tensor([[0.1, 0.05, 0.2, 0.15]])) and torch.allclose(
        denormalize_boxes(n, 200, 200), tb
    )


def test_resize_longest_pad_portrait_and_inputs():
    img = torch.rand(3, 80, 40)
    t, scale = ResizeLongestPad(64)(img)
    assert scale == 0.8 and t.shape == (3, 64, 64)
    assert (t[:, :, 32:] == 0).all() and (t[:, :, :32] > 0).any()  # right padding
    t2, _ = ResizeLongestPad(64)((img * 255).round().byte())
    assert torch.allclose(t, t2, atol=0.02)
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        ResizeLongestPad(64)(torch.rand(1, 8, 8))


def test_center_pad_crop_hand_case():
    """Crop (10, 5, 30, 45) of a 100 x 50 image -> 20 x 40 -> scale 2 -> 40 x 80, centred: pad left 20."""
    img = np.zeros((50, 100, 3), np.uint8)
    img[5:45, 10:20, 0] = 255  # left half of the crop red
    img[5:45, 20:30, 2] = 255  # right half blue
    out, p = CenterPadCrop(80, interpolation="nearest")(img, [10.0, 5.0, 30.0, 45.0])
    assert p == dict(x0=10, y0=5, scale=2.0, pad_left=20, pad_top=0)
    assert (out[:, :, :20] == 0).all() and (out[:, :, 60:] == 0).all()
    assert (out[0, :, 20:40] == 1).all() and (out[2, :, 40:60] == 1).all() and (out[0, :, 40:60] == 0).all()
    # image point -> crop tensor point
    x, y = 30.0, 45.0
    assert ((x - p["x0"]) * p["scale"] + p["pad_left"], (y - p["y0"]) * p["scale"] + p["pad_top"]) == (
        60.0,
        80.0,
    )
    # fractional boxes take the enclosing pixel span (x 10..90, y 5..25); wide crops pad top/bottom:
    # (40 - 10) // 2
    out2, p2 = CenterPadCrop(40, interpolation="nearest")(img, torch.tensor([10.5, 5.2, 89.6, 24.9]))
    assert (
        (p2["x0"], p2["y0"]) == (10, 5) and p2["scale"] == 0.5 and p2["pad_top"] == 15 and p2["pad_left"] == 0
    )
    with pytest.raises(ValueError, match="empty"):
        CenterPadCrop(40)(img, [120, 0, 130, 10])


def test_crop_regions_shapes():
    img = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    crops = crop_regions(img, torch.tensor([[0, 0, 10, 20], [5, 5, 80, 60.0]]), 32)
    assert crops.shape == (2, 3, 32, 32) and 0 <= crops.min() and crops.max() <= 1
    assert crop_regions(img, torch.zeros(0, 4), 32).shape == (0, 3, 32, 32)


def test_sample_box_regions():
    boxes = torch.tensor([[10.0, 10.0, 30.0, 30.0], [0.0, 0.0, 5.0, 5.0], [40.0, 40.0, 60.0, 80.0]])
    out = sample_box_regions(boxes, 100, 100, 0, isthing=[True, True, False])
    assert out["n_filtered"] == 1  # 5x5 < 8^2
    assert sorted(out["index"].tolist()) == [0, 2] and out["valid"].all()
    for k, i in enumerate(out["index"].tolist()):
        assert torch.equal(out["rois"][k], boxes[i])
        expect = [5.0, 5.0, 35.0, 35.0] if i == 0 else [40.0, 40.0, 60.0, 80.0]  # things 1.5x, stuff not
        assert out["crops"][k].tolist() == expect
    many = torch.tensor([[0.0, 0.0, 10.0 + k, 10.0] for k in range(30)])
    assert len(sample_box_regions(many, 100, 100, 1)["rois"]) == 20
    none = sample_box_regions(torch.tensor([[0.0, 0.0, 2.0, 2.0]]), 64, 32, 0)
    assert none["rois"].tolist() == [[0.0, 0.0, 16.0, 8.0]] and not none["valid"].any()
    with pytest.raises(ValueError, match="isthing"):
        sample_box_regions(boxes, 100, 100, 0, isthing=[True])


@settings(max_examples=80, deadline=None)
@given(st.floats(0, 90), st.floats(0, 90), st.floats(1, 60), st.floats(1, 60), st.floats(1.0, 3.0))
def test_expand_box_properties(x0, y0, w, h, scale):
    W, H = 100.0, 120.0
    box = torch.tensor([[x0, y0, min(x0 + w, W), min(y0 + h, H)]], dtype=torch.float64)
    out = expand_box(box, scale, W, H)[0]
    assert out[0] >= 0 and out[1] >= 0 and out[2] <= W and out[3] <= H
    assert out[0] <= box[0, 0] + 1e-9 and out[1] <= box[0, 1] + 1e-9  # contains the original box
    assert out[2] >= box[0, 2] - 1e-9 and out[3] >= box[0, 3] - 1e-9
    bw, bh = box[0, 2] - box[0, 0], box[0, 3] - box[0, 1]
    assert out[2] - out[0] <= scale * bw + 1e-6 and out[3] - out[1] <= scale * bh + 1e-6
    c = (box[0, :2] + box[0, 2:]) / 2
    if (c - scale * torch.stack([bw, bh]) / 2 >= 0).all() and (
        c + scale * torch.stack([bw, bh]) / 2 <= torch.tensor([W, H])
    ).all():
        assert torch.allclose((out[:2] + out[2:]) / 2, c) and torch.isclose(out[2] - out[0], scale * bw)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 90), st.integers(2, 90), st.integers(8, 64))
def test_resize_longest_pad_geometry(h, w, size):
    tf = ResizeLongestPad(size, interpolation="nearest")
    scale, rh, rw = tf.geometry(h, w)
    assert max(rh, rw) == size and rh == max(1, round(h * scale)) and rw == max(1, round(w * scale))
    img = torch.ones(3, h, w)
    t, s = tf(img)
    assert s == scale and t.shape == (3, size, size)
    nz = torch.nonzero(t[0])
    assert (
        nz[:, 0].max() + 1 == rh and nz[:, 1].max() + 1 == rw and int(t[0].sum()) == rh * rw
    )  # content top-left
    full = boxes_to_tensor(torch.tensor([[0.0, 0.0, float(w), float(h)]]), s)[0]
    assert abs(full[2] - rw) <= 0.5 + 1e-4 or rw == 1
    assert abs(full[3] - rh) <= 0.5 + 1e-4 or rh == 1


def test_sample_box_regions_seeded():
    boxes = torch.tensor([[0.0, 0.0, 10.0 + k, 20.0] for k in range(30)])
    a = sample_box_regions(boxes, 100, 100, 7)
    b = sample_box_regions(boxes, 100, 100, torch.Generator().manual_seed(7))
    assert torch.equal(a["index"], b["index"]) and torch.equal(a["crops"], b["crops"])
    assert not torch.equal(a["index"], sample_box_regions(boxes, 100, 100, 8)["index"])


def test_thing_crops_in_image_order_with_rows():
    from ovlib.data.regions import crop_regions, thing_crops

    img = np.zeros((20, 20, 3), np.uint8)
    img[:10] = 255
    seg = lambda cid, box, thing=True: {"category_id": cid, "isthing": thing, "box": box}  # noqa: E731
    data = [{"image": img, "segments": [seg(5, [0, 0, 10, 10]), seg(9, [0, 0, 20, 20], False)]},
            {"image": img, "segments": []},
            {"image": img, "segments": [seg(7, [5, 5, 15, 15]), seg(5, [10, 10, 20, 20]), seg(6, [0, 0, 4, 4])]}]
    crops, rows = thing_crops(data, {5: 0, 7: 1}, 8, n=2)  # class 6 unknown, 9 is stuff
    assert crops.shape == (2, 3, 8, 8) and rows.tolist() == [0, 1]
    torch.testing.assert_close(crops[1], crop_regions(img, torch.tensor([[5.0, 5, 15, 15]]), 8)[0])
    assert thing_crops(data, {5: 0, 7: 1}, 8, n=10)[1].tolist() == [0, 1, 0]
    empty, r = thing_crops(data[1:2], {5: 0}, 8, n=3)
    assert empty.shape == (0, 3, 8, 8) and len(r) == 0
