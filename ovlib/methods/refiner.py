"""The Refiner of R-SC-CLIPSelf (Qiu et al., ICLR'25 §3.3, App. C): Eqs. 8-14.

The frozen CLIP image tower is split as ``f_I = f_I^B o f_I^A`` (``f_I^B`` = its last ``K`` blocks). The
Refiner ``f_R`` is a trainable clone of ``f_I^B`` fed with RoIAligned tokens of the frozen ``f_I^A``::

    Z_hat_i = f_R(RoIAlign(f_I^A(X) + Z_inter, b_i))                       (Eq. 8 with Eq. 11)
    Z_inter = FC_inter[concat(Z_l1, Z_l2)]        (intermediate processor, 2-layer MLP, 2D -> D, Eq. 11)
    z_hat_i^[CLS] = FC_cls[RoIPool(f_I^A(X), b_i)]  (region-level [CLS] generator, 2-layer MLP, Eq. 10)

trained global-to-local (Eqs. 9, 13): the refined tokens of a region of the full image are matched, token by
token, to the frozen CLIP's dense tokens of the same region cropped out and encoded alone (context free),
with an InfoNCE whose negatives are the other tokens of the same crop.

Choices where the paper is silent (stated here once):
* **output space**: the Refiner's tokens go through the frozen CLIP's own final norm and projection (not
  trained), so refined tokens live in the joint space of the target tokens; the blocks are the only clone.
* **the [CLS] of a region sequence**: the region sequence is ``[cls_i, k*k RoI tokens]`` where
  ``cls_i = (prefix tokens of f_I^A(X)) + FC_cls(RoIAlign_1x1(f_I^A(X), b_i))`` -- the generator's output is
  *added* to the image's own [CLS] token. "RoIPool" is read as average pooling (RoIAlign 1x1 with
  ``aligned=True``, the pooling every other region feature in this library uses).
* **zero init**: the last linear layers of ``FC_inter`` and ``FC_cls`` start at 0, so an untrained Refiner
  with a whole-image box and ``k = h`` reproduces the model's own last ``K`` blocks exactly (tested).
* ``Z_l`` is the output of block ``l`` counted from 1 (``l1, l2 <= N - K``), prefix tokens dropped;
  ``Z_inter`` is added to the patch tokens only. Hidden width of both MLPs: ``hidden`` (paper: 4096).
* RoPE (EVA): the RoI sequence uses the table of a ``k x k`` grid.
* InfoNCE (Eq. 13) on L2-normalised tokens with temperature ``tau`` (default 0.1; the paper writes plain
  dot products). Cosine ablation (Eq. 14) reported as ``1 - mean cos`` (the paper's ``-mean cos`` + 1).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from ovlib.models import roi_features, vit_adapter
from ovlib.models.adapter import ViTAdapter

__all__ = [
    "Refiner",
    "cosine_tokens",
    "crop_images",
    "dense_tokens",
    "infonce_tokens",
    "local_box_generator",
    "sample_local_boxes",
]


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    m = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))
    nn.init.zeros_(m[2].weight)
    nn.init.zeros_(m[2].bias)
    return m


class Refiner(nn.Module):
    """A trainable clone of the last ``num_blocks`` blocks of ``clip``'s image tower (+ Eq. 10/11 heads).

    Args:
        clip: the frozen CLIP (open_clip model or its ``.visual``); its first ``N - K`` blocks, final norm and
            projection are *used* (not copied, not trained); it is not registered as a submodule.
        num_blocks: ``K`` (paper: 4 for ViT-B, 6 for ViT-L).
        inter_layers: ``(l1, l2)`` 1-based block outputs for the intermediate processor (paper: (4, 7) for B,
            (9, 14) for L); ``None`` disables it.
        region_cls: use the region-level [CLS] generator (Eq. 10).
        hidden: hidden width of both MLPs (paper 4096); ``None``: 4096 if the width is >= 512 else 4 x width.
        late: "Late" RoIAlign ablation (Eq. 12): refine the whole image's tokens, RoIAlign the output.
    """

    def __init__(self, clip: nn.Module, num_blocks: int = 4, inter_layers: Sequence[int] | None = (4, 7),
                 region_cls: bool = True, hidden: int | None = None, late: bool = False):
        super().__init__()
        ad = clip if isinstance(clip, ViTAdapter) else vit_adapter(clip)
        n = ad.num_blocks
        if not 1 <= num_blocks <= n:
            raise ValueError(f"Refiner num_blocks must be in [1, {n}] for this {n}-block tower, got {num_blocks}")
        self.start = n - num_blocks
        if inter_layers is not None:
            inter_layers = tuple(int(v) for v in inter_layers)
            if len(inter_layers) != 2 or not all(1 <= v <= self.start for v in inter_layers):
                raise ValueError(f"Refiner inter_layers must be two block numbers in [1, {self.start}] "
                                 f"(inside f_I^A, the first N-K = {self.start} blocks); got {inter_layers}")
        D = ad.width
        hidden = int(hidden) if hidden else (4096 if D >= 512 else 4 * D)
        self.__dict__["_ad"] = ad  # frozen tower: used, not registered
        self.blocks = nn.ModuleList(copy.deepcopy(ad.block(i)) for i in range(self.start, n))
        self.blocks.requires_grad_(True)
        self.inter_layers = inter_layers
        self.inter = _mlp(2 * D, hidden, D) if inter_layers else None
        self.cls_gen = _mlp(D, hidden, D) if region_cls else None
        self.late = bool(late)
        # the architecture, stored so a checkpoint rebuilds the same module (see from_state_dict)
        self.register_buffer("arch", torch.tensor([num_blocks, *(inter_layers or (0, 0)), int(region_cls),
                                                   hidden, int(late)], dtype=torch.long))

    # ------------------------------------------------------------------------------------------- build
    @classmethod
    def from_state_dict(cls, clip: nn.Module, state: dict[str, torch.Tensor], prefix: str = "") -> Refiner:
        """Rebuild a Refiner for ``clip`` from its ``state_dict`` (keys optionally under ``prefix``)."""
        sd = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if "arch" not in sd:
            raise ValueError(f"no Refiner found in the state dict (no '{prefix}arch' key); keys start with "
                             f"{sorted({k.split('.')[0] for k in state})[:8]}")
        K, l1, l2, rc, hidden, late = (int(v) for v in sd["arch"].tolist())
        ref = cls(clip, K, (l1, l2) if l1 else None, bool(rc), hidden, bool(late))
        ref.load_state_dict(sd)
        return ref

    @property
    def adapter(self) -> ViTAdapter:
        return self._ad

    # ------------------------------------------------------------------------------------------- pieces
    @torch.no_grad()
    def early(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int], torch.Tensor | None]:
        """Frozen ``f_I^A``: tokens entering block ``N - K`` ``(B, P+N, D)``, the grid, and the concatenated
        intermediate outputs ``(B, N, 2D)`` of blocks ``l1, l2`` (``None`` without the processor)."""
        ad = self._ad
        x, grid = ad.embed(images)
        rope = ad.rope(grid)
        inter = []
        for i in range(self.start):
            x = ad.block_forward(i, x, rope)
            if self.inter_layers and (i + 1) in self.inter_layers:
                inter.append(x[:, ad.num_prefix:])
        if self.inter_layers:
            inter = self._ordered(inter)
        return x, grid, (torch.cat(inter, dim=-1) if self.inter_layers else None)

    def _ordered(self, outs: list[torch.Tensor]) -> list[torch.Tensor]:
        # outs were collected in block order; return them in (l1, l2) order (l1 may exceed l2; equal repeats)
        l1, l2 = self.inter_layers
        if l1 == l2:
            return [outs[0], outs[0]]
        return outs if l1 < l2 else outs[::-1]

    def run_blocks(self, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        """The cloned blocks on a token sequence ``(B, P+N, D)`` (the tower's own block code)."""
        ad = self._ad
        if ad.family == "open_clip":
            if not ad.batch_first:
                x = x.transpose(0, 1)
                for blk in self.blocks:
                    x = blk(x)
                return x.transpose(0, 1)
            for blk in self.blocks:
                x = blk(x)
            return x
        for blk in self.blocks:
            x = blk(x, rope=rope)
        return x

    # ------------------------------------------------------------------------------------------- forward
    def forward(self, images: torch.Tensor, boxes: Sequence[torch.Tensor], grid: int) -> torch.Tensor:
        """Refined tokens ``(R, grid*grid, C)`` (projected, not normalised) of each box (Eq. 8 / Eq. 12).

        ``boxes``: list (len B) of ``(K_b, 4)`` xyxy in pixels of ``images (B, 3, H, W)``.
        """
        ad, P = self._ad, self._ad.num_prefix
        prefix, base, pmap = self.image_part(images)
        if self.late:  # Eq. 12: refine the whole image, RoIAlign the refined map
            B, _, h, w = pmap.shape
            patch = pmap.flatten(2).transpose(1, 2)  # (B, N, D)
            y = self.run_blocks(torch.cat([prefix, patch], dim=1), ad.rope((h, w)))
            dense = ad.final(y[:, P:]).transpose(1, 2).reshape(B, -1, h, w)  # (B, C, h, w)
            z = roi_features(dense, boxes, images.shape[-2:], output_size=grid)
            z = z[:, :, None, None] if grid == 1 else z
            return z.flatten(2).transpose(1, 2)  # (R, L, C)
        return self.region_part(prefix, base, pmap, boxes, images.shape[-2:], grid)

    def image_part(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What :meth:`forward` computes per image: the prefix tokens of ``f_I^A(X)`` ``(B, P, D)``, its patch map
        ``(B, D, h, w)`` (the region [CLS] generator's input) and the map the regions are cut from, ``f_I^A(X) +
        Z_inter`` ``(B, D, h, w)`` (Eq. 11). A function of each image alone (a frozen Refiner's is cacheable)."""
        P = self._ad.num_prefix
        x, (h, w), inter = self.early(images)  # (B, P+N, D)
        B, _, D = x.shape
        patch = x[:, P:]  # (B, N, D) f_I^A(X)
        base = patch.transpose(1, 2).reshape(B, D, h, w)  # (B, D, h, w)
        if self.inter is not None:
            patch = patch + self.inter(inter)  # Eq. 11
        return x[:, :P], base, patch.transpose(1, 2).reshape(B, D, h, w)

    def region_part(self, prefix: torch.Tensor, base: torch.Tensor, pmap: torch.Tensor,
                    boxes: Sequence[torch.Tensor], image_size: Sequence[int], grid: int) -> torch.Tensor:
        """Refined tokens ``(R, grid*grid, C)`` of each box from :meth:`image_part`'s outputs (Eqs. 8, 10):
        every box is refined on its own (a function of its image's maps and the box alone)."""
        ad, P = self._ad, self._ad.num_prefix
        B = pmap.shape[0]
        counts = [len(b) for b in boxes]
        roi = roi_features(pmap, boxes, image_size, output_size=grid)  # (R, D, k, k)
        roi = roi[:, :, None, None] if grid == 1 else roi
        roi = roi.flatten(2).transpose(1, 2)  # (R, L, D)
        idx = torch.repeat_interleave(torch.arange(B, device=pmap.device), torch.tensor(counts, device=pmap.device))
        pre = prefix[idx]  # (R, P, D) the image's own [CLS] (+ registers)
        if self.cls_gen is not None:  # Eq. 10
            pooled = roi_features(base, boxes, image_size, output_size=1)  # (R, D)
            pre = torch.cat([pre[:, :1] + self.cls_gen(pooled)[:, None], pre[:, 1:]], dim=1)
        y = self.run_blocks(torch.cat([pre, roi], dim=1), ad.rope((grid, grid)))  # (R, P+L, D)
        return ad.final(y[:, P:])  # (R, L, C)

    def dense(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """The refined dense map of whole square images ``(B, C, h, h)``: one whole-image box each, ``k = h``
        (RoIAlign of a whole-image box at the native grid is the identity)."""
        h, w = self._ad.grid(images)
        if h != w:
            raise ValueError(f"Refiner.dense needs a square token grid, got {(h, w)} for images {tuple(images.shape)}")
        H, W = images.shape[-2:]
        boxes = [images.new_tensor([[0.0, 0.0, W, H]]) for _ in range(images.shape[0])]
        z = self(images, boxes, h)  # (B, L, C)
        if normalize:
            z = F.normalize(z, dim=-1)
        return z.transpose(1, 2).reshape(images.shape[0], -1, h, w)


# ----------------------------------------------------------------------------------------------- losses
def infonce_tokens(pred: torch.Tensor, target: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """Eq. 13: token-level InfoNCE within each crop, ``pred, target (R, L, C)``.

    ``-1/R sum_i 1/L sum_j log softmax_k(<p_ij, t_ik> / tau)[j]`` on L2-normalised tokens: the positive of
    token ``j`` is the target token at the same position, the negatives the other tokens of the same crop.
    """
    if pred.ndim != 3 or pred.shape != target.shape:
        raise ValueError(f"infonce_tokens: pred and target must be (R, L, C) alike; got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    if tau <= 0:
        raise ValueError(f"infonce_tokens: tau must be > 0, got {tau}")
    with torch.autocast(device_type=pred.device.type, enabled=False):  # float32 logits also under AMP
        p = F.normalize(pred.float(), dim=-1)
        t = F.normalize(target.float(), dim=-1)
        logits = p @ t.transpose(1, 2) / tau  # (R, L, L)
        return -torch.diagonal(F.log_softmax(logits, dim=-1), dim1=1, dim2=2).mean()


def cosine_tokens(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 14 ablation: ``1 - mean_{i,j} cos(pred_ij, target_ij)`` for ``(R, L, C)``."""
    if pred.ndim != 3 or pred.shape != target.shape:
        raise ValueError(f"cosine_tokens: shapes must be (R, L, C) alike; got {tuple(pred.shape)}, "
                         f"{tuple(target.shape)}")
    return 1.0 - F.cosine_similarity(pred.float(), target.float(), dim=-1).mean()


# ----------------------------------------------------------------------------------------------- crops
def local_box_generator(image_id: int, boxes: torch.Tensor | None = None, seed: int = 0) -> torch.Generator:
    """A CPU generator seeded from the batch only (image id + the image's region boxes, which the data
    pipeline re-samples each epoch), so a resumed run draws exactly the same crops."""
    salt = 0 if boxes is None or boxes.numel() == 0 else round(float(boxes.double().abs().sum()) * 1000)
    return torch.Generator().manual_seed((seed * 1_000_003 + int(image_id) * 7_919 + salt) % (2 ** 63 - 1))


def sample_local_boxes(width: float, height: float, n: int, scale: tuple[float, float],
                       generator: torch.Generator) -> torch.Tensor:
    """``n`` boxes ``(n, 4)`` xyxy px with side lengths ``U(scale) x`` the image side (independently for width
    and height), placed uniformly inside the image (paper: C = 4 crops at scale [0.3, 0.7])."""
    lo, hi = scale
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"crop scale must satisfy 0 < lo <= hi <= 1, got {scale}")
    u = torch.rand(n, 4, generator=generator, dtype=torch.float64)
    bw = (lo + (hi - lo) * u[:, 0]) * width
    bh = (lo + (hi - lo) * u[:, 1]) * height
    x1 = u[:, 2] * (width - bw)
    y1 = u[:, 3] * (height - bh)
    return torch.stack([x1, y1, x1 + bw, y1 + bh], dim=1).float()


def crop_images(images: torch.Tensor, boxes: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """Context-free crops: the pixels inside each box resampled (bilinear RoIAlign) to ``size x size``.

    ``images (B, 3, H, W)``, ``boxes`` list of ``(K_b, 4)`` xyxy px -> ``(R, 3, size, size)``.
    """
    rois = torch.cat([torch.cat([b.new_full((len(b), 1), i), b], 1) for i, b in enumerate(boxes)])
    return roi_align(images, rois.to(images.dtype), output_size=(size, size), spatial_scale=1.0,
                     sampling_ratio=2, aligned=True)


def dense_tokens(dense: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w) -> (B, h*w, C)`` row-major, as given."""
    return dense.flatten(2).transpose(1, 2)
