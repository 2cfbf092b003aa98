"""OV detection data and metrics: the OV-COCO split, base-only targets, COCOeval on hand cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import shared_dir
from hypothesis import given, settings
from hypothesis import strategies as st

from ovlib.data.detection import OV_COCO_BASE, OV_COCO_NOVEL, DetectionDataset, VocabSplit, vocab_split
from ovlib.data.microworld import MicroWorld, ensure_microworld
from ovlib.eval.detection import ap50_bounds_from_counts, ap50_from_counts, coco_box_ap, detections_to_coco


# ------------------------------------------------------------------------------------------------ splits
def _coco_things() -> list[dict]:
    shared = shared_dir()
    pan = shared / "data" / "coco_panoptic_val100" / "annotations" / "panoptic_val2017.json" if shared else None
    if pan is None or not pan.is_file():
        pytest.skip("../shared/data/coco_panoptic_val100 not present")
    return [c for c in json.loads(pan.read_text())["categories"] if c["isthing"]]


def test_ov_coco_lists_are_48_plus_17_distinct_names():
    assert len(OV_COCO_BASE) == 48 and len(set(OV_COCO_BASE)) == 48
    assert len(OV_COCO_NOVEL) == 17 and len(set(OV_COCO_NOVEL)) == 17
    assert not set(OV_COCO_BASE) & set(OV_COCO_NOVEL)


def test_ov_coco_split_resolves_in_cocos_80_things():
    things = _coco_things()
    assert len(things) == 80
    sp = vocab_split(things, "ov-coco")
    ids = {c["id"] for c in things}
    assert len(sp.base) == 48 and len(sp.novel) == 17
    assert set(sp.base) <= ids and set(sp.novel) <= ids
    assert len(ids - set(sp.vocab)) == 15  # the 15 categories outside the OV-COCO vocabulary
    by_name = {c["name"]: c["id"] for c in things}
    assert by_name["cat"] in sp.novel and by_name["person"] in sp.base and by_name["traffic light"] not in sp.vocab


def test_ov_coco_split_names_a_missing_category():
    things = [c for c in _coco_things() if c["name"] != "scissors"]
    with pytest.raises(ValueError, match="scissors"):
        vocab_split(things, "ov-coco")


def test_field_split_of_the_micro_world():
    cats = [c for c in MicroWorld(seed=0).categories() if c["isthing"]]
    sp = vocab_split(cats, "field")
    assert set(sp.novel) == {c["id"] for c in cats if c["split"] == "novel"} and len(sp.novel) > 0
    assert set(sp.base) == {c["id"] for c in cats if c["split"] == "base"}
    assert sp.index[sp.novel[0]] == len(sp.base)  # the vocabulary is base then novel
    with pytest.raises(ValueError, match="split"):
        vocab_split([{"id": 1, "name": "x"}], "field")
    with pytest.raises(ValueError, match="unknown detection split"):
        vocab_split(cats, "lvis")
    with pytest.raises(ValueError, match="both base and novel"):
        VocabSplit((1, 2), (2,), {1: "a", 2: "b"})


# ------------------------------------------------------------------------------- base-only training data
@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return ensure_microworld(tmp_path_factory.mktemp("det"), "train2017", n=24, size=96, seed=0, progress=False)


def test_novel_classes_never_reach_the_training_targets(export):
    inst = json.loads((export / "annotations" / "instances_train2017.json").read_text())
    sp = vocab_split(inst["categories"], "field")
    ds = DetectionDataset(export, "train2017", keep=sp.base, novel=sp.novel)
    n_novel = sum(a["category_id"] in sp.novel for a in inst["annotations"])
    assert n_novel > 0, "the test export should hold novel objects"
    assert ds.dropped["novel"] == n_novel
    seen = 0
    for i in range(len(ds)):  # every sample of the dataset
        x, t = ds[i]
        assert x.shape[0] == 3 and x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
        cats = {sp.base[int(lab) - 1] for lab in t["labels"]}
        assert cats <= set(sp.base) and not cats & set(sp.novel)
        assert (t["boxes"][:, 2:] > t["boxes"][:, :2]).all()
        seen += len(t["labels"])
    n_base = sum(a["category_id"] in sp.base for a in inst["annotations"])
    assert seen + ds.dropped["degenerate"] == n_base
    assert len(ds) + ds.skipped["no_kept_boxes"] == len(inst["images"])


def test_detection_dataset_errors_name_the_input(export):
    with pytest.raises(ValueError, match="999"):
        DetectionDataset(export, "train2017", keep=[999])
    with pytest.raises(ValueError, match="no category"):
        DetectionDataset(export, "train2017", keep=[])


# ---------------------------------------------------------------------------------------------- COCOeval
def _gt(tmp_path, anns, cats=((1, "a"), (2, "b")), n_images=2):
    from pycocotools.coco import COCO

    d = {"images": [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.png"} for i in range(1, n_images + 1)],
         "categories": [{"id": c, "name": n} for c, n in cats],
         "annotations": [{"id": k + 1, "image_id": im, "category_id": c, "bbox": list(b), "area": b[2] * b[3],
                          "iscrowd": 0} for k, (im, c, b) in enumerate(anns)]}
    p = tmp_path / "gt.json"
    p.write_text(json.dumps(d))
    return COCO(str(p))


def test_coco_ap_hand_case(tmp_path):
    # two GT boxes of class 1; one exact hit (0.9), one false positive (0.8): precision 1 up to recall 0.5, then 0.
    # COCO's 101-point AP = 51 / 101 (recall thresholds 0, .01, ..., .50 reach precision 1)
    gt = _gt(tmp_path, [(1, 1, (10, 10, 20, 20)), (1, 1, (60, 60, 20, 20)), (2, 2, (5, 5, 30, 30))])
    dets = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9},
            {"image_id": 1, "category_id": 1, "bbox": [40, 0, 10, 10], "score": 0.8},
            {"image_id": 2, "category_id": 2, "bbox": [5, 5, 30, 30], "score": 0.7}]
    ap1 = coco_box_ap(gt, dets, [1])
    assert ap1["ap50"] == pytest.approx(100 * 51 / 101, abs=1e-6)
    assert coco_box_ap(gt, dets, [2])["ap50"] == pytest.approx(100.0)
    both = coco_box_ap(gt, dets, [1, 2])["ap50"]
    assert both == pytest.approx((100 * 51 / 101 + 100) / 2, abs=1e-6)  # the mean over categories
    # a subset without ground truth is NaN, without detections 0
    gt3 = _gt(tmp_path, [(1, 1, (10, 10, 20, 20))], cats=((1, "a"), (2, "b"), (3, "c")))
    assert math.isnan(coco_box_ap(gt3, dets, [3])["ap50"])
    assert coco_box_ap(gt, [], [1])["ap50"] == 0.0


def test_detections_to_coco_maps_rows_to_ids():
    out = {"boxes": torch.tensor([[1.0, 2.0, 11.0, 22.0]]), "labels": torch.tensor([2]), "scores": torch.tensor([.5])}
    (d,) = detections_to_coco(out, 7, vocab=(5, 9))
    assert d == {"image_id": 7, "category_id": 9, "bbox": [1.0, 2.0, 10.0, 20.0], "score": 0.5}
    with pytest.raises(ValueError, match="outside"):
        detections_to_coco({**out, "labels": torch.tensor([3])}, 7, vocab=(5, 9))


# ------------------------------------------------------------------------ AP from summed per-image counts
def test_ap_counts_rebuild_cocoeval_ap50(tmp_path):
    """Random boxes and detections on 30 images, 3 categories, scores far apart (no tie inside a bin): the
    statistic of the summed per-image counts equals COCOeval's AP50, per category subset."""
    import numpy as np

    from ovlib.eval.detection import ap50_from_counts, ap_counts, score_bins

    rng = np.random.default_rng(0)
    anns, dets = [], []
    for im in range(1, 31):
        for _ in range(rng.integers(0, 4)):
            c = int(rng.integers(1, 4))
            x, y, w, h = (float(v) for v in rng.uniform([0, 0, 10, 10], [60, 60, 40, 40]))
            anns.append((im, c, (x, y, w, h)))
            if rng.random() < 0.7:  # a jittered hit, sometimes with the wrong class
                j = rng.normal(0, 4, 4)
                dets.append({"image_id": im, "category_id": c if rng.random() < 0.8 else int(rng.integers(1, 4)),
                             "bbox": [x + j[0], y + j[1], max(2.0, w + j[2]), max(2.0, h + j[3])]})
        for _ in range(rng.integers(0, 3)):  # pure false positives
            dets.append({"image_id": im, "category_id": int(rng.integers(1, 4)),
                         "bbox": [float(v) for v in rng.uniform([0, 0, 5, 5], [80, 80, 20, 20])]})
    edges = score_bins(0.01, 500)
    order = rng.permutation(len(dets))
    for r, k in enumerate(order):  # scores one bin apart at least: distinct bins (bin width ~0.9 % of the score)
        dets[k]["score"] = float(edges[500 - 2 * r - 1] * 1.001)
    assert len(dets) < 240
    gt = _gt(tmp_path, anns, cats=((1, "a"), (2, "b"), (3, "c")), n_images=30)
    order, imgs = [3, 1, 2], list(range(30, 0, -1))  # rows follow the caller's order, not COCOeval's sorted one
    counts = ap_counts(gt, dets, order, imgs, edges)
    assert counts.shape == (30, 3, 1001)
    for ii, im in enumerate(imgs):
        for ki, c in enumerate(order):
            assert counts[ii, ki, -1] == sum(a[0] == im and a[1] == c for a in anns)
            n_det = sum(d["image_id"] == im and d["category_id"] == c for d in dets)
            assert counts[ii, ki, :-1].sum() == n_det
    for cats in ([1], [2], [1, 3], [1, 2, 3]):
        sub = counts[:, [order.index(c) for c in cats]].reshape(30, -1).sum(0)
        assert ap50_from_counts(sub, len(cats)) == pytest.approx(coco_box_ap(gt, dets, cats)["ap50"], abs=1e-9)
        assert ap50_bounds_from_counts(sub, len(cats)) == pytest.approx((ap50_from_counts(sub, len(cats)),) * 2)
    for r, k in enumerate(rng.permutation(len(dets))):  # now every score in one bin, distinct: ties everywhere
        dets[k]["score"] = float(edges[250] * (1.001 + 1e-5 * r))
    counts = ap_counts(gt, dets, order, imgs, edges)
    for cats in ([1], [2], [1, 3], [1, 2, 3]):
        sub = counts[:, [order.index(c) for c in cats]].reshape(30, -1).sum(0)
        lo, hi = ap50_bounds_from_counts(sub, len(cats))
        assert lo - 1e-9 <= coco_box_ap(gt, dets, cats)["ap50"] <= hi + 1e-9 and lo < hi


