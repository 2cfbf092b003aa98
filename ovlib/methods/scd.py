"""Spatial Correlation Distillation (SCD), R-SC-CLIPSelf paper (Qiu et al., ICLR'25) Eqs. 2-6.

For every region ``i`` the student's and the teacher's token grids ``Z_i^s, Z_i^t (L, D)`` (RoIAligned to a
``k x k`` grid, ``L = k^2``, Eq. 2) give correlation matrices ``C = Z Z^T`` (Eq. 3). Each row is turned into a
distribution by a softmax with temperature (Eq. 4) and the student's rows are pulled to the teacher's by the
cross entropy, averaged over rows and regions (Eq. 5)::

    L_SCD = 1/R sum_i 1/L sum_j H(p_t^{ij}, p_s^{ij}),   p^{ij} = softmax_k(C_i(j, k) / tau)

``H(p, q) = -sum_k p_k log q_k`` (teacher distribution as the target, student's log-probabilities). The paper
writes ``H(C_s, C_t)``; the only sensible reading with a frozen teacher is the target-first cross entropy
used here. Its minimum over ``p_s`` is at ``p_s = p_t`` with value ``H(p_t)`` (the teacher's entropy, not 0);
with ``tau_s == tau_t`` and identical correlations the gradient w.r.t. the student is exactly 0.
:func:`scd_kl` reports ``CE - H(p_t)`` (the KL divergence, 0 at the optimum) for logging.

Choices where the paper is silent (stated once here):
* tokens are L2-normalised before the product (``C`` is a cosine matrix); with ``tau = 0.2`` un-normalised
  CLIP tokens would give meaningless logits. :func:`region_tokens` re-normalises after RoIAlign.
* the teacher side is a constant: no gradient reaches ``Z^t`` (frozen CLIP or frozen / detached Refiner).
* "local" SCD (the paper's) uses RoIAligned region grids; "global" SCD (paper App. Tab. 14) uses the whole
  image's token map as one region (``L = h * w``), see :func:`image_tokens`.

Memory: the naive loss materialises ``R x L x L`` logits for both sides (and autograd keeps them). With
``chunk`` set, :func:`scd_loss` computes row blocks ``(R, chunk, L)`` of ``C^s`` and ``C^t``, accumulates the
cross entropy and, in a custom backward, recomputes each block, so peak memory is ``O(R * chunk * L)``
instead of ``O(R * L^2)`` (``benchmarks/bench_scd.py`` measures it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ovlib.models import roi_features

__all__ = ["correlation_entropy", "image_tokens", "region_tokens", "scd_kl", "scd_loss", "scd_loss_naive"]


def _check(zs: torch.Tensor, zt: torch.Tensor) -> None:
    if zs.ndim != 3 or zs.shape != zt.shape:
        raise ValueError(f"SCD: student and teacher tokens must both be (R, L, D) of the same shape; "
                         f"got {tuple(zs.shape)} and {tuple(zt.shape)}")
    if zs.shape[0] == 0 or zs.shape[1] == 0:
        raise ValueError(f"SCD needs at least one region and one token; got shape {tuple(zs.shape)}")


def _no_autocast(x: torch.Tensor):
    """SCD logits are computed in float32 at least, also inside an autocast (AMP) region."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def _up(x: torch.Tensor) -> torch.Tensor:
    """Compute in float32 at least (float64 stays float64; fp16/bf16 are promoted)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_tau(tau_s: float, tau_t: float) -> None:
    if not (tau_s > 0 and tau_t > 0):
        raise ValueError(f"SCD temperatures must be > 0; got tau_s={tau_s}, tau_t={tau_t}")


def scd_loss_naive(zs: torch.Tensor, zt: torch.Tensor, tau_s: float = 0.2, tau_t: float = 0.2) -> torch.Tensor:
    """Eqs. 3-5 with full ``(R, L, L)`` matrices and plain autograd (the reference; teacher detached)."""
    _check(zs, zt)
    _check_tau(tau_s, tau_t)
    with _no_autocast(zs):
        zs, zt = _up(zs), _up(zt.detach())
        cs = zs @ zs.transpose(1, 2)  # (R, L, L) Eq. 3
        ct = zt @ zt.transpose(1, 2)  # (R, L, L)
        log_ps = F.log_softmax(cs / tau_s, dim=-1)  # Eq. 4
        pt = F.softmax(ct / tau_t, dim=-1)
        return -(pt * log_ps).sum(-1).mean()  # Eq. 5: mean over rows j and regions i


class _ChunkedSCD(torch.autograd.Function):
    """Cross entropy of Eq. 5 accumulated over row blocks; the backward recomputes each block.

    ``dL/dC^s[j, :] = (softmax(C^s[j]/tau_s) - p_t[j]) * g / (tau_s R L)``; with ``C^s = Z Z^T``,
    ``dL/dZ = G Z + G^T Z`` accumulated block by block (rows of ``G`` to the rows of ``dZ``, columns to all).
    """

    @staticmethod
    def forward(ctx, zs, zt, tau_s: float, tau_t: float, chunk: int):
        R, L, _ = zs.shape
        zsf, ztf = _up(zs), _up(zt)
        total = zsf.new_zeros(())
        for r0 in range(0, L, chunk):
            r1 = min(L, r0 + chunk)
            cs = zsf[:, r0:r1] @ zsf.transpose(1, 2)  # (R, c, L)
            ct = ztf[:, r0:r1] @ ztf.transpose(1, 2)  # (R, c, L)
            total = total - (F.softmax(ct / tau_t, -1) * F.log_softmax(cs / tau_s, -1)).sum()
            del cs, ct
        ctx.save_for_backward(zs, zt)
        ctx.tau_s, ctx.tau_t, ctx.chunk = tau_s, tau_t, chunk
        return total / (R * L)

    @staticmethod
    def backward(ctx, g):
        zs, zt = ctx.saved_tensors
        with _no_autocast(zs):
            return _ChunkedSCD._backward(ctx, g, zs, zt)

    @staticmethod
    def _backward(ctx, g, zs, zt):
        R, L, _ = zs.shape
        zsf, ztf = _up(zs), _up(zt)
        dz = torch.zeros_like(zsf)  # (R, L, D)
        scale = g.to(zsf.dtype) / (ctx.tau_s * R * L)
        for r0 in range(0, L, ctx.chunk):
            r1 = min(L, r0 + ctx.chunk)
            cs = zsf[:, r0:r1] @ zsf.transpose(1, 2)  # (R, c, L)
            ct = ztf[:, r0:r1] @ ztf.transpose(1, 2)
            G = (F.softmax(cs / ctx.tau_s, -1) - F.softmax(ct / ctx.tau_t, -1)) * scale  # (R, c, L)
            del cs, ct
            dz[:, r0:r1].baddbmm_(G, zsf)  # rows j of C^s = z_j . z_k (in place: no (R, L, D) temporaries)
            dz.baddbmm_(G.transpose(1, 2), zsf[:, r0:r1])  # columns k
            del G
        return dz.to(zs.dtype), None, None, None, None


def scd_loss(zs: torch.Tensor, zt: torch.Tensor, tau_s: float = 0.2, tau_t: float = 0.2,
             chunk: int | None = None) -> torch.Tensor:
    """SCD loss (Eq. 5) of student tokens ``zs (R, L, D)`` against teacher tokens ``zt (R, L, D)``.

    Tokens are used as given (normalise them first, e.g. with :func:`region_tokens`). ``chunk``: rows per
    block for bounded memory (``None`` or ``>= L``: the naive computation). The teacher gets no gradient.
    """
    _check(zs, zt)
    _check_tau(tau_s, tau_t)
    L = zs.shape[1]
    if chunk is None or chunk >= L:
        return scd_loss_naive(zs, zt, tau_s, tau_t)
    if chunk < 1:
        raise ValueError(f"SCD chunk must be >= 1, got {chunk}")
    with _no_autocast(zs):
        return _ChunkedSCD.apply(zs, zt.detach(), float(tau_s), float(tau_t), int(chunk))


@torch.no_grad()
def correlation_entropy(zt: torch.Tensor, tau_t: float = 0.2, chunk: int | None = None) -> torch.Tensor:
    """Mean row entropy ``1/R sum_i 1/L sum_j H(p_t^{ij})`` of the teacher's correlation distributions."""
    if zt.ndim != 3 or zt.shape[0] == 0:
        raise ValueError(f"teacher tokens must be (R, L, D) with R > 0; got {tuple(zt.shape)}")
    R, L, _ = zt.shape
    ztf = _up(zt)
    c = L if chunk is None else max(1, int(chunk))
    total = ztf.new_zeros(())
    for r0 in range(0, L, c):
        logits = ztf[:, r0:r0 + c] @ ztf.transpose(1, 2) / tau_t  # (R, c, L)
        total -= (F.softmax(logits, -1) * F.log_softmax(logits, -1)).sum()
    return total / (R * L)


