"""Zero-shot region classification on COCO-format panoptic data (CLIPSelf / DeCLIP / SynCLIP protocol).

Reference: ``wusize/CLIPSelf:src/training/zero_shot.py`` and ``src/training/data.py`` ``COCOPanopticDataset``
(conventions only; see ``reference/implementations.md`` section 1.7). For every panoptic segment of an image:

* **thing**: RoI box = the GT box; crop = the box expanded ``thing_expand`` (1.5) times about its centre,
  clipped to the image; **stuff**: box = crop = the tight box of the mask (no expansion);
* a segment whose box area is below ``min_size**2`` or above ``max_size**2`` (pixels of the original image)
  is skipped and counted (CLIPSelf: 8 and 1024 on COCO; the micro world scales ``min_size`` with its image size);
* predictors, each L2-normalised and dotted with unit class embeddings (no temperature):
  ``rois`` (RoIAlign 1x1 of the dense map of the student image), ``maskpool`` (average of the dense map over
  the segment mask at the feature grid), ``crops`` (``encode_image`` of the teacher crop: longest side
  resized, centred pad);
* **pooling convention** (``RegionClsConfig.pooling``, :data:`POOLINGS`): ``"normalize-then-pool"`` L2-normalises
  every dense token before RoIAlign / mask pooling and the pooled row again (CLIPSelf,
  ``wusize/CLIPSelf:src/open_clip/eva_clip/eva_vit_model.py`` ``encode_dense(normalize=True)`` then
  ``extract_roi_features`` / ``mask_pool``); ``"pool-then-normalize"`` pools the unnormalised projected tokens
  and normalises the pooled row only (DeCLIP / SynCLIP, ``xiaomoguhz/DeCLIP`` ``zero_shot.py`` +
  ``encode_pseudo_boxes(normalize=True)``, reference §3.5). Tokens of very different norms pool differently;
  a dense extractor that already returns unit tokens makes the two equal, so extractors hand over raw tokens;
* **masks at the feature grid** (``RegionClsConfig.mask_grid``, :data:`MASK_GRIDS`): ``"resize"`` (default,
  CLIPSelf's): the binary mask as a float image, longest side resized to the grid with bicubic interpolation
  (``align_corners=False``; ``mask_antialias`` off as in torchvision < 0.17, CLIPSelf's environment, on as in
  torchvision >= 0.17, SynCLIP's stated torchvision 0.22), padded bottom/right with 0, thresholded ``> 0``
  (``wusize/CLIPSelf:src/training/data.py`` ``COCOPanopticDataset``: ``ResizeLongest(det_size //
  downsample_factor, fill=0)`` whose default interpolation is bicubic, then ``> 0.0``);
  ``"coverage"`` (ours): the fraction of each cell covered by the segment (area interpolation, in the padded
  student geometry), ``>= mask_threshold`` (0.5), so a segment must cover half a cell to claim it. Under either,
  a mask that vanishes at the grid falls back to its most covered cell (counted in
  ``RegionFeatures.mask_fallbacks``; CLIPSelf would pool an empty mask to a zero feature).

Every :class:`RegionFeatures` records these choices and the dense spec of each extractor in ``.protocol``.

Metrics (:func:`summarize`): Top-1 / Top-5 **mean per-class accuracy** (the mean over the classes present of
the per-class accuracy), things and stuff separately, with percentile-bootstrap intervals over images.
Features are extracted once (:func:`extract_region_features`) and scored against any number of class-embedding
matrices (:func:`score_regions`), e.g. main names vs synonyms.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ovlib.data.regions import crop_regions
from ovlib.eval._common import category_index, dataset_indices, dense_fn_for_clip, normalize_images, student_image
from ovlib.eval.metrics import macc_from_counts, per_class_counts, topk_hits
from ovlib.models import mask_pool, roi_features
from ovlib.models.images import image_mean_std
from ovlib.stats import bootstrap_ci
from ovlib.train.pretrain import _quiet

__all__ = ["RegionClsConfig", "RegionFeatures", "region_masks_at_grid", "extract_region_features",
           "score_regions", "summarize", "pool_regions", "PREDICTORS", "POOLINGS", "MASK_GRIDS"]

PREDICTORS = ("rois", "maskpool", "crops")
#: Region pooling conventions: CLIPSelf's, then DeCLIP / SynCLIP's (module docstring).
POOLINGS = ("normalize-then-pool", "pool-then-normalize")
#: How a segment mask becomes a feature-grid mask: CLIPSelf's resize ``> 0``, then our coverage threshold.
MASK_GRIDS = ("resize", "coverage")


@dataclass(frozen=True)
class RegionClsConfig:
    image_size: int = 160          # student image: longest side, bottom/right pad
    crop_size: int = 64            # teacher crop (the CLIP's native input size)
    thing_expand: float = 1.5
    min_size: float = 2.0          # px of the original image (CLIPSelf on COCO: 8)
    max_size: float = 1024.0
    max_segments: int = 100
    mask_threshold: float = 0.5    # mask_grid "coverage": fraction of a feature cell covered by the mask
    batch_size: int = 16           # student images per forward
    crop_batch: int = 256          # crops per forward
    pooling: str = "normalize-then-pool"  # POOLINGS: CLIPSelf's; "pool-then-normalize" = DeCLIP / SynCLIP's
    mask_grid: str = "resize"      # MASK_GRIDS: CLIPSelf's bicubic resize > 0; "coverage" = >= mask_threshold
    mask_antialias: bool = False   # mask_grid "resize": torchvision >= 0.17's antialiased resize (CLIPSelf: off)

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"RegionClsConfig.pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.mask_grid not in MASK_GRIDS:
            raise ValueError(f"RegionClsConfig.mask_grid must be one of {MASK_GRIDS}, got {self.mask_grid!r}")
        if not 0.0 <= self.mask_threshold <= 1.0:
            raise ValueError(f"RegionClsConfig.mask_threshold must be in [0, 1], got {self.mask_threshold}")

    def protocol(self) -> dict[str, Any]:
        """The conventions a result depends on (recorded with every result)."""
        out: dict[str, Any] = {"pooling": self.pooling, "mask_grid": self.mask_grid,
                               "image_size": self.image_size, "crop_size": self.crop_size,
                               "thing_expand": self.thing_expand}
        if self.mask_grid == "resize":
            out["mask_antialias"] = self.mask_antialias
        else:
            out["mask_threshold"] = self.mask_threshold
        return out


@dataclass
class RegionFeatures:
    """Region features of a dataset. ``features[key]`` is ``(R, D)`` unit-norm, key ``"rois/<mode>"``,
    ``"maskpool/<mode>"`` or ``"crops"``; ``category_id``, ``isthing``, ``image`` (position of the image in
    the evaluated list) are ``(R,)``. ``protocol``: :meth:`RegionClsConfig.protocol` plus ``"dense"``, the
    dense spec of every extractor (``ovlib.models.dense_spec``; ``None`` for an extractor without one)."""

    category_id: torch.Tensor
    isthing: torch.Tensor
    image: torch.Tensor
    n_images: int
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped_size: int = 0
    mask_fallbacks: int = 0
    protocol: dict[str, Any] = field(default_factory=dict)

    def subset(self, keep: torch.Tensor) -> RegionFeatures:
        """The regions where ``keep (R,) bool`` is true (every feature key; counters and ``n_images`` kept,
        so per-image bootstrap still runs over the same images)."""
        keep = torch.as_tensor(keep, dtype=torch.bool)
        if keep.shape != self.category_id.shape:
            raise ValueError(f"keep must be a (R,) = {tuple(self.category_id.shape)} bool mask, got "
                             f"{tuple(keep.shape)}")
        return RegionFeatures(self.category_id[keep], self.isthing[keep], self.image[keep], self.n_images,
                              {k: v[keep] for k, v in self.features.items()}, self.skipped_size,
                              self.mask_fallbacks, dict(self.protocol))


def _coverage(masks: torch.Tensor, scale: float, image_size: int, grid: tuple[int, int]) -> torch.Tensor:
    """``(K, H, W)`` masks -> ``(K, h, w)`` fraction of each grid cell of the padded student tensor covered."""
    k, H, W = masks.shape
    nh, nw = max(1, round(H * scale)), max(1, round(W * scale))
    canvas = torch.zeros(k, 1, image_size, image_size)
    m = F.interpolate(masks[:, None].float(), size=(nh, nw), mode="area") if k else masks[:, None].float()
    canvas[:, :, : min(nh, image_size), : min(nw, image_size)] = m[:, :, :image_size, :image_size]
    return F.adaptive_avg_pool2d(canvas, grid)[:, 0]  # (K, h, w) in [0, 1]


def region_masks_at_grid(masks: torch.Tensor, scale: float, image_size: int, grid: tuple[int, int],
                         threshold: float = 0.5, method: str = "coverage",
                         antialias: bool = False) -> tuple[torch.Tensor, int]:
    """``masks (K, H, W)`` bool of the original image -> ``((K, h, w) bool, n_fallbacks)`` on the feature grid
    of the padded ``image_size`` student tensor (original pixel ``p`` at ``p * scale``).

    ``method="coverage"``: per-cell coverage by area interpolation, ``>= threshold``. ``method="resize"``
    (CLIPSelf): the mask resized straight to the grid (original size times ``scale * grid / image_size``,
    rounded; bicubic, ``align_corners=False``, ``antialias`` as given), padded bottom/right, ``> 0``
    (``threshold`` unused). An empty result falls back to the most covered cell.
    """
    if method not in MASK_GRIDS:
        raise ValueError(f"mask grid method must be one of {MASK_GRIDS}, got {method!r}")
    k, H, W = masks.shape
    gh, gw = grid
    cov = None
    if method == "resize":
        nh = max(1, round(H * scale * gh / image_size))
        nw = max(1, round(W * scale * gw / image_size))
        val = torch.zeros(k, gh, gw)
        if k:
            m = F.interpolate(masks[:, None].float(), size=(nh, nw), mode="bicubic", align_corners=False,
                              antialias=antialias)[:, 0]  # (K, nh, nw)
            val[:, : min(nh, gh), : min(nw, gw)] = m[:, :gh, :gw]
        out = val > 0
    else:
        cov = _coverage(masks, scale, image_size, grid)
        out = cov >= threshold if threshold > 0 else cov > 0
    empty = ~out.flatten(1).any(1)
    if empty.any():
        if cov is None:
            cov = _coverage(masks, scale, image_size, grid)
        for i in empty.nonzero().flatten().tolist():
            out[i].view(-1)[int(cov[i].flatten().argmax())] = True
    return out, int(empty.sum())


def pool_regions(dense: torch.Tensor, pooling: str, image_size: tuple[int, int],
                 boxes: Sequence[torch.Tensor] | None = None, masks: Sequence[torch.Tensor] | None = None,
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Unit region features of ``dense (B, C, h, w)`` under a pooling convention (:data:`POOLINGS`).

    ``boxes``: per image ``(K_b, 4)`` xyxy pixels of the ``image_size = (H, W)`` tensor -> RoIAlign 1x1
    (:func:`ovlib.models.roi_features`); ``masks``: per image ``(K_b, h, w)`` at the grid -> mask average
    (:func:`ovlib.models.mask_pool`). ``"normalize-then-pool"`` L2-normalises every token first (CLIPSelf),
    ``"pool-then-normalize"`` pools the raw tokens (DeCLIP / SynCLIP); both normalise the pooled rows.
    Returns ``(rois (R, C) or None, maskpool (R', C) or None)``."""

    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if pooling == "normalize-then-pool":
        dense = F.normalize(dense, dim=1)  # unit tokens are pooled
    rois = None if boxes is None else F.normalize(roi_features(dense, boxes, image_size), dim=-1)
    pooled = None if masks is None else F.normalize(mask_pool(dense, masks), dim=-1)
    return rois, pooled


