"""Synonym-robustness protocols: name substitution keeps class ids, the drop table by hand, end-to-end runs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ovlib.eval.synonyms import (
    PROTOCOLS,
    class_ids,
    class_splits,
    drop_table,
    format_drop_table,
    ovss_synonym_robustness,
    per_class_accuracy,
    protocol_names,
    protocol_runs,
    protocol_text_embeddings,
    region_synonym_robustness,
)
from ovlib.models.text import MICRO_TEMPLATES

CATS = [
    {"id": 3, "name": "cup", "synonyms": ["mug", "beaker", "tumbler"], "split": "base", "isthing": True},
    {"id": 1, "name": "boat", "synonyms": ["ship", "vessel"], "split": "novel", "isthing": True},
    {"id": 7, "name": "sky", "synonyms": [], "split": "stuff", "isthing": False},
]


@pytest.fixture(scope="module")
def world_classes():
    from ovlib.data.microworld import MicroWorld

    return MicroWorld(seed=0).classes


def test_substitution_keeps_ids_and_order(world_classes):
    ids = class_ids(world_classes)
    assert ids == [c.id for c in world_classes]
    for p in PROTOCOLS:
        for seed in (0, 1):
            names = protocol_names(world_classes, p, seed)
            assert len(names) == len(world_classes)
            assert class_ids(world_classes) == ids  # nothing reordered or mutated
            for c, n in zip(world_classes, names):
                if p == "original" or not c.synonyms:
                    assert n == [c.name]
                elif p == "first_synonym":
                    assert n == [c.synonyms[0]]
                elif p == "random_synonym":
                    assert len(n) == 1 and n[0] in c.synonyms
                else:
                    assert n == [s for s in c.synonyms if s != c.name]
    splits = class_splits(world_classes)
    assert set(splits) <= {"base", "novel", "stuff"} and {"base", "novel"} <= set(splits)


def test_random_synonym_is_seeded():
    a = protocol_names(CATS, "random_synonym", seed=5)
    assert a == protocol_names(CATS, "random_synonym", seed=5)
    draws = {tuple(map(tuple, protocol_names(CATS, "random_synonym", seed=s))) for s in range(20)}
    assert len(draws) > 1  # different seeds draw different synonyms
    assert protocol_names(CATS, "random_synonym", 0)[2] == ["sky"]  # no synonym: the name stays
    with pytest.raises(ValueError, match="protocol"):
        protocol_names(CATS, "translation")


def test_protocol_runs():
    assert protocol_runs(PROTOCOLS, (0, 1, 2)) == [("original", 0), ("first_synonym", 0), ("random_synonym", 0),
                                                    ("random_synonym", 1), ("random_synonym", 2),
                                                    ("synonym_ensemble", 0)]
    with pytest.raises(ValueError):
        protocol_runs(("bogus",))
    with pytest.raises(ValueError):
        protocol_runs(PROTOCOLS, ())


def test_per_class_accuracy_from_counts():
    thing = np.zeros((2, 3, 3), dtype=np.int64)  # (images, 1 + K, C)
    thing[0, :, 0] = [2, 1, 2]
    thing[1, :, 0] = [2, 2, 2]
    thing[0, :, 1] = [1, 0, 1]
    stuff = np.zeros((2, 3, 3), dtype=np.int64)
    stuff[1, :, 2] = [4, 1, 3]
    acc = per_class_accuracy({"thing": thing, "stuff": stuff})
    np.testing.assert_allclose(acc, [75.0, 0.0, 25.0])
    np.testing.assert_allclose(per_class_accuracy({"thing": thing, "stuff": stuff}, k_index=2), [100.0, 100.0, 75.0])
    assert math.isnan(per_class_accuracy(thing)[2])


def test_drop_table_hand_case():
    splits = ["base", "base", "novel", "stuff"]
    nan = float("nan")
    scores = {("original", 0): np.array([80.0, 60.0, 50.0, nan]),
              ("first_synonym", 0): np.array([70.0, 60.0, 20.0, nan]),
              ("random_synonym", 0): np.array([60.0, 40.0, 30.0, nan]),
              ("random_synonym", 1): np.array([80.0, 60.0, 10.0, nan])}
    rows = {(r["protocol"], r["split"]): r for r in drop_table(scores, splits)}
    assert rows[("original", "base")]["score"] == 70.0 and rows[("original", "base")]["drop"] == 0.0
    assert rows[("first_synonym", "base")]["drop"] == pytest.approx(-5.0)
    assert rows[("first_synonym", "novel")]["drop"] == pytest.approx(-30.0)
    r = rows[("random_synonym", "base")]  # seeds: 50, 70 -> 60 +- 10
    assert (r["score"], r["std"], r["drop"], r["n_seeds"]) == (60.0, 10.0, -10.0, 2)
    assert rows[("random_synonym", "novel")]["drop"] == pytest.approx(-30.0)
    assert math.isnan(rows[("original", "stuff")]["score"]) and rows[("original", "stuff")]["n_classes"] == 0
    # "all" = mean over the present classes (the stuff class is absent)
    assert rows[("original", "all")]["score"] == pytest.approx((80 + 60 + 50) / 3)
    assert [r["protocol"] for r in drop_table(scores, splits)][::4] == ["original", "first_synonym",
                                                                        "random_synonym"]
    assert "| first_synonym | novel | 20.0 | -30.0 |" in format_drop_table(drop_table(scores, splits))
    with pytest.raises(ValueError, match="baseline"):
        drop_table({("first_synonym", 0): np.zeros(4)}, splits)
    with pytest.raises(ValueError, match="shape"):
        drop_table({("original", 0): np.zeros(3)}, splits)


@pytest.fixture(scope="module")
def micro_clip():
    from ovlib.models import load_clip

    model, tok, _ = load_clip("micro-clip", seed=0)
    return model, tok


def test_region_robustness_end_to_end(micro_clip):
    """Region features equal to the original-name embeddings: 100 % under ``original``, drops elsewhere are
    what scoring the same features against the substituted embeddings gives."""
    from ovlib.eval.region_cls import RegionFeatures, score_regions

    model, tok = micro_clip
    texts = protocol_text_embeddings(model, tok, CATS, seeds=(0, 1), templates=MICRO_TEMPLATES[:2])
    assert set(texts) == {("original", 0), ("first_synonym", 0), ("random_synonym", 0), ("random_synonym", 1),
                          ("synonym_ensemble", 0)}
    orig = texts[("original", 0)]
    lab = torch.tensor([0, 0, 1, 2, 1])  # rows of CATS
    rf = RegionFeatures(category_id=torch.tensor([CATS[i]["id"] for i in lab]), isthing=torch.tensor(
        [bool(CATS[i]["isthing"]) for i in lab]), image=torch.tensor([0, 0, 1, 1, 1]), n_images=2,
        features={"rois/x": orig[lab]})
    res = region_synonym_robustness(rf, model, tok, CATS, "rois/x", seeds=(0, 1), templates=MICRO_TEMPLATES[:2])
    assert res["class_ids"] == [3, 1, 7]
    np.testing.assert_allclose(res["per_class"][("original", 0)], [100.0, 100.0, 100.0])
    fs = per_class_accuracy(score_regions(rf, texts[("first_synonym", 0)], [3, 1, 7])["rois/x"])
    np.testing.assert_allclose(res["per_class"][("first_synonym", 0)], fs)
    rows = {(r["protocol"], r["split"]): r for r in res["table"]}
    assert rows[("original", "novel")]["drop"] == 0.0
    assert rows[("first_synonym", "novel")]["score"] == pytest.approx(fs[1])
    with pytest.raises(KeyError, match="rois/y"):
        region_synonym_robustness(rf, model, tok, CATS, "rois/y")


def test_ovss_robustness_end_to_end(micro_clip):
    """One 16x16 image fully covered by class "cup"; a dense map equal to the original "cup" embedding."""
    from ovlib.eval.segmentation import OVSSConfig

    model, tok = micro_clip
    orig = protocol_text_embeddings(model, tok, CATS, protocols=("original",), templates=MICRO_TEMPLATES[:2])
    cup = orig[("original", 0)][0]
    data = [{"image": np.zeros((16, 16, 3), np.uint8),
             "segments": [{"category_id": 3, "mask": np.ones((16, 16), bool)}]}]

    def dense_fn(x):
        return cup.view(1, -1, 1, 1).expand(x.shape[0], -1, 2, 2)

    res = ovss_synonym_robustness(dense_fn, data, model, tok, CATS, OVSSConfig(image_size=16, crop=16, stride=8),
                                  protocols=("original", "first_synonym"), templates=MICRO_TEMPLATES[:2])
    iou = res["per_class"][("original", 0)]
    assert iou[0] == 100.0 and math.isnan(iou[1]) and math.isnan(iou[2])
    assert res["miou"][("original", 0)][0] == 100.0
    rows = {(r["protocol"], r["split"]): r for r in res["table"]}
    assert rows[("original", "base")]["score"] == 100.0


def test_heldout_protocol(world_classes):
    names = protocol_names(world_classes, "heldout_synonym")
    for c, n in zip(world_classes, names):
        assert n == ([c.heldout_synonyms[0]] if c.heldout_synonyms else [c.name])
    assert protocol_runs(("original", "heldout_synonym"), (0, 1)) == [("original", 0), ("heldout_synonym", 0)]


# ------------------------------------------------------------------------------------------------ SynonymEval
def _counts(rows):
    """(N, 2, C) [regions, Top-1 hits] from per-image lists of (regions, hits) per class."""
    return np.asarray(rows, dtype=np.int64).transpose(0, 2, 1)


def _synonym_eval():
    from ovlib.eval.synonyms import SynonymEval

    # classes: cup (base), boat (novel), sky (stuff); two images; boat: 2 regions per image
    orig = _counts([[(1, 1), (2, 2), (0, 0)], [(1, 0), (2, 2), (0, 0)]])     # boat 4/4
    syn = _counts([[(1, 1), (2, 1), (0, 0)], [(1, 0), (2, 0), (0, 0)]])      # boat 1/4
    r0 = _counts([[(1, 1), (2, 2), (0, 0)], [(1, 1), (2, 1), (0, 0)]])       # boat 3/4
    r1 = _counts([[(1, 0), (2, 0), (0, 0)], [(1, 0), (2, 1), (0, 0)]])       # boat 1/4
    stuff = np.zeros_like(orig)

    def reg(a):
        return {"rois/dense": {"thing": a, "stuff": stuff}}

    region = {("original", 0): reg(orig), ("synonym_ensemble", 0): reg(syn), ("random_synonym", 0): reg(r0),
              ("random_synonym", 1): reg(r1)}
    eye = np.stack([np.diag([3.0, 1.0, 0.0])] * 2)  # (N, C, C): perfect on cup and boat
    ovss = {("original", 0): eye}
    cons = {"rel_spread": np.array([0.2, np.nan, 0.4]), "split": ["base", "novel", "novel"],
            "spread": np.zeros(3), "corr": np.ones(3), "hit": np.ones(3)}
    return SynonymEval(region, ovss, np.asarray(class_splits(CATS)), np.array([True, True, False]), cons)


def test_synonym_eval_metrics_hand_case():
    ev = _synonym_eval()
    assert ev.point("boxes novel") == pytest.approx(100.0)
    assert ev.point("boxes base") == pytest.approx(50.0)          # cup 1 of 2
    assert ev.point("boxes novel [synonym_ensemble]") == pytest.approx(25.0)
    assert ev.point("drop boxes novel [synonym_ensemble]") == pytest.approx(-75.0)
    # a seeded protocol: the mean over its draws (75 % and 25 %)
    assert ev.point("boxes novel [random_synonym]") == pytest.approx(50.0)
    assert ev.point("drop boxes novel [random_synonym]") == pytest.approx(-50.0)
    assert ev.point("OVSS mIoU") == pytest.approx(100.0)          # sky absent everywhere: nan, excluded
    assert math.isnan(ev.point("OVSS mIoU [synonym_ensemble]"))   # not scored
    assert ev.point("maps rel_spread") == pytest.approx(0.3)      # nan object invalid
    assert ev.point("maps rel_spread [novel]") == pytest.approx(0.4)
    # per_image: what ovlib.study rows read; the drop array's statistic on its sum is the point
    assert "boxes novel" in ev.per_image and "OVSS mIoU [synonym_ensemble]" not in ev.per_image
    arr, f = ev.per_image["drop boxes novel [random_synonym]"]
    assert arr.shape == (2, 3, 2, 3) and f(arr.sum(0)) == pytest.approx(-50.0)
    with pytest.raises(KeyError, match="unknown metric"):
        ev.point("boxes rare")
    with pytest.raises(KeyError, match="unknown map statistic"):
        ev.point("maps size")


def test_synonym_eval_is_a_study_row(tmp_path, repo_root):
    """Two seeds of SynonymEval recorded as a study row compare on a drop metric (seeds decide)."""
    import shutil

    from ovlib import config
    from ovlib.study import Study

    shutil.copytree(repo_root / "params", tmp_path / "params")
    (tmp_path / "book").mkdir()
    shutil.copy(repo_root / "book" / "paper_numbers.yaml", tmp_path / "book" / "paper_numbers.yaml")
    st = Study(config.resolve("smoke", {}, root=tmp_path), "04", root=tmp_path, log=False)
    for s in (0, 1):
        st.record("A", _synonym_eval(), seed=s)
        st.record("B", _synonym_eval(), seed=s)
    assert st.values("A", "drop boxes novel [synonym_ensemble]") == pytest.approx([-75.0, -75.0])
    c = st.claim_in("4.7", "B loses less", "A", "B", "drop boxes novel [synonym_ensemble]", negligible=0.5)
    assert c.comparison.delta == pytest.approx(0.0) and c.comparison.seeds_a == 2


def test_map_stat_array_and_pick_object():
    from ovlib.eval.synonyms import map_stat_array, pick_object

    a = map_stat_array({"corr": [0.5, np.nan, 1.0], "split": ["base", "novel", "novel"]}, "corr", "novel")
    np.testing.assert_allclose(a, [[0, 0], [0, 0], [1.0, 1.0]])
    small, big = np.zeros((4, 4), bool), np.ones((4, 4), bool)
    small[0, 0] = True
    data = [{"segments": [{"category_id": 3, "isthing": True, "mask": big},   # base, largest
                          {"category_id": 7, "isthing": False, "mask": big}]},
            {"segments": [{"category_id": 1, "isthing": True, "mask": small}]}]  # novel, small
    i, seg = pick_object(data, CATS)
    assert (i, seg["category_id"]) == (1, 1)  # a novel thing is preferred over a larger base one
    assert pick_object(data, CATS, prefer="base")[0] == 0
    with pytest.raises(ValueError, match="no thing segment"):
        pick_object([{"segments": []}], CATS)


def test_synonym_class_text_matches_per_class_embedding(micro_clip):
    from ovlib.eval.synonyms import synonym_class_text
    from ovlib.models.text import text_embeddings

    model, tok = micro_clip
    ct = synonym_class_text(model, tok, CATS, MICRO_TEMPLATES[:2])
    assert sorted(ct) == [1, 3]  # things only
    for c in CATS[:2]:
        want = text_embeddings(model, tok, [c["name"]] + c["synonyms"], MICRO_TEMPLATES[:2]).cpu()
        torch.testing.assert_close(ct[c["id"]], want, atol=1e-5, rtol=0)
