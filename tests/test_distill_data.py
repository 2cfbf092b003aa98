"""The region distillation dataset: geometry between image, student tensor and teacher crops; seeded per epoch."""

import pytest
import torch

from ovlib.data.distill import RegionDistillDataset, collate_regions
from ovlib.data.microworld import ensure_microworld
from ovlib.data.regions import crop_regions, to_chw_float


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("mw")
    ensure_microworld(root, "train2017", n=6, size=96, seed=0, progress=False)
    return root


def _unnorm(t, mean, std):
    return t * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)


def test_grid_regions_geometry_and_determinism(tiny_world):
    ds = RegionDistillDataset(str(tiny_world), "train2017", "grid", student_size=128, crop_size=64, seed=3)
    a = ds[2]
    S = 128
    assert a["image"].shape == (3, S, S) and a["crops"].shape[1:] == (3, 64, 64)
    K = len(a["boxes"])
    assert 1 <= K <= 20 and a["crops"].shape[0] == K and (a["labels"] == -1).all()
    # grid cells tile the resized image (96 -> 128: scale 4/3): union of cells covers [0, 128]^2 when all kept
    assert float(a["boxes"].min()) >= 0 and float(a["boxes"].max()) <= S + 1e-4
    b = ds[2]
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["crops"], b["crops"])
    draws = []
    for e in range(1, 6):
        ds.set_epoch(e)
        draws.append(ds[2]["boxes"])
    assert any(d.shape != a["boxes"].shape or not torch.equal(d, a["boxes"]) for d in draws)  # new epoch, new grid
    # the crops are the teacher's view of exactly these cells of the original image
    ds.set_epoch(0)
    img = to_chw_float(ds.coco[2]["image"])
    ref = crop_regions(img, a["boxes"] / (S / 96), 64)
    got = _unnorm(a["crops"], ds.mean, ds.std)
    assert torch.allclose(got, ref, atol=1e-5)


def test_gt_box_regions_expand_things_and_carry_labels(tiny_world):
    ds = RegionDistillDataset(str(tiny_world), "train2017", "gt_boxes", student_size=96, crop_size=64,
                              thing_crop_scale=1.5, vfm_size=84)
    it = ds[0]
    coco_item = ds.coco[0]
    assert set(it["labels"].tolist()) <= set(coco_item["labels"].tolist())
    assert it["image_labels"].tolist() == sorted(set(coco_item["labels"].tolist()))
    assert it["vfm_image"].shape == (3, 84, 84)
    batch = collate_regions([ds[0], ds[1]])
    assert batch["images"].shape == (2, 3, 96, 96) and len(batch["boxes"]) == 2
    assert batch["crops"].shape[0] == sum(len(b) for b in batch["boxes"]) == batch["labels"].shape[0]
    assert batch["vfm_images"].shape == (2, 3, 84, 84)


def test_bad_regions_mode_is_an_error(tiny_world):
    with pytest.raises(ValueError, match="regions must be 'grid' or 'gt_boxes'"):
        RegionDistillDataset(str(tiny_world), "train2017", "proposals")
