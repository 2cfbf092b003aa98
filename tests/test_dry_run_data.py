"""The dry run's COCO root: instances derived from panoptic PNGs, captions synthesised from category names."""

import json
import shutil

import numpy as np
import pytest

from ovlib.data import CocoInstances, CocoPanoptic
from ovlib.data.coco import CocoCaptions, caption_name, dry_run_data, dry_run_root, synthesised_captions
from ovlib.data.microworld import ensure_microworld
from tests.conftest import shared_dir


@pytest.fixture(scope="module")
def panoptic_only(tmp_path_factory):
    """A micro-world export (it has real instances) with its instances and captions removed."""
    full = ensure_microworld(tmp_path_factory.mktemp("mw"), "val2017", n=4, size=64, seed=0, progress=False)
    src = tmp_path_factory.mktemp("pan")
    shutil.copytree(full / "val2017", src / "val2017")
    (src / "annotations").mkdir()
    shutil.copytree(full / "annotations" / "panoptic_val2017", src / "annotations" / "panoptic_val2017")
    shutil.copy(full / "annotations" / "panoptic_val2017.json", src / "annotations" / "panoptic_val2017.json")
    return full, src


def test_derived_instances_equal_the_exported_ones(panoptic_only, tmp_path):
    full, src = panoptic_only
    info = dry_run_root(src, tmp_path / "dry")
    ours, ref = CocoInstances(tmp_path / "dry"), CocoInstances(full)
    assert len(ours) == len(ref) == info["images"] == 4
    for i in range(len(ref)):
        a, b = ours[i], ref[i]
        assert a["image_id"] == b["image_id"]
        # one instance per thing segment: same masks, labels and boxes (up to order)
        key = lambda d: sorted(zip(d["labels"].tolist(), d["boxes"].round(3).tolist()))  # noqa: E731
        assert key(a) == key(b)
        ma = {m.tobytes() for m in a["masks"]}
        assert ma == {m.tobytes() for m in b["masks"]}
    assert info["instances"] == sum(len(ref[i]["labels"]) for i in range(len(ref)))


def test_synthesised_captions_name_the_image_categories(panoptic_only, tmp_path):
    _, src = panoptic_only
    dry_run_root(src, tmp_path / "dry")
    pan, caps = CocoPanoptic(tmp_path / "dry"), CocoCaptions(tmp_path / "dry", load_image=False)
    by_id = {c["id"]: c for c in pan.categories}
    for i in range(len(pan)):
        item = pan[i]
        names = {caption_name(by_id[s["category_id"]]) for s in item["segments"]}
        got = caps[i]["captions"]
        assert len(got) == 2 and all(any(n in c for n in names) for c in got)


def test_synthesised_captions_format_and_errors():
    assert synthesised_captions(["dog"], 1) == ["a dog."]
    assert synthesised_captions(["grass", "dog", "sky", "cat"], 2) == ["a grass, a dog and a sky.",
                                                                        "a dog, a sky and a cat."]
    assert caption_name({"name": "wall-other-merged"}) == "wall" and caption_name({"name": "traffic light"}) == \
        "traffic light"
    with pytest.raises(ValueError, match="at least one name"):
        synthesised_captions([])


def test_rebuilt_only_when_the_source_changes_and_missing_parts_are_named(panoptic_only, tmp_path):
    _, src = panoptic_only
    first = dry_run_root(src, tmp_path / "dry")
    stamp = tmp_path / "dry" / "annotations" / "DERIVED.json"
    mtime = stamp.stat().st_mtime_ns
    assert dry_run_root(src, tmp_path / "dry") == first and stamp.stat().st_mtime_ns == mtime
    bad = tmp_path / "bad"
    (bad / "annotations").mkdir(parents=True)
    shutil.copy(src / "annotations" / "panoptic_val2017.json", bad / "annotations" / "panoptic_val2017.json")
    with pytest.raises(FileNotFoundError, match="lacks"):
        dry_run_root(bad, tmp_path / "dry2")


def test_dry_run_data_only_acts_in_a_dry_run(panoptic_only, tmp_path):
    _, src = panoptic_only
    p = {"dry_run": False, "data_root": str(src), "cache_dir": str(tmp_path)}
    assert dry_run_data(p) == (p, "")
    q, msg = dry_run_data({**p, "dry_run": True})
    assert q["data_root"] == str(tmp_path / "dry-run-coco") and "derived" in msg and "synthesised" in msg
    with pytest.raises(FileNotFoundError, match="coco_panoptic_val100"):
        dry_run_data({**p, "dry_run": True, "data_root": str(tmp_path / "nothing")})


def test_the_shared_subset_derives(tmp_path):
    shared = shared_dir()
    src = shared / "data" / "coco_panoptic_val100" if shared else None
    if src is None or not src.is_dir():
        pytest.skip("the shared COCO panoptic subset ../shared/data/coco_panoptic_val100 is absent")
    info = dry_run_root(src, tmp_path / "dry")
    pan = json.loads((src / "annotations" / "panoptic_val2017.json").read_text())
    things = {c["id"] for c in pan["categories"] if c["isthing"]}
    assert info["images"] == len(pan["annotations"])
    assert info["instances"] == sum(s["category_id"] in things for a in pan["annotations"] for s in a["segments_info"])
    inst = CocoInstances(tmp_path / "dry")
    m = inst[0]["masks"]
    assert m.dtype == bool and m.any(axis=(1, 2)).all() and np.all(inst[0]["areas"] > 0)


def test_coco_stuff_names_are_matched_in_their_caption_form():
    """A caption says "a wall", not "a wall-other-merged" (COCO panoptic's name): both forms label the class."""
    from ovlib.data.nouns import CaptionLabeler, NounVocabulary

    cats = [{"id": 1, "name": "wall-other-merged"}, {"id": 2, "name": "floor-wood"}, {"id": 3, "name": "wall-brick"},
            {"id": 4, "name": "dog"}]
    voc = NounVocabulary(cats)
    assert voc.surface["wall"] == 1 and voc.surface["walls"] == 1 and voc.surface["floor wood"] == 2
    assert voc.surface["wall brick"] == 3 and voc.surface["wall-other-merged"] == 1
    lab = CaptionLabeler(cats)
    assert sorted(lab("a dog on a wall and a floor wood.")) == [1, 2, 4]


def test_every_synthesised_caption_labels_exactly_the_categories_it_names(panoptic_only, tmp_path):
    from ovlib.data.nouns import CaptionLabeler

    _, src = panoptic_only
    dry_run_root(src, tmp_path / "dry")
    pan, caps = CocoPanoptic(tmp_path / "dry"), CocoCaptions(tmp_path / "dry", load_image=False)
    lab = CaptionLabeler(pan.categories)
    name_of = {c["id"]: caption_name(c) for c in pan.categories}
    for i in range(len(pan)):
        for cap in caps[i]["captions"]:
            named = {cid for cid, n in name_of.items() if f"a {n}," in cap or f"a {n}." in cap or f"a {n} and" in cap}
            assert set(lab(cap)) == named, cap


def test_a_derived_root_is_left_as_it_is(panoptic_only, tmp_path):
    _, src = panoptic_only
    q, _ = dry_run_data({"dry_run": True, "data_root": str(src), "cache_dir": str(tmp_path)})
    assert dry_run_data(q) == (q, "")  # a notebook's derived root handed on (e.g. to torchrun) stays
