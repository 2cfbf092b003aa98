"""Write a tiny dataset in each benchmark's MMSeg layout, with the labels a loader must read back.

``write_benchmark(name, root, n=2, seed=0) -> list of (image (H, W, 3) uint8 RGB as written, expected (H, W)
int64 label map)`` (class index, 255 = ignore; JPEG images come back only approximately). The expected map is
drawn first; the file stores what the dataset's own tools store (stated here independently of the loader):
VOC a palette PNG of the class index (255 boundaries), Context an 8-bit PNG with 0 = background, COCO
``_instanceTrainIds`` / ``_labelTrainIds`` PNGs (or, with ``raw_coco=True``, the COCO-Stuff164k maps:
category id - 1, 255 unlabeled), Cityscapes ``_gtFine_labelTrainIds.png``, ADE 0 = "other" and 1..150.
Images: smooth RGB with R > G > B (JPEG, PNG for Cityscapes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# COCO 2017 thing category ids (1..90 minus the 10 unused ids) and the 91 stuff ids 92..182.
THING_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
STUFF_IDS = list(range(92, 183))
NUM = {"voc21": 21, "voc20": 20, "context60": 60, "context59": 59, "coco_object": 81, "coco_stuff171": 171,
       "cityscapes": 19, "ade150": 150}
SIZE = (12, 16)  # (H, W)


def _voc_palette() -> list[int]:
    pal = []
    for i in range(256):
        c, rgb = i, [0, 0, 0]
        for j in range(8):
            for k in range(3):
                rgb[k] |= ((c >> k) & 1) << (7 - j)
            c >>= 3
        pal += rgb
    return pal


def _image(rng: np.random.Generator, path: Path) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    base = rng.integers(20, 236, 3)  # a smooth image (JPEG keeps it), channels far apart from each other
    base = np.sort(base)[::-1] * np.array([1.0, 0.6, 0.2])
    ramp = np.linspace(0, 15, SIZE[1])[None, :, None]
    a = np.ascontiguousarray(np.broadcast_to(np.clip(base + ramp, 0, 255), SIZE + (3,)).astype(np.uint8))
    Image.frombytes("RGB", (SIZE[1], SIZE[0]), a.tobytes()).save(path)
    return a


def _png(arr: np.ndarray, path: Path, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.ascontiguousarray(arr.astype(np.uint8))
    im = Image.frombytes("P" if palette else "L", (a.shape[1], a.shape[0]), a.tobytes())
    if palette:
        im.putpalette(_voc_palette())
    im.save(path)


def _expected(rng: np.random.Generator, C: int, ignore: bool = True) -> np.ndarray:
    lab = rng.integers(0, C, SIZE).astype(np.int64)
    lab[0, :] = np.arange(SIZE[1]) % C  # several classes for sure
    if ignore:
        lab[rng.random(SIZE) < 0.15] = 255
    return lab


def write_benchmark(name: str, root: str | Path, n: int = 2, seed: int = 0, raw_coco: bool = False
                    ) -> list[tuple[np.ndarray, np.ndarray]]:
    root, rng, C = Path(root), np.random.default_rng(seed), NUM[name]
    ids = [f"s{i:03d}" for i in range(n)]
    out = []
    for sid in ids:
        exp = _expected(rng, C, ignore=name != "coco_object")
        if name in ("voc21", "voc20"):
            base = root / "VOCdevkit" / "VOC2012"
            img = _image(rng, base / "JPEGImages" / f"{sid}.jpg")
            stored = exp.copy() if name == "voc21" else np.where(exp == 255, 255, exp + 1)
            if name == "voc20":  # background pixels (0) are ignored in VOC20
                stored[(exp == 255) & (rng.random(SIZE) < 0.5)] = 0
            _png(stored, base / "SegmentationClass" / f"{sid}.png", palette=True)
        elif name in ("context60", "context59"):
            base = root / "VOCdevkit" / "VOC2010"
            img = _image(rng, base / "JPEGImages" / f"{sid}.jpg")
            if name == "context60":
                stored = exp.copy()
            else:
                stored = np.where(exp == 255, 0, exp + 1)  # the converter writes 0 = background, never 255
            _png(stored, base / "SegmentationClassContext" / f"{sid}.png")
        elif name in ("coco_object", "coco_stuff171"):
            img = _image(rng, root / "images" / "val2017" / f"{sid}.jpg")
            ann = root / "annotations" / "val2017"
            if raw_coco:
                raw = np.full(SIZE, 255, dtype=np.int64)
                if name == "coco_stuff171":
                    ids171 = [i - 1 for i in THING_IDS + STUFF_IDS]
                    for t, cid in enumerate(ids171):
                        raw[exp == t] = cid
                else:  # background drawn from stuff ids and unlabeled; things -> COCO id - 1
                    for t in range(1, 81):
                        raw[exp == t] = THING_IDS[t - 1] - 1
                    bg = exp == 0
                    raw[bg] = rng.choice([STUFF_IDS[0] - 1, STUFF_IDS[-1] - 1, 255], size=int(bg.sum()))
                _png(raw, ann / f"{sid}.png")
            else:
                suffix = "_instanceTrainIds.png" if name == "coco_object" else "_labelTrainIds.png"
                _png(exp, ann / f"{sid}{suffix}")
        elif name == "cityscapes":
            city = "aachen"
            img = _image(rng, root / "leftImg8bit" / "val" / city / f"{city}_{sid}_leftImg8bit.png")
            _png(exp, root / "gtFine" / "val" / city / f"{city}_{sid}_gtFine_labelTrainIds.png")
        elif name == "ade150":
            img = _image(rng, root / "images" / "validation" / f"{sid}.jpg")
            _png(np.where(exp == 255, 0, exp + 1), root / "annotations" / "validation" / f"{sid}.png")
        else:
            raise ValueError(name)
        out.append((img, exp))
    for year, sets in (("2012", "Segmentation"), ("2010", "SegmentationContext")):
        d = root / "VOCdevkit" / f"VOC{year}"
        if d.is_dir():
            (d / "ImageSets" / sets).mkdir(parents=True, exist_ok=True)
            (d / "ImageSets" / sets / "val.txt").write_text("\n".join(ids) + "\n")
    return out
