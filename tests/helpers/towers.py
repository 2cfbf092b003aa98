"""Randomly initialised image towers for the DenseRC tests: perturbed so every bias / LayerNorm is non-trivial."""

from __future__ import annotations

import functools

import open_clip
import torch
from torch import nn


def perturb(model: nn.Module, seed: int, std: float = 0.05) -> nn.Module:
    """Add seeded Gaussian noise of ``std`` to every parameter; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model.eval()


def vision_tower(name: str, size: int, seed: int = 0) -> nn.Module:
    """A random open_clip image tower of config ``name`` at ``size`` px (no text tower: faster to build)."""
    from open_clip.model import _build_vision_tower

    cfg = open_clip.get_model_config(name)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        v = _build_vision_tower(cfg["embed_dim"], {**cfg["vision_cfg"], "image_size": size})
    if hasattr(v, "trunk"):  # timm trunks are built at their default size: resize (as create_model(force_image_size))
        v.set_input_size(size)
    return v.eval()


@functools.lru_cache(maxsize=4)
def shared_tower(name: str, size: int, perturb_seed: int, std: float = 0.02) -> nn.Module:
    """:func:`vision_tower` then :func:`perturb`, built once per test session (callers must not modify it)."""
    return perturb(vision_tower(name, size), perturb_seed, std)
