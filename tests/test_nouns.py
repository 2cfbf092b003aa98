"""Noun phrases -> exclusion filter -> category ids (SynSeg's weak labels, ovlib.data.nouns)."""

from __future__ import annotations

import pytest
import torch

from ovlib.data.microworld import MicroWorld, _plural
from ovlib.data.nouns import (
    BOUNDARY_WORDS,
    DEFAULT_EXCLUSIONS,
    CaptionLabelDataset,
    CaptionLabeler,
    NounVocabulary,
    SpacyUnavailable,
    collate_caption_labels,
    excluded_vocabulary,
    filter_phrases,
    plural,
    spacy_noun_chunks,
    template_noun_chunks,
)


@pytest.fixture(scope="module")
def world():
    return MicroWorld(seed=0)


@pytest.fixture(scope="module")
def labeler(world):
    return CaptionLabeler(world.categories())


def test_template_chunks_of_the_micro_templates():
    assert template_noun_chunks("a photo of a red car and two boats on the water.") == [
        "a photo", "a red car", "two boats", "the water"]
    assert template_noun_chunks("there is a beach umbrella, three sea stars and a sand pail against the wall.") == [
        "a beach umbrella", "three sea stars", "a sand pail", "the wall"]
    assert template_noun_chunks("an image showing several snowmen.") == ["an image", "several snowmen"]
    assert template_noun_chunks("a kite and some sky.") == ["a kite", "some sky"]
    assert template_noun_chunks("") == []


def test_plural_matches_the_micro_world(world):
    for c in world.classes:
        for s in [c.name, *c.synonyms]:
            assert plural(s) == _plural(s), s


def test_vocabulary_longest_suffix_and_determiners(world):
    v = NounVocabulary(world.categories())
    ids = {c.name: c.id for c in world.classes}
    assert v.lookup("a red car") == (ids["car"], "car")
    assert v.lookup("a beach umbrella") == (ids["umbrella"], "beach umbrella")  # not "beach" (sand)
    assert v.lookup("two snow sleds") == (ids["sled"], "snow sleds")  # not "snow"
    assert v.lookup("three star fish") == (ids["starfish"], "star fish")  # not "fish"
    assert v.lookup("several snowmen") == (ids["snowman"], "snowmen")
    assert v.lookup("the open water") == (ids["water"], "open water")
    assert v.lookup("a photo") is None and v.lookup("") is None
    assert v.check_boundaries() == []  # no surface form holds a chunk boundary word
    with pytest.raises(ValueError, match="names two categories"):
        NounVocabulary([{"id": 1, "name": "car"}, {"id": 2, "name": "auto", "synonyms": ["car"]}])


def test_exclusions_word_vs_substring(world):
    surf = list(NounVocabulary(world.categories()).surface)
    assert excluded_vocabulary(surf, DEFAULT_EXCLUSIONS, "word") == []
    # the paper's partial matching drops vocabulary: "back" in "paperback", "mm" in "swimmer"
    killed = excluded_vocabulary(surf, DEFAULT_EXCLUSIONS, "substring")
    assert "paperback" in killed and "finned swimmer" in killed
    assert filter_phrases(["a photo", "a red car", "the background", "a bright kite"]) == ["a red car", "a bright kite"]
    assert filter_phrases(["a bright kite"], ["right"], "substring") == []
    with pytest.raises(ValueError, match="match"):
        filter_phrases(["x"], match="regex")


def test_extraction_recovers_the_named_categories_over_many_scenes(world, labeler):
    """Every caption of 300 scenes: the extracted category set == the categories of ``layout.terms``; the
    matched surface form is the name used (or its plural)."""
    for i in range(300):
        lay = world.layout(i)
        assert len(lay.captions) == len(lay.terms)
        for cap, terms in zip(lay.captions, lay.terms):
            got = [(cid, s) for _, cid, s in labeler.phrases(cap) if cid is not None]
            assert {c for c, _ in got} == {c for c, _ in terms}, (i, cap, got, terms)
            used = {c: s for c, s in terms}
            for cid, s in got:
                assert s in (used[cid], plural(used[cid])), (cap, s, used[cid])
        assert labeler(lay.captions) == sorted({c for t in lay.terms for c, _ in t})
    assert labeler.stats["unmatched"] == 0 and labeler.stats["excluded"] > 0


