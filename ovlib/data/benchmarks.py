"""The standard open-vocabulary semantic segmentation benchmarks, read from their MMSeg layouts.

``load_benchmark(name, root, split="val") -> BenchmarkDataset``; ``dataset[i]`` is ``{"image": (H, W, 3) uint8
RGB, "label": (H, W) int64 (class index, 255 = ignore), "id", "image_path", "label_path"}``;
``dataset.classes`` is one tuple of names per class (several names allowed, as SCLIP's ``configs/cls_*.txt``;
a text encoder may ensemble or max-pool them) and ``dataset.has_background`` says whether class 0 is a
background class (the probability-threshold rule of the protocol cards, :mod:`ovlib.eval.protocols`, applies
only then).

=================  =======  ===========================================================================
name               classes  layout under ``root`` (label conventions: the configs cited below)
=================  =======  ===========================================================================
``voc21``          21       ``JPEGImages/*.jpg``, ``SegmentationClass/*.png`` (palette PNG: the label is
                            the palette index; 0 background, 255 boundary), ids in
                            ``ImageSets/Segmentation/<split>.txt``; ``root`` = ``VOC2012`` (or a folder
                            holding ``VOCdevkit/VOC2012``)
``voc20``          20       as ``voc21`` with ``reduce_zero_label``: background -> ignore
``context60``      60       VOC2010: ``JPEGImages``, ``SegmentationClassContext/*.png`` (0 background,
                            1..59; MMSeg's ``pascal_context.py`` converter), ``ImageSets/SegmentationContext``
``context59``      59       as ``context60`` with ``reduce_zero_label``
``coco_object``    81       ``images/val2017/*.jpg``, ``annotations/val2017/*_instanceTrainIds.png`` (0
                            background, 1..80 things), or, where those are absent, the COCO-Stuff164k maps
                            ``annotations/val2017/<id>.png`` converted as ``cvt_coco_object.py`` does
``coco_stuff171``  171      ``images/val2017``, ``annotations/val2017/*_labelTrainIds.png`` (0..170, 255),
                            or the raw COCO-Stuff164k maps converted as MMSeg's ``coco_stuff164k.py``
``cityscapes``     19       ``leftImg8bit/val/<city>/*_leftImg8bit.png``,
                            ``gtFine/val/<city>/*_gtFine_labelTrainIds.png`` (0..18, 255)
``ade150``         150      ``images/validation/*.jpg``, ``annotations/validation/*.png`` (0 = "other" ->
                            ignore, 1..150 -> 0..149: ``reduce_zero_label``)
=================  =======  ===========================================================================

Sources of the conventions (read for facts only): dataset classes and ``reduce_zero_label`` of
``wangf3014/SCLIP:custom_datasets.py`` (``PascalVOC20Dataset`` reduce_zero_label=True, ``PascalContext60Dataset``
False, ``PascalContext59Dataset`` True, ``COCOObjectDataset`` suffix ``_instanceTrainIds.png``) and
``configs/cfg_*.py`` (``cfg_ade20k.py``, ``cfg_context59.py``: ``LoadAnnotations(reduce_zero_label=True)``);
COCO-Object's construction ``wangf3014/SCLIP:datasets/cvt_coco_object.py`` (from GroupViT): COCO-Stuff164k
class ids 0..90 (things) -> their train id + 1, every other value (stuff 91..181 and unlabeled 255) -> 0
= background; MMSeg's ``CityscapesDataset`` / ``COCOStuffDataset`` / ``ADE20KDataset`` suffixes
(``open-mmlab/mmsegmentation:mmseg/datasets/{cityscapes,coco_stuff,ade}.py``). Class names are written here
from the datasets' own definitions (VOC devkit, PASCAL-Context 59, COCO 2017 + COCO-Stuff, Cityscapes
trainIds, ADE20K ``objectInfo150``), in the benchmarks' label order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["BENCHMARKS", "BenchmarkSpec", "BenchmarkDataset", "load_benchmark", "read_label_png",
           "reduce_zero_label", "coco_stuff_train_ids", "coco_object_from_stuff", "VOC_PALETTE"]

IGNORE = 255

# ------------------------------------------------------------------------------------------ class names
_VOC20 = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
          ("dining table", "table"), "dog", "horse", "motorbike", "person", ("potted plant", "plant in a pot"),
          "sheep", "sofa", "train", ("tv monitor", "television"))

_CONTEXT59 = ("aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
              "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup",
              "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass", "ground", "horse",
              "keyboard", "light", "motorbike", "mountain", "mouse", "person", "plate", "platform",
              ("potted plant", "plant in a pot"), "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky",
              "snow", "sofa", "table", "track", "train", "tree", "truck", ("tv monitor", "television"), "wall",
              "water", "window", "wood")

#: COCO 2017's 80 thing categories in id order (ids 1..90 with gaps).
_COCO_THINGS = ("person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
                "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
                "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
                "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
                "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
                "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
                "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
                "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
                "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
                "teddy bear", "hair drier", "toothbrush")
#: Their COCO category ids.
_COCO_THING_IDS = tuple(i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))

#: COCO-Stuff's 91 stuff categories (ids 92..182) in id order; "-other"/"-stuff" suffixes read as words.
_COCO_STUFF = ("banner", "blanket", "branch", "bridge", "building", "bush", "cabinet", "cage", "cardboard",
               "carpet", "ceiling", "ceiling tile", "cloth", "clothes", "clouds", "counter", "cupboard",
               "curtain", "desk", "dirt", "door", "fence", "marble floor", "floor", "stone floor", "tile floor",
               "wood floor", "flower", "fog", "food", "fruit", "furniture", "grass", "gravel", "ground", "hill",
               "house", "leaves", "light", "mat", "metal", "mirror", "moss", "mountain", "mud", "napkin", "net",
               "paper", "pavement", "pillow", "plant", "plastic", "platform", "playingfield", "railing",
               "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky",
               "skyscraper", "snow", "solid", "stairs", "stone", "straw", "structural", "table", "tent",
               "textile", "towel", "tree", "vegetable", "brick wall", "concrete wall", "wall", "panel wall",
               "stone wall", "tile wall", "wood wall", "water", "waterdrops", "window blind", "window", "wood")

_CITYSCAPES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
               "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
               "bicycle")

_ADE150 = ("wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", ("windowpane", "window"),
           "grass", "cabinet", "sidewalk", "person", ("earth", "ground"), "door", "table", "mountain", "plant",
           "curtain", "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug",
           "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing",
           "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
           "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
           "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
           "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
           "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
           "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
           ("television receiver", "television"), "airplane", "dirt track", "apparel", "pole", "land",
           "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship",
           "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel",
           "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
           "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket",
           "sculpture", "hood", "sconce", "vase", "traffic light", "tray", ("ashcan", "trash can"), "fan",
           "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock",
           "flag")


def _names(classes: Sequence[str | tuple[str, ...]]) -> tuple[tuple[str, ...], ...]:
    return tuple((c,) if isinstance(c, str) else tuple(c) for c in classes)


def _voc_palette() -> np.ndarray:
    """The PASCAL VOC colour map ``(256, 3)`` uint8 (the devkit's ``labelcolormap``: bits of the index
    spread over the high bits of R, G, B)."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