def test_ap50_from_counts_hand_case():
    # one category, 2 GT; bins (descending): [tp] then [fp]: precision 1 to recall 0.5 -> AP50 = 51 / 101
    nb = 3
    row = np.zeros(2 * nb + 1)
    row[0], row[nb + 1], row[2 * nb] = 1, 1, 2
    assert ap50_from_counts(row, 1) == pytest.approx(100 * 51 / 101)
    row0 = np.zeros(2 * nb + 1)  # a category without ground truth is left out of the mean
    assert ap50_from_counts(np.concatenate([row, row0]), 2) == pytest.approx(100 * 51 / 101)
    assert math.isnan(ap50_from_counts(row0, 1))


def _ap50_one_row_at_a_time(s, n_cat):
    """COCO's 101-point interpolation written out per category (the reference of the vectorised statistic)."""
    s = np.asarray(s, dtype=np.float64).reshape(n_cat, -1)
    nb = (s.shape[1] - 1) // 2
    aps = []
    for row in s:
        if row[2 * nb] <= 0:
            continue
        tp, fp = np.cumsum(row[:nb]), np.cumsum(row[nb:2 * nb])
        rc, pr = tp / row[2 * nb], np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1e-12), 0.0)
        pr = np.array([pr[j:].max() for j in range(nb)])  # the precision envelope, by its definition
        q = [pr[np.argmax(rc >= t)] if (rc >= t).any() else 0.0 for t in np.linspace(0, 1, 101)]
        aps.append(100.0 * np.mean(q))
    return float(np.mean(aps)) if aps else float("nan")


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 8), st.integers(1, 40), st.integers(0, 2 ** 31 - 1))
def test_ap50_from_counts_equals_the_per_category_definition(n_cat, nb, seed):
    rng = np.random.default_rng(seed)
    s = np.zeros((n_cat, 2 * nb + 1))
    for k in range(n_cat):
        # 0: a category without ground truth; 10, 20, 25, 50: recalls that land exactly on COCO's thresholds
        n_gt = int(rng.choice([0, 1, 2, 3, 5, 7, 10, 20, 25, 50]))
        tp = rng.multinomial(int(rng.integers(0, n_gt + 1)), np.full(nb, 1 / nb)) if n_gt else np.zeros(nb)
        s[k, :nb], s[k, nb:2 * nb], s[k, 2 * nb] = tp, rng.integers(0, 4, nb), n_gt
    want = _ap50_one_row_at_a_time(s, n_cat)
    got = ap50_from_counts(s.ravel(), n_cat)
    assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, abs=1e-9)
    lo, hi = ap50_bounds_from_counts(s.ravel(), n_cat)  # the binned AP lies between the within-bin orderings
    assert (math.isnan(got) and math.isnan(lo)) or lo - 1e-9 <= got <= hi + 1e-9


