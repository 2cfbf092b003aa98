"""Region classification / OVSS / k-means pipelines end to end on a micro-world export and real COCO files."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import shared_dir

from ovlib.eval.region_cls import (
    RegionClsConfig,
    extract_region_features,
    region_masks_at_grid,
    score_regions,
    summarize,
)
from ovlib.eval.segmentation import (
    OVSSConfig,
    evaluate_kmeans,
    evaluate_ovss,
    predict_labels,
    sliding_logits,
    window_starts,
)
from ovlib.models.text import MICRO_TEMPLATES, VILD_TEMPLATES, class_name_sets, fill_template, text_embeddings


@pytest.fixture(scope="module")
def micro_export(tmp_path_factory):
    from ovlib.data import CocoPanoptic, ensure_microworld

    root = tmp_path_factory.mktemp("mw")
    ensure_microworld(root, "val2017", n=20, size=160, seed=0, progress=False)
    return CocoPanoptic(root, "val2017")


@pytest.fixture(scope="module")
def micro_clip():
    from ovlib.models import load_clip

    model, tok, _ = load_clip("micro-clip", seed=0)
    return model, tok


def test_fill_template_rules():
    assert fill_template("a photo of {article} {}.", "apple") == "a photo of an apple."
    assert fill_template("a photo of the {}.", "traffic_light", this_is_prefix=True) == \
        "This is a photo of the traffic light."
    assert fill_template("There is {article} {} in the scene.", "wall/other", this_is_prefix=True) == \
        "There is a wall or other in the scene."
    assert len(VILD_TEMPLATES) == 63


def test_class_name_sets_modes():
    classes = [dict(name="cup", synonyms=["mug", "beaker"], heldout_synonyms=["beaker"]), dict(name="sky")]
    assert class_name_sets(classes, "main") == [["cup"], ["sky"]]
    assert class_name_sets(classes, "first_synonym") == [["mug"], ["sky"]]
    assert class_name_sets(classes, "synonym_ensemble") == [["mug", "beaker"], ["sky"]]
    assert class_name_sets(classes, "heldout_synonym") == [["beaker"], ["sky"]]
    assert class_name_sets(classes, "random_synonym", seed=1) == class_name_sets(classes, "random_synonym", seed=1)
    with pytest.raises(ValueError, match="name mode"):
        class_name_sets(classes, "nope")


def test_text_embeddings_is_template_ensemble(micro_clip):
    model, tok = micro_clip
    emb = text_embeddings(model, tok, ["cup", ["mug", "beaker"]], templates=MICRO_TEMPLATES[:2])
    assert emb.shape == (2, model.text_projection.shape[1])
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    prompts = [fill_template(t, n) for n in ("mug", "beaker") for t in MICRO_TEMPLATES[:2]]
    with torch.no_grad():
        ref = F.normalize(F.normalize(model.encode_text(tok(prompts)), dim=-1).mean(0), dim=0)
    torch.testing.assert_close(emb[1], ref, atol=1e-5, rtol=1e-5)


def test_thing_crop_expansion_hand_case():
    from ovlib.eval.region_cls import _expand

    np.testing.assert_allclose(_expand(np.array([10.0, 10.0, 20.0, 30.0]), 1.5, 100, 100), [7.5, 5.0, 22.5, 35.0])
    np.testing.assert_allclose(_expand(np.array([0.0, 90.0, 10.0, 100.0]), 1.5, 100, 100), [0.0, 87.5, 12.5, 100.0])


def test_region_masks_at_grid_hand_case():
    m = torch.zeros(2, 16, 16, dtype=torch.bool)
    m[0, :8, :8] = True          # exactly the top-left grid cell of a 2x2 grid at scale 1
    m[1, 0, 0] = True            # one pixel: vanishes at the grid -> fallback to the most covered cell
    g, nf = region_masks_at_grid(m, 1.0, 16, (2, 2), 0.5)
    assert g[0].tolist() == [[True, False], [False, False]]
    assert g[1].tolist() == [[True, False], [False, False]] and nf == 1
    # a 16x16 image in a 32-px student tensor (scale 2) only covers the top-left quarter of a 4x4 grid
    g, _ = region_masks_at_grid(torch.ones(1, 16, 16, dtype=torch.bool), 2.0, 64, (4, 4), 0.5)
    assert g[0].sum() == 4 and g[0, :2, :2].all()


def test_region_classification_micro_end_to_end(micro_export, micro_clip):
    model, tok = micro_clip
    ds = micro_export
    cfg = RegionClsConfig(image_size=160, crop_size=64, batch_size=8)
    rf = extract_region_features(model, ds, cfg, modes=("vanilla", "x+v"), n_images=20, progress=False)
    n_seg = sum(len(ds[i]["segments"]) for i in range(20))
    assert len(rf.category_id) + rf.skipped_size == n_seg and len(rf.category_id) > 0
    assert set(rf.features) == {"rois/vanilla", "rois/x+v", "maskpool/vanilla", "maskpool/x+v", "crops"}
    for k, f in rf.features.items():
        assert f.shape == (len(rf.category_id), 128), k
        torch.testing.assert_close(f.norm(dim=-1), torch.ones(len(f)), atol=1e-4, rtol=0)
    assert rf.isthing.any() and (~rf.isthing).any()
    ids = [c["id"] for c in ds.categories]
    text = text_embeddings(model, tok, [n for n in class_name_sets(ds.categories)], templates=MICRO_TEMPLATES[:1])
    scores = score_regions(rf, text, ids)
    # counts add up: every region of each part is counted once, hits never exceed totals, top-5 >= top-1
    for parts in scores.values():
        assert parts["thing"][:, 0].sum() == int(rf.isthing.sum())
        assert parts["stuff"][:, 0].sum() == int((~rf.isthing).sum())
        for arr in parts.values():
            assert (arr[:, 1] <= arr[:, 2]).all() and (arr[:, 2] <= arr[:, 0]).all()
    # an oracle text matrix (the class means of the crop features) must beat chance by far on crops
    lab = torch.tensor([ids.index(int(c)) for c in rf.category_id])
    oracle = torch.zeros(len(ids), 128).index_add_(0, lab, rf.features["crops"])
    oracle = F.normalize(oracle + 1e-6 * torch.randn(len(ids), 128, generator=torch.Generator().manual_seed(0)), dim=-1)
    summ = summarize(score_regions(rf, oracle, ids), n_boot=50)
    pt, lo, hi = summ["crops"]["thing.macc1"]
    assert lo <= pt <= hi and pt > 3 * 100 / len(ids)
    # subset: things only, scored against the thing classes only, counts the same thing regions
    th = rf.subset(rf.isthing)
    assert len(th.category_id) == int(rf.isthing.sum()) and th.isthing.all() and th.n_images == rf.n_images
    assert all(torch.equal(th.features[k], f[rf.isthing]) for k, f in rf.features.items())
    thing_ids = [c["id"] for c in ds.categories if c["isthing"]]
    sel = torch.tensor([bool(c["isthing"]) for c in ds.categories])
    sub = score_regions(th, text[sel], thing_ids)["crops"]["thing"]
    assert sub[:, 0].sum() == int(rf.isthing.sum()) and sub[:, 2].sum() >= scores["crops"]["thing"][:, 2].sum()
    with pytest.raises(ValueError, match="keep"):
        rf.subset(torch.ones(3, dtype=torch.bool))


def test_sliding_logits_known_answer():
    # dense "features" = the mean colour of each 8x8 patch; text = pure red / blue: halves must be recovered
    def dense_fn(x):
        return F.avg_pool2d(x, 8)  # (B, 3, h, w)

    img = torch.zeros(3, 40, 56)
    img[0, :, :24] = 1.0
    img[2, :, 24:] = 1.0
    text = torch.tensor([[1.0, 0, 0], [0, 0, 1.0]])
    assert window_starts(56, 32, 16) == [0, 16, 24]
    assert window_starts(20, 32, 16) == [0]
    logits = sliding_logits(dense_fn, img, text, crop=32, stride=16)
    assert logits.shape == (2, 40, 56)
    lab = predict_labels(logits, 40.0)
    assert (lab[:, :20] == 0).all() and (lab[:, 28:] == 1).all()
    # threshold: an ambiguous (uniform) map goes to background
    lab = predict_labels(torch.zeros(2, 4, 4), 40.0, prob_threshold=0.6, background_index=2)
    assert (lab == 2).all()


def test_ovss_and_kmeans_on_micro_export(micro_export, micro_clip):
    from ovlib.eval._common import dense_fn_for_clip

    model, tok = micro_clip
    ds = micro_export
    ids = [c["id"] for c in ds.categories]
    text = text_embeddings(model, tok, class_name_sets(ds.categories), templates=MICRO_TEMPLATES[:1])
    fn = dense_fn_for_clip(model, "x+v")
    res = evaluate_ovss(fn, ds, text, ids, OVSSConfig(image_size=160, crop=64, stride=48), n_images=3,
                        n_boot=20, progress=False)
    conf = res["confusion"]
    assert conf.shape == (3, len(ids), len(ids))
    assert conf[0].sum() == 160 * 160  # the micro world labels every pixel
    assert 0 <= res["miou"][0] <= 100
    km = evaluate_kmeans(fn, ds, image_size=160, n_images=3, n_boot=20, progress=False)
    assert km["per_image"].shape == (3,) and (km["per_image"] >= 0).all() and (km["per_image"] <= 100).all()


def test_region_classification_real_coco_random_vitb16():
    sd = shared_dir()
    root = None if sd is None else sd / "data" / "coco_panoptic_val100"
    if root is None or not (root / "annotations" / "panoptic_val2017.json").is_file():
        pytest.skip("real COCO subset ../shared/data/coco_panoptic_val100 not present")
    from ovlib.data import CocoPanoptic
    from ovlib.models import load_clip

    ds = CocoPanoptic(root, "val2017")
    model, tok, _ = load_clip("ViT-B-16", pretrained=None, seed=0)
    # student image at a small 224 px (14x14 grid); teacher crops at the tower's native 224 px
    cfg = RegionClsConfig(image_size=224, crop_size=224, min_size=8.0, batch_size=1, max_segments=6)
    rf = extract_region_features(model, ds, cfg, modes=("x+v",), n_images=1, progress=False)
    n_seg = min(6, len(ds[0]["segments"]))
    assert len(rf.category_id) + rf.skipped_size == n_seg and len(rf.category_id) > 0
    ids = [c["id"] for c in ds.categories]
    assert len(ids) == 133
    # random weights: only the mechanics (ViLD templates with "This is", 133 classes, thing/stuff split)
    text = F.normalize(torch.randn(len(ids), 512, generator=torch.Generator().manual_seed(0)), dim=-1)
    summ = summarize(score_regions(rf, text, ids), n_boot=20)
    assert set(summ) == {"rois/x+v", "maskpool/x+v", "crops"}
    for v in summ["crops"].values():
        assert np.isnan(v[0]) or 0 <= v[0] <= 100
    emb = text_embeddings(model, tok, [["person"]], templates=VILD_TEMPLATES[:2], this_is_prefix=True)
    assert emb.shape == (1, 512)


# ------------------------------------------------------------------ issue 18: pooling convention and grid masks
def test_pooling_conventions_hand_case():
    """Two tokens of norms 10 and 1: normalise-then-pool (CLIPSelf) averages the unit tokens, pool-then-normalise
    (DeCLIP / SynCLIP) is dominated by the long token."""
    from ovlib.eval.region_cls import pool_regions

    dense = torch.tensor([[10.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)  # (B=1, C=2, h=1, w=2): a=[10,0], b=[0,1]
    boxes = [torch.tensor([[0.0, 0.0, 16.0, 8.0]])]  # the whole 1x2 grid of an 8x16 image
    masks = [torch.ones(1, 1, 2, dtype=torch.bool)]
    r_cs, m_cs = pool_regions(dense, "normalize-then-pool", (8, 16), boxes, masks)
    r_dc, m_dc = pool_regions(dense, "pool-then-normalize", (8, 16), boxes, masks)
    s2 = 2 ** -0.5
    want_cs = torch.tensor([[s2, s2]])                                  # mean([1,0],[0,1]) = [.5,.5] -> unit
    want_dc = torch.tensor([[10.0, 1.0]]) / math.sqrt(101.0)            # mean = [5, .5] -> unit
    torch.testing.assert_close(m_cs, want_cs)
    torch.testing.assert_close(m_dc, want_dc)
    # RoIAlign of the whole grid with aligned=True samples both cells equally: the same two averages
    torch.testing.assert_close(r_cs, want_cs)
    torch.testing.assert_close(r_dc, want_dc)
    assert (m_cs - m_dc).abs().max() > 0.5
    with pytest.raises(ValueError, match="pooling"):
        pool_regions(dense, "pool-first", (8, 16), boxes, masks)


def test_mask_quarter_cell_resize_vs_coverage():
    """A segment covering a quarter of a cell: CLIPSelf's resized mask (> 0) includes that cell, our coverage
    rule (>= 0.5) does not; a fully covered cell is in both."""
    m = torch.zeros(1, 16, 16, dtype=torch.bool)  # 2x2 grid of 8-px cells
    m[0, :4, :4] = True                           # a quarter of cell (0, 0)
    m[0, 8:, 8:] = True                           # all of cell (1, 1)
    cov, nf = region_masks_at_grid(m, 1.0, 16, (2, 2), 0.5, "coverage")
    res, nf2 = region_masks_at_grid(m, 1.0, 16, (2, 2), method="resize")
    assert cov[0].tolist() == [[False, False], [False, True]] and nf == 0
    assert res[0].tolist() == [[True, False], [False, True]] and nf2 == 0
    with pytest.raises(ValueError, match="mask grid method"):
        region_masks_at_grid(m, 1.0, 16, (2, 2), method="nearest")


def test_mask_resize_matches_clipself_resize_longest():
    """The resize rule equals CLIPSelf's ``ResizeLongest(grid, fill=0)`` on the float mask (torchvision resize,
    bicubic, then bottom/right pad) thresholded > 0, for a 2:1 image in a padded square; antialias as asked."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    g = torch.Generator().manual_seed(0)
    H, W, S, grid = 40, 80, 160, 20              # original 40x80 -> student 80x160 in a 160 square (scale 2)
    masks = torch.zeros(3, H, W, dtype=torch.bool)
    masks[0, 5:17, 10:31] = True
    masks[1, 30:, 60:] = True
    masks[2] = torch.rand(H, W, generator=g) > 0.7
    for aa in (False, True):
        ours, _ = region_masks_at_grid(masks, 2.0, S, (grid, grid), method="resize", antialias=aa)
        for i in range(3):
            scale = grid / max(H, W)
            r = TF.resize(masks[i][None].float(), [round(H * scale), round(W * scale)], InterpolationMode.BICUBIC,
                          antialias=aa)
            r = TF.pad(r, [0, 0, grid - r.shape[-1], grid - r.shape[-2]], fill=0)
            assert torch.equal(ours[i], r[0] > 0), (aa, i)


