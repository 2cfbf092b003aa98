import numpy as np
import pytest
import torch

from ovlib.eval.unsupervised import hungarian_miou, iou_matrix, kmeans_labels
from ovlib.models.affinity import affinity_map, pixel_to_cell


def test_iou_matrix_hand_case():
    pred = np.array([0, 0, 1, 1])
    gt = np.array([0, 1, 1, 1])
    iou = iou_matrix(pred, gt, 2, 2)
    np.testing.assert_allclose(iou, [[1 / 2, 1 / 4], [0.0, 2 / 3]])


def test_hungarian_recovers_permuted_labels():
    gt = np.repeat(np.arange(4), 25).reshape(10, 10)
    perm = np.array([2, 0, 3, 1])
    pred = perm[gt] + 10  # arbitrary cluster ids
    miou, mapping = hungarian_miou(pred, gt)
    assert miou == pytest.approx(100.0)
    assert mapping == {int(perm[g] + 10): g for g in range(4)}


def test_hungarian_is_one_to_one():
    # one cluster covers everything: only one segment can be matched; the other scores 0
    gt = np.array([[0, 0, 1, 1]])
    pred = np.zeros_like(gt)
    miou, mapping = hungarian_miou(pred, gt)
    assert miou == pytest.approx(100 * (0.5 + 0.0) / 2)
    assert len(mapping) == 1


def test_hungarian_ignores_pixels():
    gt = np.array([[0, 0, -1, 1]])
    pred = np.array([[5, 5, 6, 6]])
    assert hungarian_miou(pred, gt, ignore_index=-1)[0] == pytest.approx(100.0)


def test_kmeans_on_synthetic_known_answer():
    # three regions with distinct prototype features + noise: k-means + Hungarian must recover them
    g = torch.Generator().manual_seed(0)
    gt = torch.zeros(12, 12, dtype=torch.long)
    gt[:, 6:] = 1
    gt[8:, :] = 2
    protos = torch.randn(3, 16, generator=g) * 3
    dense = protos[gt].permute(2, 0, 1) + 0.1 * torch.randn(16, 12, 12, generator=g)  # (C, h, w)
    labels = kmeans_labels(dense, k=3, seed=0)
    assert labels.shape == (12, 12)
    miou, _ = hungarian_miou(labels, gt.numpy())
    assert miou == pytest.approx(100.0)
    # same seed -> same labels
    assert (kmeans_labels(dense, k=3, seed=0) == labels).all()


