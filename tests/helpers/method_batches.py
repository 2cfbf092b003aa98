"""A fixed synthetic batch in the trainer's format and the frozen micro networks, shared by method tests."""

from __future__ import annotations

import torch


def synthetic_method_batch(B: int = 2, size: int = 32, K: int = 2, seed: int = 0, vfm_size: int | None = None,
                           labels=(1, 2, 3, 1), image_labels=((1, 2), (3,))) -> dict:
    """``collate_regions``-shaped batch: images (B,3,S,S), K boxes per image, 64-px crops, labels, VFM images.

    ``labels`` fill the first region labels (1 after them); ``image_labels`` the first images' label sets
    (``(1,)`` after them)."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(B, K, 2, generator=g) * size * 0.5
    wh = 6 + torch.rand(B, K, 2, generator=g) * size * 0.4
    R = B * K
    lab = list(labels)[:R] + [1] * max(0, R - len(labels))
    img_lab = [torch.tensor(list(x)) for x in image_labels][:B] + [torch.tensor([1])] * max(0, B - len(image_labels))
    return {"images": torch.randn(B, 3, size, size, generator=g),
            "boxes": [torch.cat([xy[b], xy[b] + wh[b]], 1) for b in range(B)],
            "crops": torch.randn(R, 3, 64, 64, generator=g),
            "labels": torch.tensor(lab),
            "image_labels": img_lab,
            "vfm_images": torch.randn(B, 3, vfm_size or size, vfm_size or size, generator=g)}


def micro_nets():
    """(student, teacher, vfm, tokenizer): random micro CLIP (twice, same seed) and micro VFM."""
    from ovlib.models import load_clip, load_vfm

    student, tok, _ = load_clip("micro-clip", seed=0)
    teacher, _, _ = load_clip("micro-clip", seed=0)
    return student, teacher, load_vfm("micro-vfm", seed=1), tok
