"""Image normalisation of a model: the mean / std it expects and their application to a batch."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import torch
from torch import nn

from ovlib.models.clip import OPENAI_MEAN, OPENAI_STD

__all__ = ["image_mean_std", "model_device", "normalize_images", "to_model"]


def image_mean_std(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation a CLIP/VFM expects (open_clip sets ``visual.image_mean``; timm ``pretrained_cfg``);
    default: OpenAI's."""
    vis = getattr(model, "visual", model)
    mean = getattr(vis, "image_mean", None)
    std = getattr(vis, "image_std", None)
    if mean is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean, std = cfg.get("mean"), cfg.get("std")
    return tuple(mean or OPENAI_MEAN), tuple(std or OPENAI_STD)


def normalize_images(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(B, 3, H, W)`` in [0, 1] -> normalised with per-channel ``mean`` / ``std``."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (or buffer); CPU for a model with neither."""
    t = next(chain(model.parameters(), model.buffers()), None)
    return torch.device("cpu") if t is None else t.device


def to_model(images: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """``images`` on ``model``'s device: every dense function of the evaluation (``images -> dense map``) takes
    its input on any device -- the evaluation loops build images on the CPU -- and computes where the model is."""
    return images.to(model_device(model), non_blocking=True)