VOC_PALETTE = _voc_palette()


# ------------------------------------------------------------------------------------------ label maps
def coco_stuff_train_ids() -> np.ndarray:
    """``(256,)`` int64 lookup: COCO-Stuff164k map value (category id - 1; 255 unlabeled) -> COCO-Stuff-171
    train id (0..79 things, 80..170 stuff, 255 ignore); -1 marks values that are no category."""
    lut = np.full(256, -1, dtype=np.int64)
    cls_ids = [i - 1 for i in _COCO_THING_IDS] + list(range(91, 182))
    lut[cls_ids] = np.arange(len(cls_ids))
    lut[IGNORE] = IGNORE
    return lut


def coco_object_from_stuff(raw: np.ndarray, name: str = "label") -> np.ndarray:
    """COCO-Stuff164k map ``(H, W)`` -> COCO-Object ``(H, W)`` (0 background, 1..80 things), as
    ``wangf3014/SCLIP:datasets/cvt_coco_object.py``: a thing (value <= 90) -> train id + 1; stuff and
    unlabeled (255) -> 0. A value that is no COCO-Stuff category is an error naming ``name``."""
    tid = coco_stuff_train_ids()[np.asarray(raw, dtype=np.int64)]
    if (tid < 0).any():
        bad = int(np.asarray(raw)[tid < 0].flat[0])
        raise ValueError(f"{name}: value {bad} is not a COCO-Stuff164k category id (0..181 or 255)")
    return np.where((tid < 80), tid + 1, 0).astype(np.int64)


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """MMSeg's ``reduce_zero_label``: 0 -> 255 (ignore), ``v -> v - 1`` otherwise, 255 stays 255
    (``open-mmlab/mmsegmentation:mmseg/datasets/transforms/loading.py`` ``LoadAnnotations``)."""
    lab = np.asarray(label, dtype=np.int64)
    out = lab - 1
    out[lab == 0] = IGNORE
    out[lab == IGNORE] = IGNORE
    return out