def _expand(box: np.ndarray, s: float, W: int, H: int) -> np.ndarray:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    w, h = (box[2] - box[0]) * s, (box[3] - box[1]) * s
    return np.array([max(0.0, cx - w / 2), max(0.0, cy - h / 2), min(float(W), cx + w / 2),
                     min(float(H), cy + h / 2)])


@torch.no_grad()
def extract_region_features(model: Any, dataset: Sequence, cfg: RegionClsConfig = RegionClsConfig(),
                            modes: Sequence[str] = ("vanilla",), predictors: Sequence[str] = PREDICTORS,
                            n_images: int = 0, device: str | torch.device = "cpu",
                            dense_fns: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
                            progress: bool = True) -> RegionFeatures:
    """Extract region features of the first ``n_images`` images (0 = all) of a ``CocoPanoptic``-like dataset.

    ``modes`` are ``dense_features`` modes or preset names (``ovlib.models.PRESETS``, e.g. ``"sclip"``) of
    ``model`` (CLIP); ``dense_fns`` may add named dense extractors (``images in [0, 1] -> (B, C, h, w)``), e.g.
    a distilled student, keyed by their name. Extractors should return the **unnormalised** projected tokens
    (``dense_fn_for_clip(..., normalize=False)``): the region pooling convention ``cfg.pooling`` decides where
    the L2 normalisation happens (a unit-norm extractor makes both conventions the normalise-first one).
    """

    bad = [p for p in predictors if p not in PREDICTORS]
    if bad:
        raise ValueError(f"unknown predictor(s) {bad}; choose from {PREDICTORS}")
    device = torch.device(device)
    mean, std = image_mean_std(model)
    fns: dict[str, Callable] = {}
    if "rois" in predictors or "maskpool" in predictors:
        fns = {m: dense_fn_for_clip(model, m, normalize=False) for m in modes}
        fns.update(dense_fns or {})
    protocol = {**cfg.protocol(), "dense": {k: getattr(f, "dense_spec", None) for k, f in fns.items()}}
    idx = dataset_indices(dataset, n_images)
    cat, thing, img_of = [], [], []
    feats: dict[str, list[torch.Tensor]] = {}
    crops_buf: list[torch.Tensor] = []  # (3, crop, crop) teacher crops waiting for a forward
    skipped = fallbacks = 0

    def flush_crops():
        if crops_buf:
            x = normalize_images(torch.stack(crops_buf).to(device), mean, std)
            f = F.normalize(model.encode_image(x).float(), dim=-1).cpu()
            feats.setdefault("crops", []).append(f)
            crops_buf.clear()

    bar = tqdm(total=len(idx), desc="region features", **_quiet(progress))
    for s in range(0, len(idx), cfg.batch_size):
        items = [dataset[i] for i in idx[s:s + cfg.batch_size]]
        imgs, boxes, masks = [], [], []
        for j, it in enumerate(items):
            image = np.asarray(it["image"])
            H, W = image.shape[:2]
            t, scale = student_image(image, cfg.image_size)
            imgs.append(t)
            bx, mk, cbx = [], [], []
            for seg in it["segments"][: cfg.max_segments]:
                m = torch.as_tensor(np.asarray(seg["mask"]), dtype=torch.bool)
                if m.shape != (H, W):
                    raise ValueError(f"image {it.get('image_id')}: segment mask shape {tuple(m.shape)} != image "
                                     f"{(H, W)}")
                if seg["isthing"]:
                    box = np.asarray(seg["box"], dtype=np.float64)
                else:
                    ys, xs = np.nonzero(m.numpy())
                    if xs.size == 0:
                        skipped += 1
                        continue
                    box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)
                area = (box[2] - box[0]) * (box[3] - box[1])
                if area < cfg.min_size ** 2 or area > cfg.max_size ** 2 or not m.any():
                    skipped += 1
                    continue
                cat.append(int(seg["category_id"]))
                thing.append(bool(seg["isthing"]))
                img_of.append(s + j)
                bx.append(box * scale)
                mk.append(m)
                cbx.append(_expand(box, cfg.thing_expand, W, H) if seg["isthing"] else box)
            if "crops" in predictors and cbx:
                crops_buf.extend(crop_regions(image, torch.tensor(np.array(cbx), dtype=torch.float32),
                                              cfg.crop_size))  # CenterPadCrop per box
                if len(crops_buf) >= cfg.crop_batch:
                    flush_crops()
            boxes.append(torch.tensor(np.array(bx), dtype=torch.float32).reshape(-1, 4))
            masks.append((torch.stack(mk) if mk else torch.zeros(0, H, W, dtype=torch.bool), scale))
        x = torch.stack(imgs).to(device)  # (B, 3, S, S)
        for name, fn in fns.items():
            dense = fn(x).float()  # (B, C, h, w) projected tokens
            grid = tuple(dense.shape[-2:])
            gm = None
            if "maskpool" in predictors:
                gm = []
                for m, scale in masks:
                    g, nf = region_masks_at_grid(m, scale, cfg.image_size, grid, cfg.mask_threshold,
                                                 cfg.mask_grid, cfg.mask_antialias)
                    gm.append(g.to(device))
                    if name == next(iter(fns)):
                        fallbacks += nf
            r, p = pool_regions(dense, cfg.pooling, (cfg.image_size, cfg.image_size),
                                [b.to(device) for b in boxes] if "rois" in predictors else None, gm)
            if r is not None:
                feats.setdefault(f"rois/{name}", []).append(r.cpu())
            if p is not None:
                feats.setdefault(f"maskpool/{name}", []).append(p.cpu())
        bar.update(len(items))
    flush_crops()
    bar.close()
    out = RegionFeatures(category_id=torch.tensor(cat, dtype=torch.long), isthing=torch.tensor(thing, dtype=torch.bool),
                         image=torch.tensor(img_of, dtype=torch.long), n_images=len(idx), skipped_size=skipped,
                         mask_fallbacks=fallbacks, protocol=protocol)
    for k, v in feats.items():
        out.features[k] = torch.cat(v)
        if out.features[k].shape[0] != len(cat):
            raise RuntimeError(f"region features {k}: {out.features[k].shape[0]} rows for {len(cat)} regions")
    return out


