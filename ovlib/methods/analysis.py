"""Analyses of R-SC-CLIPSelf (Qiu et al., ICLR'25): context aggregation (Eq. 7), coupling ratio (Eq. 15,
App. C.3), mask-pooled t-SNE. Pure functions over a callable ``encode(images (B, 3, H, W)) -> (B, C, h, w)``
dense features, so they apply to any model, dense mode or Refiner (:meth:`Refiner.dense`).
Affinity maps: :func:`ovlib.eval.affinity.affinity_map` (re-exported here).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ovlib.eval.affinity import affinity_map
from ovlib.models import mask_pool

__all__ = ["affinity_map", "context_aggregation", "coupling_ratio", "embed_positions", "mask_pooled_tsne"]

Encode = Callable[[torch.Tensor], torch.Tensor]


def embed_positions(n: int, target_hw: tuple[int, int], canvas_hw: tuple[int, int], patch: int,
                    generator: torch.Generator) -> torch.Tensor:
    """``n`` random top-left corners ``(n, 2)`` (y, x) in px, multiples of ``patch``, where a ``target_hw``
    image fits inside a ``canvas_hw`` context (so the target's tokens coincide with the context's grid)."""
    th, tw = target_hw
    H, W = canvas_hw
    if th > H or tw > W or th % patch or tw % patch or H % patch or W % patch:
        raise ValueError(f"target {target_hw} must fit in the context {canvas_hw} and all sides be multiples of "
                         f"the patch size {patch}")
    ys = torch.randint(0, (H - th) // patch + 1, (n,), generator=generator) * patch
    xs = torch.randint(0, (W - tw) // patch + 1, (n,), generator=generator) * patch
    return torch.stack([ys, xs], dim=1)


@torch.no_grad()
def context_aggregation(encode: Encode, target: torch.Tensor, contexts: torch.Tensor, patch: int,
                        generator: torch.Generator, batch_size: int = 16,
                        positions: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 7: ``Z_bar = 1/N sum_i Z_{X_t | X_i}``, returned for every prefix ``N = 1..N_max`` (the N sweep).

    ``target (3, th, tw)`` is pasted into each context ``contexts (N, 3, H, W)`` at a random patch-aligned
    position (or ``positions (N, 2)`` y, x px); the sub-map of the target's tokens is cut from
    ``encode(composite)`` and the sub-maps are averaged cumulatively.

    Returns ``(N, C, th/patch, tw/patch)``: row ``n-1`` is the aggregate over the first ``n`` contexts.
    """
    if target.ndim != 3 or contexts.ndim != 4 or contexts.shape[1] != target.shape[0]:
        raise ValueError(f"target must be (3, th, tw) and contexts (N, 3, H, W); got {tuple(target.shape)}, "
                         f"{tuple(contexts.shape)}")
    N, _, H, W = contexts.shape
    th, tw = target.shape[-2:]
    pos = positions if positions is not None else embed_positions(N, (th, tw), (H, W), patch, generator)
    sub = []
    for s in range(0, N, batch_size):
        imgs = contexts[s:s + batch_size].clone()
        for j in range(imgs.shape[0]):
            y, x = (int(v) for v in pos[s + j])
            imgs[j, :, y:y + th, x:x + tw] = target
        z = encode(imgs)  # (b, C, h, w)
        if z.shape[-2:] != (H // patch, W // patch):
            raise ValueError(f"encode returned a {tuple(z.shape[-2:])} grid for {H}x{W} images; expected patch {patch}")
        for j in range(imgs.shape[0]):
            y, x = (int(v) // patch for v in pos[s + j])
            sub.append(z[j, :, y:y + th // patch, x:x + tw // patch].float())
    sub = torch.stack(sub)  # (N, C, th/p, tw/p)
    counts = torch.arange(1, N + 1, dtype=sub.dtype).view(N, 1, 1, 1)
    return sub.cumsum(0) / counts


@torch.no_grad()
def coupling_ratio(encode: Encode, images_a: torch.Tensor, images_b: torch.Tensor,
                   eps: float = 1e-6) -> dict[str, float]:
    """Coupling ratio (Eq. 15, App. C.3) of pairs of independent images.

    Definition used (exactly): ``X_AB = [X_A | X_B]`` concatenated side by side (width), encoded once; ``X_A``
    and ``X_B`` encoded alone. Tokens are L2-normalised. For every token ``i`` of ``Z_{A|AB}`` (the left half of
    ``encode(X_AB)``), ``j = argmax_k cos(Z_{A|AB}[i], Z_{B|AB}[k])`` and
    ``r_i = cos(Z_{A|AB}[i], Z_{B|AB}[j]) / cos(Z_A[i], Z_B[j])``; ``CR = mean_i r_i`` over all tokens of all
    pairs. Tokens whose alone-similarity ``cos(Z_A[i], Z_B[j]) <= eps`` make the ratio meaningless; they are
    excluded and counted (``n_excluded``). Also reported: ``cr_ratio_of_means = mean(num) / mean(den)`` over
    the kept tokens. A model whose tokens ignore context has ``CR = 1`` exactly; coupling gives ``CR > 1``.

    ``images_a, images_b (B, 3, H, W)`` with W a multiple of the patch size.
    """
    if images_a.shape != images_b.shape or images_a.ndim != 4:
        raise ValueError(f"images_a and images_b must be (B, 3, H, W) alike; got {tuple(images_a.shape)}, "
                         f"{tuple(images_b.shape)}")
    za = F.normalize(encode(images_a).float(), dim=1)  # (B, C, h, w)
    zb = F.normalize(encode(images_b).float(), dim=1)
    zab = F.normalize(encode(torch.cat([images_a, images_b], dim=-1)).float(), dim=1)  # (B, C, h, 2w)
    _, C, h, w = za.shape
    if zab.shape[-2:] != (h, 2 * w):
        raise ValueError(f"the concatenation gave a {tuple(zab.shape[-2:])} grid; expected {(h, 2 * w)} "
                         "(image width must be a multiple of the patch size)")
    fl = lambda z: z.flatten(2).transpose(1, 2)
    a_ab, b_ab = fl(zab[..., :w]), fl(zab[..., w:])
    a, b = fl(za), fl(zb)
    sim_ab = a_ab @ b_ab.transpose(1, 2)  # (B, hw, hw)
    num, j = sim_ab.max(dim=-1)  # (B, hw)
    den = (a * torch.gather(b, 1, j[..., None].expand(-1, -1, C))).sum(-1)  # (B, hw)
    keep = den > eps
    n_excl = int((~keep).sum())
    if not keep.any():
        raise ValueError("coupling_ratio: every token's alone-similarity is <= eps; the ratio is undefined")
    r = num[keep] / den[keep]
    return {"cr": float(r.mean()), "cr_ratio_of_means": float(num[keep].mean() / den[keep].mean()),
            "n_tokens": int(keep.numel()), "n_excluded": n_excl}


def mask_pooled_tsne(dense: torch.Tensor, masks: Sequence[torch.Tensor], seed: int = 0,
                     perplexity: float = 30.0, max_iter: int = 1000) -> np.ndarray:
    """t-SNE (2-D, sklearn, seeded) of mask-pooled features: ``dense (B, C, h, w)``, ``masks`` list of
    ``(K_b, h, w)`` -> ``(sum K_b, 2)`` in the order of the masks."""
    from sklearn.manifold import TSNE

    feats = F.normalize(mask_pool(dense, masks).float(), dim=-1).cpu().numpy()  # (R, C)
    if feats.shape[0] < 3:
        raise ValueError(f"t-SNE needs at least 3 pooled features, got {feats.shape[0]}")
    perp = min(perplexity, (feats.shape[0] - 1) / 3)
    return TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed, max_iter=max_iter).fit_transform(feats)
