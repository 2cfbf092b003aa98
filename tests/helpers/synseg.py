"""A SynSeg method on a copy of the ``clip_and_cats`` fixture's CLIP (tests of the library and of chapter 05)."""

from __future__ import annotations

import copy

import torch

from ovlib.methods.synseg import SynSeg


def synseg_model(clip_and_cats, **opts) -> SynSeg:
    clip, tok, cats = clip_and_cats
    torch.manual_seed(0)
    return SynSeg(copy.deepcopy(clip), {}, tokenizer=tok, categories=cats, **opts)