def test_ap50_bounds_bracket_cocoeval_when_a_bin_holds_a_hit_and_a_miss():
    # one category, 2 GT; one bin holds a hit and a miss: COCOeval's order inside it is either (hit, miss): AP50 =
    # 100 * 51/101 (precision 1 to recall 0.5), or (miss, hit): 100 * 0.5 * 51/101 (precision 1/2 up to recall 0.5)
    nb = 3
    row = np.zeros(2 * nb + 1)
    row[0], row[nb], row[2 * nb] = 1, 1, 2
    lo, hi = ap50_bounds_from_counts(row, 1)
    assert lo == pytest.approx(100 * 0.5 * 51 / 101) and hi == pytest.approx(100 * 51 / 101)
    assert lo <= ap50_from_counts(row, 1) <= hi
    row[0], row[nb], row[nb + 1] = 1, 0, 1  # the miss in the next bin: no tie, both bounds are the AP
    assert ap50_bounds_from_counts(row, 1) == pytest.approx((ap50_from_counts(row, 1),) * 2)


def test_with_protocol_drop_is_other_minus_orig_per_image():
    import functools

    from ovlib.eval.detection import DetectionEval, with_protocol

    stat = functools.partial(ap50_from_counts, n_cat=1)

    def ev(rows):
        arr = np.array(rows, dtype=np.float64)  # (I, 2 nb + 1)
        return DetectionEval("x", ci={"ap50.novel": (stat(arr.sum(0)), 0, 0)},
                             per_image={"ap50.novel": (arr, stat)}, images=len(arr))

    orig = ev([[1, 0, 0, 0, 0, 0, 1], [1, 0, 0, 0, 0, 0, 1]])  # both boxes found first: AP 100
    syn = ev([[0, 0, 1, 1, 0, 0, 1], [1, 0, 0, 0, 0, 0, 1]])  # one behind a false positive
    out = with_protocol(orig, syn, "syn", n_boot=50)
    arr, f = out.per_image["drop ap50.novel [syn]"]
    assert arr.shape == (2, 14)
    assert f(arr.sum(0)) == pytest.approx(syn.point("ap50.novel") - 100.0)
    assert out.point("drop ap50.novel [syn]") < 0 and out.point("ap50.novel [syn]") == syn.point("ap50.novel")


def test_detection_dataset_max_images_keeps_the_first(export):
    inst = json.loads((export / "annotations" / "instances_train2017.json").read_text())
    sp = vocab_split(inst["categories"], "field")
    full = DetectionDataset(export, "train2017", keep=sp.base, novel=sp.novel)
    part = DetectionDataset(export, "train2017", keep=sp.base, novel=sp.novel, max_images=5)
    assert len(part) == 5 and part.image_ids() == full.image_ids()[:5]
