"""Analyses of R-SC-CLIPSelf (Qiu et al., ICLR'25): context aggregation (Eq. 7), coupling ratio (Eq. 15,
App. C.3), mask-pooled t-SNE. Pure functions over a callable ``encode(images (B, 3, H, W)) -> (B, C, h, w)``
dense features, so they apply to any model, dense mode or Refiner (:meth:`Refiner.dense`).
Affinity maps: :func:`ovlib.models.affinity.affinity_map` (re-exported here).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ovlib.models import mask_pool
from ovlib.models.affinity import affinity_map
from ovlib.models.images import normalize_images, to_model

__all__ = ["ContextAggregate", "affinity_map", "context_aggregation", "coupling_ratio", "coupling_ratio_pairs",
           "embed_positions", "mask_pooled_tsne", "refiner_dense_fn", "tsne_embed"]

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
    the kept tokens, and ``cr_per_pair`` ``(B,)``: the mean ratio over each pair's kept tokens (nan for a pair
    with none). A model whose tokens ignore context has ``CR = 1`` exactly; coupling gives ``CR > 1``.

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
    def fl(z):  # (B, C, h, w) -> (B, hw, C)
        return z.flatten(2).transpose(1, 2)

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
    ratio = torch.where(keep, num / torch.where(keep, den, torch.ones_like(den)), torch.zeros_like(num))  # (B, hw)
    kept = keep.sum(1)  # (B,)
    per_pair = torch.where(kept > 0, ratio.sum(1) / kept.clamp(min=1), torch.full_like(ratio[:, 0], float("nan")))
    return {"cr": float(r.mean()), "cr_ratio_of_means": float(num[keep].mean() / den[keep].mean()),
            "n_tokens": int(keep.numel()), "n_excluded": n_excl, "cr_per_pair": per_pair.cpu().numpy()}


def coupling_ratio_pairs(encode: Encode, images_a: torch.Tensor, images_b: torch.Tensor) -> np.ndarray:
    """Per pair ``(B, 2)`` ``[CR, 1]`` of :func:`coupling_ratio` (``[0, 0]`` for a pair without a usable token):
    the units a bootstrap over pairs resamples (:func:`ovlib.stats.ratio_stat` of their sum is the mean CR)."""
    with torch.no_grad():
        cr = np.asarray(coupling_ratio(encode, images_a, images_b)["cr_per_pair"], dtype=np.float64)
    ok = np.isfinite(cr)
    return np.stack([np.where(ok, cr, 0.0), ok.astype(np.float64)], 1)


def tsne_embed(features: torch.Tensor | np.ndarray, seed: int = 0, perplexity: float = 30.0,
               max_iter: int = 1000) -> np.ndarray:
    """2-D t-SNE (sklearn, PCA init, seeded) of L2-normalised ``features (R, C)``; the perplexity is capped at
    ``(R - 1) / 3`` so small sets work."""
    from sklearn.manifold import TSNE

    x = torch.as_tensor(np.asarray(features)).float()
    if x.ndim != 2 or x.shape[0] < 3:
        raise ValueError(f"t-SNE needs at least 3 features of shape (R, C), got {tuple(x.shape)}")
    feats = F.normalize(x, dim=-1).cpu().numpy()  # (R, C)
    perp = min(perplexity, (feats.shape[0] - 1) / 3)
    return TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed, max_iter=max_iter).fit_transform(feats)


def mask_pooled_tsne(dense: torch.Tensor, masks: Sequence[torch.Tensor], seed: int = 0,
                     perplexity: float = 30.0, max_iter: int = 1000) -> np.ndarray:
    """t-SNE (2-D, sklearn, seeded) of mask-pooled features: ``dense (B, C, h, w)``, ``masks`` list of
    ``(K_b, h, w)`` -> ``(sum K_b, 2)`` in the order of the masks."""
    return tsne_embed(mask_pool(dense, masks), seed=seed, perplexity=perplexity, max_iter=max_iter)


def refiner_dense_fn(refiner, mean: Sequence[float], std: Sequence[float]) -> Encode:
    """``images (B, 3, H, W)`` in [0, 1] -> the Refiner's unit-norm dense map ``(B, C, h, w)``.

    A square image is one whole-image region (:meth:`Refiner.dense`). An image ``W = T * H`` wide (e.g. the
    side-by-side pair ``[X_A | X_B]`` of the coupling ratio) is cut into ``T`` square tiles, each refined as a
    region of the *whole* image -- ``f_I^A`` sees every tile, the Refiner's blocks one tile -- exactly how the
    Refiner produces the R-SCD targets of a region (Eq. 8); the tiles' maps are laid side by side. Any other
    image (a COCO image resized with its aspect kept, both sides multiples of the patch) is padded bottom/right
    to a square (the book's student-image convention, zeros after normalisation = the mean colour), refined as
    one whole-image region, and its map cropped back to the image's ``(H / p, W / p)`` tokens.
    """

    patch = int(refiner.adapter.patch_size[0])

    def fn(images: torch.Tensor) -> torch.Tensor:
        x = normalize_images(to_model(images, refiner), mean, std)
        B, _, H, W = x.shape
        if H % patch or W % patch:
            raise ValueError(f"refiner_dense_fn needs H and W multiples of the patch ({patch}); got {(H, W)}")
        if W % H:  # not a row of square tiles: pad to a square, refine, crop the map back
            S = max(H, W)
            z = tiles(F.pad(x, (0, S - W, 0, S - H)))  # (B, C, S/p, S/p)
            return z[..., : H // patch, : W // patch]
        return tiles(x)

    def tiles(x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        g, T = H // patch, W // H
        boxes = [x.new_tensor([[t * H, 0.0, (t + 1) * H, H] for t in range(T)]) for _ in range(B)]
        z = F.normalize(refiner(x, boxes, g), dim=-1)  # (B*T, g*g, C)
        z = z.reshape(B, T, g, g, -1).permute(0, 4, 2, 1, 3)  # (B, C, g, T, g)
        return z.reshape(B, z.shape[1], g, T * g)

    return fn


class ContextAggregate:
    """Eq. 7 as a dense extractor: ``at(n)`` is a function ``target images (B, 3, th, tw) -> (B, C, h, w)``
    returning, for each target, the mean of its sub-maps over the first ``n`` of ``contexts (N, 3, H, W)``
    (:func:`context_aggregation`), so any dense-feature protocol (k-means mIoU, affinity maps) can sweep N.

    Positions are drawn by a generator seeded with ``seed`` and the target's pixels (the same target gets the
    same positions for every ``n``, so the sweep is nested); each target's full sweep is computed once and
    cached, so ``at(1) .. at(N)`` over a dataset cost one pass of ``N`` composites per target.
    """

    def __init__(self, encode: Encode, contexts: torch.Tensor, patch: int, seed: int = 0, batch_size: int = 16):
        if contexts.ndim != 4:
            raise ValueError(f"contexts must be (N, 3, H, W), got {tuple(contexts.shape)}")
        self.encode, self.contexts, self.patch = encode, contexts, int(patch)
        self.seed, self.batch_size = int(seed), int(batch_size)
        self.calls = 0  # targets swept (cache misses)
        self._cache: dict[int, torch.Tensor] = {}

    @property
    def n_max(self) -> int:
        return int(self.contexts.shape[0])

    def _key(self, target: torch.Tensor) -> int:
        import hashlib

        h = hashlib.sha256(target.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()
        return int(h[:15], 16)

    def sweep(self, target: torch.Tensor) -> torch.Tensor:
        """``target (3, th, tw)`` -> ``(N, C, th/p, tw/p)``, row ``n-1`` = aggregate over ``n`` contexts."""
        k = self._key(target)
        if k not in self._cache:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + k) % (2 ** 63 - 1))
            self._cache[k] = context_aggregation(self.encode, target, self.contexts, self.patch, g,
                                                 batch_size=self.batch_size).cpu()
            self.calls += 1
        return self._cache[k]

    def at(self, n: int) -> Encode:
        if not 1 <= n <= self.n_max:
            raise ValueError(f"n must be in [1, {self.n_max}], got {n}")

        def fn(images: torch.Tensor) -> torch.Tensor:
            return torch.stack([self.sweep(t)[n - 1] for t in images]).to(images.device)

        return fn
