"""ovlib.viz: the explorers' logic (which token, which map, which classes) on a micro CLIP, and the thin
ipywidgets wiring driven without a front end."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovlib.eval import affinity_map, text_embeddings
from ovlib.eval._common import dense_fn_for_clip
from ovlib.models import load_clip, roi_features
from ovlib.viz import (
    AffinityExplorer,
    AttentionExplorer,
    RegionExplorer,
    ThresholdExplorer,
    cell_on_grid,
    images_from_dataset,
    logic,
    resolve_query,
    targets_from_meta,
    threshold_labels,
    threshold_mask,
    token_from_index,
    token_to_index,
)

TEMPLATES = ("a photo of a {}.", "there is a {}.")
CLASSES = [
    {"name": "boat", "synonyms": ["vessel", "ship"]},
    {"name": "grass", "synonyms": ["lawn"]},
    {"name": "ball", "synonyms": []},
]


@pytest.fixture(scope="module")
def clip():
    model, tok, _ = load_clip("micro-clip", seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a random CLIP whose LayerNorms/biases are not trivial
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval(), tok


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, 64, 64, generator=g) for _ in range(3)]


def pooled_fn(fn):
    """A model on a coarser (4x4) grid: the CLIP map average-pooled (stands in for a VFM with other patches)."""
    return lambda x: F.normalize(F.avg_pool2d(fn(x), 2), dim=1)


# --------------------------------------------------------------------------------------------- tokens
def test_token_index_round_trip_and_errors():
    assert token_from_index(13, (8, 8)) == (1, 5)
    assert token_to_index((1, 5), (8, 8)) == 13
    assert token_from_index(5, (2, 3)) == (1, 2)
    for i in range(12):
        assert token_to_index(token_from_index(i, (3, 4)), (3, 4)) == i
    with pytest.raises(ValueError, match="outside a 8x8 grid"):
        token_from_index(64, (8, 8))
    with pytest.raises(ValueError, match="outside a 8x8 grid"):
        token_to_index((8, 0), (8, 8))


def test_cell_on_grid_carries_the_query_centre():
    assert cell_on_grid((3, 5), (8, 8), (4, 4)) == (1, 2)
    assert cell_on_grid((3, 5), (8, 8), (16, 16)) == (7, 11)
    assert cell_on_grid((0, 7), (8, 8), (8, 8)) == (0, 7)
    assert logic.point_to_cell((27.0, 20.0), (8, 8), (64, 64)) == (2, 3)
    assert logic.cell_center((2, 3), (8, 8), (64, 64)) == (28.0, 20.0)


# --------------------------------------------------------------------------------------------- affinity
def test_affinity_explorer_pins_token_and_maps(clip, images):
    model, _ = clip
    fns = {"vanilla": dense_fn_for_clip(model, "vanilla"), "x+v": dense_fn_for_clip(model, "x+v")}
    fns["coarse"] = pooled_fn(fns["x+v"])
    ex = AffinityExplorer(images, fns)
    assert ex.grid == (8, 8) and ex.token == (4, 4)
    ex.select(image=1, index=19)
    assert ex.token == (2, 3) and ex.index == 19 and ex.image == 1
    maps = ex.maps()
    assert list(maps) == ["vanilla", "x+v", "coarse"]
    for name in ("vanilla", "x+v"):
        m, cell = maps[name]
        with torch.no_grad():
            ref = affinity_map(fns[name](images[1][None]), torch.tensor([[2, 3]]))[0]
        assert cell == (2, 3)
        torch.testing.assert_close(m, ref, atol=1e-5, rtol=0)
        assert abs(float(m[2, 3]) - 1) < 1e-5 and float(m.max()) <= 1 + 1e-5
    m, cell = maps["coarse"]
    assert cell == (1, 1) and m.shape == (4, 4) and abs(float(m[1, 1]) - 1) < 1e-5
    assert not torch.allclose(maps["vanilla"][0], maps["x+v"][0])  # the modes really differ
    # a pixel selects the cell that contains it; sliders select (row, col)
    assert ex.select(point=(27.0, 20.0)).token == (2, 3)
    assert ex.select(token=(7, 0)).index == 56
    with pytest.raises(ValueError, match="one of"):
        ex.select(token=(1, 1), index=3)
    with pytest.raises(ValueError, match="outside"):
        ex.select(token=(8, 0))
    # one forward per (model, image), however often the token moves
    calls = ex.cache.calls
    for i in range(64):
        ex.select(index=i).maps()
    assert ex.cache.calls == calls


def test_affinity_figures(clip, images):
    model, _ = clip
    ex = AffinityExplorer(
        images, {"a": dense_fn_for_clip(model, "x+v"), "b": dense_fn_for_clip(model, "csa")}, token=(1, 2)
    )
    fig = ex.figure()
    assert len(fig.axes) == 3
    st = ex.static_figure()
    assert len(st.axes) == 9  # 3 tokens x (image + 2 maps)
    assert ex.token == (1, 2) and ex.image == 0  # drawing other rows restores the state
    assert ex.png()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------------------------- attention
def test_resolve_query():
    assert resolve_query(CLASSES, "boat") == ("boat", "class")
    assert resolve_query(CLASSES, "boat", "ship") == ("ship", "synonym")
    assert resolve_query(CLASSES, "boat", "ship", "  a red boat on water ") == ("a red boat on water", "text")
    assert resolve_query(CLASSES, "boat", None, "   ") == ("boat", "class")
    with pytest.raises(ValueError, match="not a synonym of 'grass'"):
        resolve_query(CLASSES, "grass", "ship")
    with pytest.raises(ValueError, match="unknown class"):
        resolve_query(CLASSES, "plane")


def test_attention_explorer_pins_text_and_maps(clip, images):
    model, tok = clip
    calls = []

    def embed(texts):
        calls.append(list(texts))
        return text_embeddings(model, tok, texts, TEMPLATES)

    def embed_free(texts):
        return text_embeddings(model, tok, texts, ("{}",))

    fns = {"teacher": dense_fn_for_clip(model, "csa"), "baseline": dense_fn_for_clip(model, "vanilla")}
    ex = AttentionExplorer(images, fns, embed, CLASSES, embed_free=embed_free, image=2)
    assert ex.query == ("boat", "class")
    ex.select(synonym="ship")
    assert ex.query == ("ship", "synonym")
    maps = ex.maps()
    with torch.no_grad():
        t = text_embeddings(model, tok, ["ship"], TEMPLATES)[0]
        for name, fn in fns.items():
            d = fn(images[2][None])[0]
            ref = torch.einsum("c,chw->hw", t, d)
            torch.testing.assert_close(maps[name], ref, atol=1e-5, rtol=0)
            r, c = ex.peaks()[name]
            assert float(ref[r, c]) == pytest.approx(float(ref.max()))
    # typed text wins and is embedded as typed (the free-text embedder)
    ex.select(text="a red boat on water")
    assert ex.query == ("a red boat on water", "text")
    with torch.no_grad():
        t2 = text_embeddings(model, tok, ["a red boat on water"], ("{}",))[0]
        torch.testing.assert_close(
            ex.maps()["teacher"],
            torch.einsum("c,chw->hw", t2, fns["teacher"](images[2][None])[0]),
            atol=1e-5,
            rtol=0,
        )
    # clearing the text goes back to the synonym; a new class resets the synonym to its main name
    assert ex.select(text="").query == ("ship", "synonym")
    assert ex.select(class_name="grass").query == ("grass", "class")
    assert ex.synonyms() == ["lawn"]
    # each text is embedded once
    n = len(calls)
    ex.select(class_name="boat", synonym="ship").maps()
    ex.maps()
    assert len(calls) == n
    fig = ex.static_figure()  # main name + 2 synonyms of "boat"
    assert len(fig.axes) == 9


def test_attention_maps_per_model_text():
    d = F.normalize(torch.randn(4, 3, 3), dim=0)
    t = {"a": torch.tensor([1.0, 0, 0, 0]), "b": torch.tensor([0, 2.0, 0, 0])}
    out = logic.attention_maps({"a": d, "b": d}, t)
    torch.testing.assert_close(out["a"], d[0])
    torch.testing.assert_close(out["b"], d[1])
    with pytest.raises(ValueError, match="text dim 3 != dense channels 4"):
        logic.attention_maps({"a": d}, torch.ones(3))


# --------------------------------------------------------------------------------------------- regions
def test_region_explorer_pins_top5(clip, images):
    model, _ = clip
    fn = dense_fn_for_clip(model, "x+v")
    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0], [32.0, 8.0, 64.0, 40.0], [8.0, 40.0, 56.0, 64.0]])
    with torch.no_grad():
        dense = fn(images[0][None])
        pooled = F.normalize(roi_features(dense, [boxes], (64, 64)), dim=-1)  # (3, D)
    g = torch.Generator().manual_seed(3)
    others = F.normalize(torch.randn(5, pooled.shape[1], generator=g), dim=-1)
    text = torch.cat([others[:2], pooled, others[2:]])  # class j+2 is "the region j itself"
    names = [f"c{j}" for j in range(len(text))]
    ex = RegionExplorer(
        images,
        {"x+v": fn},
        text,
        names,
        boxes=[boxes, boxes[:0], boxes[:1]],
        box_labels=[["c2", "c3", "c4"], [], ["c2"]],
    )
    assert ex.box == tuple(boxes[0].tolist())  # the first GT box of the image
    for j in range(3):
        top = ex.select(gt=j).topk()["x+v"]
        assert len(top) == 5
        assert top[0][0] == f"c{j + 2}" and top[0][1] == pytest.approx(1.0, abs=1e-5)
        ref = (pooled[j] @ F.normalize(text, dim=-1).T).topk(5)
        assert [n for n, _ in top] == [names[int(i)] for i in ref.indices]
        assert ex.gt_label() == f"c{j + 2}"
    # a free box: sliders; the label is gone; the box is clipped to the image
    ex.select(box=(-5, 10, 20, 70))
    assert ex.box == (0.0, 10.0, 20.0, 64.0) and ex.gt_label() is None
    with pytest.raises(ValueError, match="empty"):
        ex.select(box=(10, 10, 10, 30))
    # a new image without GT boxes falls back to the central box
    assert ex.select(image=1).box == (16.0, 16.0, 48.0, 48.0)
    assert "Top-5" in ex.html() and "c" in ex.html()
    fig = ex.static_figure()  # current box + image 2's GT box (image 0 is next too)
    assert len(fig.axes) == 3 * 2
    assert len(ex.figure(bars=False).axes) == 1 and ex.png()[:4] == b"\x89PNG"  # the widget's view


def test_region_explorer_crop_predictor(clip, images):
    model, _ = clip
    from ovlib.eval._common import normalize_images
    from ovlib.train.pretrain import image_mean_std

    mean, std = image_mean_std(model)

    def encode(x):
        return F.normalize(model.encode_image(normalize_images(x, mean, std)).float(), dim=-1)

    box = (8.0, 8.0, 40.0, 48.0)
    from ovlib.data.regions import crop_regions

    img = (images[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    with torch.no_grad():
        f = encode(crop_regions(img, torch.tensor([box]), 64))[0]
    text = torch.stack(
        [
            F.normalize(torch.randn(f.shape[0], generator=torch.Generator().manual_seed(j)), dim=0)
            for j in range(6)
        ]
        + [f]
    )
    names = [f"c{j}" for j in range(7)]
    ex = RegionExplorer(images, {}, text, names, crop_encode=encode, box=box)
    top = ex.topk()["crop CLS"]
    assert top[0][0] == "c6" and top[0][1] == pytest.approx(1.0, abs=1e-4)


# --------------------------------------------------------------------------------------------- threshold
def test_threshold_logic():
    a = torch.tensor([[[0.9, 0.2], [0.4, 0.1]], [[0.5, 0.7], [0.45, 0.3]]])  # (C=2, 2, 2)
    assert threshold_mask(a, 0.5, 0).tolist() == [[True, False], [False, False]]
    assert threshold_mask(a, 0.5, 1).tolist() == [[True, True], [False, False]]
    assert threshold_labels(a, 0.5).tolist() == [[0, 1], [-1, -1]]
    assert threshold_labels(a, 0.4, background=7).tolist() == [[0, 1], [1, 7]]
    assert threshold_labels(a, 0.0).tolist() == [[0, 1], [1, 1]]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        threshold_labels(a * 2, 0.5)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        threshold_mask(a[0], 0.5, 0)
    st = logic.mask_stats(torch.tensor([[1, 1], [0, 0]]), torch.tensor([[1, 0], [1, 0]]))
    assert st == {"coverage": 0.5, "iou": pytest.approx(1 / 3), "precision": 0.5, "recall": 0.5}


def test_threshold_explorer(images):
    g = torch.Generator().manual_seed(0)
    acts = [torch.rand(3, 64, 64, generator=g) for _ in images]
    calls = []

    def act_fn(i):
        calls.append(i)
        return acts[i]

    tgt = [{0: acts[i][0] > 0.5} for i in range(len(images))]
    ex = ThresholdExplorer(images, act_fn, ["boat", "grass", "ball"], threshold=0.6, targets=tgt)
    torch.testing.assert_close(ex.result(), threshold_labels(acts[0], 0.6))
    ex.select(class_name="grass", threshold=0.8)
    assert torch.equal(ex.result(), acts[0][1] >= 0.8)
    ex.select(class_name="boat", threshold=0.5)
    assert ex.stats()["iou"] == pytest.approx(1.0)  # the target is exactly "boat > 0.5" (ties have measure 0)
    ex.select(image=1).result()
    ex.select(threshold=0.9).result()
    assert calls == [0, 1]  # each image's activations computed once
    with pytest.raises(ValueError, match="threshold"):
        ex.select(threshold=1.5)
    with pytest.raises(ValueError, match="unknown class"):
        ex.select(class_name="plane")
    assert len(ex.static_figure().axes) >= 9
    with pytest.raises(ValueError, match="2 classes, expected 3"):
        ThresholdExplorer(images, [a[:2] for a in acts], ["boat", "grass", "ball"])


# --------------------------------------------------------------------------------------------- data
def test_images_from_dataset_scales_boxes_and_masks():
    img = np.zeros((40, 80, 3), np.uint8)
    m = np.zeros((40, 80), bool)
    m[10:20, 40:60] = True
    stuff = ~m
    ds = [
        {
            "image": img,
            "segments": [
                {"mask": m, "box": [40, 10, 60, 20], "isthing": True, "category_id": 3},
                {"mask": stuff, "isthing": False, "category_id": 9},
            ],
        }
    ]
    ims, meta = images_from_dataset(ds, [0], 160)
    assert ims[0].shape == (3, 160, 160)
    torch.testing.assert_close(
        meta[0]["boxes"], torch.tensor([[80.0, 20.0, 120.0, 40.0], [0.0, 0.0, 160.0, 80.0]])
    )
    assert meta[0]["category_id"] == [3, 9] and meta[0]["isthing"] == [True, False]
    assert int(meta[0]["masks"][0].sum()) == 40 * 20 and not meta[0]["masks"][1, 80:].any()
    tg = targets_from_meta(meta, [9, 5, 3])  # rows of class_ids: 9 -> 0, 3 -> 2; class 5 absent
    assert sorted(tg[0]) == [0, 2] and torch.equal(tg[0][2], meta[0]["masks"][0])


# --------------------------------------------------------------------------------------------- widgets
def test_widgets_drive_the_explorers(clip, images):
    pytest.importorskip("ipywidgets")
    model, tok = clip
    fn = dense_fn_for_clip(model, "x+v")
    ex = AffinityExplorer(images, {"x+v": fn})
    w = ex.widget()
    controls = w.children[0].children
    img, row, col, idx = controls
    view = w.children[2]
    first = view.value
    assert first[:4] == b"\x89PNG"
    row.value = 1
    assert ex.token == (1, 4) and idx.value == 12 and view.value != first
    idx.value = 63
    assert ex.token == (7, 7) and (row.value, col.value) == (7, 7)
    img.value = 2
    assert ex.image == 2 and "token (7, 7) = #63" in w.children[1].value

    at = AttentionExplorer(
        images,
        {"m": dense_fn_for_clip(model, "csa")},
        lambda t: text_embeddings(model, tok, t, TEMPLATES),
        CLASSES,
    )
    w = at.widget()
    cls = w.children[0].children[1]
    syn, txt = w.children[1].children
    syn.value = "vessel"
    assert at.query == ("vessel", "synonym") and "vessel" in w.children[2].value
    cls.value = "grass"
    assert list(syn.options) == ["(main name)", "lawn"] and at.query == ("grass", "class")
    txt.value = "green field"
    assert at.query == ("green field", "text")

    boxes = [torch.tensor([[0.0, 0.0, 32.0, 32.0], [10.0, 20.0, 50.0, 60.0]])] * 3
    text = F.normalize(torch.randn(6, 128, generator=torch.Generator().manual_seed(0)), dim=-1)
    rg = RegionExplorer(
        images, {"x+v": fn}, text, [f"c{j}" for j in range(6)], boxes=boxes, box_labels=[["c1", "c2"]] * 3
    )
    w = rg.widget()
    gt = w.children[0].children[1]
    xs, ys = w.children[1].children
    assert gt.value == 0  # the initial box is image 0's first ground-truth box
    gt.value = 1
    assert rg.box == (10.0, 20.0, 50.0, 60.0) and xs.value == (10, 50) and ys.value == (20, 60)
    table = w.children[3].children[1]
    assert "<b>c2</b>" in table.value or "ground truth: <b>c2</b>" in table.value
    xs.value = (0, 64)
    assert rg.box == (0.0, 20.0, 64.0, 60.0) and "free box" in table.value and gt.value == -1

    g = torch.Generator().manual_seed(0)
    th = ThresholdExplorer(images, [torch.rand(2, 64, 64, generator=g) for _ in images], ["a", "b"])
    w = th.widget()
    _, thr, cls = w.children[0].children
    before = w.children[1].value
    thr.value = 0.9
    assert th.threshold == 0.9 and w.children[1].value != before
    cls.value = "b"
    assert th.class_index == 1 and "coverage" in w.children[1].value


def test_map_grid_and_affinity_row_figures():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ovlib.viz.figures import affinity_row, map_grid

    img = torch.rand(3, 32, 48)
    maps = torch.rand(3, 4, 6)
    fig = map_grid(img, [("a", maps), ("b", maps[:2])], ["n1", "n2", "n3"], "t", box=(1, 2, 10, 12), deviations=True)
    axes = np.asarray(fig.axes).reshape(4, 4)  # 2 rows + their deviation rows; image + 3 maps
    assert axes[1, 0].get_title() == "a: map − mean" and len(axes[0, 0].patches) == 1
    dev = axes[1, 1].get_images()[0]
    assert dev.get_clim()[0] == pytest.approx(-dev.get_clim()[1])  # symmetric deviation scale
    np.testing.assert_allclose(dev.get_array(), (maps - maps.mean(0, keepdim=True))[0].numpy(), atol=1e-6)
    plt.close(fig)
    z = F.normalize(torch.randn(1, 8, 4, 6), dim=1)
    fig = affinity_row(img, {"m": z, "m2": z[..., :2, :3]}, point=(47.0, 31.0))
    first = fig.axes[1].get_images()[0].get_array()
    np.testing.assert_allclose(first, affinity_map(z, torch.tensor([[3, 5]]))[0].numpy(), atol=1e-6)  # last cell
    assert fig.axes[2].get_images()[0].get_array().shape == (2, 3)
    plt.close(fig)
    with pytest.raises(ValueError, match="rows is empty"):
        map_grid(img, [], [], "")


def test_frequent_class_pick_and_tsne_panels():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ovlib.viz.figures import frequent_class_pick, tsne_panels

    labels = np.array([3, 3, 3, 5, 5, -1, 7, 3, 5, 9])
    pick, top = frequent_class_pick(labels, n_classes=2, per_class=2, seed=0)
    assert top == [3, 5] and len(pick) == 4
    assert (labels[pick[:2]] == 3).all() and (labels[pick[2:]] == 5).all()  # grouped by class, most frequent first
    assert (frequent_class_pick(labels, 2, 2, seed=0)[0] == pick).all()  # seeded
    assert frequent_class_pick(np.array([-1, -1]))[1] == []
    g = torch.Generator().manual_seed(0)
    lab = np.repeat([0, 1], 6)
    feats = torch.cat([torch.randn(6, 8, generator=g) + 5 * torch.eye(8)[0], torch.randn(6, 8, generator=g)
                       + 5 * torch.eye(8)[1]])
    fig, sil = tsne_panels({"sep": feats, "noise": torch.randn(12, 8, generator=g)}, lab, {0: "a", 1: "b"},
                           max_iter=250)
    assert len(fig.axes) == 2 and sil["sep"] > 0.5 > sil["noise"]  # separated classes: high silhouette
    plt.close(fig)


def test_heatmap_row_scales_and_labels():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ovlib.viz.figures import heatmap_row

    a = np.array([[0.5, -1.0], [0.25, 0.0]])
    fig = heatmap_row([(a, "div", "RdBu_r"), (a + 2, "seq", "viridis")], yticklabels=["3", "4"], fmt="{:.1f}")
    div, seq = (ax.get_images()[0] for ax in fig.axes[:2])  # then the two colour bars
    assert div.get_clim() == (-1.0, 1.0) and seq.get_clim() == (1.0, 2.5)  # symmetric only when diverging
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["3", "4"]
    assert sorted(t.get_text() for t in fig.axes[0].texts) == sorted(["0.5", "-1.0", "0.2", "0.0"])
    plt.close(fig)
