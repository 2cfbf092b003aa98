"""The micro world: class table, determinism, scene invariants, captions, context bias, COCO export."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ovlib.data.coco import id2rgb, rgb2id
from ovlib.data.microworld import (
    SPLIT_START,
    MicroWorld,
    MicroWorldStream,
    _argmax0,
    _plural,
    ensure_microworld,
    main,
    mosaic,
)
from ovlib.data.regions import mask_to_box


@pytest.fixture(scope="module")
def world() -> MicroWorld:
    return MicroWorld(seed=0)


@pytest.fixture(scope="module")
def layouts(world):
    return [world.layout(i) for i in range(2000)]


# ---------------------------------------------------------------------------------------------- classes
def test_class_table(world):
    assert len(world.things) >= 24 and len(world.stuff) >= 8
    assert [c.id for c in world.classes] == list(range(1, len(world.classes) + 1))
    assert world.class_names == [c.name for c in world.classes]
    assert len(set(world.class_names)) == len(world.classes)
    assert sum(c.novel for c in world.things) >= 6 and not any(c.novel for c in world.stuff)
    all_terms = Counter(t for c in world.classes for t in [c.name] + c.synonyms)
    assert all(v == 1 for v in all_terms.values()), [k for k, v in all_terms.items() if v > 1]
    stuff_ids = set(world.stuff_ids)
    for c in world.classes:
        assert 3 <= len(c.synonyms) <= 6
        assert c.heldout_synonyms and set(c.heldout_synonyms) <= set(c.synonyms)
        assert c.caption_synonyms, c.name
        assert any(" " in s for s in c.synonyms), c.name  # common, rare and multi-word synonyms
        assert c.name in c.definition.lower() and c.definition.endswith(".")
        assert world.class_by_id(c.id) is c
        if c.isthing:
            assert c.colour in c.definition and c.preferred_stuff and set(c.preferred_stuff) <= stuff_ids
            assert c.split in ("base", "novel")
        else:
            assert c.split == "stuff"
    # every stuff class is preferred by some thing, and (shape, colour, texture) triples are distinct
    assert stuff_ids == {s for c in world.things for s in c.preferred_stuff}
    triples = {(c.name, c.colour, c.texture) for c in world.things}
    assert len(triples) == len(world.things)
    colours = Counter(c.colour for c in world.things)
    assert max(colours.values()) >= 3  # classes share colours: recognition is not trivial
    with pytest.raises(KeyError, match="unknown micro-world category id 999"):
        world.class_by_id(999)
    assert (
        _plural("bus") == "buses"
        and _plural("snowman") == "snowmen"
        and _plural("passenger car") == "passenger cars"
    )
    assert _plural("fish") == "fish" and _plural("daisy") == "daisies"


def test_bad_arguments():
    with pytest.raises(ValueError, match="context_bias"):
        MicroWorld(context_bias=1.5)
    w = MicroWorld()
    for bad in (31, 513, 64.0):
        with pytest.raises(ValueError, match="size must be an int"):
            w.sample(0, bad)
    with pytest.raises(ValueError, match="scene index"):
        w.sample(-1, 64)


# ---------------------------------------------------------------------------------------------- determinism
def test_determinism_and_call_order(world):
    a = [world.sample(i, 64) for i in (5, 3, 9)]
    other = MicroWorld(seed=0)
    other.sample(100, 128)  # a different call history
    b = {i: other.sample(i, 64) for i in (9, 5, 3)}
    for sc in a:
        sb = b[sc.index]
        assert sc.image.tobytes() == sb.image.tobytes()
        assert sc.panoptic.tobytes() == sb.panoptic.tobytes() and sc.masks.tobytes() == sb.masks.tobytes()
        assert sc.captions == sb.captions and sc.segments == sb.segments
    assert world.sample(5, 64).image.tobytes() != world.sample(6, 64).image.tobytes()
    assert MicroWorld(seed=1).sample(5, 64).image.tobytes() != a[0].image.tobytes()


def test_layout_is_size_independent(world):
    for i in range(10):
        s64, s160 = world.sample(i, 64), world.sample(i, 160)
        assert s64.captions == s160.captions and s64.mentions == s160.mentions
        l64, l160 = s64.layout, s160.layout
        assert [(t.category_id, t.cx, t.cy, t.r, t.rot) for t in l64.things] == [
            (t.category_id, t.cx, t.cy, t.r, t.rot) for t in l160.things
        ]
        # the same objects, in normalised coordinates (boxes agree to within a pixel of the coarser raster)
        assert sorted(s64.labels.tolist()) == sorted(s160.labels.tolist())
        if len(s64.labels):
            np.testing.assert_allclose(
                np.sort(s64.boxes / 64, 0), np.sort(s160.boxes / 160, 0), atol=2.5 / 64
            )


@pytest.mark.parametrize("size", [32, 97, 512])
def test_any_size(world, size):
    sc = world.sample(7, size)
    assert sc.image.shape == (size, size, 3) and sc.image.dtype == np.uint8
    assert sc.semantic.shape == (size, size) and sc.panoptic.shape == (size, size)
    assert sc.masks.shape[1:] == (size, size)


# ---------------------------------------------------------------------------------------------- invariants
@pytest.mark.parametrize("size", [32, 64, 160])
def test_scene_invariants(world, size):
    thing_ids, stuff_ids = set(world.thing_ids), set(world.stuff_ids)
    for i in range(15 if size == 160 else 40):
        sc = world.sample(i, size)
        K = len(sc.labels)
        assert sc.masks.shape == (K, size, size) and sc.boxes.shape == (K, 4) and sc.masks.dtype == bool
        assert set(sc.labels.tolist()) <= thing_ids
        # visible masks are disjoint and non-empty; boxes are their tight boxes (so they enclose them)
        assert (sc.masks.sum(0) <= 1).all() and sc.masks.any((1, 2)).all()
        if K:
            np.testing.assert_array_equal(sc.boxes, mask_to_box(sc.masks))
        # every pixel belongs to exactly one segment; panoptic/semantic agree with segments and masks
        seg_ids = [s["id"] for s in sc.segments]
        assert len(set(seg_ids)) == len(seg_ids)
        assert set(np.unique(sc.panoptic).tolist()) == set(seg_ids)
        assert sum(s["area"] for s in sc.segments) == size * size
        things = [s for s in sc.segments if s["isthing"]]
        assert len(things) == K
        for s, m, lab in zip(things, sc.masks, sc.labels):
            assert s["category_id"] == lab
            np.testing.assert_array_equal(sc.panoptic == s["id"], m)
            assert s["area"] == m.sum()
        for s in sc.segments:
            m = sc.panoptic == s["id"]
            assert (sc.semantic[m] == s["category_id"]).all()
            assert s["category_id"] in (thing_ids if s["isthing"] else stuff_ids)
            x0, y0, x1, y1 = mask_to_box(m).tolist()
            assert s["bbox"] == [x0, y0, x1 - x0, y1 - y0]
        assert set(np.unique(sc.semantic).tolist()) <= thing_ids | stuff_ids
        # captions name only what is in the scene
        present = set(np.unique(sc.semantic).tolist())
        assert sc.mentions <= present, (i, sc.captions)


def test_overlap_rule(world, layouts):
    for lay in layouts[:500]:
        b = np.array([t.box for t in lay.things]).reshape(-1, 4)
        for p in range(len(b)):
            for q in range(p):
                ix = max(0.0, min(b[p, 2], b[q, 2]) - max(b[p, 0], b[q, 0]))
                iy = max(0.0, min(b[p, 3], b[q, 3]) - max(b[p, 1], b[q, 1]))
                inter = ix * iy
                ap, aq = np.prod(b[p, 2:] - b[p, :2]), np.prod(b[q, 2:] - b[q, :2])
                assert inter / (ap + aq - inter) <= world.max_iou + 1e-9
                assert inter / min(ap, aq) <= world.max_cover + 1e-9
    n = np.array([len(lay.things) for lay in layouts])
    assert n.min() >= 1 and n.max() == world.max_things


def test_layout_boxes_enclose_rasterised_shapes(world):
    """The analytic layout box contains every pixel the shape covers (before occlusion)."""
    for i in range(30):
        lay = world.layout(i)
        for k, th in enumerate(lay.things):
            size = 128
            img = np.zeros((size, size, 3), np.float32)
            owner = np.zeros((size, size), np.int64)
            world._draw_thing(img, owner, 1, th, size)
            if not owner.any():
                continue
            x0, y0, x1, y1 = mask_to_box(owner == 1).tolist()
            bx = th.box * size
            assert bx[0] <= x0 + 1 and bx[1] <= y0 + 1 and bx[2] >= x1 - 1 and bx[3] >= y1 - 1, (i, k)


# ---------------------------------------------------------------------------------------------- captions
def test_captions_names_and_heldout(world, layouts):
    heldout = {h: c.id for c in world.classes for h in c.heldout_synonyms}
    pats = {h: re.compile(r"\b" + re.escape(h) + r"\b") for h in heldout}
    main_uses = total = 0
    syn_rank = Counter()
    for lay in layouts:
        assert len(lay.captions) == world.captions_per_scene
        present = {t.category_id for t in lay.things} | set(lay.stuff)
        for cap, terms in zip(lay.captions, lay.terms):
            assert not [h for h, p in pats.items() if p.search(cap)], cap
            for cid, surface in terms:
                c = world.class_by_id(cid)
                assert cid in present
                assert surface == c.name or surface in c.caption_synonyms
                total += 1
                if surface == c.name:
                    main_uses += 1
                else:
                    syn_rank[c.caption_synonyms.index(surface)] += 1
    frac = main_uses / total
    assert abs(frac - world.main_name_prob) < 0.015, frac
    # Zipf over the caption synonyms: rank 0 used more than rank 1 more than rank 2
    assert syn_rank[0] > syn_rank[1] > syn_rank[2] > 0


def test_main_name_prob_is_a_knob():
    w = MicroWorld(main_name_prob=0.5)
    terms = [t for i in range(300) for cap in w.layout(i).terms for t in cap]
    frac = np.mean([s == w.class_by_id(c).name for c, s in terms])
    assert 0.45 < frac < 0.55


def test_caption_surface_forms_appear_in_text(world, layouts):
    for lay in layouts[:300]:
        for cap, terms in zip(lay.captions, lay.terms):
            for _cid, surface in terms:
                forms = [surface, _plural(surface)]
                assert any(re.search(r"\b" + re.escape(f) + r"\b", cap) for f in forms), (cap, surface)


def test_caption_token_length(world, layouts):
    open_clip = pytest.importorskip("open_clip")
    tok = open_clip.SimpleTokenizer()
    lengths = [len(tok.encode(c)) + 2 for lay in layouts[:500] for c in lay.captions]  # + sot/eot
    assert max(lengths) <= 32, max(lengths)


# ---------------------------------------------------------------------------------------------- context bias
def _centre_stats(w, layouts):
    """(flagged, on a preferred stuff) bool arrays over all things of ``layouts``."""
    flagged, pref = [], []
    for lay in layouts:
        if not lay.things:
            continue
        sid = w.stuff_at(lay, [t.cx for t in lay.things], [t.cy for t in lay.things])
        flagged += [t.context for t in lay.things]
        pref += [int(s) in w.class_by_id(t.category_id).preferred_stuff for s, t in zip(sid, lay.things)]
    return np.array(flagged), np.array(pref)


def test_context_bias_statistics(world, layouts):
    flagged, pref = _centre_stats(world, layouts)
    n = len(flagged)
    assert n > 5000
    assert pref[flagged].all(), "a context-biased thing must sit on one of its preferred stuff classes"
    # flagged things are drawn Bernoulli(context_bias) (a few are dropped by the overlap rule): 4 std errors
    se = np.sqrt(world.context_bias * (1 - world.context_bias) / n)
    assert abs(flagged.mean() - world.context_bias) < 4 * se, flagged.mean()
    # without the bias, things land on a preferred stuff only by chance (p0); with it, the rate is
    # context_bias + (1 - context_bias) * p0: unflagged things are placed as in the unbiased world
    w0 = MicroWorld(seed=0, context_bias=0.0)
    f0, p0 = _centre_stats(w0, [w0.layout(i) for i in range(2000)])
    assert not f0.any() and p0.mean() < 0.5 * world.context_bias
    expected = world.context_bias + (1 - world.context_bias) * p0.mean()
    assert abs(pref.mean() - expected) < 4 * se + 0.01, (pref.mean(), expected)
    assert abs(pref[~flagged].mean() - p0.mean()) < 0.03


def test_stuff_field_matches_raster(world):
    """The point evaluation used for placement is the function the raster samples at pixel centres."""
    rng = np.random.default_rng(0)
    for i in range(30):
        lay = world.layout(i)
        size = 96
        _img, lab = world._render_stuff(lay, size)
        px, py = rng.integers(0, size, 50), rng.integers(0, size, 50)
        got = world.stuff_at(lay, (px + 0.5) / size, (py + 0.5) / size)
        np.testing.assert_array_equal(got, np.asarray(lay.stuff)[lab[py, px]])


# ---------------------------------------------------------------------------------------------- export
@pytest.fixture(scope="module")
def exported(tmp_path_factory, world):
    root = tmp_path_factory.mktemp("mw")
    world.export_coco(root, split="val2017", n=6, size=64, progress=False)
    return root


def test_export_layout_and_pycocotools(exported, world):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    ann = exported / "annotations"
    start = SPLIT_START["val2017"]
    files = sorted(p.name for p in (exported / "val2017").iterdir())
    assert files == [f"{start + i + 1:012d}.png" for i in range(6)]
    coco = COCO(str(ann / "instances_val2017.json"))
    cats = coco.loadCats(coco.getCatIds())
    assert [c["id"] for c in cats] == world.thing_ids
    for c in cats:
        info = world.class_by_id(c["id"])
        assert c["isthing"] == 1 and c["synonyms"] == info.synonyms and c["definition"] == info.definition
        assert c["split"] == info.split
    for img_id in coco.getImgIds():
        sc = world.sample(img_id - 1, 64)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img_id]))
        assert len(anns) == len(sc.labels)
        for a, m, lab, box in zip(anns, sc.masks, sc.labels, sc.boxes):
            rle = a["segmentation"]
            assert a["area"] == int(mask_utils.area(rle)) == int(m.sum())
            np.testing.assert_array_equal(coco.annToMask(a).astype(bool), m)
            x, y, w, h = a["bbox"]
            assert [x, y, x + w, y + h] == box.tolist() and a["category_id"] == lab and a["iscrowd"] == 0
    caps = COCO(str(ann / "captions_val2017.json"))
    assert len(caps.getAnnIds()) == 6 * world.captions_per_scene
    pan = json.loads((ann / "panoptic_val2017.json").read_text())
    assert {c["split"] for c in pan["categories"]} == {"base", "novel", "stuff"}
    assert [c["id"] for c in pan["categories"]] == [c.id for c in world.classes]
    syn = json.loads((ann / "synonyms.json").read_text())
    assert set(syn) == set(world.class_names) and all(
        {"synonyms", "definition"} <= set(v) for v in syn.values()
    )


def test_export_panoptic_png_roundtrip(exported, world):
    from PIL import Image

    ann = exported / "annotations"
    pan = json.loads((ann / "panoptic_val2017.json").read_text())
    for a in pan["annotations"]:
        ids = rgb2id(np.asarray(Image.open(ann / "panoptic_val2017" / a["file_name"]).convert("RGB")))
        assert set(np.unique(ids).tolist()) == {s["id"] for s in a["segments_info"]}
        for s in a["segments_info"]:
            m = ids == s["id"]
            assert m.sum() == s["area"]
            x0, y0, x1, y1 = mask_to_box(m).tolist()
            assert s["bbox"] == [x0, y0, x1 - x0, y1 - y0]
        sc = world.sample(a["image_id"] - 1, 64)
        np.testing.assert_array_equal(ids, sc.panoptic)
        img = np.asarray(Image.open(exported / "val2017" / f"{a['image_id']:012d}.png"))
        np.testing.assert_array_equal(img, sc.image)


def test_ensure_microworld_idempotent(tmp_path):
    root = tmp_path / "mw"
    ensure_microworld(root, "val2017", n=3, size=48, seed=0, progress=False)
    manifest = root / "annotations" / "manifest_val2017.json"
    stamp = manifest.stat().st_mtime_ns
    png = root / "val2017" / f"{SPLIT_START['val2017'] + 1:012d}.png"
    png_stamp = png.stat().st_mtime_ns
    ensure_microworld(root, "val2017", n=3, size=48, seed=0, progress=False)
    assert manifest.stat().st_mtime_ns == stamp and png.stat().st_mtime_ns == png_stamp
    # a different config re-exports; so does an export without manifest (killed before the end)
    ensure_microworld(root, "val2017", n=2, size=48, seed=0, progress=False)
    assert len(list((root / "val2017").glob("*.png"))) == 2
    assert json.loads(manifest.read_text())["config"]["n"] == 2
    manifest.unlink()
    ensure_microworld(root, "val2017", n=2, size=48, seed=0, progress=False)
    assert manifest.is_file()
    # a second split lives beside the first
    ensure_microworld(root, "train2017", n=2, size=48, seed=0, progress=False)
    assert (root / "train2017" / f"{1:012d}.png").is_file() and manifest.is_file()


def test_cli_export(tmp_path, capsys):
    assert (
        main(["export", "--root", str(tmp_path / "cli"), "--split", "val2017", "--n", "2", "--size", "40"])
        == 0
    )
    assert (tmp_path / "cli" / "annotations" / "panoptic_val2017.json").is_file()
    assert "2 scenes at 40 px" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- stream
def test_stream_items_and_resume(world):
    ds = MicroWorldStream(world, size=48, start=10, stop=14)
    items = list(ds)
    assert [it["index"] for it in items] == [10, 11, 12, 13] and len(ds) == 4
    it = items[0]
    assert it["image"].shape == (3, 48, 48) and it["image"].dtype == torch.float32
    assert 0.0 <= it["image"].min() and it["image"].max() <= 1.0
    sc = world.sample(10, 48)
    np.testing.assert_array_equal((it["image"] * 255).round().byte().permute(1, 2, 0).numpy(), sc.image)
    assert it["caption"] in sc.captions
    assert it["labels"][: len(sc.layout.things)].tolist() == [t.category_id for t in sc.layout.things]
    resumed = list(MicroWorldStream(world, size=48, start=12, stop=14))
    assert [r["caption"] for r in resumed] == [r["caption"] for r in items[2:]]
    assert torch.equal(resumed[0]["image"], items[2]["image"])
    u8 = MicroWorldStream(world, size=48, start=10, stop=11, uint8=True).item(10)["image"]
    assert u8.dtype == torch.uint8
    inf = iter(MicroWorldStream(world, size=32))
    assert [next(inf)["index"] for _ in range(3)] == [0, 1, 2]
    with pytest.raises(TypeError):
        len(MicroWorldStream(world, size=32))


def test_object_view_is_a_named_close_up(world):
    """object_view: deterministic, the chosen thing is one of the scene's and every caption names it; the
    context factor sets the window."""
    names = {c.id: {c.name, *c.caption_synonyms} for c in world.classes}
    for i in range(12):
        img, caps, cid = world.object_view(i, 48, render_size=96)
        assert img.shape == (48, 48, 3) and img.dtype == np.uint8
        img2, caps2, cid2 = world.object_view(i, 48, render_size=96)
        assert cid == cid2 and caps == caps2 and np.array_equal(img, img2)
        lay = world.layout(i)
        assert cid in {t.category_id for t in lay.things} and len(caps) == world.captions_per_scene
        for cap in caps:
            assert any(re.search(rf"\b{re.escape(n)}", cap) for n in names[cid]), (cap, cid)
    # the context factor sets the window: a tight and a wide view of the same thing differ
    tight, _, cid = world.object_view(3, 64, 256, context=(1.2, 1.2))
    wide, _, cid_w = world.object_view(3, 64, 256, context=(4.0, 4.0))
    assert cid == cid_w and not np.array_equal(tight, wide)
    with pytest.raises(ValueError, match="context"):
        world.object_view(0, 48, context=(0.5, 2.0))


def test_stream_object_views(world):
    ds = MicroWorldStream(world, size=40, start=0, stop=40, object_views=0.5, view_render_size=80)
    n_views = 0
    for it in ds:
        i = it["index"]
        rng = np.random.default_rng([world.seed, i, 1])
        pick = int(rng.integers(world.captions_per_scene))
        if rng.random() < 0.5:
            n_views += 1
            img, caps, cid = world.object_view(i, 40, 80)
            assert it["caption"] == caps[pick] and it["labels"].tolist() == [cid] + [0] * (world.max_things - 1)
            np.testing.assert_array_equal((it["image"] * 255).round().byte().permute(1, 2, 0).numpy(), img)
        else:
            assert it["caption"] == world.sample(i, 40).captions[pick]
    assert 8 <= n_views <= 32
    with pytest.raises(ValueError, match="object_views"):
        MicroWorldStream(world, object_views=1.5)


def test_world_pickles(world):
    import pickle

    w2 = pickle.loads(pickle.dumps(MicroWorld(seed=3, context_bias=0.5)))
    assert w2.seed == 3 and w2.context_bias == 0.5
    assert (
        w2.sample(4, 48).image.tobytes() == MicroWorld(seed=3, context_bias=0.5).sample(4, 48).image.tobytes()
    )


def test_stream_workers_partition_indices(world):
    ds = MicroWorldStream(world, size=32, start=5, stop=17)
    assert list(ds.indices(1, 3)) == [6, 9, 12, 15]
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    got = {it["index"]: it["caption"] for it in loader}
    assert sorted(got) == list(range(5, 17))
    assert got == {i: ds.item(i)["caption"] for i in range(5, 17)}
    # DDP shards x workers partition the indices too
    seen = []
    for r in range(3):
        shard = MicroWorldStream(world, size=32, start=5, stop=17, shard=r, num_shards=3)
        loader = torch.utils.data.DataLoader(shard, batch_size=None, num_workers=2)
        seen += [it["index"] for it in loader]
    assert sorted(seen) == list(range(5, 17))
    with pytest.raises(ValueError, match="shard"):
        MicroWorldStream(world, shard=2, num_shards=2)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 256**3 - 1), st.integers(0, 256**3 - 1))
def test_rgb2id_roundtrip(a, b):
    ids = np.array([[a, b], [0, 256**3 - 1]], np.int64)
    np.testing.assert_array_equal(rgb2id(id2rgb(ids)), ids)
    assert id2rgb(np.array([[1 + 256 * 2 + 65536 * 3]]))[0, 0].tolist() == [1, 2, 3]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_argmax0_matches_numpy(k, n, seed):
    rng = np.random.default_rng(seed)
    f = rng.integers(0, 3, size=(k, n, n)).astype(float)  # many ties: the first maximum wins in both
    np.testing.assert_array_equal(_argmax0(f), np.argmax(f, 0))
    g = rng.normal(size=(k, n))
    np.testing.assert_array_equal(_argmax0(g), np.argmax(g, 0))


def test_class_image_sheet_and_mosaic(world):
    for c in world.classes:
        img = world.class_image(c.id, 48)
        assert img.shape == (48, 48, 3) and img.dtype == np.uint8
        if c.isthing:  # the object is drawn over its background
            bg = world.class_image(c.preferred_stuff[0], 48)
            assert (img != bg).any(-1).mean() > 0.1
    sheet, order = world.class_sheet(size=20, cols=9)
    rows = -(-len(world.classes) // 9)
    assert sheet.shape == (rows * 22 - 2, 9 * 22 - 2, 3) and order == world.classes
    np.testing.assert_array_equal(sheet[22:42, 0:20], world.class_image(world.classes[9].id, 20))
    grid = world.scene_mosaic(range(32), size=32, cols=8)
    assert grid.shape == (4 * 34 - 2, 8 * 34 - 2, 3)
    np.testing.assert_array_equal(grid[34:66, 68:100], world.sample(10, 32).image)
    with pytest.raises(ValueError, match="image 1"):
        mosaic([np.zeros((4, 4, 3), np.uint8), np.zeros((5, 4, 3), np.uint8)], 2)
