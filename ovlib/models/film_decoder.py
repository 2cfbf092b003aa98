"""FiLM conditioning and a CLIPSeg-style decoder over intermediate CLIP activations (SynSeg's trainable part).

* :class:`FiLM` (Perez et al., AAAI'18; SynSeg App. D1): a small MLP maps the text embedding ``t (P, D_t)`` to
  per-channel ``(dgamma, beta) (P, C)``; features ``x (P, L, C)`` become ``x * (1 + dgamma) + beta``. The
  ``1 +`` form (FiLM's own "predict the deviation of gamma from 1") makes a zero MLP output the identity; the
  last layer is zero-initialised, so training starts from the unconditioned decoder.
* :class:`CLIPSegDecoder` follows the design of CLIPSeg (Lüddecke & Ecker, CVPR'22; convention of
  ``timojl/clipseg:models/clipseg.py`` ``CLIPDensePredT``, not its code): the token activations of a few
  intermediate CLIP blocks (``extract_layers``), each reduced by its own ``Linear(width, reduce_dim)``, are
  visited from the deepest to the shallowest; the deepest is FiLM-conditioned on the text, then every level
  adds its reduced activation and runs one transformer layer; the cls token is dropped, the patch tokens
  form a ``(reduce_dim, h, w)`` map, and a transposed convolution with kernel = stride = patch size gives
  one logit per pixel. SynSeg adds the **projector** (a convolution, ``reduce_dim -> proj_dim``) that
  turns the post-decoder conditional map into the features ``X`` of the Feature Synergy Structure.
* :func:`clip_block_activations` runs the frozen CLIP image tower (any tower :class:`~ovlib.models.ViTAdapter`
  supports) and returns the tokens after the requested blocks (0-based), stopping at the deepest one.

Shapes: ``B`` images, ``P`` (image, text) pairs, ``L = 1 + h*w`` tokens, ``W`` CLIP width, ``C = reduce_dim``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ovlib.models.adapter import ViTAdapter, vit_adapter

__all__ = ["CLIPSegDecoder", "FiLM", "clip_block_activations", "default_extract_layers", "gather_rows"]


def default_extract_layers(num_blocks: int) -> tuple[int, ...]:
    """CLIPSeg's blocks 3, 6, 9 of 12 (0-based) scaled to ``num_blocks``: ``round(L * k / 4)``, k = 1, 2, 3,
    clipped to ``[0, L-1]`` and deduplicated (micro CLIP, 4 blocks: 1, 2, 3)."""
    out = sorted({min(num_blocks - 1, max(0, round(num_blocks * k / 4))) for k in (1, 2, 3)})
    return tuple(out)


def gather_rows(x: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """``x (B, ...)``, ``owner (P,)`` -> ``x[owner] (P, ...)`` with a **deterministic** backward.

    The backward of advanced indexing, ``index_put_(..., accumulate=True)``, adds the ``P`` gradient rows into
    the ``B`` rows with parallel atomic float adds on CPU once the gradient has >= 32768 elements and torch runs
    more than one thread: when two threads add into the rows of the same image (its pairs straddle their split),
    the order of the additions, and so the last bits of the gradient, change from run to run (SynSeg's
    same-seed smoke runs differed by ~1e-7 from step 3 on; on CUDA ``index_add_`` uses atomics too). Here the
    gather is a product with the one-hot ``(P, B)`` matrix, in fp32 with autocast off: the forward is exact
    (``1 * x + 0 * y = x`` for finite values) and the backward is a matrix product, whose summation order is
    fixed. A tensor that needs no gradient is indexed directly."""
    if owner.ndim != 1:
        raise ValueError(f"owner must be (P,), got {tuple(owner.shape)}")
    if not x.requires_grad:
        return x[owner]
    onehot = nn.functional.one_hot(owner, x.shape[0]).to(device=x.device, dtype=torch.float32)  # (P, B)
    with torch.autocast(x.device.type, enabled=False):
        out = onehot @ x.reshape(x.shape[0], -1).float()  # (P, prod(...))
    return out.reshape(owner.shape[0], *x.shape[1:]).to(x.dtype)


@torch.no_grad()
def clip_block_activations(model_or_adapter, images: torch.Tensor, layers: Sequence[int]
                           ) -> tuple[list[torch.Tensor], tuple[int, int]]:
    """Tokens ``(B, P_pre + h*w, W)`` after each block in ``layers`` (0-based, ascending), and the grid.

    Runs under ``no_grad`` (the CLIP is frozen in SynSeg); blocks after ``max(layers)`` are not run."""
    ad = model_or_adapter if isinstance(model_or_adapter, ViTAdapter) else vit_adapter(model_or_adapter)
    layers = sorted(int(i) for i in layers)
    if not layers or layers[0] < 0 or layers[-1] >= ad.num_blocks:
        raise ValueError(f"extract layers {layers} must lie in [0, {ad.num_blocks - 1}]")
    x, grid = ad.embed(images)  # (B, P_pre + N, W)
    rope = ad.rope(grid)
    acts, start = [], 0
    for i in layers:
        x = ad.run_blocks(x, start, i + 1, rope)
        acts.append(x)
        start = i + 1
    return acts, grid


class FiLM(nn.Module):
    """``x * (1 + dgamma(t)) + beta(t)`` with ``(dgamma, beta) = MLP(t)``; ``t (P, D_t)``, ``x (P, ..., C)``.

    MLP: ``Linear(D_t, hidden) -> GELU -> Linear(hidden, 2C)`` (``hidden = 0``: one linear layer, CLIPSeg's
    ``film_mul``/``film_add``); the output layer starts at zero (identity FiLM). The text is scaled by
    ``sqrt(D_t)`` first, so a unit-norm CLIP embedding has entries of about unit size.
    """

    def __init__(self, text_dim: int, channels: int, hidden: int = 256):
        super().__init__()
        self.text_dim, self.channels = int(text_dim), int(channels)
        if hidden > 0:
            self.mlp = nn.Sequential(nn.Linear(text_dim, hidden), nn.GELU(), nn.Linear(hidden, 2 * channels))
        else:
            self.mlp = nn.Sequential(nn.Linear(text_dim, 2 * channels))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def params(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dgamma, beta)``, each ``(P, C)``."""
        if text.ndim != 2 or text.shape[1] != self.text_dim:
            raise ValueError(f"FiLM: text must be (P, {self.text_dim}), got {tuple(text.shape)}")
        out = self.mlp(text * self.text_dim ** 0.5)  # (P, 2C)
        return out[:, :self.channels], out[:, self.channels:]

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != text.shape[0] or x.shape[-1] != self.channels:
            raise ValueError(f"FiLM: x must be (P, ..., {self.channels}) with P = {text.shape[0]}, got "
                             f"{tuple(x.shape)}")
        dg, b = self.params(text)
        shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (self.channels,)
        return x * (1.0 + dg.view(shape)) + b.view(shape)


