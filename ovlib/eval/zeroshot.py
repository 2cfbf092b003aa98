"""Global (image-level) zero-shot classification of single-object images.

The region-classification protocol (``region_cls``) crops GT things out of *scenes*, with their neighbours and the
stuff around them. This module measures the simpler task the micro CLIP's pre-training target is stated for:
**one object alone** in the picture. :func:`isolated_objects` renders every thing class of a micro world centred on
every stuff background at several rotations (``MicroWorld.class_image``); :func:`zero_shot_hits` classifies a
stack of images by the CLIP's image embedding against class text embeddings; :func:`zero_shot_summary` gives the
Top-k mean per-class accuracy with a percentile-bootstrap interval over images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ovlib.eval._common import category_index, normalize_images
from ovlib.eval.metrics import macc_from_counts, topk_hits
from ovlib.models.images import image_mean_std
from ovlib.stats import bootstrap_ci

__all__ = ["isolated_objects", "zero_shot_hits", "zero_shot_summary"]


def isolated_objects(world: Any, size: int = 64, rotations: int = 4,
                     backgrounds: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every thing class of ``world`` centred on each background (default: every stuff class) at ``rotations``
    evenly spaced angles in [0, 2π). Returns ``(images (N, size, size, 3) uint8, labels (N,) category ids,
    in_context (N,) bool)`` with ``N = things × backgrounds × rotations``, ordered class-major; ``in_context``
    marks a background among the class's ``preferred_stuff`` (where the world's context bias puts it in scenes)."""
    if rotations < 1:
        raise ValueError(f"isolated_objects: rotations must be >= 1, got {rotations}")
    bgs = list(world.stuff_ids if backgrounds is None else backgrounds)
    if not bgs:
        raise ValueError("isolated_objects: no background (the world has no stuff classes and none were given)")
    images, labels, in_context = [], [], []
    for cid in world.thing_ids:
        preferred = set(world.class_by_id(cid).preferred_stuff)
        for bg in bgs:
            for r in range(rotations):
                images.append(world.class_image(cid, size, background=bg, rot=2 * math.pi * r / rotations))
                labels.append(cid)
                in_context.append(bg in preferred)
    return np.stack(images), np.asarray(labels, dtype=np.int64), np.asarray(in_context, dtype=bool)


@torch.no_grad()
def zero_shot_hits(model: Any, images: np.ndarray | torch.Tensor, labels: Sequence[int], text: torch.Tensor,
                   class_ids: Sequence[int], ks: tuple[int, ...] = (1, 5), input_size: int | None = None,
                   batch_size: int = 256, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
                   ) -> dict[int, np.ndarray]:
    """``images (N, H, W, 3) uint8`` (or ``(N, 3, H, W)`` float in [0, 1]), ``labels`` category ids, ``text
    (C, D)`` unit-norm class embeddings in the order of ``class_ids`` -> ``{k: (N,) bool}`` Top-k hits of
    ``model.encode_image``. Images are resized (bilinear, antialiased) to ``input_size`` (default: as given)."""

    cidx = category_index(class_ids)
    missing = sorted({int(c) for c in labels} - set(cidx))
    if missing:
        raise ValueError(f"zero_shot_hits: labels {missing} are not among class_ids")
    if text.ndim != 2 or text.shape[0] != len(cidx):
        raise ValueError(f"zero_shot_hits: text must be (len(class_ids)={len(cidx)}, D), got {tuple(text.shape)}")
    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:
        x = x.permute(0, 3, 1, 2).float() / 255.0  # (N, 3, H, W) in [0, 1]
    if x.ndim != 4 or x.shape[1] != 3 or x.shape[0] != len(labels):
        raise ValueError(f"zero_shot_hits: images must be (N, H, W, 3) uint8 or (N, 3, H, W) float with "
                         f"N = len(labels) = {len(labels)}, got {tuple(x.shape)}")
    if mean is None or std is None:
        mean, std = image_mean_std(model)
    dev = text.device
    logits = []
    for i in range(0, x.shape[0], batch_size):
        b = x[i:i + batch_size].to(dev)
        if input_size is not None and tuple(b.shape[-2:]) != (input_size, input_size):
            b = F.interpolate(b, size=(input_size, input_size), mode="bilinear", antialias=True, align_corners=False)
        f = F.normalize(model.encode_image(normalize_images(b, mean, std)).float(), dim=-1)  # (b, D)
        logits.append(f @ text.float().T)  # (b, C)
    y = torch.tensor([cidx[int(c)] for c in labels], device=dev)
    return {k: v.cpu().numpy() for k, v in topk_hits(torch.cat(logits), y, ks).items()}


def zero_shot_summary(hits: dict[int, np.ndarray], labels: Sequence[int], n_boot: int = 1000, seed: int = 0
                      ) -> dict[int, tuple[float, float, float]]:
    """Top-k mean per-class accuracy (percent) with a 95 % percentile-bootstrap interval over images:
    ``{k: (point, low, high)}``."""
    lab = np.asarray(labels, dtype=np.int64)
    classes = {c: i for i, c in enumerate(sorted(set(lab.tolist())))}
    li = np.array([classes[c] for c in lab], dtype=np.int64)
    out = {}
    for k, h in hits.items():
        h = np.asarray(h, dtype=bool)
        if h.shape != lab.shape:
            raise ValueError(f"zero_shot_summary: hits[{k}] has shape {h.shape}, labels {lab.shape}")
        per = np.zeros((len(lab), 2, len(classes)))  # per image: (hit, total) one-hot on its class
        per[np.arange(len(lab)), 0, li] = h
        per[np.arange(len(lab)), 1, li] = 1.0
        out[k] = bootstrap_ci(per, lambda s: macc_from_counts(s[0], s[1]), n_boot=n_boot, seed=seed)
    return out
