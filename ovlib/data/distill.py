"""The distillation dataset shared by every teacher-student method (CLIPSelf family).

Per image (reference §1.3-1.4, §4.5):

* ``image`` — the student tensor: :class:`~ovlib.data.regions.ResizeLongestPad` (longest side ``student_size``,
  bottom/right zero padding), then the CLIP normalisation; ``(3, S, S)``;
* ``boxes`` — RoIs in pixels of that tensor ``(K, 4)`` xyxy: CLIPSelf grid cells (``regions="grid"``) or the GT
  boxes of the instances file (``regions="gt_boxes"``, SynCLIP), at most ``max_boxes``;
* ``crops`` — the teacher's view of each region, cut from the **original** image: the cell itself (grid) or the
  box expanded ``thing_crop_scale`` about its centre (GT boxes), longest side resized to ``crop_size`` and centre
  padded (:class:`~ovlib.data.regions.CenterPadCrop`), CLIP-normalised; ``(K, 3, c, c)``;
* ``labels`` — category id per region (-1 for grid cells) and ``image_labels`` — the category ids in the image;
* ``vfm_image`` — optional proxy image for a VFM whose grid must equal the student's (reference §3.3):
  longest side ``vfm_size`` with bottom/right padding, VFM normalisation.

Randomness (grid choice, cell order, box subset) is a function of ``(seed, epoch, index)`` only, so a resumed
run sees exactly the same batches (call :meth:`set_epoch`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD

from ovlib.data.coco import CocoInstances
from ovlib.data.regions import ResizeLongestPad, crop_regions, sample_box_regions, sample_grid_boxes, to_chw_float
from ovlib.models.clip import OPENAI_MEAN, OPENAI_STD


def _normalize(t: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=t.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=t.dtype).view(-1, 1, 1)
    return (t - m) / s


class RegionDistillDataset(torch.utils.data.Dataset):
    """Student image + regions + teacher crops (+ VFM proxy) over any COCO-format root."""

    def __init__(self, root: str, split: str = "train2017", regions: str = "grid", student_size: int = 160,
                 crop_size: int = 64, max_split: int = 6, max_boxes: int = 20, thing_crop_scale: float = 1.5,
                 mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD,
                 vfm_size: int | None = None, vfm_mean: Sequence[float] = IMAGENET_MEAN,
                 vfm_std: Sequence[float] = IMAGENET_STD, seed: int = 0, max_images: int = 0):
        if regions not in ("grid", "gt_boxes"):
            raise ValueError(f"regions must be 'grid' or 'gt_boxes', got {regions!r}")
        self.coco = CocoInstances(root, split, masks=False, skip_empty=regions == "gt_boxes")
        self.n = len(self.coco) if max_images <= 0 else min(max_images, len(self.coco))
        if self.n == 0:
            raise ValueError(f"no usable image in {root} ({split}); skipped: {dict(self.coco.skipped)}")
        self.regions, self.max_split, self.max_boxes = regions, max_split, max_boxes
        self.thing_crop_scale = thing_crop_scale
        self.student = ResizeLongestPad(student_size)
        self.crop_size = crop_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.vfm = ResizeLongestPad(vfm_size) if vfm_size else None
        self.vfm_mean, self.vfm_std = tuple(vfm_mean), tuple(vfm_std)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        item = self.coco[i]
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + i)
        img = to_chw_float(item["image"])  # (3, H, W) in [0, 1]
        H, W = img.shape[-2:]
        if self.regions == "grid":
            rois = sample_grid_boxes(W, H, g, self.max_split, self.max_boxes)  # (K, 4) image px
            crops_px, labels = rois, torch.full((len(rois),), -1, dtype=torch.long)
        else:
            r = sample_box_regions(item["boxes"], W, H, g, max_anns=self.max_boxes, crop_scale=self.thing_crop_scale)
            rois, crops_px = r["rois"], r["crops"]
            labels = torch.where(r["valid"], torch.as_tensor(item["labels"])[r["index"].clamp_min(0)], -1)
        student, scale = self.student(img)
        out = {
            "image": _normalize(student, self.mean, self.std),  # (3, S, S)
            "boxes": rois * scale,  # (K, 4) student-tensor px
            "crops": _normalize(crop_regions(img, crops_px, self.crop_size), self.mean, self.std),  # (K, 3, c, c)
            "labels": labels,
            "image_labels": torch.as_tensor(sorted(set(item.get("labels", []).tolist())) if "labels" in item else [],
                                            dtype=torch.long),
            "image_id": int(item["image_id"]),
        }
        if self.vfm is not None:
            out["vfm_image"] = _normalize(self.vfm(img)[0], self.vfm_mean, self.vfm_std)
        return out


def collate_regions(items: list[dict]) -> dict:
    """Batch: ``images (B, 3, S, S)``, ``boxes`` list of ``(K_b, 4)``, ``crops (R, 3, c, c)``, ``labels (R,)``,
    ``image_labels`` list of ``(L_b,)``, optional ``vfm_images (B, 3, S', S')``."""
    out = {
        "images": torch.stack([it["image"] for it in items]),
        "boxes": [it["boxes"] for it in items],
        "crops": torch.cat([it["crops"] for it in items]),
        "labels": torch.cat([it["labels"] for it in items]),
        "image_labels": [it["image_labels"] for it in items],
        "image_ids": torch.tensor([it["image_id"] for it in items]),
    }
    if "vfm_image" in items[0]:
        out["vfm_images"] = torch.stack([it["vfm_image"] for it in items])
    return out
