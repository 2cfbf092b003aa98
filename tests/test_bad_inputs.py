"""Bad inputs: each gives a clear error naming the input, or a counted and logged skip (never silence)."""

import json
import logging
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ovlib import config
from ovlib.data.coco import CocoInstances, CocoPanoptic, ImageReadError, read_image
from ovlib.data.microworld import ensure_microworld
from ovlib.data.regions import CenterPadCrop
from ovlib.data.synonyms import SynonymCorpus
from ovlib.io import CheckpointError, safe_load
from ovlib.methods.clipself import rla_loss
from ovlib.models import dense_features, load_clip, mask_pool, roi_features
from ovlib.models.clip import CheckpointMismatch, WeightsUnavailable
from ovlib.train.distill import DistillConfig, NonFiniteLoss


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad") / "mw"
    ensure_microworld(root, "val2017", n=4, size=64, seed=0, progress=False)
    return root


@pytest.fixture
def world_copy(world, tmp_path):
    dst = tmp_path / "mw"
    shutil.copytree(world, dst)
    return dst


def _first_image(root):
    return sorted((root / "val2017").glob("*.png"))[0]


# ----------------------------------------------------------------------------------------------- images


def test_corrupt_image_is_a_counted_logged_skip_and_strict_names_it(world_copy, caplog):
    bad = _first_image(world_copy)
    bad.write_bytes(b"this is not a png at all" * 10)
    ds = CocoInstances(world_copy, "val2017")
    with caplog.at_level(logging.WARNING):
        item = ds[0]  # falls through to the next readable image
    assert item["file_name"] != bad.name and ds.skipped["unreadable"] == 1
    assert bad.name in caplog.text
    with pytest.raises(ImageReadError, match=bad.name):
        CocoInstances(world_copy, "val2017", strict=True)[0]


def test_truncated_image_names_the_file(world_copy):
    bad = _first_image(world_copy)
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 3])
    with pytest.raises(ImageReadError, match=f"cannot read image .*{bad.name}"):
        read_image(bad)


def test_missing_image_file_is_counted(world_copy, caplog):
    _first_image(world_copy).unlink()
    with caplog.at_level(logging.WARNING):
        ds = CocoPanoptic(world_copy, "val2017")
    assert ds.skipped["missing_image"] == 1 and len(ds) == 3
    assert "missing_image" in caplog.text


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_grayscale_rgba_palette_images_become_rgb(tmp_path, mode):
    p = tmp_path / f"im_{mode}.png"
    Image.new(mode, (7, 5)).save(p)
    arr = read_image(p)
    assert arr.shape == (5, 7, 3) and arr.dtype == np.uint8


# ----------------------------------------------------------------------------------------------- annotations


def test_image_without_annotations_is_counted(world_copy):
    ann = world_copy / "annotations" / "instances_val2017.json"
    data = json.loads(ann.read_text())
    first = data["images"][0]["id"]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != first]
    ann.write_text(json.dumps(data))
    ds = CocoInstances(world_copy, "val2017")
    assert ds.skipped["no_annotations"] == 1 and len(ds) == 3


def test_panoptic_json_with_dangling_ids(world_copy):
    ann = world_copy / "annotations" / "panoptic_val2017.json"
    data = json.loads(ann.read_text())
    data["annotations"][0]["image_id"] = 987654321  # no such image: counted
    ann.write_text(json.dumps(data))
    ds = CocoPanoptic(world_copy, "val2017")
    assert ds.skipped["annotation_without_image"] == 1
    data["annotations"][1]["segments_info"][0]["category_id"] = 4242  # no such category: an error naming it
    ann.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"unknown category ids \[4242\]"):
        CocoPanoptic(world_copy, "val2017")


def test_panoptic_png_ids_not_in_segments_info(world_copy):
    ann = world_copy / "annotations" / "panoptic_val2017.json"
    data = json.loads(ann.read_text())
    dropped = data["annotations"][0]["segments_info"].pop(0)
    ann.write_text(json.dumps(data))
    ds = CocoPanoptic(world_copy, "val2017")
    with pytest.raises(ValueError, match=rf"segment ids \[{dropped['id']}\] that are not in the segments_info"):
        ds[0]


def test_missing_annotation_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="instances_val2017.json"):
        CocoInstances(tmp_path, "val2017")


# ----------------------------------------------------------------------------------------------- boxes and tensors


@pytest.mark.parametrize("box,msg", [
    ([4.0, 4.0, 4.0, 9.0], r"boxes\[0\]\[1\] = .* is empty"),  # zero area
    ([9.0, 9.0, 2.0, 3.0], r"boxes\[0\]\[1\] = .* is empty"),  # inverted
    ([1.0, float("nan"), 3.0, 4.0], r"boxes\[0\]\[1\] is not finite"),
    ([1.0, 1.0, float("inf"), 4.0], r"boxes\[0\]\[1\] is not finite"),
])
def test_bad_boxes_are_named(box, msg):
    dense = torch.randn(1, 8, 4, 4)
    boxes = [torch.tensor([[0.0, 0.0, 8.0, 8.0], box])]
    with pytest.raises(ValueError, match=msg):
        roi_features(dense, boxes, (16, 16))


def test_crop_box_outside_the_image_is_named():
    img = np.zeros((20, 30, 3), np.uint8)
    with pytest.raises(ValueError, match=r"crop box \[40.0, 5.0, 50.0, 9.0\] is empty inside the 30x20 image"):
        CenterPadCrop(16)(img, [40.0, 5.0, 50.0, 9.0])