def test_affinity_map_hand_case():
    dense = torch.zeros(1, 2, 2, 2)
    dense[0, 0, 0, 0] = 1.0   # (0,0) = e0
    dense[0, 1, 0, 1] = 2.0   # (0,1) = e1
    dense[0, :, 1, 0] = torch.tensor([1.0, 1.0])  # 45 degrees
    dense[0, 0, 1, 1] = -3.0  # opposite of e0
    a = affinity_map(dense, torch.tensor([[0, 0]]))
    np.testing.assert_allclose(a[0].numpy(), [[1.0, 0.0], [2 ** -0.5, -1.0]], atol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        affinity_map(dense, torch.tensor([[2, 0]]))


def test_pixel_to_cell():
    cells = pixel_to_cell(torch.tensor([[0.0, 0.0], [159.0, 80.0]]), (160, 160), (20, 20))
    assert cells.tolist() == [[0, 0], [10, 19]]


def test_mean_colour_dense_hand_case():
    from ovlib.eval.unsupervised import mean_colour_dense

    x = torch.zeros(1, 3, 4, 4)
    x[0, 0, :2, :2] = 1.0  # red top-left patch
    x[0, 2, 2:, 2:] = torch.tensor([[0.2, 0.4], [0.6, 0.8]])  # blue ramp bottom-right
    d = mean_colour_dense(x, 2)  # (1, 3, 2, 2): mean RGB - 0.5
    assert d.shape == (1, 3, 2, 2)
    torch.testing.assert_close(d[0, :, 0, 0], torch.tensor([0.5, -0.5, -0.5]))
    torch.testing.assert_close(d[0, :, 1, 1], torch.tensor([-0.5, -0.5, 0.0]))
    with pytest.raises(ValueError, match="images"):
        mean_colour_dense(torch.zeros(3, 4, 4), 2)


def test_equalize_segment_colours_removes_mean_colour_keeps_texture():
    from ovlib.eval.unsupervised import equalize_segment_colours

    rng = np.random.default_rng(0)
    seg = np.zeros((8, 8), np.int64)
    seg[:, 4:] = 1
    seg[0, 0] = -1  # ignored pixel, left untouched
    img = np.zeros((8, 8, 3), np.uint8)
    img[seg == 0] = [200, 30, 30]
    img[seg == 1] = [20, 40, 220]
    tex = rng.integers(-10, 11, size=(8, 8, 3))
    img = np.clip(img.astype(int) + tex, 0, 255).astype(np.uint8)
    img[0, 0] = [1, 2, 3]
    out = equalize_segment_colours(img, seg)
    target = img[seg >= 0].astype(float).mean(0)
    for k in (0, 1):
        np.testing.assert_allclose(out[seg == k].astype(float).mean(0), target, atol=0.6)  # rounding
        dev_in = img[seg == k].astype(float) - img[seg == k].astype(float).mean(0)
        dev_out = out[seg == k].astype(float) - out[seg == k].astype(float).mean(0)
        np.testing.assert_allclose(dev_out, dev_in, atol=1.0)  # texture kept (up to rounding)
    assert tuple(out[0, 0]) == (1, 2, 3)
    # the no-model colour tokens of the two halves now coincide: k-means on them cannot find the split
    from ovlib.eval.unsupervised import mean_colour_dense

    t = torch.from_numpy(out).permute(2, 0, 1)[None].float() / 255
    d = mean_colour_dense(t, 4)[0]  # (3, 2, 2): left and right columns (bottom row: no ignored pixel)
    assert float((d[:, 1, 0] - d[:, 1, 1]).abs().max()) < 0.02
    d0 = mean_colour_dense(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255, 4)[0]
    assert float((d0[:, 1, 0] - d0[:, 1, 1]).abs().max()) > 0.5  # before: red vs blue
    with pytest.raises(ValueError, match="segments"):
        equalize_segment_colours(img, seg[:4])


def test_evaluate_kmeans_colour_option(tmp_path):
    from ovlib.eval.segmentation import evaluate_kmeans

    with pytest.raises(ValueError, match="colour"):
        evaluate_kmeans(lambda x: x, [], colour="grey")


def test_object_affinity_hand_case():
    from ovlib.models.affinity import object_affinity

    seg = torch.tensor([[0, 0, 1], [0, 0, 1], [-1, 1, 1]])
    dense = torch.zeros(2, 3, 3)
    dense[0][seg == 0] = 1.0  # segment 0 points along e0, segment 1 along e1, the unlabelled cell along both
    dense[1][seg == 1] = 1.0
    dense[:, 2, 0] = 1.0
    inside, outside = object_affinity(dense, seg, [0, 1])
    assert inside == pytest.approx(1.0) and outside == pytest.approx(0.0)
    dense[1][seg == 0] = 1.0  # segment 0 now at 45 degrees to segment 1
    inside, outside = object_affinity(dense, seg, [0])
    assert inside == pytest.approx(1.0) and outside == pytest.approx(2 ** -0.5)
    assert all(v != v for v in object_affinity(dense, seg, [5]))  # absent segment: nan
    with pytest.raises(ValueError, match="segments"):
        object_affinity(dense, seg[:2], [0])


def test_kmeans_sample_is_a_fixed_mean_over_images():
    from ovlib.eval.segmentation import kmeans_sample

    s = kmeans_sample({"per_image": [50.0, 70.0, 90.0], "miou": (70.0, 50.0, 90.0)})
    assert s.fixed and s.seeds == () and len(s.runs) == 1
    np.testing.assert_allclose(s.runs[0], [[50.0, 1.0], [70.0, 1.0], [90.0, 1.0]])
    assert s.statistic(s.runs[0].sum(0)) == pytest.approx(70.0)