def test_region_config_validates_and_records():
    with pytest.raises(ValueError, match="pooling"):
        RegionClsConfig(pooling="normalise-first")
    with pytest.raises(ValueError, match="mask_grid"):
        RegionClsConfig(mask_grid="area")
    p = RegionClsConfig().protocol()
    assert p["pooling"] == "normalize-then-pool" and p["mask_grid"] == "resize" and p["mask_antialias"] is False
    assert RegionClsConfig(mask_grid="coverage").protocol()["mask_threshold"] == 0.5


def test_pooling_convention_end_to_end(micro_export, micro_clip):
    """On the micro CLIP, the two conventions give different region features (raw tokens have unequal norms),
    the features of a unit-norm extractor do not depend on the convention, and the protocol is recorded."""
    from ovlib.eval._common import dense_fn_for_clip

    model, _ = micro_clip
    kw = dict(modes=("sclip",), predictors=("rois", "maskpool"), n_images=3, progress=False)
    a = extract_region_features(model, micro_export, RegionClsConfig(batch_size=8), **kw)
    b = extract_region_features(model, micro_export, RegionClsConfig(batch_size=8, pooling="pool-then-normalize"), **kw)
    assert a.protocol["pooling"] == "normalize-then-pool" and b.protocol["pooling"] == "pool-then-normalize"
    assert a.protocol["dense"]["sclip"] == {"mode": "csa", "scale": True, "residual": True, "ffn": True,
                                            "rope": False, "pos_interp": "scale-factor"}
    for k in ("rois/sclip", "maskpool/sclip"):
        assert (a.features[k] - b.features[k]).abs().max() > 1e-4, k
    unit = {"u": dense_fn_for_clip(model, "sclip")}  # unit tokens: both conventions pool the same thing
    kw.update(modes=(), dense_fns=unit)
    c = extract_region_features(model, micro_export, RegionClsConfig(batch_size=8), **kw)
    d = extract_region_features(model, micro_export, RegionClsConfig(batch_size=8, pooling="pool-then-normalize"), **kw)
    torch.testing.assert_close(c.features["maskpool/u"], d.features["maskpool/u"])
    torch.testing.assert_close(c.features["maskpool/u"], a.features["maskpool/sclip"])


def test_chapter01_rows_are_vanilla_or_presets():
    """Every training-free row of chapters 01 / 05 is named after a method and runs that method's preset (a bare
    ``csa`` row is none of SCLIP, DeCLIP or SynCLIP)."""
    from ovlib.eval.profiles import dense_eval_settings
    from ovlib.models import PRESETS

    for profile in ("smoke", "micro", "paper"):
        ev = dense_eval_settings(profile, 0)
        assert all(m == "vanilla" or m in PRESETS for m in ev.modes), (profile, ev.modes)
        assert ev.region.pooling == "normalize-then-pool" and ev.region.mask_grid == "resize"
