"""Open-vocabulary detection data: the base/novel vocabulary split and base-only training targets.

Two splits, both resolved once against the categories of an instances file (:func:`vocab_split`):

* ``"ov-coco"`` -- the OV-COCO split of COCO 2017 that every OV-COCO paper uses (Zareian et al., OVR-CNN,
  CVPR'21; F-VLM, CLIPSelf's F-ViT, SynCLIP): 48 base and 17 novel of COCO's 80 thing categories; the other 15
  are in neither (they are not in the OV-COCO vocabulary and their boxes are neither trained on nor evaluated).
  The lists below are written from that definition by category *name* and resolved to ids through the file's
  categories, so a file with other ids (or without one of the names) is an error naming the name.
* ``"field"`` -- the ``split`` field of each category (``"base"`` / ``"novel"``), as the micro world's export
  writes it (:meth:`ovlib.data.microworld.MicroWorld.export_coco`).

:class:`DetectionDataset` yields detector training samples with the boxes of the ``keep`` categories only (the
base classes for training): every other annotation is dropped and counted by reason (``novel``, ``outside``
the vocabulary, ``crowd``, ``degenerate`` boxes), images left without a box are skipped and counted, and the
counts are logged once -- the OV protocol's "novel objects are background in training", made inspectable.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ovlib.data.coco import CocoInstances, ImageReadError, read_image

__all__ = ["OV_COCO_BASE", "OV_COCO_NOVEL", "SPLITS", "VocabSplit", "vocab_split", "DetectionDataset",
           "collate_detection"]

log = logging.getLogger(__name__)

#: OV-COCO base categories (48), COCO 2017 names
OV_COCO_BASE = (
    "person", "bicycle", "car", "motorcycle", "train", "truck", "boat", "bench", "bird", "horse", "sheep", "bear",
    "zebra", "giraffe", "backpack", "handbag", "suitcase", "frisbee", "skis", "kite", "surfboard", "bottle", "fork",
    "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "pizza", "donut", "chair", "bed",
    "toilet", "tv", "laptop", "mouse", "remote", "microwave", "oven", "toaster", "refrigerator", "book", "clock",
    "vase", "toothbrush",
)
#: OV-COCO novel categories (17), COCO 2017 names
OV_COCO_NOVEL = (
    "airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie", "snowboard", "skateboard", "cup", "knife",
    "cake", "couch", "keyboard", "sink", "scissors",
)
#: the splits :func:`vocab_split` knows
SPLITS = ("ov-coco", "field")


@dataclass(frozen=True)
class VocabSplit:
    """A detection vocabulary: ``base`` and ``novel`` category ids (sorted) and every id's name.

    ``vocab`` (base then novel) is the test-time vocabulary; ``index`` maps a category id to its row in it.
    """

    base: tuple[int, ...]
    novel: tuple[int, ...]
    names: dict[int, str]

    def __post_init__(self) -> None:
        both = set(self.base) & set(self.novel)
        if both:
            raise ValueError(f"categories {sorted(both)} are both base and novel")
        if not self.base:
            raise ValueError("a detection split needs at least one base category")

    @property
    def vocab(self) -> tuple[int, ...]:
        return self.base + self.novel

    @property
    def index(self) -> dict[int, int]:
        return {c: i for i, c in enumerate(self.vocab)}

    def kind(self, cat_id: int) -> str:
        return "base" if cat_id in self.base else "novel" if cat_id in self.novel else "outside"


def vocab_split(categories: Sequence[dict], split: str) -> VocabSplit:
    """The :class:`VocabSplit` of an instances file's ``categories`` (dicts with ``id``, ``name`` and, for
    ``"field"``, ``split``). Errors name the split and the missing or unknown category."""
    if split not in SPLITS:
        raise ValueError(f"unknown detection split {split!r}; expected one of {SPLITS}")
    names = {int(c["id"]): str(c["name"]) for c in categories}
    if split == "ov-coco":
        by_name = {n: i for i, n in names.items()}
        missing = [n for n in OV_COCO_BASE + OV_COCO_NOVEL if n not in by_name]
        if missing:
            raise ValueError(f"split 'ov-coco': the categories lack {missing} (is this a COCO 2017 instances file?)")
        base = tuple(sorted(by_name[n] for n in OV_COCO_BASE))
        novel = tuple(sorted(by_name[n] for n in OV_COCO_NOVEL))
    else:
        unknown = [c["name"] for c in categories if c.get("split") not in ("base", "novel")]
        if unknown:
            raise ValueError(f"split 'field': categories {unknown[:5]} have no 'split' of 'base' / 'novel'")
        base = tuple(sorted(int(c["id"]) for c in categories if c["split"] == "base"))
        novel = tuple(sorted(int(c["id"]) for c in categories if c["split"] == "novel"))
    return VocabSplit(base, novel, {c: names[c] for c in base + novel})


class DetectionDataset(torch.utils.data.Dataset):
    """Detector samples from a COCO instances file, keeping the boxes of ``keep`` (category ids) only.

    ``__getitem__`` -> ``(image (3, H, W) float in [0, 1], target)`` with ``target`` = ``boxes (K, 4)`` float32
    xyxy px, ``labels (K,)`` int64 = 1 + the row of the category in ``keep`` (0 is torchvision's background),
    ``image_id``. Dropped annotations are counted in ``dropped`` (``novel``: a category of ``novel``; ``outside``:
    in neither; ``crowd``; ``degenerate``: width or height < ``min_size`` px); images left without a box are left
    out and counted in ``skipped["no_kept_boxes"]`` (the counts are logged once, at construction; they are over
    the whole file, before ``max_images`` keeps the first images with a box).
    """

    def __init__(self, root, split: str, keep: Sequence[int], novel: Sequence[int] = (), min_size: float = 1.0,
                 strict: bool = False, max_images: int | None = None):
        self.coco_ds = CocoInstances(root, split, masks=False, strict=strict)
        self.keep = tuple(int(c) for c in keep)
        if not self.keep:
            raise ValueError("DetectionDataset: `keep` names no category")
        known = {int(c["id"]) for c in self.coco_ds.categories}
        unknown = sorted(set(self.keep) - known)
        if unknown:
            raise ValueError(f"DetectionDataset: categories {unknown} are not in {root}/{split}'s instances file")
        self.row = {c: i for i, c in enumerate(self.keep)}
        novel = {int(c) for c in novel}
        self.min_size = float(min_size)
        self.dropped: Counter = Counter()
        self.skipped: Counter = Counter(self.coco_ds.skipped)
        self.items: list[tuple[int, list[dict]]] = []  # (index into coco_ds, kept annotations)
        coco = self.coco_ds.coco
        for i, img_id in enumerate(self.coco_ds.items):
            kept = []
            for a in coco.loadAnns(coco.getAnnIds(imgIds=[img_id])):
                c = int(a["category_id"])
                w, h = a["bbox"][2], a["bbox"][3]
                reason = ("novel" if c in novel else "outside" if c not in self.row else "crowd"
                          if a.get("iscrowd", 0) else "degenerate" if min(w, h) < self.min_size else None)
                if reason:
                    self.dropped[reason] += 1
                else:
                    kept.append(a)
            if kept:
                self.items.append((i, kept))
            else:
                self.skipped["no_kept_boxes"] += 1
        if self.dropped or self.skipped:
            log.info("detection %s (%s): %d images with boxes of %d categories; dropped annotations %s; skipped "
                     "images %s", split, root, len(self.items), len(self.keep), dict(self.dropped),
                     dict(self.skipped))
        if not self.items:
            raise ValueError(f"DetectionDataset: no image of {root}/{split} has a box of the kept categories")
        if max_images is not None:
            self.items = self.items[:max_images]  # the first images (in id order) that have a kept box

    def __len__(self) -> int:
        return len(self.items)

    def image_ids(self) -> list[int]:
        return [int(self.coco_ds.items[i]) for i, _ in self.items]

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = len(self.items)
        for k in range(n):  # an undecodable image is counted and replaced by the next one (strict: raised)
            i, anns = self.items[(idx + k) % n]
            try:
                image = read_image(self.coco_ds.image_dir / self.coco_ds.coco.imgs[self.coco_ds.items[i]]["file_name"])
                break
            except ImageReadError as e:
                self.skipped["unreadable"] += 1
                if self.coco_ds.strict:
                    raise
                log.warning("%s (skipped images so far: %s)", e, dict(self.skipped))
        else:
            raise ImageReadError(f"no readable image in the detection dataset {self.coco_ds.root}")
        img_id = self.coco_ds.items[i]  # image (H, W, 3) uint8
        boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                          for a in anns], np.float32)  # (K, 4) xyxy px
        labels = np.array([1 + self.row[int(a["category_id"])] for a in anns], np.int64)  # (K,)
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div_(255)  # (3, H, W)
        return x, {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels),
                   "image_id": torch.tensor(int(img_id))}


def collate_detection(batch: list) -> tuple[list[torch.Tensor], list[dict]]:
    """Lists of images and targets (torchvision's detection models take lists: sizes may differ)."""
    return [b[0] for b in batch], [b[1] for b in batch]
