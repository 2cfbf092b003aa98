"""Helpers shared by the evaluation protocols: dataset iteration, student images, normalisation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ovlib.data.regions import ResizeLongestPad
from ovlib.models import dense_features, dense_spec, vfm_patch_features
from ovlib.models.images import image_mean_std, normalize_images, to_model

__all__ = ["dataset_indices", "student_image", "normalize_images", "category_index", "dense_fn_for_clip",
           "dense_fn_for_vfm", "dense_fn_for_proxyclip"]


def dataset_indices(dataset: Sequence, n_images: int) -> list[int]:
    """The first ``n_images`` indices of ``dataset`` (all when ``n_images <= 0``); deterministic order."""
    n = len(dataset)
    return list(range(n if n_images <= 0 else min(n, n_images)))


def student_image(image: np.ndarray, size: int) -> tuple[torch.Tensor, float]:
    """``image (H, W, 3) uint8`` -> ``((3, size, size) float in [0, 1], scale)``: the longest side resized to
    ``size`` and the rest padded bottom/right with 0 (``ovlib.data.regions.ResizeLongestPad``, CLIPSelf's
    ``ResizeLongest``). Pixel ``p`` of the original lands at ``p * scale``."""

    t, scale = ResizeLongestPad(size)(image)  # (3, size, size) float in [0, 1]
    return t.contiguous(), float(scale)


def category_index(class_ids: Sequence[int]) -> dict[int, int]:
    """Category id -> row of the class-embedding matrix; duplicate ids are an error."""
    idx = {int(c): i for i, c in enumerate(class_ids)}
    if len(idx) != len(class_ids):
        raise ValueError(f"class_ids has duplicates: {list(class_ids)}")
    return idx


def dense_fn_for_clip(model: Any, mode: str, mean=None, std=None, normalize: bool = True,
                      **switches) -> Callable[[torch.Tensor], torch.Tensor]:
    """``images (B, 3, H, W) in [0, 1] -> (B, C, h, w)`` dense CLIP features of ``mode``: a dense mode or a
    preset name (``ovlib.models.PRESETS``, e.g. ``"sclip"``; ``switches`` override its entries), unit-norm
    tokens unless ``normalize=False``. The function carries ``.dense_spec``, the complete keyword set
    (``ovlib.models.dense_spec``) that results record."""
    if mean is None or std is None:
        mean, std = image_mean_std(model)
    spec = dense_spec(mode, **switches)

    def fn(images: torch.Tensor) -> torch.Tensor:
        return dense_features(model, normalize_images(to_model(images, model), mean, std), normalize=normalize,
                              **spec)

    fn.dense_spec = spec
    return fn


def dense_fn_for_vfm(vfm: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """``images (B, 3, H, W) in [0, 1] -> (B, C, h, w)`` unit-norm VFM patch features on the VFM's own grid."""
    import torch.nn.functional as F

    mean, std = image_mean_std(vfm)
    p = vfm.patch_embed.patch_size
    p = p[0] if isinstance(p, (tuple, list)) else int(p)

    def fn(images: torch.Tensor) -> torch.Tensor:
        grid = (images.shape[-2] // p, images.shape[-1] // p)
        return F.normalize(vfm_patch_features(vfm, normalize_images(to_model(images, vfm), mean, std), grid), dim=1)

    return fn


def dense_fn_for_proxyclip(model: Any, vfm: Any, beta: float = 1.2, gamma: float = 3.0
                           ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``images (B, 3, H, W) in [0, 1] -> (B, C, h', w')`` unit-norm ProxyCLIP features (dense mode ``proxy``):
    the VFM sees the same pixels with its own normalisation (ProxyCLIP's ``norm(unnorm(img))``) on its own grid
    ``(H // p, W // p)``; CLIP's values are aggregated with the VFM's patch affinities on that grid
    (:func:`ovlib.models.dense.proxy_attention`)."""
    mean, std = image_mean_std(model)
    vmean, vstd = image_mean_std(vfm)
    p = vfm.patch_embed.patch_size
    p = p[0] if isinstance(p, (tuple, list)) else int(p)

    def fn(images: torch.Tensor) -> torch.Tensor:
        grid = (images.shape[-2] // p, images.shape[-1] // p)
        images = to_model(images, model)
        feats = vfm_patch_features(vfm, normalize_images(to_model(images, vfm), vmean, vstd), grid)  # (B, C', h', w')
        return dense_features(model, normalize_images(images, mean, std), "proxy", normalize=True,
                              vfm_features=feats, beta=beta, gamma=gamma)

    return fn
