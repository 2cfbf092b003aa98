"""Optimiser pieces shared by micro pre-training and distillation: AdamW parameter groups and warmup + cosine."""

from __future__ import annotations

import math
from typing import Any, Sequence

from torch import nn

#: CLIPSelf / open_clip: no weight decay for ``ndim < 2`` parameters or names containing these
#: (``wusize/CLIPSelf:src/training/main.py`` ``exclude``; ``mlfoundations/open_clip`` ``open_clip_train/main.py``).
CLIPSELF_NO_DECAY = ("bn", "ln", "bias", "logit_scale")


def param_groups(model: nn.Module, weight_decay: float,
                 no_decay: Sequence[str] = CLIPSELF_NO_DECAY) -> list[dict[str, Any]]:
    """``[decay group, no-decay group]`` over the parameters that require grad: a parameter skips weight decay
    when ``ndim < 2`` or its lower-cased name contains one of ``no_decay``."""
    decay, skip = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        low = name.lower()
        (skip if p.ndim < 2 or any(s in low for s in no_decay) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": skip, "weight_decay": 0.0}]


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear warmup ``(step + 1) / warmup`` for ``step < warmup``, then cosine from 1 to 0 at
    ``total`` (and 0 after it)."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * t))