def read_label_png(path: str | Path) -> np.ndarray:
    """A label PNG -> ``(H, W)`` int64 of its stored values (palette PNG: the palette index, as MMSeg reads
    it with ``imfrombytes(..., flag="unchanged", backend="pillow")``). A colour (RGB) PNG is an error naming
    the file: it holds colours, not labels."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode not in ("P", "L", "I", "I;16"):
            raise ValueError(f"{path}: label PNG has mode {im.mode!r}; expected a single-channel or palette PNG")
        return np.asarray(im, dtype=np.int64)


# ------------------------------------------------------------------------------------------ layouts
@dataclass(frozen=True)
class BenchmarkSpec:
    """One benchmark: its classes, whether class 0 is background, its layout and label convention."""

    name: str
    classes: tuple[tuple[str, ...], ...]
    has_background: bool
    layout: str                 # "voc" | "context" | "coco" | "cityscapes" | "ade"
    label: str                  # "plain" | "reduce_zero" | "coco_object" | "coco_stuff"

    @property
    def num_classes(self) -> int:
        return len(self.classes)


BENCHMARKS: dict[str, BenchmarkSpec] = {
    "voc21": BenchmarkSpec("voc21", _names(("background",) + _VOC20), True, "voc", "plain"),
    "voc20": BenchmarkSpec("voc20", _names(_VOC20), False, "voc", "reduce_zero"),
    "context60": BenchmarkSpec("context60", _names(("background",) + _CONTEXT59), True, "context", "plain"),
    "context59": BenchmarkSpec("context59", _names(_CONTEXT59), False, "context", "reduce_zero"),
    "coco_object": BenchmarkSpec("coco_object", _names(("background",) + _COCO_THINGS), True, "coco",
                                 "coco_object"),
    "coco_stuff171": BenchmarkSpec("coco_stuff171", _names(_COCO_THINGS + _COCO_STUFF), False, "coco",
                                   "coco_stuff"),
    "cityscapes": BenchmarkSpec("cityscapes", _names(_CITYSCAPES), False, "cityscapes", "plain"),
    "ade150": BenchmarkSpec("ade150", _names(_ADE150), False, "ade", "reduce_zero"),
}


def _need_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: directory {path} does not exist")
    return path


def _voc_root(root: Path, year: str) -> Path:
    for cand in (root, root / "VOCdevkit" / f"VOC{year}", root / f"VOC{year}"):
        if (cand / "JPEGImages").is_dir():
            return cand
    raise FileNotFoundError(f"PASCAL VOC{year}: no JPEGImages directory under {root} (expected {root}/JPEGImages "
                            f"or {root}/VOCdevkit/VOC{year}/JPEGImages)")


def _id_list(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} does not exist")
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


def _pairs(spec: BenchmarkSpec, root: Path, split: str) -> list[tuple[str, Path, Path]]:
    """``(id, image path, label path)`` of every sample, sorted as the split file or by name."""
    if spec.layout in ("voc", "context"):
        year, seg, sets = (("2012", "SegmentationClass", "Segmentation") if spec.layout == "voc"
                           else ("2010", "SegmentationClassContext", "SegmentationContext"))
        base = _voc_root(root, year)
        img_dir, lab_dir = base / "JPEGImages", _need_dir(base / seg, spec.name)
        ids = _id_list(base / "ImageSets" / sets / f"{split}.txt")
        return [(i, img_dir / f"{i}.jpg", lab_dir / f"{i}.png") for i in ids]
    if spec.layout == "coco":
        sub = f"{split}2017" if split in ("val", "train") else split
        img_dir = _need_dir(root / "images" / sub, spec.name)
        lab_dir = _need_dir(root / "annotations" / sub, spec.name)
        suffix = "_instanceTrainIds.png" if spec.label == "coco_object" else "_labelTrainIds.png"
        out = []
        for p in sorted(img_dir.glob("*.jpg")):
            lab = lab_dir / f"{p.stem}{suffix}"
            out.append((p.stem, p, lab if lab.is_file() else lab_dir / f"{p.stem}.png"))
        return out
    if spec.layout == "cityscapes":
        img_dir = _need_dir(root / "leftImg8bit" / split, spec.name)
        lab_dir = _need_dir(root / "gtFine" / split, spec.name)
        out = []
        for p in sorted(img_dir.glob("*/*_leftImg8bit.png")):
            stem = p.name[: -len("_leftImg8bit.png")]
            out.append((stem, p, lab_dir / p.parent.name / f"{stem}_gtFine_labelTrainIds.png"))
        return out
    if spec.layout == "ade":
        sub = {"val": "validation", "train": "training"}.get(split, split)
        img_dir = _need_dir(root / "images" / sub, spec.name)
        lab_dir = _need_dir(root / "annotations" / sub, spec.name)
        return [(p.stem, p, lab_dir / f"{p.stem}.png") for p in sorted(img_dir.glob("*.jpg"))]
    raise ValueError(f"unknown layout {spec.layout!r}")


class BenchmarkDataset:
    """A benchmark split (see the module docstring); indexable, ``len()``; items read lazily from disk."""

    def __init__(self, spec: BenchmarkSpec, root: str | Path, split: str = "val"):
        self.spec, self.root, self.split = spec, Path(root), split
        if not self.root.is_dir():
            raise FileNotFoundError(f"{spec.name}: root directory {self.root} does not exist")
        self.samples = _pairs(spec, self.root, split)
        if not self.samples:
            raise FileNotFoundError(f"{spec.name}: no images found under {self.root} for split {split!r}")
        for _, img, lab in self.samples:
            for p in (img, lab):
                if not p.is_file():
                    raise FileNotFoundError(f"{spec.name}: file {p} does not exist")

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def classes(self) -> tuple[tuple[str, ...], ...]:
        return self.spec.classes

    @property
    def has_background(self) -> bool:
        return self.spec.has_background

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    def __len__(self) -> int:
        return len(self.samples)

    def label(self, i: int) -> np.ndarray:
        """``(H, W)`` int64 class indices of sample ``i`` (255 = ignore); a value outside the classes is an
        error naming the file."""
        _, _, path = self.samples[i]
        raw = read_label_png(path)
        if self.spec.label == "coco_object" and not path.name.endswith("_instanceTrainIds.png"):
            lab = coco_object_from_stuff(raw, name=str(path))
        elif self.spec.label == "coco_stuff" and not path.name.endswith("_labelTrainIds.png"):
            lab = coco_stuff_train_ids()[np.clip(raw, 0, 255)]
            if (lab < 0).any() or (raw > 255).any():
                raise ValueError(f"{path}: a value is not a COCO-Stuff164k category id (0..181 or 255)")
        elif self.spec.label == "reduce_zero":
            lab = reduce_zero_label(raw)
        else:
            lab = raw
        bad = (lab != IGNORE) & ((lab < 0) | (lab >= self.num_classes))
        if bad.any():
            v = int(raw[bad].flat[0])
            raise ValueError(f"{path}: label value {v} is outside the {self.num_classes} classes of {self.name} "
                             f"(and not the ignore value {IGNORE})")
        return lab.astype(np.int64)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from PIL import Image

        if not -len(self) <= i < len(self):
            raise IndexError(f"{self.name}: index {i} out of range for {len(self)} samples")
        i = i % len(self)
        sid, img_path, lab_path = self.samples[i]
        with Image.open(img_path) as im:
            image = np.asarray(im.convert("RGB"), dtype=np.uint8)  # (H, W, 3) RGB
        label = self.label(i)
        if label.shape != image.shape[:2]:
            raise ValueError(f"{lab_path}: label shape {label.shape} differs from image {img_path} "
                             f"{image.shape[:2]}")
        return {"image": image, "label": label, "id": sid, "image_path": str(img_path),
                "label_path": str(lab_path)}


def load_benchmark(name: str, root: str | Path, split: str = "val") -> BenchmarkDataset:
    """The ``split`` of benchmark ``name`` (one of :data:`BENCHMARKS`) under ``root`` in its MMSeg layout."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {sorted(BENCHMARKS)}")
    return BenchmarkDataset(BENCHMARKS[name], root, split)
