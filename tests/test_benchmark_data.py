"""``ovlib.data.benchmarks``: every MMSeg layout read back exactly from a written fixture; the real VOC files."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import shared_dir
from helpers.benchmarks import NUM, write_benchmark
from PIL import Image

from ovlib.data.benchmarks import BENCHMARKS, coco_object_from_stuff, load_benchmark, reduce_zero_label


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_fixture_labels_read_back_exactly(tmp_path, name):
    written = write_benchmark(name, tmp_path, n=2, seed=3)
    ds = load_benchmark(name, tmp_path)
    assert len(ds) == 2 and ds.num_classes == NUM[name] == len(ds.classes)
    assert ds.has_background == (name in ("voc21", "context60", "coco_object"))
    assert all(isinstance(c, tuple) and c and all(isinstance(n, str) for n in c) for c in ds.classes)
    for i, (img, exp) in enumerate(written):
        it = ds[i]
        assert it["image"].dtype == np.uint8 and it["image"].shape == img.shape
        assert it["label"].dtype == np.int64
        np.testing.assert_array_equal(it["label"], exp)
        if name == "cityscapes":  # PNG images: exact, and RGB order
            np.testing.assert_array_equal(it["image"], img)
        else:  # JPEG: close to what was written (a BGR swap would be far)
            assert np.abs(it["image"].astype(int) - img).mean() < 4


@pytest.mark.parametrize("name", ["coco_object", "coco_stuff171"])
def test_coco_from_raw_stuff_maps(tmp_path, name):
    written = write_benchmark(name, tmp_path, n=2, seed=5, raw_coco=True)
    ds = load_benchmark(name, tmp_path)
    for i, (_, exp) in enumerate(written):
        np.testing.assert_array_equal(ds[i]["label"], exp)


def test_label_conventions_by_hand():
    np.testing.assert_array_equal(reduce_zero_label(np.array([[0, 1, 255, 150]])), [[255, 0, 255, 149]])
    # COCO-Stuff164k values: 0 person -> 1; 12 (stop sign, id 13) -> 12; 89 (hair drier, id 90) -> 80;
    # 91 (banner, stuff) -> 0; 255 unlabeled -> 0 (cvt_coco_object.py)
    np.testing.assert_array_equal(coco_object_from_stuff(np.array([0, 12, 89, 91, 181, 255])), [1, 12, 80, 0, 0, 0])
    with pytest.raises(ValueError, match="lbl.png.*11"):
        coco_object_from_stuff(np.array([11]), name="lbl.png")  # COCO id 12 does not exist


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_benchmark("ade150", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("voc99", tmp_path)
    write_benchmark("ade150", tmp_path, n=1)
    bad = tmp_path / "annotations" / "validation" / "s000.png"
    a = np.asarray(Image.open(bad)).copy()
    a[0, 0] = 200  # 200 - 1 = 199 >= 150
    Image.fromarray(a).save(bad)
    ds = load_benchmark("ade150", tmp_path)
    with pytest.raises(ValueError, match=r"s000\.png.*200"):
        ds[0]
    (tmp_path / "annotations" / "validation" / "s000.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"s000\.png"):
        load_benchmark("ade150", tmp_path)
    (tmp_path / "cs" / "leftImg8bit" / "val").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="gtFine"):
        load_benchmark("cityscapes", tmp_path / "cs")


def test_real_voc_images():
    shared = shared_dir()
    root = shared / "data" / "voc_real" if shared else None
    if root is None or not root.is_dir():
        pytest.skip("../shared/data/voc_real (three real PASCAL VOC images) is not present")
    ds21, ds20 = load_benchmark("voc21", root), load_benchmark("voc20", root)
    assert len(ds21) == 3
    seen = {}
    for i in range(3):
        it, it20 = ds21[i], ds20[i]
        assert it["image"].shape[:2] == it["label"].shape and it["image"].shape[2] == 3
        seen[it["id"]] = set(np.unique(it["label"]).tolist())
        lab = it["label"]
        exp20 = np.where((lab == 0) | (lab == 255), 255, lab - 1)
        np.testing.assert_array_equal(it20["label"], exp20)
    # values listed in ../shared/data/voc_real/SOURCE.md
    assert seen == {"2011_000003": {0, 5, 15, 255}, "2011_000006": {0, 9, 15, 18, 255}, "2011_000025": {0, 6, 7}}
    assert ds21[0]["image"].shape == (338, 500, 3)