class _Tok:
    def __init__(self, text, pos):
        self.text, self.pos_ = text, pos


class _Chunk(list):
    @property
    def text(self):
        return " ".join(t.text for t in self)


class _Doc:
    def __init__(self, chunks):
        self.noun_chunks = chunks


def test_spacy_path_keeps_chunks_with_a_noun_token():
    """The paper's Stage 1 with a stand-in pipeline (no spaCy needed): chunks without a NOUN are dropped."""
    doc = _Doc([_Chunk([_Tok("A", "DET"), _Tok("red", "ADJ"), _Tok("Car", "NOUN")]),
                _Chunk([_Tok("it", "PRON")]),
                _Chunk([_Tok("Paris", "PROPN")])])
    assert spacy_noun_chunks("ignored", nlp=lambda text: doc) == ["a red car"]


def test_spacy_extractor_error_names_the_install_commands(world):
    try:
        import spacy

        spacy.load("en_core_web_sm")
        pytest.skip("spaCy and en_core_web_sm are installed")
    except (ImportError, OSError):
        pass
    with pytest.raises(SpacyUnavailable, match="spacy download en_core_web_sm"):
        CaptionLabeler(world.categories(), extractor="spacy")
    with pytest.raises(ValueError, match="extractor"):
        CaptionLabeler(world.categories(), extractor="regex")


@pytest.mark.skipif(__import__("importlib").util.find_spec("spacy") is None, reason="spaCy not installed")
def test_spacy_extractor_on_a_template_caption(world):  # pragma: no cover - needs spaCy + model
    try:
        lab = CaptionLabeler(world.categories(), extractor="spacy")
    except SpacyUnavailable:
        pytest.skip("no spaCy English model")
    ids = {c.name: c.id for c in world.classes}
    assert lab("a photo of a red car and two boats on the water.") == sorted([ids["car"], ids["boat"], ids["water"]])


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    from ovlib.data.microworld import ensure_microworld

    root = tmp_path_factory.mktemp("nouns") / "mw"
    ensure_microworld(root, "train2017", n=6, size=64, seed=0, progress=False)
    return root


def test_caption_label_dataset(tiny_export, world):
    all_ds = CaptionLabelDataset(tiny_export, "train2017", size=32, caption_pick="all")
    assert len(all_ds) == 6 and len(all_ds.categories) == len(world.classes)  # panoptic: things + stuff
    from ovlib.data.microworld import SPLIT_START

    start = SPLIT_START["train2017"]
    for i in range(len(all_ds)):
        it = all_ds[i]
        lay = world.layout(start + i)
        assert it["image"].shape == (3, 32, 32)
        assert it["category_ids"].tolist() == sorted({c for t in lay.terms for c, _ in t})
        assert it["captions"] == list(lay.captions)
    one = CaptionLabelDataset(tiny_export, "train2017", size=32, caption_pick="one", seed=3)
    it = one[2]
    assert len(it["captions"]) == 1
    assert set(it["category_ids"].tolist()) <= set(all_ds[2]["category_ids"].tolist())
    assert torch.equal(one[2]["category_ids"], it["category_ids"])  # deterministic per (seed, epoch, index)
    b = collate_caption_labels([all_ds[0], all_ds[1]])
    assert b["images"].shape == (2, 3, 32, 32) and len(b["category_ids"]) == 2 and b["image_ids"].shape == (2,)
    cov = all_ds.coverage()
    assert cov["images_with_labels"] == 1.0 and cov["categories_per_caption"] >= 1.0
    with pytest.raises(ValueError, match="caption_pick"):
        CaptionLabelDataset(tiny_export, "train2017", caption_pick="some")


def test_boundary_words_are_not_determiners():
    from ovlib.data.nouns import DETERMINERS

    assert not BOUNDARY_WORDS & DETERMINERS
