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