def scd_kl(zs: torch.Tensor, zt: torch.Tensor, tau_s: float = 0.2, tau_t: float = 0.2,
           chunk: int | None = None) -> torch.Tensor:
    """``KL(p_t || p_s)`` averaged like Eq. 5 = :func:`scd_loss` minus the teacher's entropy (same gradient);
    0 exactly when the student's row distributions equal the teacher's. For logging."""
    return scd_loss(zs, zt, tau_s, tau_t, chunk) - correlation_entropy(zt, tau_t, chunk)


def region_tokens(dense: torch.Tensor, boxes: Sequence[torch.Tensor], image_size: tuple[int, int],
                  grid: int) -> torch.Tensor:
    """Eq. 2: RoIAlign of ``dense (B, C, h, w)`` to a ``grid x grid`` token grid per box, re-normalised per
    token: ``(R, L, C)`` with ``L = grid**2`` in row-major order."""
    z = roi_features(dense, boxes, image_size, output_size=grid)  # (R, C, k, k)
    if grid == 1:
        z = z[:, :, None, None]
    return F.normalize(z.flatten(2).transpose(1, 2), dim=-1)  # (R, L, C)


def image_tokens(dense: torch.Tensor) -> torch.Tensor:
    """Global SCD: every image's whole token map as one region, ``(B, C, h, w) -> (B, h*w, C)`` normalised."""
    if dense.ndim != 4:
        raise ValueError(f"dense must be (B, C, h, w), got {tuple(dense.shape)}")
    return F.normalize(dense.flatten(2).transpose(1, 2), dim=-1)
