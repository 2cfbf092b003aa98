"""Optimiser pieces shared by micro pre-training and distillation: AdamW parameter groups and warmup + cosine."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

#: CLIPSelf / open_clip: no weight decay for ``ndim < 2`` parameters or names containing these
#: (``wusize/CLIPSelf:src/training/main.py`` ``exclude``; ``mlfoundations/open_clip`` ``open_clip_train/main.py``).
CLIPSELF_NO_DECAY = ("bn", "ln", "bias", "logit_scale")


def param_groups(model: nn.Module, weight_decay: float, no_decay: Sequence[str] = CLIPSELF_NO_DECAY,
                 lr_mult: Mapping[str, float] | None = None, base_lr: float | None = None) -> list[dict[str, Any]]:
    """``[decay group, no-decay group, ...]`` over the parameters that require grad: a parameter skips weight decay
    when ``ndim < 2`` or its lower-cased name contains one of ``no_decay``.

    ``lr_mult`` maps a module prefix (``"constructor.hsg"``) to a learning-rate multiplier for the parameters
    under it; they go to extra groups (after the two default ones, which are always present, possibly empty) with
    ``lr = base_lr * mult`` (``base_lr`` is then required) and the multiplier kept as ``lr_mult``. A prefix that
    matches no trainable parameter is an error (a typo would silently train at the base rate)."""
    lr_mult = dict(lr_mult or {})
    if lr_mult and base_lr is None:
        raise ValueError("param_groups: lr_mult needs base_lr")
    groups: dict[tuple[bool, float], list] = {(True, 1.0): [], (False, 1.0): []}
    used = set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        low = name.lower()
        decay = not (p.ndim < 2 or any(s in low for s in no_decay))
        mult = 1.0
        for prefix, m in lr_mult.items():
            if name == prefix or name.startswith(prefix + "."):
                mult = float(m)
                used.add(prefix)
                break
        groups.setdefault((decay, mult), []).append(p)
    unused = sorted(set(lr_mult) - used)
    if unused:
        raise ValueError(f"param_groups: lr_mult prefix(es) {unused} match no trainable parameter")
    out = []
    for (decay, mult), params in groups.items():
        g: dict[str, Any] = {"params": params, "weight_decay": weight_decay if decay else 0.0}
        if mult != 1.0:
            g.update(lr=base_lr * mult, lr_mult=mult)
        out.append(g)
    return out


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear warmup ``(step + 1) / warmup`` for ``step < warmup``, then cosine from 1 to 0 at
    ``total`` (and 0 after it)."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * t))