def score_regions(rf: RegionFeatures, text: torch.Tensor, class_ids: Sequence[int],
                  ks: tuple[int, ...] = (1, 5)) -> dict[str, dict[str, np.ndarray]]:
    """Per-image hit counts of every feature key against ``text (C, D)`` (rows ordered as ``class_ids``).

    Returns ``{key: {"thing"|"stuff": (N_images, 1 + len(ks), C) counts}}`` where ``[:, 0]`` is the number
    of regions per class and ``[:, 1 + i]`` the Top-``ks[i]`` hits, ready for :func:`bootstrap_ci`."""
    cidx = category_index(class_ids)
    missing = sorted({int(c) for c in rf.category_id.tolist()} - set(cidx))
    if missing:
        raise ValueError(f"regions have category ids {missing} that are not among the class embeddings")
    labels = torch.tensor([cidx[int(c)] for c in rf.category_id.tolist()], dtype=torch.long)
    C = len(class_ids)
    text = F.normalize(text.float(), dim=-1).cpu()
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, f in rf.features.items():
        hits = topk_hits(f @ text.T, labels, ks)  # {k: (R,)}
        res = {}
        for part, sel in (("thing", rf.isthing), ("stuff", ~rf.isthing)):
            arr = np.zeros((rf.n_images, 1 + len(ks), C), dtype=np.int64)
            for n in range(rf.n_images):
                m = (sel & (rf.image == n)).numpy()
                lab = labels.numpy()[m]
                arr[n, 0] = np.bincount(lab, minlength=C)
                for i, k in enumerate(ks):
                    arr[n, 1 + i] = per_class_counts(hits[k].numpy()[m], lab, C)[0]
            res[part] = arr
        out[key] = res
    return out


def summarize(scores: dict[str, dict[str, np.ndarray]], ks: tuple[int, ...] = (1, 5), n_boot: int = 1000,
              seed: int = 0) -> dict[str, dict[str, tuple[float, float, float]]]:
    """``{key: {"thing.macc1": (point, lo, hi), ...}}`` mean per-class accuracy in percent with 95 %
    bootstrap intervals over images (``nan`` where a part has no region)."""
    out: dict[str, dict[str, tuple[float, float, float]]] = {}
    for key, parts in scores.items():
        out[key] = {}
        for part, arr in parts.items():
            for i, k in enumerate(ks):
                def stat(s, i=i):
                    return macc_from_counts(s[1 + i], s[0])

                out[key][f"{part}.macc{k}"] = bootstrap_ci(arr, stat, n_boot=n_boot, seed=seed)
    return out
