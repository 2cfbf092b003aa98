"""COCO-format datasets: the real COCO val2017 panoptic subset (if ../shared is present), the micro world."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from ovlib.data.coco import CocoCaptions, CocoInstances, CocoPanoptic, ImageReadError, id2rgb
from ovlib.data.microworld import MicroWorld
from ovlib.data.regions import mask_to_box


def _shared_panoptic() -> Path | None:
    cands = []
    if os.environ.get("OVBOOK_SHARED"):
        cands.append(Path(os.environ["OVBOOK_SHARED"]) / "data" / "coco_panoptic_val100")
    cands.append(Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_panoptic_val100")
    for c in cands:
        if (c / "annotations" / "panoptic_val2017.json").is_file():
            return c
    return None


REAL = _shared_panoptic()
needs_real = pytest.mark.skipif(REAL is None, reason="../shared/data/coco_panoptic_val100 not present")


@needs_real
def test_real_coco_panoptic_reads_exactly():
    ds = CocoPanoptic(REAL, "val2017")
    raw = json.loads((REAL / "annotations" / "panoptic_val2017.json").read_text())
    assert len(ds) == len(raw["annotations"]) == 100 and not ds.skipped
    assert len(ds.categories) == 133 and len(ds.thing_ids) == 80 and len(ds.stuff_ids) == 53
    by_img = {a["image_id"]: a for a in raw["annotations"]}
    n_void = 0
    for k in range(len(ds)):
        item = ds[k]
        ann = by_img[item["image_id"]]
        H, W = item["image"].shape[:2]
        assert item["image"].dtype == np.uint8 and item["panoptic"].shape == (H, W)
        ids = set(np.unique(item["panoptic"]).tolist()) - {0}
        assert ids == {s["id"] for s in ann["segments_info"]}
        n_void += int((item["panoptic"] == 0).any())
        for seg, js in zip(item["segments"], ann["segments_info"]):
            assert seg["id"] == js["id"] and seg["category_id"] == js["category_id"]
            assert seg["isthing"] == bool(ds.category_by_id[js["category_id"]]["isthing"])
            assert seg["mask"].sum() == js["area"] == seg["area"]
            x, y, w, h = js["bbox"]
            assert seg["box"].tolist() == [x, y, x + w, y + h]
            assert mask_to_box(seg["mask"]).tolist() == [
                x,
                y,
                x + w,
                y + h,
            ]  # COCO bboxes are tight mask boxes
    assert n_void > 0  # real COCO has unlabelled (id 0) pixels, which belong to no segment


@pytest.fixture(scope="module")
def micro_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mwcoco")
    MicroWorld(seed=0).export_coco(root, split="val2017", n=5, size=64, start=0, progress=False)
    return root


def test_micro_world_through_all_loaders(micro_root):
    world = MicroWorld(seed=0)
    pan, inst, caps = CocoPanoptic(micro_root), CocoInstances(micro_root), CocoCaptions(micro_root)
    assert len(pan) == len(inst) == len(caps) == 5
    assert [c["id"] for c in pan.categories] == [c.id for c in world.classes]
    assert all({"synonyms", "definition", "split", "isthing"} <= set(c) for c in pan.categories)
    for k in range(5):
        sc = world.sample(k, 64)
        p, i, c = pan[k], inst[k], caps[k]
        assert p["image_id"] == i["image_id"] == c["image_id"] == k + 1
        np.testing.assert_array_equal(p["image"], sc.image)
        np.testing.assert_array_equal(i["image"], sc.image)
        things = [s for s in p["segments"] if s["isthing"]]
        assert [s["category_id"] for s in things] == sc.labels.tolist()
        for s, m, b in zip(things, sc.masks, sc.boxes):
            np.testing.assert_array_equal(s["mask"], m)
            assert s["box"].tolist() == b.tolist()
        stuff = {s["category_id"] for s in p["segments"] if not s["isthing"]}
        assert stuff == set(np.unique(sc.semantic).tolist()) - set(sc.labels.tolist())
        np.testing.assert_array_equal(i["boxes"], sc.boxes)
        np.testing.assert_array_equal(i["labels"], sc.labels)
        np.testing.assert_array_equal(i["masks"], sc.masks)
        assert c["captions"] == sc.captions
    text_only = CocoCaptions(micro_root, load_image=False)[0]
    assert "image" not in text_only and text_only["captions"]


def test_bad_data_is_counted_not_silent(micro_root, tmp_path, caplog):
    root = tmp_path / "broken"
    shutil.copytree(micro_root, root)
    files = sorted((root / "val2017").iterdir())
    files[0].write_bytes(b"not an image")  # unreadable
    files[1].unlink()  # missing
    # an image with no segments / annotations / captions
    for kind in ("panoptic", "captions"):
        p = root / "annotations" / f"{kind}_val2017.json"
        d = json.loads(p.read_text())
        if kind == "panoptic":
            d["annotations"][2]["segments_info"] = []
        else:
            d["annotations"] = [a for a in d["annotations"] if a["image_id"] != 4]
        p.write_text(json.dumps(d))
    p = root / "annotations" / "instances_val2017.json"
    d = json.loads(p.read_text())
    d["annotations"] = [a for a in d["annotations"] if a["image_id"] != 4]
    p.write_text(json.dumps(d))

    with caplog.at_level("WARNING"):
        pan = CocoPanoptic(root)
    assert pan.skipped == {"missing_image": 1, "no_segments": 1} and len(pan) == 3
    assert "skipped" in caplog.text
    first = pan[0]  # unreadable -> counted, the next readable image is returned
    assert pan.skipped["unreadable"] == 1 and first["image_id"] == 4
    with pytest.raises(ImageReadError, match="cannot read image"):
        CocoPanoptic(root, strict=True)[0]
    inst = CocoInstances(root)
    assert inst.skipped["missing_image"] == 1 and inst.skipped["no_annotations"] == 1 and len(inst) == 3
    caps = CocoCaptions(root)
    assert caps.skipped == {"missing_image": 1, "no_captions": 1}
    with pytest.raises(IndexError):
        pan[10]
    with pytest.raises(FileNotFoundError, match="panoptic annotation file not found"):
        CocoPanoptic(root, split="train2017")


def test_panoptic_png_size_mismatch_is_an_error(micro_root, tmp_path):
    from PIL import Image

    root = tmp_path / "mismatch"
    shutil.copytree(micro_root, root)
    png = sorted((root / "annotations" / "panoptic_val2017").iterdir())[0]
    Image.fromarray(id2rgb(np.zeros((10, 10), np.int64))).save(png)
    with pytest.raises(ValueError, match="panoptic PNG"):
        CocoPanoptic(root)[0]
