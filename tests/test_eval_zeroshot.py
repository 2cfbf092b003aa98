"""Single-object zero-shot (ovlib.eval.zeroshot): the gallery, the hits against a hand-built model, the summary."""

import numpy as np
import pytest
import torch

from ovlib.data import MicroWorld
from ovlib.eval.zeroshot import isolated_objects, zero_shot_hits, zero_shot_summary


class MeanColour(torch.nn.Module):
    """encode_image = the per-channel mean of the (normalised) image: a hand-checkable 'CLIP' with D = 3."""

    def encode_image(self, x):  # (B, 3, H, W) -> (B, 3)
        return x.mean(dim=(2, 3))


def test_isolated_objects_grid_and_order():
    w = MicroWorld(seed=0)
    bgs = w.stuff_ids[:2]
    imgs, labels, in_context = isolated_objects(w, size=32, rotations=2, backgrounds=bgs)
    n_th, n_st = len(w.thing_ids), len(bgs)
    assert imgs.shape == (n_th * n_st * 2, 32, 32, 3) and imgs.dtype == np.uint8
    assert labels.tolist() == [c for c in w.thing_ids for _ in range(n_st * 2)]
    assert in_context.tolist() == [b in w.class_by_id(c).preferred_stuff for c in w.thing_ids for b in bgs
                                   for _ in range(2)]
    # rotations differ for a non-round thing, backgrounds differ always
    assert not np.array_equal(imgs[0], imgs[2])
    with pytest.raises(ValueError, match="rotations"):
        isolated_objects(w, rotations=0)


def test_zero_shot_hits_hand_case():
    # three pure-colour images; class text = unit RGB axes: red image -> class 7, green -> 8, blue -> 9
    imgs = np.zeros((3, 8, 8, 3), np.uint8)
    for i in range(3):
        imgs[i, ..., i] = 255
    text = torch.eye(3)
    hits = zero_shot_hits(MeanColour(), imgs, [7, 9, 9], text, [7, 8, 9], ks=(1, 2), mean=(0, 0, 0), std=(1, 1, 1))
    assert hits[1].tolist() == [True, False, True]  # the green image is labelled 9: wrong at Top-1
    assert hits[2].tolist()[0] and hits[2].tolist()[2]
    s = zero_shot_summary(hits, [7, 9, 9], n_boot=50)
    assert s[1][0] == pytest.approx(100 * (1.0 + 0.5) / 2)  # mean per class: class 7 1/1, class 9 1/2
    lo, hi = s[1][1], s[1][2]
    assert lo <= s[1][0] <= hi


def test_zero_shot_resizes_and_rejects_bad_input():
    imgs = np.zeros((2, 16, 16, 3), np.uint8)
    imgs[0, ..., 1] = 255  # green
    imgs[1, ..., 0] = 255  # red
    # class id 0 = red axis, id 1 = green axis; both images labelled 1
    hits = zero_shot_hits(MeanColour(), imgs, [1, 1], torch.eye(3)[:2], [0, 1], ks=(1,), input_size=8,
                          mean=(0, 0, 0), std=(1, 1, 1))
    assert hits[1].tolist() == [True, False]
    with pytest.raises(ValueError, match="not among class_ids"):
        zero_shot_hits(MeanColour(), imgs, [1, 5], torch.eye(2), [0, 1], mean=(0, 0, 0), std=(1, 1, 1))
    with pytest.raises(ValueError, match="text must be"):
        zero_shot_hits(MeanColour(), imgs, [1, 0], torch.eye(3), [0, 1], mean=(0, 0, 0), std=(1, 1, 1))
