"""Datasets over any COCO-format root: the micro-world export and real COCO 2017 (standard layout).

Layout (``root`` = a ``data_root``)::

    {split}/<file_name>                              images (jpg for COCO, png for the micro world)
    annotations/instances_{split}.json               boxes + RLE/polygon masks (things)
    annotations/panoptic_{split}.json                segments_info per image (things and stuff)
    annotations/panoptic_{split}/<png file_name>     segment ids, id = R + 256 G + 256^2 B
    annotations/captions_{split}.json                captions

Bad data is never silently dropped: at construction, images whose file (or panoptic PNG) is missing and
images without annotations are left out and **counted** in ``.skipped`` (a ``Counter`` keyed by reason,
logged once); an image that exists but cannot be decoded is counted under ``"unreadable"`` when it is
read and replaced by the next readable image (``strict=True`` raises instead). ``skipped`` counts the
work of the process that holds the dataset (DataLoader workers keep their own copies).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["CocoPanoptic", "CocoInstances", "CocoCaptions", "read_image", "ImageReadError", "rgb2id", "id2rgb",
           "dry_run_root", "dry_run_data", "synthesised_captions", "caption_name"]


# ----------------------------------------------------------------------------------------------------------
# panoptic id encoding (COCO panopticapi convention: id = R + 256 G + 256^2 B)
# ----------------------------------------------------------------------------------------------------------
def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) int64 segment ids (``cocodataset/panopticapi:panopticapi/utils.py``)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"rgb2id expects (H, W, 3), got shape {rgb.shape}")
    ids = rgb[..., 0].astype(np.int64)
    ids += rgb[..., 1].astype(np.int64) << 8
    ids += rgb[..., 2].astype(np.int64) << 16
    return ids


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """(H, W) int segment ids in [0, 256^3) -> (H, W, 3) uint8."""
    ids = np.asarray(ids, np.int64)
    if ids.min(initial=0) < 0 or ids.max(initial=0) >= 256**3:
        raise ValueError("panoptic ids must lie in [0, 256**3)")
    return np.stack([ids % 256, (ids // 256) % 256, ids // 65536], -1).astype(np.uint8)


log = logging.getLogger(__name__)


class ImageReadError(OSError):
    """An image file exists but cannot be decoded."""


def read_image(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB array of an image file; unreadable files raise :class:`ImageReadError`."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageReadError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def _load_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{what} annotation file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


class _CocoBase:
    """Shared image bookkeeping: ``self.items`` holds the kept entries; ``self.skipped`` the counts."""

    kind = "coco"

    def __init__(self, root, split: str, image_dir=None, strict: bool = False):
        self.root = Path(root)
        self.split = split
        self.image_dir = Path(image_dir) if image_dir is not None else self.root / split
        self.strict = strict
        self.skipped: Counter = Counter()
        self.items: list = []

    def _report(self, total: int) -> None:
        if self.skipped:
            log.warning(
                "%s %s (%s): kept %d of %d images; skipped %s",
                self.kind,
                self.split,
                self.root,
                len(self.items),
                total,
                dict(self.skipped),
            )

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, idx: int) -> dict:  # pragma: no cover - overridden
        raise NotImplementedError

    def __getitem__(self, idx: int) -> dict:
        n = len(self.items)
        if not -n <= idx < n:
            raise IndexError(f"index {idx} out of range for {self.kind} dataset of {n} images")
        idx %= n
        for k in range(n):
            j = (idx + k) % n
            try:
                return self._load(j)
            except ImageReadError as e:
                self.skipped["unreadable"] += 1
                if self.strict:
                    raise
                log.warning("%s (skipped images so far: %s)", e, dict(self.skipped))
        raise ImageReadError(f"no readable image in {self.kind} dataset {self.root} ({self.split})")


class CocoPanoptic(_CocoBase):
    """COCO panoptic segmentation (``panoptic_{split}.json`` + PNGs).

    ``__getitem__`` -> dict(``image`` (H, W, 3) uint8, ``image_id``, ``file_name``, ``panoptic`` (H, W)
    int64 segment ids (0 = void), ``segments``: list of dict(``id``, ``category_id``, ``isthing``,
    ``iscrowd``, ``mask`` (H, W) bool, ``box`` xyxy float px = json bbox [x, y, x+w, y+h], ``bbox`` xywh,
    ``area`` = json area)). ``.categories``: the json categories (``id, name, isthing``, plus
    ``synonyms/definition/split`` for the micro world).
    """

    kind = "panoptic"

    def __init__(
        self, root, split: str = "val2017", ann_file=None, image_dir=None, png_dir=None, strict: bool = False
    ):
        super().__init__(root, split, image_dir, strict)
        ann_file = (
            Path(ann_file) if ann_file is not None else self.root / "annotations" / f"panoptic_{split}.json"
        )
        self.png_dir = (
            Path(png_dir) if png_dir is not None else self.root / "annotations" / f"panoptic_{split}"
        )
        data = _load_json(ann_file, "panoptic")
        self.categories: list[dict] = data["categories"]
        self.category_by_id = {c["id"]: c for c in self.categories}
        images = {im["id"]: im for im in data["images"]}
        for ann in data["annotations"]:
            im = images.get(ann["image_id"])
            if im is None:
                self.skipped["annotation_without_image"] += 1
                continue
            if not ann.get("segments_info"):
                self.skipped["no_segments"] += 1
                continue
            if not (self.image_dir / im["file_name"]).is_file():
                self.skipped["missing_image"] += 1
                continue
            if not (self.png_dir / ann["file_name"]).is_file():
                self.skipped["missing_png"] += 1
                continue
            bad = [
                s["category_id"] for s in ann["segments_info"] if s["category_id"] not in self.category_by_id
            ]
            if bad:
                raise ValueError(f"{ann_file}: image {ann['image_id']} has unknown category ids {bad}")
            self.items.append((im, ann))
        self.skipped["image_without_annotation"] += len(images) - len(
            {a["image_id"] for a in data["annotations"]} & set(images)
        )
        self.skipped = Counter({k: v for k, v in self.skipped.items() if v})
        self._report(len(images))

    @property
    def thing_ids(self) -> list[int]:
        return [c["id"] for c in self.categories if c.get("isthing", 1)]

    @property
    def stuff_ids(self) -> list[int]:
        return [c["id"] for c in self.categories if not c.get("isthing", 1)]

    def _load(self, idx: int) -> dict:
        im, ann = self.items[idx]
        image = read_image(self.image_dir / im["file_name"])
        png_path = self.png_dir / ann["file_name"]
        ids = rgb2id(read_image(png_path))  # (H, W) int64
        if ids.shape != image.shape[:2]:
            raise ValueError(
                f"panoptic PNG {png_path} is {ids.shape}, image {im['file_name']} is {image.shape[:2]}"
            )
        known = {int(s["id"]) for s in ann["segments_info"]}
        unknown = sorted(set(np.unique(ids).tolist()) - known - {0})
        if unknown:
            raise ValueError(f"panoptic PNG {png_path} holds segment ids {unknown[:10]} that are not in the "
                             f"segments_info of image {im['id']} ({sorted(known)[:10]}...)")
        segments = []
        for s in ann["segments_info"]:
            x, y, w, h = (float(v) for v in s["bbox"])
            segments.append(
                dict(
                    id=int(s["id"]),
                    category_id=int(s["category_id"]),
                    isthing=bool(self.category_by_id[s["category_id"]].get("isthing", 1)),
                    iscrowd=int(s.get("iscrowd", 0)),
                    mask=ids == s["id"],
                    box=np.array([x, y, x + w, y + h], np.float32),
                    bbox=[x, y, w, h],
                    area=int(s["area"]),
                )
            )
        return dict(
            image=image, image_id=int(im["id"]), file_name=im["file_name"], panoptic=ids, segments=segments
        )


class CocoInstances(_CocoBase):
    """COCO instances (``instances_{split}.json``) through pycocotools.

    ``__getitem__`` -> dict(``image`` (H, W, 3) uint8, ``image_id``, ``boxes`` (K, 4) float32 xyxy px,
    ``labels`` (K,) int64 category ids, ``areas`` (K,) float32, ``iscrowd`` (K,) bool, ``masks`` (K, H, W)
    bool when ``masks=True``). Images without annotations are skipped and counted unless ``skip_empty=False``.
    """

    kind = "instances"

    def __init__(
        self,
        root,
        split: str = "val2017",
        ann_file=None,
        image_dir=None,
        masks: bool = True,
        skip_empty: bool = True,
        strict: bool = False,
    ):
        from pycocotools.coco import COCO

        super().__init__(root, split, image_dir, strict)
        ann_file = (
            Path(ann_file) if ann_file is not None else self.root / "annotations" / f"instances_{split}.json"
        )
        if not ann_file.is_file():
            raise FileNotFoundError(f"instances annotation file not found: {ann_file}")
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO(str(ann_file))
        self.masks = masks
        self.categories: list[dict] = self.coco.loadCats(self.coco.getCatIds())
        for img_id in sorted(self.coco.getImgIds()):
            im = self.coco.imgs[img_id]
            if skip_empty and not self.coco.getAnnIds(imgIds=[img_id]):
                self.skipped["no_annotations"] += 1
                continue
            if not (self.image_dir / im["file_name"]).is_file():
                self.skipped["missing_image"] += 1
                continue
            self.items.append(img_id)
        self._report(len(self.coco.imgs))

    def _load(self, idx: int) -> dict:
        img_id = self.items[idx]
        im = self.coco.imgs[img_id]
        image = read_image(self.image_dir / im["file_name"])
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=[img_id]))
        boxes = np.array(
            [
                [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                for a in anns
            ],
            np.float32,
        ).reshape(-1, 4)
        out = dict(
            image=image,
            image_id=int(img_id),
            file_name=im["file_name"],
            boxes=boxes,
            labels=np.array([a["category_id"] for a in anns], np.int64),
            areas=np.array([a["area"] for a in anns], np.float32),
            iscrowd=np.array([bool(a.get("iscrowd", 0)) for a in anns], bool),
        )
        if self.masks:
            H, W = image.shape[:2]
            out["masks"] = (
                np.stack([self.coco.annToMask(a) for a in anns]).astype(bool)
                if anns
                else np.zeros((0, H, W), bool)
            )
        return out


class CocoCaptions(_CocoBase):
    """COCO captions (``captions_{split}.json``): ``__getitem__`` -> dict(``image``, ``image_id``,
    ``captions`` list[str]); ``load_image=False`` skips decoding (text-only use, e.g. a vocabulary)."""

    kind = "captions"

    def __init__(
        self,
        root,
        split: str = "val2017",
        ann_file=None,
        image_dir=None,
        load_image: bool = True,
        strict: bool = False,
    ):
        super().__init__(root, split, image_dir, strict)
        ann_file = (
            Path(ann_file) if ann_file is not None else self.root / "annotations" / f"captions_{split}.json"
        )
        data = _load_json(ann_file, "captions")
        self.load_image = load_image
        caps: dict[int, list[str]] = {}
        for a in data["annotations"]:
            caps.setdefault(a["image_id"], []).append(a["caption"])
        for im in sorted(data["images"], key=lambda d: d["id"]):
            if im["id"] not in caps:
                self.skipped["no_captions"] += 1
                continue
            if load_image and not (self.image_dir / im["file_name"]).is_file():
                self.skipped["missing_image"] += 1
                continue
            self.items.append((im, caps[im["id"]]))
        self._report(len(data["images"]))

    def _load(self, idx: int) -> dict:
        im, caps = self.items[idx]
        out = dict(image_id=int(im["id"]), file_name=im["file_name"], captions=list(caps))
        if self.load_image:
            out["image"] = read_image(self.image_dir / im["file_name"])
        return out


# ------------------------------------------------------------------------------------ dry-run data
def caption_name(category: dict) -> str:
    """A category name as a caption word (:func:`ovlib.data.synonyms.normalize_class_name`): COCO panoptic's
    ``"wall-other-merged"`` -> ``"wall"``, ``"traffic light"`` stays."""
    from ovlib.data.synonyms import normalize_class_name

    return normalize_class_name(str(category["name"]))


def synthesised_captions(names: list[str], n: int = 2) -> list[str]:
    """``n`` template captions naming ``names`` (largest segment first): caption ``k`` lists the names from
    position ``k`` on, at most three (``"a person, a dog and a grass."``). Not real language: a stand-in so
    caption-driven code runs on a panoptic-only COCO subset."""
    if not names:
        raise ValueError("synthesised_captions needs at least one name")
    out = []
    for k in range(n):
        picked = (names[k:] + names[:k])[:3]
        words = [f"a {w}" for w in picked]
        out.append((", ".join(words[:-1]) + " and " + words[-1] if len(words) > 1 else words[0]) + ".")
    return out


def dry_run_root(src, dst, split: str = "val2017") -> dict:
    """A COCO root at ``dst`` built from a panoptic-only one at ``src`` (the shared 100-image subset): the
    images and panoptic files are linked, ``instances_{split}.json`` is **derived** from the panoptic PNGs (one
    instance per thing segment, RLE mask, the segment's bbox/area/iscrowd) and ``captions_{split}.json`` is
    **synthesised** from each image's category names (:func:`synthesised_captions`). Rebuilt only when
    ``src``'s panoptic JSON changed. Returns counts (``images``, ``instances``, ``captions``, ``dst``)."""
    import hashlib
    import os

    from pycocotools import mask as mask_utils

    from ovlib.io import atomic_write_text

    src, dst = Path(src).resolve(), Path(dst)
    pan_json = src / "annotations" / f"panoptic_{split}.json"
    pan = _load_json(pan_json, "panoptic")
    stamp = dst / "annotations" / "DERIVED.json"
    digest = hashlib.sha256(pan_json.read_bytes()).hexdigest()
    if stamp.is_file():
        info = json.loads(stamp.read_text())
        if info.get("source") == digest:
            return info
    (dst / "annotations").mkdir(parents=True, exist_ok=True)
    for link, target in ((dst / split, src / split), (dst / "annotations" / f"panoptic_{split}", src / "annotations" /
                                                        f"panoptic_{split}"),
                         (dst / "annotations" / f"panoptic_{split}.json", pan_json)):
        if not target.exists():
            raise FileNotFoundError(f"dry-run source {src} lacks {target}")
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(target, link)
    ds = CocoPanoptic(dst, split, strict=True)
    cats = {c["id"]: c for c in pan["categories"]}
    instances, captions = [], []
    for i in range(len(ds)):
        item = ds[i]
        segs = sorted(item["segments"], key=lambda s: -s["area"])
        for s in segs:
            if not s["isthing"]:
                continue
            rle = mask_utils.encode(np.asfortranarray(s["mask"].astype(np.uint8)))
            instances.append(dict(id=len(instances) + 1, image_id=item["image_id"],
                                  category_id=s["category_id"], bbox=s["bbox"], area=s["area"],
                                  iscrowd=s["iscrowd"], segmentation=dict(size=[int(v) for v in rle["size"]],
                                                                          counts=rle["counts"].decode("ascii"))))
        names = list(dict.fromkeys(caption_name(cats[s["category_id"]]) for s in segs))
        for cap in synthesised_captions(names):
            captions.append(dict(id=len(captions) + 1, image_id=item["image_id"], caption=cap))
    kept = {it[0]["id"] for it in ds.items}
    images = [im for im in pan["images"] if im["id"] in kept]
    thing_cats = [{k: c[k] for k in ("id", "name", "supercategory") if k in c} for c in pan["categories"]
                  if c.get("isthing", 1)]
    atomic_write_text(json.dumps(dict(images=images, annotations=instances, categories=thing_cats)),
                      dst / "annotations" / f"instances_{split}.json")
    atomic_write_text(json.dumps(dict(images=images, annotations=captions)),
                      dst / "annotations" / f"captions_{split}.json")
    info = dict(source=digest, dst=str(dst), images=len(images), instances=len(instances), captions=len(captions))
    atomic_write_text(json.dumps(info), stamp)
    return info


def dry_run_data(params: dict) -> tuple[dict, str]:
    """For a dry run (``params["dry_run"]``): ``params`` with ``data_root`` replaced by the :func:`dry_run_root`
    derived from it (under ``cache_dir/dry-run-coco``), and a sentence for the chapter's output saying what is
    derived and synthesised. Otherwise ``(params, "")`` unchanged."""
    if not params.get("dry_run"):
        return params, ""
    src = Path(params["data_root"])
    if (src / "annotations" / "DERIVED.json").is_file():  # derived already (the notebook hands it to the trainer)
        return params, ""
    if not (src / "annotations").is_dir():
        raise FileNotFoundError(f"dry run: data_root {src} is not a COCO root (no annotations/); the dry run reads the "
                                "shared 100-image COCO panoptic subset (../shared/data/coco_panoptic_val100)")
    info = dry_run_root(src, Path(params["cache_dir"]) / "dry-run-coco")
    depth = (params.get("dry_run_settings") or {}).get("depth")
    cut = f", towers cut to their first {depth} blocks" if depth else ""
    msg = (f"**Dry run** (random weights{cut}, at most 2 training steps, small images: the numbers mean nothing): "
           f"{info['images']} real COCO val2017 images from `{src}` with their panoptic annotations; the "
           f"{info['instances']} instances are *derived* from the panoptic thing segments and the "
           f"{info['captions']} captions are *synthesised* from each image's category names "
           f"(`ovlib.data.coco.dry_run_root`), both written to `{info['dst']}`; val2017 doubles as the training split.")
    return {**params, "data_root": info["dst"]}, msg
