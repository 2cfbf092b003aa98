"""CLIPSeg's decoder weights in and out of :class:`~ovlib.models.film_decoder.CLIPSegDecoder`.

CLIPSeg (Lüddecke & Ecker, CVPR'22) trains a small decoder on a frozen CLIP; its released checkpoints
(``rd64-uni.pth``, ``rd16-uni.pth`` from ``github.com/timojl/clipseg``) hold the decoder alone, under the
attribute names of ``timojl/clipseg:models/clipseg.py`` ``CLIPDensePredT`` (facts read there; no code
copied):

=========================== ================================================ =====================================
CLIPSeg key                 module                                           ours (``CLIPSegDecoder``)
=========================== ================================================ =====================================
``film_mul.{weight,bias}``  ``Linear(512, reduce_dim)``: ``a * film_mul(t)``  ``film.mlp.0`` rows ``[:C]`` (see below)
``film_add.{weight,bias}``  ``Linear(512, reduce_dim)``: ``+ film_add(t)``    ``film.mlp.0`` rows ``[C:]``
``reduces.i.*``             ``Linear(768, reduce_dim)``, i = 0 the deepest    ``reduces.i.*`` (same order)
``blocks.i.*``              ``nn.TransformerEncoderLayer(reduce_dim, 4)``:    ``blocks.i.*`` (same names; ``relu``,
                            ReLU, ``dim_feedforward`` 2048, sequence-first    ``mlp_ratio = 2048 / reduce_dim``)
``trans_conv.{weight,bias}`` ``ConvTranspose2d(reduce_dim, 1, 16, stride 16)`` ``upsample.*``
``reduce.{weight,bias}``    defined by the base class, unused by the forward  dropped
=========================== ================================================ =====================================

The forward is the same: visit the extracted layers deepest first, reduce and add, FiLM-condition the
deepest (``cond_layer = 0``) *before* its transformer layer, drop the cls token, transposed convolution.
Our FiLM computes ``x (1 + g) + b`` with ``(g, b) = W (sqrt(D) t) + c`` (a zero layer is the identity), so
CLIPSeg's ``x * (W_m t + c_m) + (W_a t + c_a)`` maps exactly to ``W = [W_m; W_a] / sqrt(D)``,
``c = [c_m - 1; c_a]``. The ``refined`` checkpoints (``complex_trans_conv=True``: a 3x3 conv and two
transposed convolutions, keys ``trans_conv.0/2/4``) have another head and are refused with a clear error.
CLIPSeg feeds the *raw* CLIP text embedding to FiLM; the book feeds unit-norm template ensembles, so with
real CLIPSeg weights the FiLM input differs by the embedding's norm (a known deviation of the ``paper`` path).

The micro CLIPSeg (trained by :func:`ovlib.train.proxies.pretrain_clipseg`) is stored in the same key
format, so one loader serves both.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .film_decoder import CLIPSegDecoder

__all__ = [
    "CLIPSEG_ARCHS",
    "CLIPSEG_HINT",
    "ClipSegArch",
    "build_clipseg_decoder",
    "clipseg_arch",
    "clipseg_to_decoder_state",
    "decoder_to_clipseg_state",
    "load_clipseg_decoder",
    "read_clipseg_checkpoint",
]

CLIPSEG_HINT = ("a CLIPSeg decoder checkpoint with CLIPSeg's own key names, e.g. rd64-uni.pth from the weights "
                "archive linked in github.com/timojl/clipseg (README, 'weights'); pass its local path")


@dataclass(frozen=True)
class ClipSegArch:
    """The decoder shape a CLIPSeg checkpoint implies (CLIPSeg: reduce_dim 64, 4 heads, feed-forward 2048)."""

    reduce_dim: int = 64
    heads: int = 4
    ff_dim: int = 2048


#: Named decoder shapes: the real ViT-B/16 CLIPSeg and the micro CLIPSeg of the book (a 4x smaller FF).
CLIPSEG_ARCHS: dict[str, ClipSegArch] = {"rd64-uni": ClipSegArch(64, 4, 2048),
                                         "micro-clipseg": ClipSegArch(64, 4, 256)}


def clipseg_arch(source: str | Mapping[str, torch.Tensor]) -> ClipSegArch:
    """The shape of a named CLIPSeg (:data:`CLIPSEG_ARCHS`) or of a CLIPSeg state dict (read from
    ``reduces.0.weight`` and ``blocks.0.linear1.weight``; heads: CLIPSeg's 4, not stored)."""
    if isinstance(source, str):
        if source not in CLIPSEG_ARCHS:
            raise ValueError(f"unknown CLIPSeg {source!r}; named: {sorted(CLIPSEG_ARCHS)} (or a checkpoint file)")
        return CLIPSEG_ARCHS[source]
    _check_keys(source)
    return ClipSegArch(int(source["reduces.0.weight"].shape[0]), 4, int(source["blocks.0.linear1.weight"].shape[0]))


def build_clipseg_decoder(width: int, text_dim: int, n_levels: int, patch_size: tuple[int, int],
                          arch: ClipSegArch, proj_dim: int | None = None, proj_kernel: int = 3,
                          n_prefix: int = 1) -> CLIPSegDecoder:
    """A :class:`CLIPSegDecoder` in CLIPSeg's form: linear FiLM, ReLU transformer layers with ``arch.ff_dim``,
    one transposed convolution (kernel = stride = patch)."""
    return CLIPSegDecoder(width, text_dim, n_levels, patch_size, arch.reduce_dim, arch.heads,
                          mlp_ratio=arch.ff_dim / arch.reduce_dim, film_hidden=0, proj_dim=proj_dim,
                          proj_kernel=proj_kernel, n_prefix=n_prefix, activation="relu")


def _check_keys(state: Mapping[str, torch.Tensor]) -> None:
    if any(k.startswith("trans_conv.0.") for k in state):
        raise ValueError("this CLIPSeg checkpoint is a 'refined' one (complex_trans_conv: trans_conv.0/2/4); "
                         f"its head is not CLIPSeg's single transposed convolution. Supply {CLIPSEG_HINT}")
    need = ("film_mul.weight", "film_add.weight", "reduces.0.weight", "blocks.0.linear1.weight", "trans_conv.weight")
    missing = [k for k in need if k not in state]
    if missing:
        raise ValueError(f"not a CLIPSeg decoder state dict: missing {missing}. Expected {CLIPSEG_HINT}")


def decoder_to_clipseg_state(decoder: CLIPSegDecoder) -> dict[str, torch.Tensor]:
    """The decoder's weights under CLIPSeg's key names (the projector, SynSeg's, is not part of CLIPSeg)."""
    film = decoder.film
    if len(film.mlp) != 1:
        raise ValueError("only a linear FiLM (film_hidden=0) has CLIPSeg's form")
    lin = film.mlp[0]
    c, s = film.channels, film.text_dim ** 0.5
    w, b = lin.weight.detach() * s, lin.bias.detach().clone()  # (2C, D), (2C,)
    out = {"film_mul.weight": w[:c].clone(), "film_mul.bias": b[:c] + 1.0,
           "film_add.weight": w[c:].clone(), "film_add.bias": b[c:].clone()}
    for k, v in decoder.state_dict().items():
        if k.startswith(("reduces.", "blocks.")):
            out[k] = v.detach().clone()
        elif k.startswith("upsample."):
            out["trans_conv." + k[len("upsample."):]] = v.detach().clone()
    return out


def clipseg_to_decoder_state(state: Mapping[str, torch.Tensor], text_dim: int) -> dict[str, torch.Tensor]:
    """CLIPSeg keys -> :class:`CLIPSegDecoder` keys (no ``projector``); ``text_dim`` = the FiLM input size."""
    _check_keys(state)
    s = float(text_dim) ** 0.5
    if state["film_mul.weight"].shape[1] != text_dim:
        raise ValueError(f"CLIPSeg FiLM expects text of dim {state['film_mul.weight'].shape[1]}, the CLIP gives "
                         f"{text_dim}")
    out = {"film.mlp.0.weight": torch.cat([state["film_mul.weight"], state["film_add.weight"]]) / s,
           "film.mlp.0.bias": torch.cat([state["film_mul.bias"] - 1.0, state["film_add.bias"]])}
    for k, v in state.items():
        if k.startswith(("reduces.", "blocks.")):
            out[k] = v
        elif k.startswith("trans_conv."):
            out["upsample." + k[len("trans_conv."):]] = v
        elif k.startswith(("film_mul.", "film_add.", "reduce.")):
            continue  # FiLM converted above; ``reduce`` is defined but unused by CLIPDensePredT
        else:
            raise ValueError(f"unexpected key {k!r} in the CLIPSeg checkpoint (extra_blocks / shift vectors are "
                             "not supported)")
    return out


def load_clipseg_decoder(decoder: CLIPSegDecoder, state: Mapping[str, torch.Tensor]) -> CLIPSegDecoder:
    """Load CLIPSeg weights (CLIPSeg key names) into ``decoder`` in place; every decoder tensor but the
    projector must be covered, with matching shapes. Returns ``decoder``."""
    conv = clipseg_to_decoder_state(state, decoder.film.text_dim)
    own = decoder.state_dict()
    missing = sorted(k for k in own if not k.startswith("projector.") and k not in conv)
    extra = sorted(k for k in conv if k not in own)
    bad = sorted(k for k in conv if k in own and own[k].shape != conv[k].shape)
    if missing or extra or bad:
        raise ValueError(f"CLIPSeg weights do not fit the decoder: missing {missing[:6]}, unexpected {extra[:6]}, "
                         f"shape mismatch {[(k, tuple(conv[k].shape), tuple(own[k].shape)) for k in bad[:4]]}")
    decoder.load_state_dict(conv, strict=False)
    return decoder


def read_clipseg_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A CLIPSeg state dict from a local file (``torch.load(weights_only=True)``; a ``{"model": ...}`` wrapper,
    as the book's cache files have, is unwrapped). A missing file is an error naming what to supply."""
    from ovlib.io import safe_load

    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIPSeg weights not found at {path}: supply {CLIPSEG_HINT} (nothing is "
                                "downloaded at run time)")
    state = safe_load(path)
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    _check_keys(state)
    return dict(state)