class CLIPSegDecoder(nn.Module):
    """FiLM + reduce + transformer layers + transposed-conv upsampling, and SynSeg's FSS projector.

    ``forward(acts, text, grid)``: ``acts`` list (shallow -> deep) of ``(P, L, W)`` tokens (``L = n_prefix +
    h*w``), ``text (P, D_t)`` -> ``logits (P, h*ph, w*pw)`` and the projected conditional map
    ``X (P, proj_dim, h, w)``.
    """

    def __init__(self, width: int, text_dim: int, n_levels: int, patch_size: tuple[int, int], reduce_dim: int = 64,
                 heads: int = 4, mlp_ratio: float = 4.0, film_hidden: int = 256, proj_dim: int | None = None,
                 proj_kernel: int = 3, n_prefix: int = 1, activation: str = "gelu"):
        super().__init__()
        if n_levels < 1:
            raise ValueError("CLIPSegDecoder needs at least one level")
        self.n_prefix = int(n_prefix)
        self.reduces = nn.ModuleList(nn.Linear(width, reduce_dim) for _ in range(n_levels))
        self.film = FiLM(text_dim, reduce_dim, film_hidden)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(reduce_dim, heads, int(reduce_dim * mlp_ratio), dropout=0.0,
                                       activation=activation, batch_first=True)
            for _ in range(n_levels))
        ph, pw = patch_size
        self.upsample = nn.ConvTranspose2d(reduce_dim, 1, kernel_size=(ph, pw), stride=(ph, pw))
        self.projector = nn.Conv2d(reduce_dim, proj_dim or text_dim, proj_kernel, padding=proj_kernel // 2)

    def forward(self, acts: Sequence[torch.Tensor], text: torch.Tensor, grid: tuple[int, int],
                owner: torch.Tensor | None = None, project: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``acts`` (shallow -> deep) ``(B, L, W)``, ``text (P, D_t)``, ``owner (P,)`` the image of each pair
        (``None``: ``B = P``, pair p = image p) -> ``logits (P, h*ph, w*pw)`` and ``X (P, proj_dim, h, w)``
        (``None`` when ``project=False``, e.g. at inference). Each level is reduced once per image, then
        gathered per pair (``reduce`` is linear, so this equals reducing the gathered tokens)."""
        fmap = self._fmap(acts, text, grid, owner)  # (P, C, h, w)
        logits = self.upsample(fmap)[:, 0]  # (P, h*ph, w*pw)
        return logits, (self.projector(fmap) if project else None)  # (P, proj_dim, h, w)

    def image_features(self, acts: Sequence[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        """The projector over the *unconditioned* decoder map (FiLM skipped = its identity), one per image:
        ``acts (B, L, W)`` -> ``(B, proj_dim, h, w)`` (SynSeg ``x_source="image"``: text-free synergy features)."""
        return self.projector(self._fmap(acts, None, grid, None))

    def _fmap(self, acts: Sequence[torch.Tensor], text: torch.Tensor | None, grid: tuple[int, int],
              owner: torch.Tensor | None) -> torch.Tensor:
        if len(acts) != len(self.reduces):
            raise ValueError(f"decoder expects {len(self.reduces)} activation levels, got {len(acts)}")
        h, w = grid
        a = None
        for act, reduce, block in zip(reversed(acts), self.reduces, self.blocks):
            r = reduce(act)  # (B, L, C)
            r = r if owner is None else gather_rows(r, owner)  # (P, L, C), deterministic backward
            if a is None:  # the deepest level is conditioned (cond_layer = 0); text None = identity FiLM
                a = r if text is None else self.film(r, text)
            else:
                a = a + r
            a = block(a)  # (P, L, C)
        tokens = a[:, self.n_prefix:]  # (P, h*w, C)
        if tokens.shape[1] != h * w:
            raise ValueError(f"{tokens.shape[1]} patch tokens do not form the {h}x{w} grid")
        return tokens.transpose(1, 2).reshape(a.shape[0], -1, h, w)  # (P, C, h, w)
