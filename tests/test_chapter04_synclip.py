"""Chapter 04 (SynCLIP) additions: the teacher-text choice (``semantic_type``, the "SAR only" ablation), the
synonym-map statistics of the phenomenon, the paired seed/image bootstrap of differences, and the cached
OVSS synonym protocols."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovlib.eval.metrics import macc_from_counts
from ovlib.eval.synonyms import (
    _memoized,
    ovss_synonym_robustness,
    protocol_text_embeddings,
    synonym_attention_consistency,
    synonym_map_stats,
)
from ovlib.methods.synclip import SEMANTIC_TYPES, SynCLIP, sar_aggregate, semantic_texts
from ovlib.models.text import MICRO_TEMPLATES
from ovlib.stats import hierarchical_bootstrap_diff
from tests.helpers.method_batches import micro_nets, synthetic_method_batch

CATS = [
    {"id": 1, "name": "dog", "synonyms": ["puppy", "canine"], "definition": "a domestic animal.", "split": "base"},
    {"id": 2, "name": "boat", "synonyms": ["ship"], "definition": "", "split": "novel"},
    {"id": 5, "name": "grass", "synonyms": [], "definition": "green cover", "split": "stuff", "isthing": False},
]


# ------------------------------------------------------------------------------------ teacher text types
def test_semantic_types_text():
    assert semantic_texts(CATS)[1] == ("dog", "dog, a domestic animal, puppy, canine")
    lab = semantic_texts(CATS, semantic_type="label")
    assert {k: v for k, v in lab.items()} == {1: ("dog", "dog"), 2: ("boat", "boat"), 5: ("grass", "grass")}
    d = semantic_texts(CATS, semantic_type="definition")
    assert d[1][1] == "a domestic animal" and d[2][1] == "boat" and d[5][1] == "green cover"  # empty -> name
    s = semantic_texts(CATS, semantic_type="synonym")
    assert s[1][1] == "puppy, canine" and s[2][1] == "ship" and s[5][1] == "grass"  # no synonyms -> name
    held = [{**CATS[0], "heldout_synonyms": ["canine"]}]
    assert semantic_texts(held, exclude_heldout=True, semantic_type="synonym")[1][1] == "puppy"
    assert set(SEMANTIC_TYPES) == {"semantic", "label", "definition", "synonym"}
    with pytest.raises(ValueError, match="semantic_type"):
        semantic_texts(CATS, semantic_type="translation")


@pytest.fixture(scope="module")
def nets():
    return micro_nets()


def make(nets, **kw):
    student, teacher, vfm, tok = nets
    return SynCLIP(copy.deepcopy(student), {"teacher": teacher, "vfm": vfm}, tokenizer=tok, categories=CATS, **kw)


def test_sar_only_target_uses_the_label_text_on_the_teacher(nets):
    """``semantic_type="label"``: the teacher-side text equals the student's label text, so the target is
    SAR(t_label . X_teacher); at step 0 (student = teacher) the unrefined target equals the student map."""
    b = synthetic_method_batch(2, 32, 2, 0, labels=(1, 2, 5, 1), image_labels=((1, 2), (5,)))
    m = make(nets, semantic_type="label", topk=3)
    assert m.semantic_type == "label" and all(lab == sem for lab, sem in m.texts.values())
    lab, sem = m.class_text_features(torch.device("cpu"))
    torch.testing.assert_close(lab, sem)
    dense, _ = m.student_dense(b["images"])
    vfm_sim, _ = m.vfm_similarity(b["vfm_images"])
    a_label, target, valid = m.semantic_maps(b, dense, vfm_sim)
    expect, _ = sar_aggregate(a_label, vfm_sim.float(), 3, m.spa_ratio, m.sem_ratio)  # student = teacher here
    torch.testing.assert_close(target, expect * valid[..., None], atol=1e-5, rtol=1e-5)
    # SSA only with the label text: target = the student's own map, so the semantic loss is 0 at step 0
    m0 = make(nets, semantic_type="label", sar=False)
    assert m0(b)["semantic"].item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="semantic_type"):
        make(nets, semantic_type="all")


# ------------------------------------------------------------------------------------ map statistics
def test_synonym_map_stats_hand_case():
    maps = torch.tensor([[0.0, 1.0, 2.0, 3.0],
                         [0.0, 2.0, 4.0, 6.0],   # the first map scaled: correlation 1
                         [3.0, 2.0, 1.0, 0.0]])  # reversed: correlation -1 with both
    inside = torch.tensor([False, False, True, True])
    st = synonym_map_stats(maps, inside)
    x = maps.double()
    spread = float(x.std(0, unbiased=False).mean())
    own = float(x.std(1, unbiased=False).mean())
    assert st["spread"] == pytest.approx(spread)
    assert st["rel_spread"] == pytest.approx(spread / own)
    assert st["corr"] == pytest.approx((1.0 - 1.0 - 1.0) / 3)
    assert st["hit"] == pytest.approx(2 / 3)  # argmax at token 3, 3, 0
    same = synonym_map_stats(maps[:1].repeat(4, 1), inside)
    assert same["spread"] == 0.0 and same["rel_spread"] == 0.0 and same["corr"] == pytest.approx(1.0)
    one = synonym_map_stats(maps[:1])
    assert math.isnan(one["corr"]) and math.isnan(one["hit"])
    flat = synonym_map_stats(torch.ones(2, 4))
    assert math.isnan(flat["rel_spread"]) and math.isnan(flat["corr"])
    with pytest.raises(ValueError, match="inside"):
        synonym_map_stats(maps, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(S, M\)"):
        synonym_map_stats(torch.ones(4))


def test_synonym_attention_consistency_on_a_constructed_map():
    """Dense tokens equal to the name embeddings on the object and orthogonal elsewhere."""
    D = 4
    e = torch.eye(D)
    class_text = {1: torch.stack([e[0], F.normalize(e[0] + 0.1 * e[1], dim=0)])}  # two close names
    mask = np.zeros((16, 16), bool)
    mask[:8, :8] = True
    data = [{"image": np.zeros((16, 16, 3), np.uint8),
             "segments": [{"category_id": 1, "isthing": True, "mask": mask},
                          {"category_id": 5, "isthing": False, "mask": ~mask}]}]

    def dense_fn(x):  # (B, D, 2, 2): token (0, 0) = e0, the rest e3
        d = e[3].view(1, D, 1, 1).repeat(x.shape[0], 1, 2, 2)
        d[:, :, 0, 0] = e[0]
        return d

    res = synonym_attention_consistency(dense_fn, data, None, None, CATS, image_size=16, class_text=class_text)
    assert res["category_id"].tolist() == [1] and res["split"] == ["base"]
    maps = class_text[1] @ torch.stack([e[0], e[3], e[3], e[3]]).T
    ref = synonym_map_stats(maps, torch.tensor([True, False, False, False]))
    for k in ("spread", "rel_spread", "corr", "hit"):
        assert res[k][0] == pytest.approx(ref[k])
    assert res["hit"][0] == 1.0


# ------------------------------------------------------------------------------------ bootstrap of differences
def _counts(rng, n, C, p):
    tot = rng.integers(1, 4, size=(n, C))
    hits = rng.binomial(tot, p)
    return np.stack([tot, hits], 1)  # (N, 2, C)


def test_bootstrap_diff_identical_and_shifted_runs():
    rng = np.random.default_rng(1)
    a = _counts(rng, 20, 4, 0.5)

    def f(s):
        return macc_from_counts(s[1], s[0])

    assert hierarchical_bootstrap_diff([a, a], [a], f, n_boot=200) == (0.0, 0.0, 0.0)
    better = a.copy()
    better[:, 1] = better[:, 0]  # every region right
    pt, lo, hi = hierarchical_bootstrap_diff([a], [better, better], f, n_boot=200)
    assert 0 < lo <= pt <= hi


def test_bootstrap_diff_carries_seed_spread():
    """Two seeds of b that disagree widen the interval beyond the image-only one."""
    rng = np.random.default_rng(2)
    a = _counts(rng, 40, 4, 0.5)
    b1, b2 = a.copy(), a.copy()
    b1[:, 1] = np.minimum(a[:, 1] + 1, a[:, 0])
    b2[:, 1] = np.maximum(a[:, 1] - 1, 0)

    def f(s):
        return macc_from_counts(s[1], s[0])

    _, lo1, _ = hierarchical_bootstrap_diff([a], [b1], f, n_boot=400)
    _, lo2, hi2 = hierarchical_bootstrap_diff([a], [b1, b2], f, n_boot=400)
    assert lo1 > 0 and lo2 < 0 < hi2  # one seed says better; with the disagreeing seed it is not resolved


def test_bootstrap_diff_errors_and_nan():
    a = np.ones((3, 2, 2))
    with pytest.raises(ValueError, match="at least one run"):
        hierarchical_bootstrap_diff([], [a], lambda s: 0.0)
    pt, lo, hi = hierarchical_bootstrap_diff([a], [a], lambda s: float("nan"), n_boot=10)
    assert math.isnan(pt) and math.isnan(lo) and math.isnan(hi)


# ------------------------------------------------------------------------------------ cached OVSS protocols
def test_memoized_dense_calls_once_per_input():
    calls = []

    def fn(x):
        calls.append(1)
        return x * 2

    m = _memoized(fn)
    x = torch.arange(6.0).view(1, 1, 2, 3)
    assert torch.equal(m(x), x * 2) and torch.equal(m(x.clone()), x * 2)
    assert len(calls) == 1
    m(x + 1)
    assert len(calls) == 2


@pytest.fixture(scope="module")
def micro_clip():
    from ovlib.models import load_clip

    model, tok, _ = load_clip("micro-clip", seed=0)
    return model, tok


def test_ovss_cache_and_texts_give_the_uncached_result(micro_clip):
    from ovlib.eval.segmentation import OVSSConfig

    model, tok = micro_clip
    cats = [dict(c, isthing=c.get("isthing", True)) for c in CATS]
    rng = np.random.default_rng(0)
    data = []
    for i in range(2):
        m = np.zeros((24, 24), bool)
        m[: 8 + 4 * i] = True
        data.append({"image": rng.integers(0, 255, (24, 24, 3), dtype=np.uint8),
                     "segments": [{"category_id": 1, "mask": m}, {"category_id": 5, "mask": ~m}]})
    g = torch.Generator().manual_seed(0)
    proj = torch.randn(3, model.text_projection.shape[1], generator=g)
    calls = []

    def dense_fn(x):  # a fixed random linear map of the pixels: (B, D, 4, 4)
        calls.append(x.shape[0])
        return F.normalize(torch.einsum("bchw,cd->bdhw", F.adaptive_avg_pool2d(x, 4), proj), dim=1)

    cfg = OVSSConfig(image_size=24, crop=16, stride=8)
    protos = ("original", "first_synonym", "synonym_ensemble")
    plain = ovss_synonym_robustness(dense_fn, data, model, tok, cats, cfg, protocols=protos,
                                    templates=MICRO_TEMPLATES[:2], cache_dense=False)
    n_plain = len(calls)
    calls.clear()
    texts = protocol_text_embeddings(model, tok, cats, protos, templates=MICRO_TEMPLATES[:2])
    cached = ovss_synonym_robustness(dense_fn, data, model, tok, cats, cfg, texts=texts)
    assert len(calls) == n_plain // len(protos) == len(data)  # one dense pass per image
    assert set(cached["confusion"]) == set(plain["confusion"]) == {(p, 0) for p in protos}
    for k in plain["confusion"]:
        np.testing.assert_array_equal(cached["confusion"][k], plain["confusion"][k])
        np.testing.assert_array_equal(cached["per_class"][k], plain["per_class"][k])
        assert cached["confusion"][k].shape == (len(data), 3, 3)