def test_empty_mask_is_named():
    masks = [torch.zeros(2, 4, 4, dtype=torch.bool)]
    masks[0][0, 1, 1] = True
    with pytest.raises(ValueError, match=r"masks\[0\]\[1\] is empty"):
        mask_pool(torch.randn(1, 8, 4, 4), masks)


@pytest.fixture(scope="module")
def micro():
    return load_clip("micro-clip", seed=0)[0]


def test_wrong_tensor_ranks_are_named(micro):
    with pytest.raises(ValueError, match=r"images must be \(B, 3, H, W\), got shape \(3, 64, 64\)"):
        dense_features(micro, torch.randn(3, 64, 64), "x+v")
    with pytest.raises(ValueError, match=r"dense must be a \(B, C, h, w\) tensor"):
        roi_features(torch.randn(8, 4, 4), [torch.tensor([[0.0, 0.0, 4.0, 4.0]])], (16, 16))


def test_image_size_not_a_multiple_of_the_patch(micro):
    with pytest.raises(ValueError, match=r"image size \(60, 64\) is not a multiple of the patch size \(8, 8\)"):
        dense_features(micro, torch.randn(1, 3, 60, 64), "x+v")


def test_mismatched_batch_sizes_between_student_and_teacher():
    with pytest.raises(ValueError, match=r"student and teacher must both be \(R, C\); got \(5, 8\) and \(4, 8\)"):
        rla_loss(torch.randn(5, 8), torch.randn(4, 8))
    with pytest.raises(ValueError, match="boxes has 1 entries for a batch of 2 dense maps"):
        roi_features(torch.randn(2, 8, 4, 4), [torch.tensor([[0.0, 0.0, 4.0, 4.0]])], (16, 16))


def test_nan_features_stop_training_with_a_clear_error(tmp_path):
    from tests.helpers.synthetic_distill import build, small_config

    tr = build(small_config(str(tmp_path), max_steps=3))
    with torch.no_grad():
        for p in tr.method.frozen["teacher"].visual.parameters():
            p.fill_(float("nan"))  # the teacher's crop embeddings become NaN
    with pytest.raises(NonFiniteLoss, match="non-finite loss at step 0"):
        tr.fit(resume=False)


# ----------------------------------------------------------------------------------------------- vocabulary


def test_empty_synonym_list_and_unknown_class():
    corpus = SynonymCorpus({"car": {"synonyms": [], "definition": "a car"}})
    assert corpus["car"]["synonyms"] == []
    with pytest.raises(KeyError, match="class 'zebra' is not in the synonym corpus"):
        corpus["zebra"]
    with pytest.raises(ValueError, match="'synonyms' must be a list of strings"):
        SynonymCorpus({"car": {"synonyms": "auto", "definition": "a car"}})


def test_class_without_synonyms_under_a_synonym_protocol_is_logged(caplog):
    from ovlib.models.text import class_name_sets

    cats = [{"id": 1, "name": "car", "synonyms": ["auto"]}, {"id": 2, "name": "boat", "synonyms": []}]
    with caplog.at_level(logging.WARNING):
        names = class_name_sets(cats, "first_synonym")
    assert names == [["auto"], ["boat"]]
    assert "1 of 2 classes have no synonym" in caplog.text and "boat" in caplog.text


def test_unknown_class_in_a_micro_world_lookup():
    from ovlib.data.microworld import MicroWorld

    with pytest.raises(KeyError):
        MicroWorld(seed=0).class_by_id(9999)


# ----------------------------------------------------------------------------------------------- parameters


def test_unknown_profile_and_parameter(repo_root):
    with pytest.raises(config.ParamError, match="unknown profile 'tiny'"):
        config.resolve("tiny", root=repo_root)
    with pytest.raises(config.ParamError, match=r"unknown parameter\(s\) \['batch'\]"):
        config.resolve("smoke", ["batch=3"], root=repo_root)
    with pytest.raises(ValueError, match=r"unknown DistillConfig field\(s\) \['batch'\]"):
        DistillConfig.from_dict({"batch": 3})


def test_params_file_with_a_wrong_type(tmp_path, repo_root):
    data = config.load_profile("micro", repo_root)
    data["seeds"] = 2.5
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "micro.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(config.ParamError, match=r"micro\.yaml: parameter 'seeds' must be int, got float 2\.5"):
        config.load_profile("micro", tmp_path)


# ----------------------------------------------------------------------------------------------- weights


def test_missing_offline_weights_say_how_to_supply_a_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailable, match=r"not available offline.*pretrained='/path/to/"):
        load_clip("ViT-B-16", pretrained="openai")


class _Callable:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_checkpoint_with_a_pickled_callable_is_refused(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "x": _Callable()}, p)
    with pytest.raises(CheckpointError, match="evil.pt"):
        safe_load(p)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_clip("micro-clip", pretrained=str(p))


def test_checkpoint_from_another_architecture_lists_mismatched_keys(tmp_path):
    from ovlib.models import load_vfm

    p = tmp_path / "vfm.pt"
    torch.save(load_vfm("micro-vfm").state_dict(), p)
    with pytest.raises(CheckpointMismatch, match=r"(?s)vfm\.pt.*missing.*unexpected"):
        load_clip("micro-clip", pretrained=str(p))
